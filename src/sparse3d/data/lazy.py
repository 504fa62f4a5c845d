"""Lazy readers (layer 1): image and label files as dask arrays that read only the blocks a
computation asks for, so a volume far larger than memory can be processed block by block.

Formats, chosen like the importer (:mod:`sparse3d.data.formats`) by extension:

* HDF5 (``.h5``/``.hdf5``/``.hdf``): a sparse3d volume (its ``image`` (C, Z, Y, X), ``label`` and
  ``dense_label``), or any HDF5 file with a dataset named ``image``, ``raw``, ``data``,
  ``volumes/raw`` or ``exported_data`` (``label``/``labels`` for labels), or the one named as
  ``file.h5/inner/name`` or ``key=``. Array order is (Z, Y, X) / (C, Z, Y, X).
* Zarr (a ``.zarr`` directory, zarr v2 or v3): a plain array, a group holding one array, an
  OME-Zarr multiscale group (level 0; singleton time axes dropped, a ``channel`` axis found), or
  ``store.zarr/name``.
* TIFF (``.tif``/``.tiff``): series 0 through tifffile's zarr store (reads only the strips or
  tiles a block needs; a memory map would pickle its whole content into a dask graph).
* NIfTI (``.nii``/``.nii.gz``) through nibabel's array proxy; a ``.nii.gz`` is decompressed
  from its start for every block (slow but bounded in memory).
* NRRD (``.nrrd``/``.nhdr``): raw-encoded data is memory-mapped inside each read; any other
  encoding is loaded whole once (logged).

Axis order and channel axis follow the importer: ``channel_axis`` is the index of the channel
axis in the array as stored (before NIfTI/NRRD's (x, y, z) are reversed to (z, y, x)); where the
file says which axis holds channels (sparse3d volumes, a TIFF series with a ``C``/``S`` axis, an
OME-Zarr ``channel`` axis, a NIfTI 5th dimension, an NRRD non-spatial ``kind``) it is found
without the argument. A 3D image becomes C = 1. Values keep their stored dtype.

Every returned dask array pickles small: its blocks are read by :class:`ArraySource`, which holds
a path, a key, shape and dtype and opens the file inside ``__getitem__`` (open handles are cached
per process and thread), so graphs run on ``distributed`` worker processes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from sparse3d.data.lazy_sources import (
    ArraySource,
    _fail,
    _Native,
    _native,
    close_handles,
    is_sparse3d_volume,
)
from sparse3d.data.volume import VolumeMeta, open_volume

__all__ = [
    "ArraySource",
    "LazyImage",
    "LazyVolume",
    "auto_chunks",
    "close_handles",
    "is_sparse3d_volume",
    "lazy_volume",
    "open_image",
    "open_image_source",
    "open_labels",
]

#: Spatial voxels per dask chunk the default chunking aims at (128^3; at least 64^3).
TARGET_CHUNK_VOXELS = 128**3


# --------------------------------------------------------------------------------------------
# chunking and reordering


def auto_chunks(
    shape_zyx: tuple[int, ...],
    store_chunks_zyx: tuple[int, ...] | None = None,
    target_voxels: int = TARGET_CHUNK_VOXELS,
) -> tuple[int, int, int]:
    """Default spatial chunks: whole store chunks (a chunk split between dask blocks would be
    decoded once per block), doubled along the smallest axis while the block stays within
    ``target_voxels``; 64^3 to start from where the store has no chunks."""
    chunks = [
        max(1, min(int(store_chunks_zyx[i] if store_chunks_zyx else 64), int(n)))
        for i, n in enumerate(shape_zyx)
    ]
    while math.prod(chunks) * 2 <= target_voxels:
        growable = [i for i in range(3) if chunks[i] < shape_zyx[i]]
        if not growable:
            break
        i = min(growable, key=lambda a: chunks[a])
        chunks[i] = min(chunks[i] * 2, int(shape_zyx[i]))
    return (chunks[0], chunks[1], chunks[2])


def _spatial_chunks(chunks: Any, shape_zyx, store_zyx) -> tuple[int, ...]:
    if chunks is None or chunks == "auto":
        return auto_chunks(shape_zyx, store_zyx)
    if isinstance(chunks, int):
        chunks = (chunks,) * 3
    return tuple(max(1, min(int(c), int(n))) for c, n in zip(chunks, shape_zyx, strict=True))


def _to_dask(native: _Native, channel_axis: int | None, chunks: Any, labels: bool):
    """(C, Z, Y, X) (or (Z, Y, X) for labels) dask array + (z, y, x) spacing in um."""
    path, shape = native.path, native.shape
    kept = [i for i in range(len(shape)) if i not in native.drop]
    hint = f" (axes {native.axes})" if native.axes else ""
    if labels:
        ch = None
        if (
            len(kept) == 4
            and native.channel_hint is not None
            and shape[kept[native.channel_hint]] == 1
        ):
            ch = native.channel_hint  # a single-channel label image
        elif len(kept) != 3:
            raise _fail(path, f"labels must be 3D (Z, Y, X), got shape {shape}{hint}")
    elif len(kept) == 3:
        ch = None
    elif len(kept) == 4:
        ch = native.channel_hint if channel_axis is None else channel_axis
        if ch is None:
            raise _fail(
                path,
                f"expected a 3D array, got shape {shape}{hint}; pass channel_axis "
                "(--channel-axis) for a multi-channel image",
            )
        if not -4 <= ch < 4:
            raise _fail(path, f"channel_axis {ch} out of range for 4 axes")
        ch %= 4
    else:
        raise _fail(path, f"expected a 3D or 4D array, got shape {shape}{hint}")
    spatial = [a for j, a in enumerate(kept) if j != ch]  # native axes, stored order
    if native.reverse:
        spatial = spatial[::-1]
    zyx_shape = tuple(shape[a] for a in spatial)
    store = native.store_chunks
    spatial_chunks = _spatial_chunks(
        chunks[-3:] if isinstance(chunks, tuple | list) else chunks,
        zyx_shape,
        None if store is None else tuple(store[a] for a in spatial),
    )
    native_chunks = [1] * len(shape)
    for a, c in zip(spatial, spatial_chunks, strict=True):
        native_chunks[a] = c
    if ch is not None:
        c_len = shape[kept[ch]]
        given = chunks[0] if isinstance(chunks, tuple | list) and len(chunks) == 4 else c_len
        native_chunks[kept[ch]] = max(1, min(int(given), c_len))
    src = native.source
    arr = da.from_array(
        src,
        chunks=tuple(native_chunks),
        name=f"read-{native.path.name}-{tokenize(src, native_chunks)}",
        meta=np.empty((0,) * len(shape), dtype=src.dtype),
        asarray=True,
        fancy=False,
    )
    if native.drop:
        arr = arr[tuple(0 if i in native.drop else slice(None) for i in range(len(shape)))]
    order = ([kept[ch]] if ch is not None else []) + spatial  # native axes, output order
    arr = arr.transpose([kept.index(a) for a in order])
    if labels and ch is not None:
        arr = arr[0]
    elif not labels and ch is None:
        arr = arr[None]
    spacing = tuple(native.spacing[a] if native.spacing else None for a in spatial)
    return arr, spacing


# --------------------------------------------------------------------------------------------
# public API


@dataclass
class LazyImage:
    """An image opened lazily: ``data`` (C, Z, Y, X) dask array in the stored dtype and the
    (z, y, x) voxel size in um found in the file (None where it has none)."""

    data: da.Array
    spacing_zyx_um: tuple[float | None, float | None, float | None]
    path: Path


def open_image_source(
    path: str | os.PathLike[str],
    channel_axis: int | None = None,
    chunks: int | tuple[int, ...] | None = None,
    key: str | None = None,
) -> LazyImage:
    """Open an image file lazily with its voxel size; see :func:`open_image`."""
    path = Path(path)
    arr, spacing = _to_dask(_native(path, key, labels=False), channel_axis, chunks, labels=False)
    return LazyImage(arr, spacing, path)  # type: ignore[arg-type]


def open_image(
    path: str | os.PathLike[str],
    channel_axis: int | None = None,
    chunks: int | tuple[int, ...] | None = None,
    key: str | None = None,
) -> da.Array:
    """Open an image file as a lazy ``(C, Z, Y, X)`` dask array in its stored dtype.

    Args:
        path: HDF5, Zarr/OME-Zarr, TIFF, NIfTI or NRRD file (see the module docstring);
            ``file.h5/name`` or ``store.zarr/name`` names a member.
        channel_axis: index of the channel axis in the array as stored; None: the one the file
            declares, or none for a 3D array (which becomes C = 1).
        chunks: spatial chunk edge (int), (z, y, x) or (c, z, y, x); None: about 64^3-128^3
            voxels aligned to the store's chunks, all channels in one chunk.
        key: HDF5 dataset or zarr member (instead of naming it in ``path``).

    Raises:
        ConvertError (a ValueError): one line naming the file and the problem, e.g. an HDF5 file
            without an image dataset (the datasets it has are listed).
    """
    return open_image_source(path, channel_axis, chunks, key).data


def open_labels(
    path: str | os.PathLike[str],
    chunks: int | tuple[int, ...] | None = None,
    key: str | None = None,
) -> da.Array:
    """Open a label file as a lazy ``(Z, Y, X)`` dask array (stored dtype).

    HDF5: ``label`` or ``labels`` (a sparse3d volume's sparse ``label``) unless ``key`` or
    ``file.h5/name`` names another; the other formats as :func:`open_image` (a singleton channel
    axis the file declares is dropped).
    """
    path = Path(path)
    arr, _ = _to_dask(_native(path, key, labels=True), None, chunks, labels=True)
    return arr


@dataclass
class LazyVolume:
    """A sparse3d volume opened lazily: ``image`` (C, Z, Y, X) float32, ``label`` and
    ``dense_label`` (Z, Y, X) uint8 dask arrays (``dense_label`` None when the file has none),
    and the metadata (labels spec, annotated slices, voxel size, channel names)."""

    path: Path
    image: da.Array
    label: da.Array
    dense_label: da.Array | None
    meta: VolumeMeta

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        z, y, x = self.label.shape
        return (int(z), int(y), int(x))


def lazy_volume(
    path: str | os.PathLike[str], chunks: int | tuple[int, ...] | None = None
) -> LazyVolume:
    """Open a sparse3d volume file lazily: its structure, shapes and attributes are checked
    (:func:`sparse3d.data.volume.open_volume` with ``scan_values=False``), no voxel is read.

    Raises:
        VolumeFormatError (a ValueError): not a valid volume file.
    """
    path = Path(path)
    with open_volume(path, scan_values=False) as vol:
        meta, has_dense = vol.meta, vol.has_dense_label
    image = open_image(path, chunks=chunks, key="image")
    label = open_labels(path, chunks=image.chunksize[1:], key="label")
    dense = open_labels(path, chunks=image.chunksize[1:], key="dense_label") if has_dense else None
    return LazyVolume(path, image, label, dense, meta)
