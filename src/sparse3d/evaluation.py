"""Whole-volume prediction used for evaluation, for 3D and for the 2D baseline (layer 1).

3D: one pass over the mirror-padded volume when it fits, else the overlap-tile predictor.
2D (the paper's 2D baseline, Sec. 4.1): the 2D network sees every slice of each of the three
orientations (xy, xz, yz) as an independent image; the three softmax volumes are averaged and the
arg-max taken. The 2D net thus predicts every voxel three times, once per orientation, and is
scored on the held-out slices of all orientations like the 3D net.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse3d.inference.tiling import reflect_indices
from sparse3d.models import UNet


def _pad_for_single_pass(net: UNet, spatial: tuple[int, ...]) -> tuple[list[int], tuple[int, ...]]:
    """Input shape for one pass whose output covers ``spatial``; returns (pad pairs, input)."""
    inp = net.input_shape_for_output(spatial)
    out = net.output_shape(inp)
    pads = []
    for n, i, o in zip(spatial, inp, out, strict=True):
        before = (i - o) // 2
        pads.append((before, i - n - before))
    return pads, inp


def _reflect_pad(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Mirror-pad the trailing axes of ``x (B, C, *s)`` as the tiling predictor does
    (:func:`sparse3d.inference.tiling.reflect_indices`, periodic for pads beyond one reflection)."""
    for axis, ((before, after), n) in enumerate(zip(pads, x.shape[2:], strict=True)):
        if before or after:
            idx = torch.from_numpy(reflect_indices(-before, n + before + after, n))
            x = x.index_select(axis + 2, idx.to(x.device))
    return x


@torch.no_grad()
def predict_probabilities_single_pass(net: UNet, image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``image (C, *s)`` -> softmax ``(K, *s)`` from one mirror-padded pass of ``net``."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]
    dev = next(net.parameters()).device
    spatial = tuple(x.shape[2:])
    pads, _ = _pad_for_single_pass(net, spatial)
    xp = _reflect_pad(x.to(dev), pads)
    logits = net(xp)
    out_shape = logits.shape[2:]
    crop = tuple(slice(0, n) for n in spatial)
    # output of a valid net starts at input voxel (in - out) / 2 = pad-before, i.e. voxel 0
    assert all(o >= n for o, n in zip(out_shape, spatial, strict=True))
    return torch.softmax(logits[0].float(), dim=0)[(slice(None), *crop)].cpu()


@torch.no_grad()
def predict_volume_2d(net: UNet, image: np.ndarray, batch: int = 8) -> np.ndarray:
    """Tri-planar 2D prediction: ``image (C, Z, Y, X)`` -> labels ``(Z, Y, X)`` uint8."""
    if net.dim != 2:
        raise ValueError("predict_volume_2d needs a 2D network")
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    c, z, y, xx = x.shape
    acc = torch.zeros(net.num_classes, z, y, xx)
    for axis in (1, 2, 3):  # xy slices along z, xz along y, yz along x
        slices = x.movedim(axis, 0)  # (N, C, H, W)
        probs = []
        for s in slices:
            probs.append(predict_probabilities_single_pass(net, s))  # (K, H, W)
        stacked = torch.stack(probs, 0)  # (N, K, H, W)
        acc += stacked.movedim(0, axis)  # back to (K, Z, Y, X)
    return acc.argmax(0).numpy().astype(np.uint8)


@torch.no_grad()
def predict_volume_3d_single_pass(net: UNet, image: np.ndarray) -> np.ndarray:
    """``image (C, Z, Y, X)`` -> labels ``(Z, Y, X)`` from one mirror-padded pass."""
    return predict_probabilities_single_pass(net, image).argmax(0).numpy().astype(np.uint8)
