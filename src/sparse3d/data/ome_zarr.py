"""OME-Zarr (NGFF 0.4) output (layer 1): a segmentation written block by block as a labels
multiscale, an image written from a dask array, and the level of a pyramid that fits a budget.

Layout of a segmentation (``seg.ome.zarr``), a zarr v2 group with ``/``-separated chunk keys::

    .zattrs   multiscales: axes z, y, x (space, micrometer); one dataset per level with its
              scale transform (the level-0 voxel size times the level's down-sampling);
              type "nearest" (every level is a stride-2 subsample of the one before)
              image-label: colors and properties (class names) per label value
    0/        level 0 (Z, Y, X), written by the caller block by block
    1/, 2/... level n = level n-1 [::fz, ::2, ::2]

Down-sampling halves y and x at every level and z only while the halved z voxel stays no coarser
than the new y/x voxel (an anisotropic stack keeps its z planes until y/x catch up). Subsampling
picks the first voxel of every 2 (2 x 2 x 2), so voxel centres stay at ``index * scale`` and no
translation is needed. Levels are added while the largest edge exceeds ``min_edge``.

Outputs are written under a temporary name beside the target (``.<name>.<hex>.tmp``) and renamed
when finished; an existing output is refused unless ``overwrite=True``.

Concurrency: :class:`ChunkedWriter` is a small picklable object (a path, the shape and chunks)
that opens the array inside ``__setitem__``, so dask tasks on worker processes may write level 0
concurrently (``dask.array.store(arr, writer.level0, lock=False)``) as long as every write covers
whole chunks, which it checks.

The metadata is written here rather than with ``ome-zarr-py`` (which pulls in s3fs and botocore
and whose default scaler down-samples only y/x); tested with zarr 2.18 and zarr 3.1.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from sparse3d.atomic import commit_dir, temp_name
from sparse3d.data.lazy import ArraySource

__all__ = [
    "NGFF_VERSION",
    "ChunkedWriter",
    "OmeLevel",
    "OmeZarrLabelsWriter",
    "overview_level",
    "pyramid_factors",
    "read_levels",
    "write_image",
]

logger = logging.getLogger(__name__)

NGFF_VERSION = "0.4"
_ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
_V2: dict[str, Any] = {"zarr_format": 2} if _ZARR3 else {}
#: Colours of label values 0, 1, 2, ... (cycled), RGB hex.
_PALETTE = "e6194b 3cb44b 0082c8 ffe119 f58231 911eb4 46f0f0 f032e6 d2f53c 808080".split()


# --------------------------------------------------------------------------------------------
# arrays


def _compressor(dtype: np.dtype):
    from numcodecs import Blosc

    shuffle = Blosc.BITSHUFFLE if np.dtype(dtype).itemsize == 1 else Blosc.SHUFFLE
    return Blosc(cname="zstd", clevel=3, shuffle=shuffle)


def _create_array(path: Path, shape, chunks, dtype) -> None:
    zarr.create(
        shape=tuple(int(n) for n in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=np.dtype(dtype),
        store=str(path),
        compressor=_compressor(dtype),
        fill_value=0,
        dimension_separator="/",
        overwrite=False,
        **_V2,
    )


@dataclass(frozen=True)
class ChunkedWriter:
    """Chunk-aligned region writes into one zarr array, safe from many processes at once.

    ``writer[region] = block`` opens the array by path and writes ``block``; ``region`` is a
    tuple of unit-step slices (one per axis) whose bounds lie on chunk boundaries (or the array's
    end), so no two writers ever touch one chunk. Pickles small (a path, shape and chunks).
    """

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __setitem__(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        if not isinstance(region, tuple) or len(region) != self.ndim:
            raise ValueError(f"{self.path}: expected {self.ndim} slices, got {region!r}")
        for s, n, c in zip(region, self.shape, self.chunks, strict=True):
            start, stop, step = s.indices(n)
            if step != 1 or start % c or (stop % c and stop != n):
                raise ValueError(
                    f"{self.path}: region {region} is not aligned to the chunks {self.chunks}"
                )
        arr = zarr.open_array(store=self.path, mode="r+")
        arr[region] = np.asarray(block, dtype=self.dtype)


def _reader(path: Path, chunks: tuple[int, ...] | None = None) -> da.Array:
    """A stored zarr array as a dask array with ``chunks`` (default: as stored) that reads by
    path on any worker (v2 or v3 metadata)."""
    arr = zarr.open_array(store=str(path), mode="r")
    meta = path / (".zarray" if (path / ".zarray").exists() else "zarr.json")
    stamp = (meta.stat().st_mtime_ns, 0)
    src = ArraySource("zarr", str(path), "", arr.shape, np.dtype(arr.dtype).str, stamp)
    meta_arr = np.empty((0,) * arr.ndim, arr.dtype)
    return da.from_array(src, chunks=chunks or arr.chunks, meta=meta_arr)


# --------------------------------------------------------------------------------------------
# pyramid


def pyramid_factors(
    shape_zyx: tuple[int, int, int],
    voxel_size_zyx_um: tuple[float, float, float],
    min_edge: int = 128,
    max_levels: int = 10,
) -> list[tuple[int, int, int]]:
    """The (z, y, x) down-sampling factor from each level to the next: y and x halve at every
    level, z only while its halved voxel stays no coarser than the new y/x voxel. Levels are
    added while the largest edge exceeds ``min_edge`` (at most ``max_levels`` levels in all)."""
    shape = [int(n) for n in shape_zyx]
    vs = [float(v) for v in voxel_size_zyx_um]
    out: list[tuple[int, int, int]] = []
    while len(out) + 1 < max_levels and max(shape) > min_edge:
        fy, fx = (2 if shape[1] > 1 else 1), (2 if shape[2] > 1 else 1)
        new_yx = min(vs[1] * fy, vs[2] * fx)
        fz = 2 if shape[0] > 1 and vs[0] * 2 <= new_yx * (1 + 1e-6) else 1
        if (fz, fy, fx) == (1, 1, 1):
            break
        out.append((fz, fy, fx))
        shape = [math.ceil(n / f) for n, f in zip(shape, (fz, fy, fx), strict=True)]
        vs = [v * f for v, f in zip(vs, (fz, fy, fx), strict=True)]
    return out


def _build_pyramid(
    root: Path,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: np.dtype,
    scale: tuple[float, ...],
    min_edge: int,
    max_levels: int,
) -> list[dict[str, Any]]:
    """Write levels 1, 2, ... from level 0 (already in ``root/0``), each block by block on
    dask's current scheduler; return the multiscales ``datasets`` entries. A leading channel
    axis (4D) is never down-sampled."""
    lead = len(shape) - 3
    factors = pyramid_factors(shape[lead:], scale[lead:], min_edge, max_levels)  # type: ignore[arg-type]
    datasets = [_dataset("0", scale)]
    for level, f in enumerate(factors, start=1):
        full = (1,) * lead + f
        src = _reader(
            root / str(level - 1), tuple(c * k for c, k in zip(chunks, full, strict=True))
        )
        down = src[tuple(slice(None, None, k) for k in full)]
        shape = tuple(math.ceil(n / k) for n, k in zip(shape, full, strict=True))
        level_chunks = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))
        _create_array(root / str(level), shape, level_chunks, dtype)
        target = ChunkedWriter(str(root / str(level)), shape, level_chunks, np.dtype(dtype).str)
        da.store(down.rechunk(level_chunks), target, lock=False)
        scale = tuple(s * k for s, k in zip(scale, full, strict=True))
        datasets.append(_dataset(str(level), scale))
        logger.info("%s: level %d %s written", root, level, shape)
    return datasets


def _dataset(path: str, scale: tuple[float, ...]) -> dict[str, Any]:
    return {
        "path": path,
        "coordinateTransformations": [{"type": "scale", "scale": [float(s) for s in scale]}],
    }


def _axes(channels: bool) -> list[dict[str, str]]:
    space = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def _multiscales(name: str, axes: list[dict[str, str]], datasets: list[dict[str, Any]]) -> dict:
    return {
        "version": NGFF_VERSION,
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": "nearest",
        "metadata": {"method": "stride subsampling: the first voxel of every 2 along each axis"},
    }


# --------------------------------------------------------------------------------------------
# temporary name, rename


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: output exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output folder {path.parent} does not exist")


def _commit_dir(tmp: Path, path: Path, overwrite: bool) -> Path:
    """Rename the finished store ``tmp`` onto ``path`` (:func:`sparse3d.atomic.commit_dir`)."""
    return commit_dir(tmp, path, overwrite)


# --------------------------------------------------------------------------------------------
# labels


class OmeZarrLabelsWriter:
    """A segmentation written as an OME-Zarr labels multiscale, block by block.

    Args:
        path: the output store (e.g. ``seg.ome.zarr``); written under a temporary name until
            :meth:`finish`.
        shape_zyx: (Z, Y, X) of level 0.
        voxel_size_zyx_um: level-0 voxel size (z, y, x) in micrometres.
        class_names: name of label value k (k = 0, 1, ...), stored as ``image-label`` properties
            with a colour each (napari shows value 0 as its background, transparent).
        chunks_zyx: chunk shape of every level (clipped to the level's shape).
        dtype: label dtype (uint8 up to 256 values).
        overwrite: replace an existing ``path`` at :meth:`finish`; else it is refused now.
        name: the multiscale's name (default: the file name without ``.ome.zarr``/``.zarr``).

    Use: write level 0 with :meth:`write`, :meth:`store` or ``level0`` (a :class:`ChunkedWriter`
    that dask tasks on other processes can write into), then call :meth:`finish`; on an error
    call :meth:`abort` (or use the writer as a context manager, which aborts on an exception).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (one line).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape_zyx: tuple[int, int, int],
        voxel_size_zyx_um: tuple[float, float, float],
        class_names: tuple[str, ...] | list[str],
        chunks_zyx: tuple[int, int, int] = (64, 128, 128),
        dtype: Any = np.uint8,
        overwrite: bool = False,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        if len(shape_zyx) != 3 or min(shape_zyx) < 1:
            raise ValueError(f"{self.path}: shape_zyx must be 3 positive sizes, got {shape_zyx}")
        vs = tuple(float(v) for v in voxel_size_zyx_um)
        if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
            raise ValueError(f"{self.path}: voxel_size_zyx_um must be 3 positive numbers, got {vs}")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "ui":
            raise ValueError(f"{self.path}: label dtype must be an integer type, got {self.dtype}")
        if len(class_names) > np.iinfo(self.dtype).max + 1:
            raise ValueError(f"{self.path}: {len(class_names)} classes do not fit {self.dtype}")
        _check_target(self.path, overwrite)
        self.overwrite = overwrite
        self.shape_zyx = tuple(int(n) for n in shape_zyx)
        self.chunks_zyx = tuple(
            max(1, min(int(c), n)) for c, n in zip(chunks_zyx, self.shape_zyx, strict=True)
        )
        self.voxel_size_zyx_um = vs
        self.class_names = tuple(str(c) for c in class_names)
        self.name = name or self.path.name.removesuffix(".zarr").removesuffix(".ome")
        self.tmp = temp_name(self.path)
        zarr.open_group(str(self.tmp), mode="w", **_V2)
        _create_array(self.tmp / "0", self.shape_zyx, self.chunks_zyx, self.dtype)
        self.level0 = ChunkedWriter(
            str(self.tmp / "0"), self.shape_zyx, self.chunks_zyx, self.dtype.str
        )
        self._done = False

    def write(self, region_zyx: tuple[slice, slice, slice], block: np.ndarray) -> None:
        """Write a chunk-aligned ``block`` (z, y, x) of level 0 at ``region_zyx``."""
        self.level0[tuple(region_zyx)] = block

    def store(self, labels: da.Array | np.ndarray) -> None:
        """Write the whole of level 0 from a (Z, Y, X) array, block by block on dask's current
        scheduler (rechunked to the store's chunks first)."""
        arr = labels if isinstance(labels, da.Array) else da.from_array(labels)
        if tuple(arr.shape) != self.shape_zyx:
            raise ValueError(f"{self.path}: labels shape {arr.shape} != {self.shape_zyx}")
        da.store(arr.rechunk(self.chunks_zyx).astype(self.dtype), self.level0, lock=False)

    def finish(self, min_edge: int = 128, max_levels: int = 10) -> Path:
        """Build the pyramid from level 0, write the metadata and rename the store onto
        ``path``; returns ``path``."""
        try:
            datasets = _build_pyramid(
                self.tmp,
                self.shape_zyx,
                self.chunks_zyx,
                self.dtype,
                self.voxel_size_zyx_um,
                min_edge,
                max_levels,
            )
            group = zarr.open_group(str(self.tmp), mode="a", **_V2)
            group.attrs.update(
                {
                    "multiscales": [_multiscales(self.name, _axes(False), datasets)],
                    "image-label": _image_label(self.class_names),
                }
            )
            _commit_dir(self.tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary store; ``path`` is untouched."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> OmeZarrLabelsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def _image_label(class_names: tuple[str, ...]) -> dict[str, Any]:
    colors = [
        {"label-value": k, "rgba": [*bytes.fromhex(_PALETTE[k % len(_PALETTE)]), 255]}
        for k in range(len(class_names))
    ]
    props = [{"label-value": k, "class": n} for k, n in enumerate(class_names)]
    return {"version": NGFF_VERSION, "colors": colors, "properties": props}


# --------------------------------------------------------------------------------------------
# images


def write_image(
    path: str | os.PathLike[str],
    image: da.Array | np.ndarray,
    voxel_size_zyx_um: tuple[float, float, float],
    channel_names: tuple[str, ...] | list[str] | None = None,
    chunks_zyx: tuple[int, int, int] = (64, 128, 128),
    overwrite: bool = False,
    min_edge: int = 128,
    max_levels: int = 10,
) -> Path:
    """Write a (C, Z, Y, X) image as an OME-Zarr multiscale (axes c, z, y, x; one channel per
    chunk), block by block on dask's current scheduler; returns ``path``.

    The ``omero`` block names the channels and sets each display window from the coarsest
    level's range.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (one line).
    """
    path = Path(path)
    arr = image if isinstance(image, da.Array) else da.from_array(np.asarray(image))
    if arr.ndim != 4:
        raise ValueError(f"{path}: image must be 4D (C, Z, Y, X), got shape {arr.shape}")
    vs = tuple(float(v) for v in voxel_size_zyx_um)
    names = (
        [f"channel_{c}" for c in range(arr.shape[0])] if channel_names is None else channel_names
    )
    if len(names) != arr.shape[0]:
        raise ValueError(f"{path}: {len(names)} channel names for {arr.shape[0]} channels")
    _check_target(path, overwrite)
    shape = tuple(int(n) for n in arr.shape)
    chunks = (1, *(max(1, min(int(c), n)) for c, n in zip(chunks_zyx, shape[1:], strict=True)))
    dtype = np.dtype(arr.dtype)
    tmp = temp_name(path)
    try:
        zarr.open_group(str(tmp), mode="w", **_V2)
        _create_array(tmp / "0", shape, chunks, dtype)
        da.store(
            arr.rechunk(chunks), ChunkedWriter(str(tmp / "0"), shape, chunks, dtype.str), lock=False
        )
        datasets = _build_pyramid(tmp, shape, chunks, dtype, (1.0, *vs), min_edge, max_levels)
        coarse = _reader(tmp / datasets[-1]["path"], chunks)
        lo, hi = da.compute(coarse.min(axis=(1, 2, 3)), coarse.max(axis=(1, 2, 3)))
        omero = {
            "channels": [
                {
                    "label": str(n),
                    "color": "FFFFFF",
                    "active": True,
                    "window": {
                        "start": float(a),
                        "end": float(b),
                        "min": float(a),
                        "max": float(b),
                    },
                }
                for n, a, b in zip(names, lo, hi, strict=True)
            ],
            "rdefs": {"model": "greyscale" if shape[0] == 1 else "color"},
        }
        name = path.name.removesuffix(".zarr").removesuffix(".ome")
        group = zarr.open_group(str(tmp), mode="a", **_V2)
        group.attrs.update(
            {"multiscales": [_multiscales(name, _axes(True), datasets)], "omero": omero}
        )
        return _commit_dir(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# reading levels


@dataclass
class OmeLevel:
    """One level of a multiscale: ``data`` (its dask array, axes as stored: (Z, Y, X) or
    (C, Z, Y, X)), ``index`` (0 = full resolution), ``scale_zyx_um`` (its voxel size) and
    ``factor_zyx`` (level-0 voxels per voxel of this level along each axis)."""

    data: da.Array
    index: int
    scale_zyx_um: tuple[float, float, float]
    factor_zyx: tuple[float, float, float]


def read_levels(path: str | os.PathLike[str]) -> list[OmeLevel]:
    """The levels of an OME-Zarr multiscale store (NGFF 0.4, or 0.5 under ``ome``), finest
    first, each a lazy dask array (chunks as stored)."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        ms = attrs.get("ome", attrs)["multiscales"][0]
    except Exception as err:  # zarr v2/v3 raise different types; missing keys
        raise ValueError(f"{path}: not an OME-Zarr multiscale store ({err})") from None
    levels: list[OmeLevel] = []
    for i, d in enumerate(ms["datasets"]):
        scale = next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")
        zyx = tuple(float(s) for s in scale[-3:])
        base = levels[0].scale_zyx_um if levels else zyx
        factor = tuple(s / b for s, b in zip(zyx, base, strict=True))
        levels.append(OmeLevel(_reader(path / d["path"]), i, zyx, factor))  # type: ignore[arg-type]
    return levels


def overview_level(path: str | os.PathLike[str], max_voxels: int) -> OmeLevel:
    """The finest level of an OME-Zarr multiscale whose spatial voxel count is at most
    ``max_voxels`` (the coarsest level when none is that small): the view to draw an overview
    picture from without reading the full volume."""
    levels = read_levels(path)
    for level in levels:
        if math.prod(level.data.shape[-3:]) <= max_voxels:
            return level
    return levels[-1]
