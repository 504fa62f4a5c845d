"""Compare test-time batch-normalisation modes on a volume with a reference labelling.

Used to decide between the paper's per-tile batch statistics and recalibrated statistics
(``sparse3d.inference.bn``): IoU = TP / (TP + FP + FN) per class on the labelled voxels of the
reference (paper Sec. 4.1), and how many voxels the modes label differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse3d.inference.predictor import Predictor
from sparse3d.metrics import confusion_matrix, iou_summary


def bn_mode_iou(
    net,
    meta,
    image: np.ndarray,
    reference: np.ndarray,
    modes: Sequence[str] = ("recalibrate", "batch"),
    **predictor_kwargs: Any,
) -> dict[str, Any]:
    """Predict ``image (C, Z, Y, X)`` once per BN mode and score each against ``reference``.

    Args:
        net, meta: the trained network and its ``ModelMeta`` (class names, ignore code,
            normalisation).
        image: raw image, normalised as in training.
        reference: ``(Z, Y, X)`` labels; voxels equal to ``meta.ignore_index`` are not counted.
        modes: BN modes to compare (``"recalibrate"``, ``"batch"``, ``"running"``).
        predictor_kwargs: further :class:`Predictor` arguments (e.g. ``input_tile`` to force a
            tiling, ``precision``).

    Returns:
        ``{mode: {"iou": {class: ...}, "mean": ..., "labelled_voxels": ..., "tiles": ...},
        "disagreement": {"<a> vs <b>": fraction of voxels labelled differently}}``.
    """
    out: dict[str, Any] = {}
    labels: dict[str, np.ndarray] = {}
    k = len(meta.class_names)
    for mode in modes:
        pred = Predictor(net, meta, bn_mode=mode, **predictor_kwargs)
        labels[mode], _ = pred.predict_array(image)
        cm = confusion_matrix(labels[mode], reference, k, meta.ignore_index)
        summary = iou_summary(cm, tuple(meta.class_names))
        summary["tiles"] = pred.last_report.num_tiles if pred.last_report else 0
        summary["bn_mode_used"] = pred.last_report.bn_mode if pred.last_report else mode
        out[mode] = summary
    names = list(modes)
    out["disagreement"] = {
        f"{a} vs {b}": float(np.mean(labels[a] != labels[b]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return out
