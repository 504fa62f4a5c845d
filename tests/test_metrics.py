"""IoU on labelled evaluation voxels only (paper Sec. 4.1), hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from sparse3d.metrics import LabelledConfusion, confusion_matrix, iou_from_confusion, iou_summary

IGN = 3


def test_hand_computed_case_with_ignored_voxels_predicted_as_every_class():
    target = np.array([0, 0, 1, 1, 1, 2, IGN, IGN, IGN])
    pred = np.array([0, 1, 1, 1, 2, 2, 0, 1, 2])
    cm = confusion_matrix(pred, target, 3, IGN)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    iou = iou_from_confusion(cm)
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 1, FP 1 -> 1/2
    assert iou.tolist() == [0.5, 0.5, 0.5]
    s = iou_summary(cm, ("inside", "tubule", "background"))
    assert s["mean"] == 0.5 and s["labelled_voxels"] == 6
    assert s["iou"] == {"inside": 0.5, "tubule": 0.5, "background": 0.5}
    assert s["confusion"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]


def test_ignored_predictions_change_nothing():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 1000)
    pred = rng.integers(0, 3, 1000)
    cm0 = confusion_matrix(pred, target, 3, IGN)
    for c in range(3):
        p = pred.copy()
        p[target == IGN] = c
        assert np.array_equal(confusion_matrix(p, target, 3, IGN), cm0)


def test_absent_class_is_nan_and_excluded_from_mean():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3, IGN)
    iou = iou_from_confusion(cm)
    assert iou[0] == 0.5 and iou[1] == 0.5 and math.isnan(iou[2])
    s = iou_summary(cm, ("a", "b", "c"))
    assert s["mean"] == 0.5 and s["iou"]["c"] is None
    json.dumps(s, allow_nan=False)  # JSON without NaN: an absent class is null


def test_summary_readers_take_both_schemas():
    from sparse3d.metrics import summary_class_iou, summary_mean

    new = iou_summary(np.array([[3, 1], [0, 4]]), ("a", "b"))
    old = {"iou/a": new["iou"]["a"], "iou/b": new["iou"]["b"], "iou/mean": new["mean"]}
    assert summary_mean(new) == summary_mean(old) == new["mean"]
    assert summary_class_iou(new) == summary_class_iou(old) == new["iou"]
    assert math.isnan(summary_mean(None)) and math.isnan(summary_mean({"mean": None}))


def test_perfect_and_disjoint():
    t = np.array([0, 1, 2, 2])
    assert iou_from_confusion(confusion_matrix(t, t, 3, IGN)).tolist() == [1.0, 1.0, 1.0]
    assert iou_from_confusion(confusion_matrix((t + 1) % 3, t, 3, IGN)).tolist() == [0, 0, 0]


def test_torchmetrics_accumulator_pools_and_agrees_with_torchmetrics():
    g = torch.Generator().manual_seed(0)
    metric = LabelledConfusion(3, IGN)
    ref = MulticlassJaccardIndex(num_classes=3, ignore_index=IGN, average="none")
    for _ in range(3):
        target = torch.randint(0, 4, (2, 5, 6, 7), generator=g)
        pred = torch.randint(0, 3, (2, 5, 6, 7), generator=g)
        metric.update(pred, target)
        ref.update(pred, target)
    ours = torch.from_numpy(iou_from_confusion(metric.compute().numpy())).float()
    assert torch.allclose(ours, ref.compute().float(), atol=1e-6)
    assert int(metric.confusion.sum()) > 0


def test_bad_prediction_codes():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([5]), np.array([0]), 3, IGN)
