"""IoU = TP / (TP + FP + FN) per class, on labelled evaluation voxels only (paper Sec. 4.1).

Voxels whose reference is ``ignore_index`` are dropped before counting, whatever was predicted
there. Counts are accumulated in a confusion matrix so IoU can be pooled over slices, tiles and
volumes; :class:`LabelledConfusion` is the torchmetrics form (summed across DDP processes), and
:func:`iou_summary` the one summary written to ``metrics.json`` and ``densify.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int,
) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = reference class, columns = predicted class.

    ``pred`` and ``target`` have the same shape; voxels with ``target == ignore_index`` are
    excluded.
    """
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long()
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in size: {p.numel()} vs {t.numel()}")
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError("target holds codes that are neither classes nor ignore_index")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError("prediction holds codes outside 0..num_classes-1")
    cm = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix; NaN for a class absent from reference and
    prediction (TP + FP + FN = 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def iou_summary(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The one IoU summary of a voxel set, as written to ``metrics.json`` and ``densify.json``.

    ``{"iou": {class: IoU or None}, "mean": mean over defined classes or None,
    "labelled_voxels": voxels counted, "confusion": (K, K) counts as nested lists}``; a class
    absent from reference and prediction has IoU None (JSON null).
    """
    cm = np.asarray(cm)
    iou = iou_from_confusion(cm)
    defined = np.isfinite(iou)
    return {
        "iou": {
            n: (float(v) if ok else None)
            for n, v, ok in zip(class_names, iou, defined, strict=True)
        },
        "mean": float(np.nanmean(iou)) if defined.any() else None,
        "labelled_voxels": int(cm.sum()),
        "confusion": cm.astype(np.int64).tolist(),
    }


def summary_mean(summary: dict[str, Any] | None) -> float:
    """Mean IoU of a summary (NaN when missing); also reads the ``"iou/mean"`` key of
    ``densify.json`` files written before the summaries were unified."""
    if not summary:
        return float("nan")
    value = summary.get("mean", summary.get("iou/mean"))
    return float("nan") if value is None else float(value)


def summary_class_iou(summary: dict[str, Any] | None) -> dict[str, float]:
    """``{class: IoU}`` of a summary (NaN for undefined); reads older ``"iou/<class>"`` keys."""
    if not summary:
        return {}
    if isinstance(summary.get("iou"), dict):
        items = summary["iou"].items()
    else:
        items = ((k[4:], v) for k, v in summary.items() if k.startswith("iou/") and k != "iou/mean")
    return {n: float("nan") if v is None else float(v) for n, v in items}


class LabelledConfusion(Metric):
    """torchmetrics accumulator of the labelled-voxel confusion matrix.

    ``update(pred (B, *s) int, target (B, *s) int)``; ``compute() -> (K, K)`` pooled counts
    (summed over DDP processes); ``iou_from_confusion`` turns them into per-class IoU.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confusion += torch.from_numpy(cm).to(self.confusion.device)

    def compute(self) -> torch.Tensor:
        return self.confusion.clone()
