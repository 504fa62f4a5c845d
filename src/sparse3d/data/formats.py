"""Format readers of the importer: TIFF, NIfTI, NRRD and Zarr files as arrays in (Z, Y, X)
order with their voxel spacing in micrometres (layer 1).

Readers, chosen by extension:

* TIFF stacks (``.tif``/``.tiff``, tifffile): array order as stored, spatial axes (Z, Y, X). Voxel
  size from ImageJ metadata (``spacing`` and X/Y resolution with a micron unit) where present.
* NIfTI (``.nii``/``.nii.gz``, nibabel): voxel index order (x, y, z[, c]); transposed to (z, y, x)
  without any reorientation to a world frame. Voxel size from the header zooms and spatial unit
  (an "unknown" unit is taken as micrometres, with a warning).
* NRRD (``.nrrd``/``.nhdr``, pynrrd; 3D Slicer's format, the paper's annotation tool, Sec. 3.1):
  read in (x, y, z) order and transposed. Spacing from ``space directions`` (vector norms) or
  ``spacings``, unit from ``space units`` (an anatomical ``space`` without units means mm).
* Zarr (a ``.zarr`` directory, zarr v2 or v3): an array, a group holding exactly one array, an
  OME-Zarr multiscale group (level 0, its ``scale`` and axis units), or ``store.zarr/name`` for a
  named array inside a group. Array order is (Z, Y, X).

The importer itself is :mod:`sparse3d.data.convert`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_UNIT_TO_UM = {
    "um": 1.0,
    "µm": 1.0,
    "\u03bcm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
}


class ConvertError(ValueError):
    """Bad input to the importer; the one-line message names the file and the problem."""


@dataclass
class SourceArray:
    """An array as a reader returns it.

    ``data`` is in the file's native axis order; ``reverse`` says its spatial axes are (x, y, z)
    (NIfTI, NRRD) rather than (z, y, x); ``spacing_um`` holds the spacing of each native axis in
    micrometres, None where unknown or not spatial; ``axes`` is a hint for messages (e.g. 'ZCYX').
    """

    path: Path
    data: np.ndarray
    reverse: bool
    spacing_um: tuple[float | None, ...]
    axes: str = ""


def _unit_scale(unit: str | None, path: Path, default_note: str) -> float:
    if unit is None or not str(unit).strip():
        logger.warning("%s: no spatial unit recorded; %s", path, default_note)
        return 1.0
    key = str(unit).strip().lower().replace("\\u00b5", "µ")
    if key not in _UNIT_TO_UM:
        raise ConvertError(f"{path}: unknown spatial unit {unit!r}; pass voxel_size_zyx_um")
    return _UNIT_TO_UM[key]


@dataclass(frozen=True)
class OmeLevel0:
    """The finest level of an OME-Zarr multiscale group: its array's ``path`` in the group, the
    ``types`` of its axes (``space``, ``channel``, ``time``; '' when unknown) and the spacing of
    each axis in micrometres (None where not spatial or not recorded)."""

    path: str
    types: tuple[str, ...]
    spacing_um: tuple[float | None, ...] | None


def ome_level0(attrs: dict, ndim_of: Callable[[str], int], path: Path) -> OmeLevel0 | None:
    """The finest level that the group attributes ``attrs`` describe (NGFF 0.4, or 0.5 with its
    ``ome`` key), or None when they hold no ``multiscales``. ``ndim_of(level path)`` gives the
    level's number of dimensions; axes and scale are used when they match it."""
    ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        return None
    ms = ome["multiscales"][0]
    level = ms["datasets"][0]
    ndim = ndim_of(level["path"])
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    if len(axes) != ndim:
        return OmeLevel0(level["path"], ("",) * ndim, None)
    types = tuple(str(a.get("type", "space" if a["name"] in "zyx" else "")) for a in axes)
    scale = next(
        (t["scale"] for t in level.get("coordinateTransformations", []) if t["type"] == "scale"),
        None,
    )
    spacing = None
    if scale is not None and len(scale) == ndim:
        spacing = tuple(
            float(v) * _unit_scale(a.get("unit"), path, "assuming micrometres")
            if t == "space"
            else None
            for a, t, v in zip(axes, types, scale, strict=True)
        )
    return OmeLevel0(level["path"], types, spacing)


def _read_tiff(path: Path) -> SourceArray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        data = series.asarray()
        axes = series.axes
        spacing: list[float | None] = [None] * data.ndim
        ij = tf.imagej_metadata or {}
        unit = str(ij.get("unit", "")).replace("\\u00B5", "µ")
        if ij and unit.lower() in _UNIT_TO_UM and len(axes) == data.ndim:
            scale = _UNIT_TO_UM[unit.lower()]
            tags = series.pages[0].tags if series.pages else tf.pages[0].tags
            for ax, tag in (("X", "XResolution"), ("Y", "YResolution")):
                if ax in axes and tag in tags:
                    num, den = tags[tag].value
                    if num:
                        spacing[axes.index(ax)] = den / num * scale
            if "Z" in axes:
                spacing[axes.index("Z")] = float(ij.get("spacing", 1.0)) * scale
    return SourceArray(path, data, reverse=False, spacing_um=tuple(spacing), axes=axes)


def _read_nifti(path: Path) -> SourceArray:
    import nibabel

    try:
        img = nibabel.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types
        raise ConvertError(f"{path}: not a readable NIfTI file ({err})") from None
    data = np.asarray(img.dataobj)
    zooms = [float(z) for z in img.header.get_zooms()]
    if data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, t=1, c): drop the time axis
        data = data[:, :, :, 0]
        zooms = zooms[:3] + zooms[4:]
    unit = img.header.get_xyzt_units()[0]
    scale = _unit_scale(
        None if unit == "unknown" else unit, path, "assuming the zooms are in micrometres"
    )
    spacing = tuple(zooms[i] * scale if i < 3 else None for i in range(data.ndim))
    return SourceArray(path, data, reverse=True, spacing_um=spacing, axes="XYZC"[: data.ndim])


def _read_nrrd(path: Path) -> SourceArray:
    import nrrd

    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as err:  # pynrrd raises NRRDError, OSError, ValueError
        raise ConvertError(
            f"{path}: not a readable NRRD file ({str(err) or type(err).__name__})"
        ) from None
    ndim = data.ndim
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * ndim)]
    spatial = [k in ("domain", "space") for k in kinds] if len(kinds) == ndim else [True] * ndim
    lengths: list[float | None] = [None] * ndim
    directions = header.get("space directions")
    if directions is not None:
        rows = np.asarray(directions, dtype=float)
        spatial_axes = [i for i in range(ndim) if spatial[i]]
        # one row per axis ("none" rows read as NaN), or, from some writers, per spatial axis
        axis_of_row = list(range(ndim)) if len(rows) == ndim else spatial_axes
        for i, row in zip(axis_of_row, rows, strict=False):
            if spatial[i] and np.all(np.isfinite(row)):
                lengths[i] = float(np.linalg.norm(row))
    elif "spacings" in header:
        for i, s in enumerate(np.asarray(header["spacings"], dtype=float)):
            if spatial[i] and np.isfinite(s):
                lengths[i] = float(s)
    units = header.get("space units")
    if any(v is not None for v in lengths):
        if units is not None and len(units):
            scale = _unit_scale(str(units[0]), path, "")
        elif "space" in header:
            scale = _UNIT_TO_UM["mm"]  # anatomical world spaces are in millimetres
        else:
            scale = _unit_scale(None, path, "assuming the spacing is in micrometres")
        lengths = [None if v is None else v * scale for v in lengths]
    axes = "".join("S" if s else "C" for s in spatial)
    return SourceArray(path, data, reverse=True, spacing_um=tuple(lengths), axes=axes)


def _zarr_object(path: Path) -> tuple[Any, Path]:
    """Open ``path`` with zarr; when it is not a store itself, try ``parent.zarr`` + member."""
    import zarr

    try:
        return zarr.open(str(path), mode="r"), path
    except Exception as err:  # zarr v2/v3 raise different types for a missing node
        for parent in path.parents:
            if parent.suffix == ".zarr" and parent.is_dir():
                member = path.relative_to(parent).as_posix()
                try:
                    return zarr.open(str(parent), mode="r")[member], path
                except Exception:
                    break
        raise ConvertError(f"{path}: not a readable zarr array or group ({err})") from None


def _read_zarr(path: Path) -> SourceArray:
    import zarr

    obj, _ = _zarr_object(path)
    spacing: list[float | None] | None = None
    level0 = None
    if isinstance(obj, zarr.Group):
        level0 = ome_level0(dict(obj.attrs), lambda p, g=obj: g[p].ndim, path)
    if level0 is not None:
        spacing = None if level0.spacing_um is None else list(level0.spacing_um)
        obj = obj[level0.path]
    elif isinstance(obj, zarr.Group):
        names = sorted(obj.array_keys())
        if len(names) != 1:
            listing = ", ".join(names) if names else "none"
            raise ConvertError(
                f"{path}: zarr group holds {len(names)} arrays ({listing}); "
                f"name one as {path}/<array>"
            )
        obj = obj[names[0]]
    data = np.asarray(obj[...])
    if spacing is None or len(spacing) != data.ndim:
        spacing = [None] * data.ndim
    return SourceArray(path, data, reverse=False, spacing_um=tuple(spacing))


def _reader_for(path: Path) -> Callable[[Path], SourceArray]:
    name = path.name.lower()
    if name.endswith((".tif", ".tiff")):
        return _read_tiff
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti
    if name.endswith((".nrrd", ".nhdr")):
        return _read_nrrd
    if ".zarr" in [p.suffix for p in (path, *path.parents)]:
        return _read_zarr
    raise ConvertError(
        f"{path}: unknown format; expected .tif/.tiff, .nii/.nii.gz, .nrrd/.nhdr or a .zarr store"
    )


_FORMAT_NAMES: dict[Callable[[Path], SourceArray], str] = {
    _read_tiff: "TIFF",
    _read_nifti: "NIfTI",
    _read_nrrd: "NRRD",
    _read_zarr: "Zarr",
}


def read_source(path: str | os.PathLike[str]) -> SourceArray:
    """Read an image or label file in its native axis order (see the module docstring).

    Raises:
        ConvertError: one line naming the file, whatever went wrong while reading it.
    """
    path = Path(path)
    reader = _reader_for(path)
    if not path.exists():
        raise ConvertError(f"{path}: file does not exist")
    if reader is not _read_zarr and path.is_dir():
        raise ConvertError(f"{path}: is a directory")
    try:
        return reader(path)
    except ConvertError as err:
        raise ConvertError(" ".join(str(err).split())) from None  # one line
    except Exception as err:  # a corrupt file makes readers fail in any way (IndexError, EOF...)
        msg = " ".join(str(err).split()) or "no details"
        kind = _FORMAT_NAMES.get(reader, "")
        raise ConvertError(
            f"{path}: not a readable {kind} file (truncated or corrupt?): "
            f"{type(err).__name__}: {msg}"
        ) from None


def _to_zyx(
    src: SourceArray, channel_axis: int | None
) -> tuple[np.ndarray, tuple[float | None, ...]]:
    """Return the data as (C, Z, Y, X) (or (Z, Y, X) when ``channel_axis`` is None and the data
    is 3D) plus the (z, y, x) spacing."""
    data, spacing = src.data, list(src.spacing_um)
    hint = f" (axes {src.axes})" if src.axes else ""
    if channel_axis is None:
        if data.ndim != 3:
            raise ConvertError(
                f"{src.path}: expected a 3D array, got shape {data.shape}{hint}; "
                "pass channel_axis (--channel-axis) for a multi-channel image"
            )
        channels = None
    else:
        if data.ndim != 4:
            raise ConvertError(
                f"{src.path}: channel_axis given but the array has shape {data.shape}{hint}; "
                "expected 4 axes (3 spatial + channels)"
            )
        if not -4 <= channel_axis < 4:
            raise ConvertError(f"{src.path}: channel_axis {channel_axis} out of range for 4 axes")
        ax = channel_axis % 4
        data = np.moveaxis(data, ax, 0)
        del spacing[ax]
        channels = data.shape[0]
    if src.reverse:  # (x, y, z) -> (z, y, x)
        data = data.transpose((0, 3, 2, 1)) if channels is not None else data.transpose(2, 1, 0)
        spacing = spacing[::-1]
    return np.ascontiguousarray(data), tuple(spacing)


def read_zyx(
    path: str | os.PathLike[str], channel_axis: int | None = None
) -> tuple[np.ndarray, tuple[float | None, ...]]:
    """Read any supported file as ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` with ``channel_axis``) plus
    its (z, y, x) spacing in um (None where the header has none).

    Raises:
        ConvertError: unreadable file or wrong dimensionality.
    """
    return _to_zyx(read_source(path), channel_axis)
