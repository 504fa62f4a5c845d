"""The block readers behind :mod:`sparse3d.data.lazy` (layer 1): :class:`ArraySource`, a
picklable array-like that opens its file inside ``__getitem__`` (handles cached per process and
thread), and one reader per format that finds a file's array, axes, spacing and store chunks
without reading voxels (``_native``). The public functions are in :mod:`sparse3d.data.lazy`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.data.formats import _UNIT_TO_UM, ConvertError, ome_level0

__all__ = ["ArraySource", "close_handles", "is_sparse3d_volume"]

logger = logging.getLogger(__name__)

_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_IMAGE_KEYS = ("image", "raw", "data", "volumes/raw", "exported_data")
_LABEL_KEYS = ("label", "labels")
_HANDLES_PER_THREAD = 8


# --------------------------------------------------------------------------------------------
# the picklable block reader


@dataclass(frozen=True)
class ArraySource:
    """A stored array read block by block: ``source[slices]`` opens (or reuses) the file and
    returns a numpy array. Holds no handle and no data, so it pickles in a few hundred bytes.

    Args:
        kind: ``"hdf5"``, ``"zarr"``, ``"tiff"``, ``"nifti"`` or ``"raw"`` (memory-mapped).
        path: the file (or the ``.zarr`` store folder; for NRRD the raw data file).
        key: HDF5 dataset, zarr member path, TIFF series index; ``""`` when none.
        shape, dtype: of the array as stored (native axis order).
        stamp: ``(mtime_ns, size)`` of the file when opened; a changed file gets a new handle and
            a new dask token.
        extra: format details (raw: byte offset and "C"/"F" order).
    """

    kind: str
    path: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    stamp: tuple[int, int] = (0, 0)
    extra: tuple[Any, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        reader = _handle(self)
        return np.asarray(reader(index))

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return (self.kind, self.path, self.key, self.shape, self.dtype, self.stamp, self.extra)


_local = threading.local()
_all_caches: list[tuple[int, OrderedDict]] = []  # (pid, cache) of every thread, for close_handles
_registry_lock = threading.Lock()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (int(st.st_mtime_ns), int(st.st_size))


def _handle(src: ArraySource):
    """The read function of ``src``'s open file, from this process' and thread's small LRU
    cache (h5py, tifffile and zarr handles are neither fork- nor thread-safe to share)."""
    cache: OrderedDict | None = getattr(_local, "cache", None)
    if cache is None or getattr(_local, "pid", None) != os.getpid():
        cache = _local.cache = OrderedDict()  # after a fork: never touch the parent's handles
        _local.pid = os.getpid()
        with _registry_lock:
            _all_caches.append((os.getpid(), cache))
    key = src.__dask_tokenize__()
    if key in cache:
        cache.move_to_end(key)
        return cache[key][0]
    read, close = _OPENERS[src.kind](src)
    cache[key] = (read, close)
    while len(cache) > _HANDLES_PER_THREAD:
        _, (_, old_close) = cache.popitem(last=False)
        old_close()
    return read


def close_handles() -> None:
    """Close every file the readers hold open in this process (all threads). Call it between
    computations, e.g. before opening an input file for writing (HDF5 refuses a second open in
    another mode); the next read reopens what it needs."""
    with _registry_lock:
        mine = [c for pid, c in _all_caches if pid == os.getpid()]
        _all_caches[:] = [(pid, c) for pid, c in _all_caches if pid == os.getpid()]
    for cache in mine:
        while cache:
            _, (_, close) = cache.popitem(last=False)
            close()


def _open_hdf5(src: ArraySource):
    import h5py

    f = h5py.File(src.path, "r")
    return f[src.key].__getitem__, f.close


def _open_zarr(src: ArraySource):
    import zarr

    arr = zarr.open_array(store=src.path, path=src.key or None, mode="r")
    return arr.__getitem__, lambda: None


def _tiff_zarr(series):
    """The series' level 0 as a zarr array (reads only the strips/tiles asked for), or None
    where tifffile's zarr store is unavailable (it needs zarr 3)."""
    import zarr

    try:
        return zarr.open(series.aszarr(level=0), mode="r")
    except (ValueError, ImportError, TypeError):
        return None


def _tiff_pages(series):
    """Fallback reader of whole pages: ``(read, shape, chunks)``, where a page is the last
    axes of the series (its key frame's shape) and ``read(index)`` reads only the pages
    ``index`` selects along the leading axes."""
    page = tuple(series.keyframe.shape)
    shape = tuple(series.shape)
    lead = shape[: len(shape) - len(page)]
    if shape[len(lead) :] != page:
        raise ValueError(f"TIFF series {shape} is not a stack of {page} pages; install zarr>=3")
    numbers = np.arange(math.prod(lead)).reshape(lead)

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        pages = numbers[index[: len(lead)]]
        data = np.empty(pages.shape + page, series.dtype)
        if pages.size:
            data = np.asarray(series.asarray(key=pages.ravel().tolist())).reshape(data.shape)
        return data[(Ellipsis, *index[len(lead) :])]

    return read, shape, (1,) * len(lead) + page


def _open_tiff(src: ArraySource):
    import tifffile

    tf = tifffile.TiffFile(src.path)
    series = tf.series[int(src.key)]
    arr = _tiff_zarr(series)
    return (arr.__getitem__ if arr is not None else _tiff_pages(series)[0]), tf.close


def _open_nifti(src: ArraySource):
    import nibabel

    proxy = nibabel.load(src.path).dataobj
    return proxy.__getitem__, lambda: None


def _open_raw(src: ArraySource):
    """Uncompressed data at a byte offset (raw NRRD, contiguous TIFF), memory-mapped for each
    read and unmapped after the copy: the map never enters a dask graph, and pages it touched
    do not stay in the process' resident memory (which a worker's memory monitor watches)."""
    offset, order = src.extra

    def read(index):
        mm = np.memmap(src.path, src.dtype, mode="r", offset=offset, shape=src.shape, order=order)
        out = np.array(mm[index])
        del mm  # the last reference: unmapped here (CPython frees it at once)
        return out

    return read, lambda: None


_OPENERS = {
    "hdf5": _open_hdf5,
    "zarr": _open_zarr,
    "tiff": _open_tiff,
    "nifti": _open_nifti,
    "raw": _open_raw,
}


# --------------------------------------------------------------------------------------------
# what a format reader finds


@dataclass
class _Native:
    """A stored array before reordering: its source (or, for a loaded NRRD, its data), whether
    its spatial axes are (x, y, z), the spacing (um) of each axis, a hint of its axes for
    messages, the channel axis the file declares, singleton axes to drop and store chunks."""

    source: ArraySource | np.ndarray
    path: Path
    reverse: bool = False
    spacing: tuple[float | None, ...] = ()
    axes: str = ""
    channel_hint: int | None = None
    drop: tuple[int, ...] = ()
    store_chunks: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.source.shape)


def _fail(path: Path, problem: str) -> ConvertError:
    return ConvertError(" ".join(f"{path}: {problem}".split()))


def _split_member(path: Path, suffixes: tuple[str, ...]) -> tuple[Path, str]:
    """``store.ext/inner/name`` -> (``store.ext``, ``inner/name``); a path without a member is
    returned whole with an empty key."""
    for cand in (path, *path.parents):
        if cand.suffix.lower() in suffixes and cand.exists():
            return cand, path.relative_to(cand).as_posix() if cand != path else ""
    return path, ""


def is_sparse3d_volume(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an HDF5 file with a sparse3d volume's layout (image, label and the
    ``format_version`` root attribute); reads only the file's structure."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "format_version" in f.attrs and "image" in f and "label" in f
    except OSError:
        return False


def _hdf5_datasets(f) -> list[str]:
    import h5py

    found: list[str] = []
    f.visititems(
        lambda n, o: found.append(f"{n} {o.shape}") if isinstance(o, h5py.Dataset) else None
    )
    return found


def _read_hdf5(path: Path, key: str | None, labels: bool) -> _Native:
    import h5py

    path, member = _split_member(path, _H5_SUFFIXES)
    key = key or member or None
    if not path.is_file():
        raise _fail(path, "file does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise _fail(path, f"not a readable HDF5 file (truncated or corrupt?): {err}") from None
    with f:
        volume = "format_version" in f.attrs and "image" in f and "label" in f
        names = (_LABEL_KEYS if labels else _IMAGE_KEYS) if key is None else (key,)
        found = next((n for n in names if isinstance(f.get(n), h5py.Dataset)), None)
        if found is None:
            what = "label" if labels else "image"
            listing = ", ".join(_hdf5_datasets(f)[:12]) or "none"
            raise _fail(
                path,
                f"no {what} dataset {'/'.join(names)}; datasets found: {listing}; "
                f"name one as {path}/<dataset>",
            )
        ds = f[found]
        spacing: tuple[float | None, ...] = (None,) * ds.ndim
        vs = f.attrs.get("voxel_size_zyx_um", f.attrs.get("element_size_um"))
        if vs is not None and len(np.ravel(vs)) == 3:
            spacing = (None,) * (ds.ndim - 3) + tuple(float(v) for v in np.ravel(vs))
        src = ArraySource("hdf5", str(path), found, ds.shape, ds.dtype.str, _stamp(path))
        return _Native(
            src,
            path,
            spacing=spacing,
            channel_hint=0 if volume and found == "image" else None,
            store_chunks=ds.chunks,
        )


def _read_zarr(path: Path, key: str | None) -> _Native:
    import zarr

    root, member = _split_member(path, (".zarr",))
    member = "/".join(p for p in (member, key or "") if p)
    try:
        obj = zarr.open(store=str(root), mode="r")
        if member:
            obj = obj[member]
    except Exception as err:  # zarr v2/v3 raise different types for a missing node
        raise _fail(path, f"not a readable zarr array or group ({err})") from None
    spacing: list[float | None] | None = None
    channel_hint, drop = None, ()
    level0 = None
    if isinstance(obj, zarr.Group):
        level0 = ome_level0(dict(obj.attrs), lambda p, g=obj: g[p].ndim, path)
    if level0 is not None:
        member = "/".join(p for p in (member, level0.path) if p)
        obj = obj[level0.path]
        types = level0.types
        channel_hint = types.index("channel") if types.count("channel") == 1 else None
        drop = tuple(i for i, t in enumerate(types) if t == "time" and obj.shape[i] == 1)
        spacing = None if level0.spacing_um is None else list(level0.spacing_um)
    elif isinstance(obj, zarr.Group):
        names = sorted(obj.array_keys())
        if len(names) != 1:
            listing = ", ".join(names) if names else "none"
            raise _fail(
                path,
                f"zarr group holds {len(names)} arrays ({listing}); name one as {path}/<array>",
            )
        member = "/".join(p for p in (member, names[0]) if p)
        obj = obj[names[0]]
    meta = root / member / (".zarray" if (root / member / ".zarray").exists() else "zarr.json")
    src = ArraySource("zarr", str(root), member, obj.shape, np.dtype(obj.dtype).str, _stamp(meta))
    if channel_hint is not None and drop:
        channel_hint -= sum(d < channel_hint for d in drop)
    spacing_t = tuple(spacing) if spacing else (None,) * len(obj.shape)
    return _Native(
        src, path, spacing=spacing_t, channel_hint=channel_hint, drop=drop, store_chunks=obj.chunks
    )


def _read_tiff(path: Path) -> _Native:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        arr = _tiff_zarr(series)
        shape, chunks = (arr.shape, arr.chunks) if arr is not None else _tiff_pages(series)[1:]
        dtype, axes = np.dtype(series.dtype).newbyteorder(tf.byteorder), series.axes
        offset = series.dataoffset if math.prod(shape) == math.prod(series.shape) else None
        spacing: list[float | None] = [None] * len(shape)
        ij = tf.imagej_metadata or {}
        unit = str(ij.get("unit", "")).replace("\\u00B5", "µ").lower()
        if ij and unit in _UNIT_TO_UM and len(axes) == len(shape):
            tags = series.pages[0].tags if series.pages else tf.pages[0].tags
            for ax, tag in (("X", "XResolution"), ("Y", "YResolution")):
                if ax in axes and tag in tags and tags[tag].value[0]:
                    num, den = tags[tag].value
                    spacing[axes.index(ax)] = den / num * _UNIT_TO_UM[unit]
            if "Z" in axes:
                spacing[axes.index("Z")] = float(ij.get("spacing", 1.0)) * _UNIT_TO_UM[unit]
    chans = [i for i, a in enumerate(axes) if a in "CS"] if len(axes) == len(shape) else []
    src = ArraySource("tiff", str(path), "0", shape, dtype.str, _stamp(path))
    if offset is not None:  # uncompressed and contiguous: read any block directly
        src = ArraySource("raw", str(path), "", shape, dtype.str, _stamp(path), (offset, "C"))
        chunks = None
    return _Native(
        src,
        path,
        spacing=tuple(spacing),
        axes=axes,
        channel_hint=chans[0] if len(chans) == 1 else None,
        store_chunks=chunks,
    )


def _read_nifti(path: Path) -> _Native:
    import nibabel

    try:
        img = nibabel.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types
        raise _fail(path, f"not a readable NIfTI file ({err})") from None
    shape = tuple(int(n) for n in img.shape)
    dtype = np.asarray(img.dataobj[(slice(0, 1),) * len(shape)]).dtype  # after scaling
    zooms = [float(z) for z in img.header.get_zooms()]
    unit = img.header.get_xyzt_units()[0]
    if unit == "unknown":
        logger.warning("%s: no spatial unit recorded; assuming the zooms are in micrometres", path)
    scale = 1.0 if unit == "unknown" else _UNIT_TO_UM.get(str(unit), 1.0)
    spacing = tuple(zooms[i] * scale if i < 3 else None for i in range(len(shape)))
    drop = (3,) if len(shape) == 5 and shape[3] == 1 else ()  # (x, y, z, t=1, c)
    src = ArraySource("nifti", str(path), "", shape, dtype.str, _stamp(path))
    return _Native(
        src,
        path,
        reverse=True,
        spacing=spacing,
        axes="XYZTC"[: len(shape)],
        channel_hint=3 if len(shape) == 5 else None,  # after dropping t
        drop=drop,
    )


def _read_nrrd(path: Path) -> _Native:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as err:  # pynrrd raises NRRDError, OSError, ValueError
        raise _fail(path, f"not a readable NRRD file ({err or type(err).__name__})") from None
    shape = tuple(int(n) for n in header["sizes"])
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(shape))]
    spatial = [k in ("domain", "space") for k in kinds] if len(kinds) == len(shape) else []
    chans = [i for i, s in enumerate(spatial) if not s]
    spacing: list[float | None] = [None] * len(shape)
    rows = header.get("space directions")
    if rows is not None and len(rows) == len(shape):
        spacing = [float(np.linalg.norm(r)) if np.all(np.isfinite(r)) else None for r in rows]
    elif "spacings" in header:
        spacing = [float(s) if np.isfinite(s) else None for s in header["spacings"]]
    units = header.get("space units")
    unit = (
        str(units[0]) if units is not None and len(units) else ("mm" if "space" in header else "")
    )
    spacing = [None if s is None else s * _UNIT_TO_UM.get(unit, 1.0) for s in spacing]
    native = _Native(
        np.empty(0),
        path,
        reverse=True,
        spacing=tuple(spacing),
        axes="".join("S" if s else "C" for s in spatial),
        channel_hint=chans[0] if len(chans) == 1 else None,
    )
    datafile = path.parent / header["data file"] if "data file" in header else path
    skip = int(header.get("byte skip", 0))
    raw = header.get("encoding") == "raw" and int(header.get("line skip", 0)) == 0 and skip >= -1
    if raw:
        dtype = nrrd.reader._determine_datatype(header)
        nbytes = math.prod(shape) * dtype.itemsize
        offset = datafile.stat().st_size - nbytes if skip == -1 or datafile == path else skip
        if offset >= 0:
            extra = (int(offset), "F")
            native.source = ArraySource(
                "raw", str(datafile), "", shape, dtype.str, _stamp(datafile), extra
            )
            return native
    logger.info("%s: %s-encoded NRRD is loaded into memory whole", path, header.get("encoding"))
    native.source, _ = nrrd.read(str(path), index_order="F")
    return native


def _native(path: Path, key: str | None, labels: bool) -> _Native:
    name = path.name.lower()
    if any(p.suffix.lower() in _H5_SUFFIXES for p in (path, *path.parents)):
        return _read_hdf5(path, key, labels)
    if ".zarr" in [p.suffix.lower() for p in (path, *path.parents)]:
        return _read_zarr(path, key)
    if not path.exists():
        raise _fail(path, "file does not exist")
    readers = {
        (".tif", ".tiff"): _read_tiff,
        (".nii", ".nii.gz"): _read_nifti,
        (".nrrd", ".nhdr"): _read_nrrd,
    }
    for ends, reader in readers.items():
        if name.endswith(ends):
            try:
                return reader(path)
            except ConvertError:
                raise
            except Exception as err:  # a corrupt file makes readers fail in any way
                raise _fail(path, f"not a readable file: {type(err).__name__}: {err}") from None
    raise _fail(
        path,
        "unknown format; expected .h5/.hdf5, .zarr, .tif/.tiff, .nii/.nii.gz or .nrrd/.nhdr",
    )
