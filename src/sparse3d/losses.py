"""The paper's weighted softmax cross-entropy with weight 0 for unlabelled voxels (Sec. 2, 3.2).

The mask is applied first: only logits of labelled voxels ever enter the computation, so the
loss and its gradient are exactly blind to whatever the network predicts at unlabelled voxels
(no multiplying of logits by a mask). The loss is normalised by the summed weight of the
labelled voxels, so its scale does not depend on how many voxels are unlabelled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse3d.crop import center_crop


def balanced_class_weights(counts: Sequence[int], power: float = 1.0) -> tuple[float, ...]:
    """Inverse-frequency class weights from labelled-voxel counts, normalised to mean 1.

    Computed from labelled voxels only. Frequent classes (the paper's background) get weights
    below 1, rare ones (the inner tubule) above (Sec. 3.2). ``power`` 1: weight ``1 / count``,
    every class has the same total influence; 0.5: ``1 / sqrt(count)``, a rare class counts
    more than its share but less than a frequent one; 0: no weighting. A class with no labelled
    voxel gets weight 0.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size < 2 or (c < 0).any():
        raise ValueError(f"counts must be a non-negative vector of >= 2 classes, got {counts!r}")
    present = c > 0
    if not present.any():
        raise ValueError("no labelled voxel: cannot compute balanced class weights")
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"the balancing power must lie in [0, 1], got {power}")
    w = np.zeros_like(c)
    w[present] = (c[present].sum() / (present.sum() * c[present])) ** power
    w *= present.sum() / w.sum()
    return tuple(float(v) for v in w)


class MaskedCrossEntropy(nn.Module):
    """Weighted softmax cross-entropy over labelled voxels.

    ``forward(logits (B, K, *s), target (B, *t)) -> scalar`` with ``t >= s``: the target is
    centre-cropped to the logits (valid convolutions); voxels equal to ``ignore_index`` have
    weight 0. Equals ``sum_i w[y_i] * CE_i / sum_i w[y_i]`` over labelled voxels ``i``, i.e.
    plain (weighted) cross-entropy over the labelled voxels alone. A batch without labelled
    voxels gives 0 with a zero gradient, not NaN.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(
                f"class_weights has {len(class_weights)} entries for {num_classes} classes"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        w = torch.ones(num_classes) if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("class_weights", w.float(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, expected {self.num_classes}")
        target = center_crop(target, logits.shape[2:])
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"batch mismatch: logits {logits.shape}, target {target.shape}")
        mask = target != self.ignore_index  # (B, *s)
        if not bool(mask.any()):
            return logits.sum() * 0.0
        picked = logits.movedim(1, -1)[mask]  # (N, K): labelled voxels only
        y = target[mask].long()  # (N,)
        if bool((y < 0).any() | (y >= self.num_classes).any()):
            bad = sorted(set(y[(y < 0) | (y >= self.num_classes)].tolist()))
            raise ValueError(f"target codes {bad} are neither classes nor ignore_index")
        w = self.class_weights.to(picked.device)
        ce = F.cross_entropy(picked.float(), y, reduction="none")  # (N,)
        wy = w[y]
        denom = wy.sum()
        if float(denom) == 0.0:
            return logits.sum() * 0.0
        return (wy * ce).sum() / denom
