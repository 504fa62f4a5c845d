"""Scoring a trained network on whole volumes: one predictor, one IoU summary (layer 1).

Every score of the project comes from here: ``train`` (held-out slices, paper Sec. 4),
``densify`` (the voxels nobody annotated) and ``bench`` alike.

* 3D networks predict through :class:`sparse3d.inference.Predictor` at fp32 — the same tiled,
  memory-budgeted predictor users run, so a large volume cannot exhaust memory after training —
  with test-time batch normalisation from the volume's own statistics (one tile: the paper's
  "batch" statistics exactly; several tiles: recalibrated, seamless).
* The paper's 2D baseline (Sec. 4.1) sees every slice of each of the three orientations (xy, xz,
  yz) as an image; the three softmax volumes are averaged and the arg-max taken. It is scored on
  the held-out slices of all orientations like the 3D net.

IoU summaries have one schema (:func:`sparse3d.metrics.iou_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sparse3d.metrics import confusion_matrix, iou_summary
from sparse3d.mirror import reflect_indices
from sparse3d.models import UNet

#: The voxel sets a training run is scored on (``metrics.json`` keys).
VOXEL_SETS = ("heldout", "heldout_all", "all_voxels")


# -- prediction ------------------------------------------------------------------------------
def predict_labels(net: UNet, image: np.ndarray) -> np.ndarray:
    """``image (C, Z, Y, X)`` (already normalised) -> labels ``(Z, Y, X)`` uint8.

    Runs on the device of ``net``'s parameters; ``net`` itself is not modified."""
    return labeller(net)(image)


def labeller(net: UNet) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`predict_labels` for many volumes: the predictor (a copy of ``net`` and its memory
    model) is built once."""
    if net.dim == 2:
        return lambda image: predict_volume_2d(net, image)
    from sparse3d.inference import Predictor

    device = next(net.parameters()).device
    predictor = Predictor(net, None, precision="fp32", device=device, progress=False)

    def label(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float32)
        return predictor.predict_array(image, normalize=False)[0]

    return label


def _reflect_pad(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Mirror-pad the trailing axes of ``x (B, C, *s)`` by ``(before, after)`` voxels each, as
    the tiled predictor does (periodic beyond one reflection)."""
    for axis, ((before, after), n) in enumerate(zip(pads, x.shape[2:], strict=True)):
        if before or after:
            idx = torch.from_numpy(reflect_indices(-before, n + before + after, n))
            x = x.index_select(axis + 2, idx.to(x.device))
    return x


@torch.no_grad()
def _slice_probabilities(net: UNet, image: torch.Tensor) -> torch.Tensor:
    """One 2D image ``(C, H, W)`` -> softmax ``(K, H, W)`` from one mirror-padded pass."""
    spatial = tuple(image.shape[1:])
    input_tile = net.input_shape_for_output(spatial)  # the whole slice as one tile
    output_tile = net.output_shape(input_tile)
    pads = []
    for n, i, o in zip(spatial, input_tile, output_tile, strict=True):
        before = (i - o) // 2  # a valid net's output starts (in - out) / 2 voxels in
        pads.append((before, i - n - before))
    logits = net(_reflect_pad(image[None], pads))
    crop = tuple(slice(0, n) for n in spatial)
    return torch.softmax(logits[0].float(), dim=0)[(slice(None), *crop)].cpu()


@torch.no_grad()
def predict_volume_2d(net: UNet, image: np.ndarray) -> np.ndarray:
    """Tri-planar 2D prediction: ``image (C, Z, Y, X)`` -> labels ``(Z, Y, X)`` uint8.

    Batch normalisation uses each slice's statistics (``bn_eval_stats``, the paper's choice)."""
    if net.dim != 2:
        raise ValueError("predict_volume_2d needs a 2D network")
    was_training = net.training
    net.eval()
    try:
        dev = next(net.parameters()).device
        x = torch.as_tensor(np.asarray(image, dtype=np.float32)).to(dev)
        _, z, y, xx = x.shape
        acc = torch.zeros(net.num_classes, z, y, xx)
        for axis in (1, 2, 3):  # xy slices along z, xz along y, yz along x
            slices = x.movedim(axis, 0)  # (N, C, H, W)
            stacked = torch.stack([_slice_probabilities(net, s) for s in slices], 0)
            acc += stacked.movedim(0, axis)  # (N, K, H, W) back to (K, Z, Y, X)
    finally:
        net.train(was_training)
    return acc.argmax(0).numpy().astype(np.uint8)


# -- scoring ---------------------------------------------------------------------------------
def score(
    pred: np.ndarray,
    references: Mapping[str, np.ndarray | None],
    class_names: Sequence[str],
    ignore_index: int,
) -> dict[str, np.ndarray | None]:
    """Confusion matrices ``(K, K)`` of ``pred (Z, Y, X)`` against each named reference
    (voxels equal to ``ignore_index`` not counted); None where a reference is missing."""
    k = len(class_names)
    return {
        tag: None if ref is None else confusion_matrix(pred, ref, k, ignore_index)
        for tag, ref in references.items()
    }


def summaries(
    confusions: Mapping[str, np.ndarray | None], class_names: Sequence[str]
) -> dict[str, dict[str, Any] | None]:
    """:func:`~sparse3d.metrics.iou_summary` per voxel set; None for a set with no voxels."""
    return {
        tag: None if cm is None or int(np.asarray(cm).sum()) == 0 else iou_summary(cm, class_names)
        for tag, cm in confusions.items()
    }


def add_confusions(
    total: dict[str, np.ndarray | None], more: Mapping[str, np.ndarray | None]
) -> dict[str, np.ndarray | None]:
    """Pool confusion matrices over volumes (in place into ``total``, which is returned)."""
    for tag, cm in more.items():
        if cm is None:
            total.setdefault(tag, None)
        elif total.get(tag) is None:
            total[tag] = np.array(cm, copy=True)
        else:
            total[tag] = total[tag] + cm
    return total


def evaluate_volumes(
    net: UNet,
    volumes: Sequence[Any],
    class_names: Sequence[str],
    ignore_index: int,
    voxel_sets: Sequence[str] = VOXEL_SETS,
) -> tuple[dict[str, dict[str, Any] | None], dict[str, np.ndarray]]:
    """Predict each volume and score it; returns ``(summaries, {name: labels (Z, Y, X)})``.

    ``volumes``: objects with ``name``, normalised ``image (C, Z, Y, X)``, ``eval_label`` (the
    held-out voxels: test slices less their crossings with training slices, the paper's test),
    ``eval_label_all`` (every voxel of the test slices, or None = ``eval_label``) and
    ``dense_label`` (the dense ground truth, or None). Confusions are pooled over the volumes:
    ``heldout``, ``heldout_all``, ``all_voxels``; ``voxel_sets`` names those to score (the
    periodic evaluation during training scores ``heldout`` only).
    """
    unknown = set(voxel_sets) - set(VOXEL_SETS)
    if unknown:
        raise ValueError(f"unknown voxel sets {sorted(unknown)}: choose from {VOXEL_SETS}")
    total: dict[str, np.ndarray | None] = dict.fromkeys(voxel_sets)
    predictions = {}
    label = labeller(net) if volumes else None
    for vol in volumes:
        pred = label(vol.image)
        refs = {
            "heldout": vol.eval_label,
            "heldout_all": vol.eval_label if vol.eval_label_all is None else vol.eval_label_all,
            "all_voxels": vol.dense_label,
        }
        refs = {tag: refs[tag] for tag in voxel_sets}
        add_confusions(total, score(pred, refs, class_names, ignore_index))
        predictions[vol.name] = pred
    return summaries(total, class_names), predictions
