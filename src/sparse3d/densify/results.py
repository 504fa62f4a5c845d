"""What ``python -m sparse3d.densify`` writes and scores per volume (layer 3): the result file
and picture of a method's probabilities, and the IoU of a result against a dense ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sparse3d.data.volume import VolumeArrays


def write_result(
    vol: VolumeArrays,
    probs: np.ndarray,
    seg: Path,
    png: Path,
    save_probabilities: bool,
    attrs: dict[str, Any],
) -> None:
    """Write ``probs (K, Z, Y, X)`` of ``vol`` as the predictor writes its results: the result
    file (labels, float16 probabilities when asked; temporary name, then renamed) and the
    overview picture."""
    from sparse3d.inference.writers import ResultFile, write_overview

    spec = vol.meta.labels
    labels = probs.argmax(0).astype(np.uint8)
    meta_attrs = {
        "class_names": list(spec.class_names),
        "channel_names": list(vol.meta.channel_names),
        "voxel_size_zyx_um": list(vol.meta.voxel_size_zyx_um),
        "source": str(vol.path),
        **attrs,
    }
    dtype = "float16" if save_probabilities else None
    result = ResultFile(seg, labels.shape, spec.num_classes, dtype, meta_attrs)
    try:
        result.labels[...] = labels
        if result.probabilities is not None:
            result.probabilities[...] = probs
        write_overview(
            png,
            vol.image,
            labels,
            spec,
            title=f"{vol.path.name}: prediction",
            voxel_size_zyx_um=vol.meta.voxel_size_zyx_um,
            channel_names=tuple(vol.meta.channel_names),
            overwrite=True,
        )
        result.commit()
    except BaseException:
        result.abort()
        raise


def score(src: Path, seg: Path) -> dict[str, Any]:
    """IoU of the result file ``seg`` against the dense ground truth of the volume ``src``.

    ``unannotated``: the voxels no annotated plane covers (sparse label == ignore), the paper's
    semi-automated score; ``all_voxels``: every voxel of the truth. Empty without a truth.
    """
    import h5py

    from sparse3d.data.volume import open_volume
    from sparse3d.metrics import confusion_matrix, iou_summary

    full = (slice(None),) * 3
    with open_volume(src, scan_values=False) as vol:
        if not vol.has_dense_label:
            return {}
        spec = vol.meta.labels
        truth = vol.read_dense_label(full)
        label = vol.read_label(full)
    with h5py.File(seg, "r") as f:
        pred = f["labels"][...]
    k, ign, names = spec.num_classes, spec.ignore_index, tuple(spec.class_names)
    annotated = label != ign
    unannotated_truth = np.where(annotated, ign, truth)
    return {
        "unannotated": iou_summary(confusion_matrix(pred, unannotated_truth, k, ign), names),
        "all_voxels": iou_summary(confusion_matrix(pred, truth, k, ign), names),
        "annotated_fraction": float(annotated.mean()),
    }


def iou_line(summary: dict[str, Any]) -> str:
    """``mean 0.812 (a 0.901, b 0.723)`` of an IoU summary."""
    from sparse3d.metrics import summary_class_iou, summary_mean

    per = ", ".join(f"{n} {v:.3f}" for n, v in summary_class_iou(summary).items())
    return f"mean {summary_mean(summary):.3f} ({per})"
