"""Prediction outputs: the HDF5 result file, a TIFF of the labels and a PNG overview.

Result file layout (``format = "sparse3d-prediction"``, ``format_version`` 1)::

    /labels          uint8            (Z, Y, X)     arg-max class per voxel
    /probabilities   float16|float32  (K, Z, Y, X)  optional softmax per class
    root attributes: format, format_version, class_names, channel_names, voxel_size_zyx_um
                     (if known), source, and how it was predicted (bn_mode, precision, input_tile)

Every file is written under a temporary name in its folder and renamed when complete; an existing
file is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sparse3d.atomic import atomic_path
from sparse3d.atomic import temp_name as temp_name  # re-exported (the predictor's scratch file)
from sparse3d.labels import LabelSpec

logger = logging.getLogger(__name__)

FORMAT = "sparse3d-prediction"
FORMAT_VERSION = 1
LABELS = "labels"
PROBABILITIES = "probabilities"
#: HDF5 chunk cache for the result file: tiles rarely align with chunks.
CHUNK_CACHE_BYTES = 256 * 2**20
#: Voxels of the volume shown in an overview at most (larger volumes are subsampled).
OVERVIEW_MAX_VOXELS = 48_000_000


def check_output(path: str | os.PathLike[str] | None, overwrite: bool) -> Path | None:
    """Refuse an existing output without ``overwrite`` and a missing output folder."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: output exists; pass overwrite=True to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: output is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output folder {path.parent} does not exist")
    return path


def _chunks(shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(1, min(s, t)) for s, t in zip(shape, target, strict=True))


class ResultFile:
    """The HDF5 result being written (under a temporary name until :meth:`commit`).

    ``labels`` and ``probabilities`` are h5py datasets that accept slice assignment, like numpy
    arrays, so a predictor can stream tiles into them.
    """

    def __init__(
        self,
        path: Path,
        shape_zyx: tuple[int, int, int],
        num_classes: int,
        probabilities_dtype: str | None,
        attrs: Mapping[str, Any],
    ) -> None:
        self.path = path
        self._target = atomic_path(path)
        self.tmp = self._target.tmp
        self._file: h5py.File | None = None
        try:
            self._open(shape_zyx, num_classes, probabilities_dtype, attrs)
        except BaseException:
            self.abort()
            raise

    def _open(
        self,
        shape_zyx: tuple[int, int, int],
        num_classes: int,
        probabilities_dtype: str | None,
        attrs: Mapping[str, Any],
    ) -> None:
        self._file = h5py.File(self.tmp, "w", rdcc_nbytes=CHUNK_CACHE_BYTES)
        comp = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
        self.labels = self._file.create_dataset(
            LABELS,
            shape=shape_zyx,
            dtype=np.uint8,
            chunks=_chunks(shape_zyx, (32, 128, 128)),
            **comp,
        )
        self.probabilities = None
        if probabilities_dtype is not None:
            shape = (num_classes, *shape_zyx)
            self.probabilities = self._file.create_dataset(
                PROBABILITIES,
                shape=shape,
                dtype=np.dtype(probabilities_dtype),
                chunks=_chunks(shape, (1, 32, 128, 128)),
                **comp,
            )
        self._file.attrs["format"] = FORMAT
        self._file.attrs["format_version"] = FORMAT_VERSION
        str_dt = h5py.string_dtype()
        for key, value in attrs.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
                self._file.attrs[key] = np.asarray(value, dtype=str_dt)
            else:
                self._file.attrs[key] = value

    def commit(self) -> Path:
        """Close the file and rename it onto ``path``."""
        try:
            self._file.close()
        except BaseException:
            self._target.abort()
            raise
        return self._target.commit()

    def abort(self) -> None:
        """Close and remove the temporary file; ``path`` is untouched."""
        try:
            if self._file is not None:
                self._file.close()
        finally:
            self._target.abort()


def iter_slabs(length: int, step: int) -> Iterator[slice]:
    for z0 in range(0, length, step):
        yield slice(z0, min(length, z0 + step))


def write_tiff(
    path: Path,
    labels,
    voxel_size_zyx_um: tuple[float, float, float] | None,
    overwrite: bool = False,
) -> Path:
    """Write ``labels (Z, Y, X)`` uint8 (numpy array or HDF5 dataset, read slice by slice) as an
    ImageJ TIFF stack with the voxel size in micrometres."""
    path = check_output(path, overwrite)  # type: ignore[assignment]
    import tifffile

    z, y, x = labels.shape
    kwargs: dict[str, Any] = {"imagej": True, "metadata": {"axes": "ZYX"}}
    if voxel_size_zyx_um is not None:
        vz, vy, vx = voxel_size_zyx_um
        kwargs["resolution"] = (1.0 / vx, 1.0 / vy)
        kwargs["metadata"].update({"spacing": float(vz), "unit": "um"})

    def frames() -> Iterator[np.ndarray]:
        for sl in iter_slabs(z, 16):
            block = np.asarray(labels[sl], dtype=np.uint8)
            yield from block

    with atomic_path(path, overwrite) as tmp:
        tifffile.imwrite(tmp, frames(), shape=(z, y, x), dtype=np.uint8, **kwargs)
    return path


def overview_stride(shape_zyx: tuple[int, ...]) -> int:
    """Subsampling step that keeps an overview below :data:`OVERVIEW_MAX_VOXELS`."""
    return max(1, math.ceil((math.prod(shape_zyx) / OVERVIEW_MAX_VOXELS) ** (1 / 3)))


def write_overview(
    path: Path,
    image,
    prediction,
    labels: LabelSpec,
    title: str,
    voxel_size_zyx_um: tuple[float, float, float] | None,
    channel_names: tuple[str, ...] | None,
    overwrite: bool = False,
) -> Path:
    """PNG of orthogonal slices with the prediction overlaid (``sparse3d.viz.save_overview``).

    ``image (C, Z, Y, X)`` and ``prediction (Z, Y, X)`` may be HDF5 datasets; big volumes are read
    with a stride (see :func:`overview_stride`).
    """
    path = check_output(path, overwrite)  # type: ignore[assignment]
    from sparse3d.viz import save_overview

    s = overview_stride(tuple(prediction.shape))
    sub = (slice(None, None, s),) * 3
    img = np.asarray(image[(slice(None), *sub)], dtype=np.float32)
    pred = np.asarray(prediction[sub])
    vs = None if voxel_size_zyx_um is None else tuple(v * s for v in voxel_size_zyx_um)
    if s > 1:
        title = f"{title} (one voxel in {s} along each axis)"
    return save_overview(
        path,
        img,
        None,
        labels,
        title=title,
        prediction=pred,
        voxel_size_zyx_um=vs,
        channel_names=channel_names,
        overwrite=True,
    )
