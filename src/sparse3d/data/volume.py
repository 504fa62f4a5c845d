"""One HDF5 file per volume: multi-channel image, sparse label, optional dense ground truth.

Layout (``format_version`` 1)::

    /image         float32 (C, Z, Y, X)   chunked, gzip-compressed
    /label         uint8   (Z, Y, X)      sparse annotation; ``ignore_index`` marks unlabelled voxels
    /dense_label   uint8   (Z, Y, X)      optional dense ground truth (synthetic data)
    root attributes:
        voxel_size_zyx_um   float64 (3,)  voxel size in micrometres, (z, y, x)
        channel_names       str (C,)
        class_names         str (K,)      class codes are 0..K-1
        ignore_index        int           the code of unlabelled voxels
        annotated_z/_y/_x   int64 (n,)    indices of annotated slices along each axis
        format_version      int

The paper annotates orthogonal xy, xz and yz slices and gives every voxel outside them the label
"unlabeled" (Sec. 3.1); ``annotated_z`` lists the annotated xy slices (indexed along z), ``annotated_y``
the xz slices and ``annotated_x`` the yz slices.

Reading is lazy: :func:`open_volume` validates the file (structure, attributes, shapes, and a
chunk-wise scan of label codes and image values) and returns a :class:`Volume` whose tile reads
touch only the HDF5 chunks they need. :func:`load_volume` reads everything into memory.

This module reads; :class:`VolumeMeta` and the root attributes are in
:mod:`sparse3d.data.volume_meta`, :func:`write_volume` in :mod:`sparse3d.data.volume_write`
(both re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sparse3d.axes import AXES
from sparse3d.data.volume_meta import (
    FORMAT_VERSION,
    VolumeFormatError,
    VolumeMeta,
    read_meta,
)
from sparse3d.data.volume_meta import format_error as _fail
from sparse3d.data.volume_write import IMAGE_CHUNKS_CZYX, LABEL_CHUNKS_ZYX, write_volume

__all__ = [
    "AXES",
    "FORMAT_VERSION",
    "IMAGE_CHUNKS_CZYX",
    "LABEL_CHUNKS_ZYX",
    "Volume",
    "VolumeArrays",
    "VolumeFormatError",
    "VolumeMeta",
    "ZYXSlices",
    "load_volume",
    "open_volume",
    "write_volume",
]

#: Upper bound on the bytes one validation read pulls into memory.
_SCAN_BLOCK_BYTES = 64 * 2**20

ZYXSlices = tuple[slice, slice, slice]


# --------------------------------------------------------------------------------------------
# reading


def _scan_blocks(ds: h5py.Dataset) -> Iterator[np.ndarray]:
    """Yield ``ds`` in slabs along its first spatial axis, aligned to its chunks, each at most
    about ``_SCAN_BLOCK_BYTES`` (never less than one chunk row), so a scan never holds the whole
    array. For a 4D image the slabs are per channel."""
    shape = ds.shape
    lead = 1 if ds.ndim == 4 else 0  # channel axis of an image
    chunk_z = ds.chunks[lead] if ds.chunks is not None else 1
    plane_bytes = int(np.prod(shape[lead + 1 :], dtype=np.int64)) * ds.dtype.itemsize
    step = max(1, _SCAN_BLOCK_BYTES // max(1, plane_bytes * chunk_z)) * chunk_z
    channels = range(shape[0]) if lead else [None]
    for c in channels:
        for z0 in range(0, shape[lead], step):
            sl = slice(z0, min(z0 + step, shape[lead]))
            yield ds[c, sl] if lead else ds[sl]


def _validate(path: Path, f: h5py.File, meta: VolumeMeta, scan_values: bool) -> None:
    for name in ("image", "label"):
        if name not in f:
            raise _fail(path, f"missing dataset '{name}'")
        if not isinstance(f[name], h5py.Dataset):
            raise _fail(path, f"'{name}' is not a dataset")
    image, label = f["image"], f["label"]
    dense = f.get("dense_label")
    if dense is not None and not isinstance(dense, h5py.Dataset):
        raise _fail(path, "'dense_label' is not a dataset")
    if image.ndim != 4:
        raise _fail(path, f"image must be 4D (C,Z,Y,X), got shape {image.shape}")
    if label.ndim != 3:
        raise _fail(path, f"label must be 3D (Z,Y,X), got shape {label.shape}")
    if image.shape[1:] != label.shape:
        raise _fail(path, f"image spatial shape {image.shape[1:]} != label shape {label.shape}")
    if dense is not None and dense.shape != label.shape:
        raise _fail(path, f"dense_label shape {dense.shape} != label shape {label.shape}")
    if image.shape[0] != meta.num_channels:
        raise _fail(
            path,
            f"image has {image.shape[0]} channels but channel_names has {meta.num_channels}",
        )
    if image.dtype.kind != "f":
        raise _fail(path, f"image dtype {image.dtype} is not floating point")
    for name, ds in (("label", label), ("dense_label", dense)):
        if ds is not None and ds.dtype.kind not in "ui":
            raise _fail(path, f"{name} dtype {ds.dtype} is not an integer type")
    for ax, n in zip(AXES, label.shape, strict=True):
        idx = meta.annotated_slices[ax]
        out = [i for i in idx if not 0 <= i < n]
        if out:
            raise _fail(path, f"annotated_{ax} indices {out} outside 0..{n - 1}")
    if not scan_values:
        return
    allowed = np.asarray(meta.labels.allowed_codes())
    for name, ds in (("label", label), ("dense_label", dense)):
        if ds is None:
            continue
        bad: set[int] = set()
        for block in _scan_blocks(ds):
            codes = np.unique(block)
            bad.update(int(c) for c in codes[~np.isin(codes, allowed)])
        if bad:
            raise _fail(
                path,
                f"{name} has codes {sorted(bad)[:20]} outside classes "
                f"0..{meta.labels.num_classes - 1} and ignore value {meta.labels.ignore_index}",
            )
    for block in _scan_blocks(image):
        if not np.all(np.isfinite(block)):
            raise _fail(path, "image contains NaN or Inf values")


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise _fail(path, "file does not exist")
    if path.is_dir():
        raise _fail(path, "is a directory, not an HDF5 volume file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        msg = " ".join(str(err).split())
        raise _fail(path, f"not a readable HDF5 file (truncated or corrupt?): {msg}") from None


class Volume:
    """An open, validated volume file. Tile reads touch only the HDF5 chunks they intersect.

    Attributes:
        path: the file.
        meta: :class:`VolumeMeta` read from the root attributes.
        shape_zyx: spatial shape (Z, Y, X).
        num_channels: C.
        image, label, dense_label: the h5py datasets, (C,Z,Y,X), (Z,Y,X), (Z,Y,X) or None.

    Use as a context manager or call :meth:`close`. A ``Volume`` can be pickled (e.g. into
    DataLoader workers): the copy reopens the file without re-validating it. After a fork the file
    is reopened in the child on first access, since HDF5 handles are not fork-safe.
    """

    def __init__(self, path: str | os.PathLike[str], scan_values: bool = True) -> None:
        self.path = Path(path)
        f = _open_h5(self.path)
        try:
            self.meta = read_meta(self.path, f)
            _validate(self.path, f, self.meta, scan_values)
        except VolumeFormatError:
            f.close()
            raise
        except (OSError, KeyError, RuntimeError) as err:
            f.close()
            msg = " ".join(str(err).split())
            raise _fail(self.path, f"unreadable data (truncated or corrupt?): {msg}") from None
        except BaseException:
            f.close()
            raise
        self._file: h5py.File | None = f
        self._pid = os.getpid()
        self._closed = False
        z, y, x = (int(n) for n in f["label"].shape)
        self.shape_zyx: tuple[int, int, int] = (z, y, x)
        self.num_channels = int(f["image"].shape[0])
        self.has_dense_label = "dense_label" in f

    # -- file handle -------------------------------------------------------------------------
    def _h5(self) -> h5py.File:
        if self._file is not None and self._pid != os.getpid():
            self._file = None  # inherited across fork: do not touch or close the parent's handle
        if self._file is None:
            if self._closed:
                raise ValueError(f"{self.path}: volume is closed")
            self._file = _open_h5(self.path)
            self._pid = os.getpid()
        return self._file

    @property
    def image(self) -> h5py.Dataset:
        """(C, Z, Y, X) float32 dataset."""
        return self._h5()["image"]

    @property
    def label(self) -> h5py.Dataset:
        """(Z, Y, X) uint8 sparse label dataset."""
        return self._h5()["label"]

    @property
    def dense_label(self) -> h5py.Dataset | None:
        """(Z, Y, X) uint8 dense ground truth dataset, or None when the file has none."""
        return self._h5()["dense_label"] if self.has_dense_label else None

    # -- reads ---------------------------------------------------------------------------------
    def _check_slices(self, zyx_slices: ZYXSlices) -> ZYXSlices:
        if len(zyx_slices) != 3 or not all(isinstance(s, slice) for s in zyx_slices):
            raise ValueError(f"{self.path}: expected three slices (z, y, x), got {zyx_slices!r}")
        for s in zyx_slices:
            if s.step not in (None, 1):
                raise ValueError(f"{self.path}: only unit-step slices are supported, got {s}")
        z, y, x = zyx_slices
        return (z, y, x)

    def read_image(self, zyx_slices: ZYXSlices) -> np.ndarray:
        """Read the image tile at ``zyx_slices`` -> (C, z, y, x) float32."""
        sl = self._check_slices(zyx_slices)
        return np.asarray(self.image[(slice(None), *sl)], dtype=np.float32)

    def read_label(self, zyx_slices: ZYXSlices) -> np.ndarray:
        """Read the sparse label tile at ``zyx_slices`` -> (z, y, x) uint8."""
        sl = self._check_slices(zyx_slices)
        return np.asarray(self.label[sl])

    def read_dense_label(self, zyx_slices: ZYXSlices) -> np.ndarray:
        """Read the dense ground truth tile at ``zyx_slices`` -> (z, y, x) uint8."""
        sl = self._check_slices(zyx_slices)
        ds = self.dense_label
        if ds is None:
            raise ValueError(f"{self.path}: volume has no dense_label")
        return np.asarray(ds[sl])

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._closed = True

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"Volume({str(self.path)!r}, channels={self.num_channels}, "
            f"shape_zyx={self.shape_zyx}, classes={self.meta.labels.class_names})"
        )


def open_volume(path: str | os.PathLike[str], scan_values: bool = True) -> Volume:
    """Open and validate a volume file.

    Args:
        path: the ``.h5`` volume file.
        scan_values: also scan label codes and image values chunk-wise (reads the whole file once);
            pass False to check only structure, attributes and shapes (fast, for repeated opens of
            a file already validated).

    Raises:
        VolumeFormatError: missing or unreadable file, missing dataset or attribute, wrong
            dimensionality, shape mismatch, label codes outside the declared classes and ignore
            value, NaN/Inf in the image, or annotated slice indices out of range.
    """
    return Volume(path, scan_values=scan_values)


@dataclass
class VolumeArrays:
    """A whole volume in memory: image (C,Z,Y,X) float32, label (Z,Y,X) uint8, dense_label or None."""

    image: np.ndarray
    label: np.ndarray
    dense_label: np.ndarray | None
    meta: VolumeMeta
    path: Path


def load_volume(path: str | os.PathLike[str]) -> VolumeArrays:
    """Validate and read a whole volume into memory (benchmark-size volumes)."""
    with open_volume(path) as vol:
        full: ZYXSlices = (slice(None), slice(None), slice(None))
        return VolumeArrays(
            image=vol.read_image(full),
            label=vol.read_label(full),
            dense_label=vol.read_dense_label(full) if vol.has_dense_label else None,
            meta=vol.meta,
            path=vol.path,
        )
