"""The importer of :mod:`sparse3d.data.convert`, block by block (layer 1): an image and its label
file in any format the lazy readers take (TIFF, Zarr / OME-Zarr, NIfTI, NRRD, HDF5) become a
sparse3d volume file without either being held in memory whole.

Blocks of ``block_zyx`` voxels are read, the label codes mapped (:func:`apply_label_map`) and
both written into the chunked datasets of the volume file, which is renamed into place at the
end. The annotated slices follow :func:`derive_annotated_slices`' rule, from per-plane counts:
fully labelled planes first, then a greedy cover of the labelled voxels outside them (read a
second time, as coordinates: painted sections are thin).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from sparse3d.atomic import atomic_path
from sparse3d.axes import AXES
from sparse3d.data.formats import ConvertError
from sparse3d.data.label_map import apply_label_map, parse_label_map
from sparse3d.data.volume_meta import VolumeMeta, write_meta
from sparse3d.data.volume_write import IMAGE_CHUNKS_CZYX, LABEL_CHUNKS_ZYX, _chunks
from sparse3d.labels import LabelSpec

logger = logging.getLogger(__name__)

#: voxels per block read and written at a time
BLOCK_ZYX = (64, 256, 256)


def _boxes(shape: Sequence[int], block: Sequence[int]):
    ranges = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
    for start in itertools.product(*ranges):
        yield tuple(slice(s, min(n, s + b)) for s, b, n in zip(start, block, shape, strict=True))


def cover_planes(
    points: np.ndarray, shape: Sequence[int], chosen: Sequence[set[int]]
) -> list[set[int]]:
    """The greedy cover of :func:`sparse3d.data.label_map.derive_annotated_slices` on the
    labelled voxels ``points (N, 3)`` outside the fully labelled planes ``chosen``: repeatedly
    the plane (any axis; ties z, then y, then x, then the lowest index) holding most of the
    still-uncovered voxels."""
    chosen = [set(c) for c in chosen]
    rest = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    while len(rest):
        counts = [np.bincount(rest[:, a], minlength=int(shape[a])) for a in range(3)]
        a = int(np.argmax([c.max() for c in counts]))
        i = int(np.argmax(counts[a]))
        chosen[a].add(i)
        rest = rest[rest[:, a] != i]
    return chosen


def convert_lazy(
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
    dense_label_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    block_zyx: Sequence[int] = BLOCK_ZYX,
) -> Path:
    """Import ``image_path`` (3D, or 4D with a channel axis) with ``label_path`` (and an
    optional dense truth, same codes) into the sparse3d volume ``out_path``, block by block.

    Arguments as :func:`sparse3d.data.convert.convert` (without ``boundary_class``, which needs
    whole neighbourhoods). Raises ConvertError (one line) for unreadable input, shapes that
    differ, unmapped codes or non-finite intensities; FileExistsError for an existing output
    without ``overwrite``.
    """
    from sparse3d.data.convert import _channel_names, _resolve_voxel_size
    from sparse3d.data.lazy import open_image_source, open_labels

    image_path, label_path, out_path = Path(image_path), Path(label_path), Path(out_path)
    try:
        labels = LabelSpec(class_names=tuple(class_names), ignore_index=int(ignore_index))
    except ValueError as err:
        raise ConvertError(f"invalid classes: {err}") from None
    mapping = parse_label_map(label_map, labels)
    src = open_image_source(image_path, channel_axis)
    image = src.data
    label = open_labels(label_path)
    shape = tuple(int(n) for n in image.shape[1:])
    sources = {"label": (label, label_path)}
    if dense_label_path is not None:
        sources["dense_label"] = (open_labels(dense_label_path), Path(dense_label_path))
    for arr, where in sources.values():
        if tuple(arr.shape) != shape:
            raise ConvertError(
                f"{where}: label shape (z,y,x) {tuple(arr.shape)} != image shape {shape} from "
                f"{image_path}"
            )
    voxel = _resolve_voxel_size(voxel_size_zyx_um, src.spacing_zyx_um, (None,) * 3, image_path)
    names = _channel_names(channel_names, int(image.shape[0]), image_path)
    target = atomic_path(out_path, overwrite)
    counts = [np.zeros(n, np.int64) for n in shape]
    with target as tmp, h5py.File(tmp, "w") as f:
        comp = {"compression": "gzip", "compression_opts": 4}
        img_ds = f.create_dataset(
            "image", shape=image.shape, dtype=np.float32, shuffle=True,
            chunks=_chunks(IMAGE_CHUNKS_CZYX, tuple(image.shape)), **comp,
        )  # fmt: skip
        lab_chunks = _chunks(LABEL_CHUNKS_ZYX, shape)
        out = {
            key: f.create_dataset(key, shape=shape, dtype=np.uint8, chunks=lab_chunks, **comp)
            for key in sources
        }
        for box in _boxes(shape, block_zyx):
            block = np.asarray(image[(slice(None), *box)], dtype=np.float32)
            if not np.isfinite(block).all():
                raise ConvertError(f"{image_path}: the image holds NaN or infinite values")
            img_ds[(slice(None), *box)] = block
            for key, (arr, where) in sources.items():
                mapped = apply_label_map(np.asarray(arr[box]), mapping, where)
                out[key][box] = mapped
                if key == "label":
                    labelled = mapped != labels.ignore_index
                    for a in range(3):
                        other = tuple(b for b in range(3) if b != a)
                        counts[a][box[a]] += labelled.sum(axis=other)
        annotated = _annotated(out["label"], counts, shape, labels.ignore_index, block_zyx)
        meta = VolumeMeta(voxel, names, labels, annotated)
        write_meta(f, meta)
    logger.info("imported %s + %s into %s block by block: annotated %s", image_path, label_path,
                out_path, annotated)  # fmt: skip
    return target.path


def _annotated(label_ds, counts, shape, ignore: int, block_zyx) -> dict[str, tuple[int, ...]]:
    """The annotated slices from the per-plane label counts (and, where labels lie outside
    every fully labelled plane, their coordinates)."""
    area = [int(np.prod([shape[b] for b in range(3) if b != a])) for a in range(3)]
    chosen = [set(np.flatnonzero(counts[a] == area[a]).tolist()) for a in range(3)]
    n = [len(c) for c in chosen]
    # voxels on the union of the fully labelled planes (inclusion-exclusion), all labelled
    on_full = (
        sum(n[a] * area[a] for a in range(3))
        - (n[0] * n[1] * shape[2] + n[0] * n[2] * shape[1] + n[1] * n[2] * shape[0])
        + n[0] * n[1] * n[2]
    )
    if int(counts[0].sum()) > on_full:  # labels outside them: cover those voxels greedily
        points = []
        for box in _boxes(shape, block_zyx):
            lab = label_ds[box] != ignore
            for a in range(3):
                local = [i - box[a].start for i in chosen[a] if box[a].start <= i < box[a].stop]
                index: list = [slice(None)] * 3
                index[a] = local
                lab[tuple(index)] = False
            idx = np.argwhere(lab)
            if len(idx):
                points.append(idx + np.asarray([s.start for s in box]))
        if points:
            chosen = cover_planes(np.concatenate(points), shape, chosen)
    return {ax: tuple(sorted(int(i) for i in chosen[a])) for a, ax in enumerate(AXES)}
