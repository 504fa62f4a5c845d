"""Writing a volume file (layer 1): :func:`write_volume` checks the arrays against their
metadata and writes image, labels and attributes atomically (the layout is in
:mod:`sparse3d.data.volume`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from sparse3d.atomic import atomic_path
from sparse3d.axes import AXES
from sparse3d.data.volume_meta import VolumeMeta, write_meta

logger = logging.getLogger(__name__)

#: Target chunk shape of the image (C, Z, Y, X); clipped to the volume size.
IMAGE_CHUNKS_CZYX = (1, 32, 64, 64)
#: Target chunk shape of the label datasets (Z, Y, X); clipped to the volume size.
LABEL_CHUNKS_ZYX = (32, 64, 64)
_COMPRESSION = "gzip"
_COMPRESSION_LEVEL = 4


def _chunks(target: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(1, min(t, s)) for t, s in zip(target, shape, strict=True))


def _check_arrays(
    image: np.ndarray,
    label: np.ndarray,
    meta: VolumeMeta,
    dense_label: np.ndarray | None,
    where: str,
) -> None:
    """Validate in-memory arrays against ``meta``; raise ValueError naming ``where``."""
    if image.ndim != 4:
        raise ValueError(f"{where}: image must be 4D (C,Z,Y,X), got shape {image.shape}")
    if label.ndim != 3:
        raise ValueError(f"{where}: label must be 3D (Z,Y,X), got shape {label.shape}")
    if image.shape[1:] != label.shape:
        raise ValueError(
            f"{where}: image spatial shape {image.shape[1:]} != label shape {label.shape}"
        )
    if image.shape[0] != meta.num_channels:
        raise ValueError(
            f"{where}: image has {image.shape[0]} channels but meta names "
            f"{meta.num_channels} ({meta.channel_names})"
        )
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"{where}: image dtype {image.dtype} is not real numeric")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{where}: image contains NaN or Inf values")
    spec = meta.labels
    if not (0 <= spec.ignore_index <= 255 and spec.num_classes <= 255):
        raise ValueError(
            f"{where}: labels are stored as uint8; ignore_index {spec.ignore_index} and "
            f"{spec.num_classes} classes must fit in 0..255"
        )
    for name, arr in (("label", label), ("dense_label", dense_label)):
        if arr is None:
            continue
        if arr.shape != label.shape:
            raise ValueError(f"{where}: {name} shape {arr.shape} != label shape {label.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"{where}: {name} dtype {arr.dtype} is not an integer type")
        bad = spec.invalid_codes(arr)
        if bad:
            raise ValueError(
                f"{where}: {name} has codes {bad[:20]} outside classes 0..{spec.num_classes - 1} "
                f"and ignore value {spec.ignore_index}"
            )
    for ax, n in zip(AXES, label.shape, strict=True):
        idx = meta.annotated_slices[ax]
        out = [i for i in idx if not 0 <= i < n]
        if out:
            raise ValueError(f"{where}: annotated_{ax} indices {out} outside 0..{n - 1}")


def write_volume(
    path: str | os.PathLike[str],
    image: np.ndarray,
    label: np.ndarray,
    meta: VolumeMeta,
    dense_label: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one volume file atomically (:func:`sparse3d.atomic.atomic_path`).

    Args:
        path: output ``.h5`` file.
        image: (C, Z, Y, X) real array, stored as float32; must be finite.
        label: (Z, Y, X) integer array of class codes and ``meta.labels.ignore_index``, stored uint8.
        meta: voxel size, channel names, label vocabulary and annotated slices.
        dense_label: optional (Z, Y, X) dense ground truth, same codes as ``label``.
        overwrite: replace an existing file; without it an existing ``path`` raises FileExistsError.

    Returns:
        The written path.
    """
    target = atomic_path(path, overwrite)  # refuses an existing file or a missing folder now
    path = target.path
    image = np.asarray(image)
    label = np.asarray(label)
    dense = None if dense_label is None else np.asarray(dense_label)
    _check_arrays(image, label, meta, dense, str(path))

    with target as tmp:
        with h5py.File(tmp, "w") as f:
            comp = {"compression": _COMPRESSION, "compression_opts": _COMPRESSION_LEVEL}
            f.create_dataset(
                "image",
                data=image.astype(np.float32, copy=False),
                chunks=_chunks(IMAGE_CHUNKS_CZYX, image.shape),
                shuffle=True,
                **comp,
            )
            label_chunks = _chunks(LABEL_CHUNKS_ZYX, label.shape)
            f.create_dataset(
                "label", data=label.astype(np.uint8, copy=False), chunks=label_chunks, **comp
            )
            if dense is not None:
                f.create_dataset(
                    "dense_label",
                    data=dense.astype(np.uint8, copy=False),
                    chunks=label_chunks,
                    **comp,
                )
            write_meta(f, meta)
    logger.debug("wrote volume %s: image %s, label %s", path, image.shape, label.shape)
    return path
