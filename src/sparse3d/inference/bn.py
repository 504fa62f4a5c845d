"""Test-time batch normalisation for tiled prediction (paper Sec. 2).

The paper normalises with the statistics of the current batch also at test time ("using the
current statistics also at test time works the best" with batch size 1). With tiled prediction
every tile then normalises differently, which shows as seams between tiles and makes the result
depend on the tiling. Three modes:

* ``"batch"``: the paper's choice, statistics of each tile (each batch of tiles).
* ``"running"``: the running statistics accumulated during training (Ioffe & Szegedy).
* ``"recalibrate"`` (the predictor's default): one extra pass over the volume being predicted
  estimates its statistics, which are then fixed for the prediction pass. This keeps the paper's
  idea (statistics of the data at hand, not of the training set) and restores seamless tiling:
  with fixed statistics the tiled result equals one pass over the whole volume. When the volume
  is a single tile, recalibration equals ``"batch"`` exactly and the extra pass is skipped. The
  predictor calibrates over the largest tiles the memory budget allows, whatever tile it predicts
  with: a valid-convolution tile's statistics include its context, which dominates small tiles
  and biases them toward the mirrored borders (measured on a trained model: 98 tiles of
  56x60x60 gave mean IoU 0.47, one whole-volume tile 0.73).

:func:`recalibrate_bn` pools the first and second moments of every normalisation layer's input over
all voxels of all tiles, weighted by voxel count (the law of total variance: within-tile variance
plus the variance of the tile means). A cumulative average of per-tile statistics
(``momentum=None`` in a training-mode pass) gave the same IoU within 0.015 in that measurement;
pooling is exact for the voxels seen and uses the biased variance that batch-statistics
normalisation uses, so one tile reproduces ``"batch"`` exactly. During the pass each layer
normalises with the current tile's statistics, as a training-mode forward does.

Which mode segments best was measured on the 24 (model, volume) pairs of the CPU-preset Tables
1-3 (``experiments/bn_modes.py``, IoU on every voxel): recalibrate 0.625 on average and best in
15 pairs, running 0.605 and best in 9 but erratic (0.42-0.81; with 120 Adam steps the running
averages trail weights that are still moving fast), per-tile with the training tile 0.563 and
never best. Hence ``"recalibrate"`` is the default.

Prediction passes fold fixed statistics into the preceding convolution (one fewer pass over
memory) and apply batch statistics in place (no extra tensor), see :func:`prepare_for_inference`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sparse3d.models.blocks import batch_stats_norm

BN_MODES = ("recalibrate", "batch", "running")


class BatchStatsNorm(nn.Module):
    """In-place normalisation of ``(B, C, *s)`` with the current batch's statistics (training-mode
    batch-norm arithmetic), optionally pooling the statistics over calls.

    Built from a batch-norm layer (shares its affine parameters). With ``accumulate`` the pooled
    count, mean and sum of squared deviations are kept in float64 (Chan et al.'s parallel update).
    """

    def __init__(self, bn: _BatchNorm, accumulate: bool = False) -> None:
        super().__init__()
        self.weight = bn.weight
        self.bias = bn.bias
        self.eps = float(bn.eps)
        self.accumulate = accumulate
        c = bn.num_features
        self.count = 0
        self.mean = torch.zeros(c, dtype=torch.float64)
        self.m2 = torch.zeros(c, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, mean, var = batch_stats_norm(x, self.weight, self.bias, self.eps, inplace=True)
        if self.accumulate:
            n_b = x.numel() // x.shape[1]
            self._pool(n_b, mean.double().cpu(), var.double().cpu())
        return x

    def _pool(self, n_b: int, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + var_b * n_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) over every voxel seen."""
        if self.count == 0:
            raise RuntimeError("no statistics were collected")
        return self.mean, self.m2 / self.count


def _bn_slots(net: nn.Module) -> list[tuple[nn.Module, str, _BatchNorm]]:
    """(parent, attribute name, layer) for every batch-norm layer of ``net``."""
    slots = []
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, _BatchNorm):
                slots.append((parent, name, child))
    return slots


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in net.modules())


def strip_batchnorm(net: nn.Module) -> nn.Module:
    """Replace every batch-norm layer by ``Identity`` in place (shape profiling only)."""
    for parent, name, _ in _bn_slots(net):
        setattr(parent, name, nn.Identity())
    return net


def recalibrate_bn(
    net: nn.Module,
    tiles: Iterable[torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    autocast: AbstractContextManager | None = None,
) -> nn.Module:
    """Set every batch-norm layer's statistics to those of ``tiles`` and fix them (in place).

    Args:
        net: network with batch-norm layers (e.g. a ``UNet`` with ``norm="batch"``).
        tiles: input batches ``(B, C, z, y, x)`` on the network's device, e.g. the tiles of the
            volume to predict; consumed once.
        forward: ``forward(net, x)``; default ``net(x)``.
        autocast: context for each forward (e.g. bf16 autocast), default none.

    Returns:
        ``net``, in eval mode with ``running_mean``/``running_var`` set to the pooled statistics
        (biased variance) and, for a ``UNet``, ``bn_eval_stats="running"``.
    """
    slots = _bn_slots(net)
    if not slots:
        return net
    was_training = net.training
    net.eval()
    accum = [BatchStatsNorm(bn, accumulate=True) for _, _, bn in slots]
    for (parent, name, _), mod in zip(slots, accum, strict=True):
        setattr(parent, name, mod)
    run = forward or (lambda m, x: m(x))
    seen = 0
    try:
        with torch.inference_mode():
            for x in tiles:
                with autocast or nullcontext():
                    run(net, x)
                seen += 1
    finally:
        for parent, name, bn in slots:
            setattr(parent, name, bn)
        if was_training:
            net.train()
    if seen == 0:
        raise ValueError("recalibrate_bn: no tiles given")
    with torch.no_grad():
        for (_, _, bn), mod in zip(slots, accum, strict=True):
            mean, var = mod.pooled()
            bn.running_mean.copy_(mean.to(bn.running_mean))
            bn.running_var.copy_(var.to(bn.running_var))
            bn.num_batches_tracked.fill_(seen)
    if hasattr(net, "bn_eval_stats"):
        net.bn_eval_stats = "running"
    net.eval()
    return net


def fuse_batchnorm(net: nn.Module) -> nn.Module:
    """Fold each batch-norm layer that directly follows a convolution in a ``Sequential`` into
    that convolution (running statistics), in place; the layer becomes ``Identity``."""
    for seq in net.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.modules.conv._ConvNd) and isinstance(bn, _BatchNorm):
                if conv.transposed:
                    continue
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
    if has_batchnorm(net):
        raise ValueError("a batch-norm layer does not follow a convolution; cannot fold it")
    return net


def prepare_for_inference(net: nn.Module, bn_mode: str) -> nn.Module:
    """A copy of ``net`` for prediction passes with the given test-time batch-norm mode.

    ``"running"`` (also used after :func:`recalibrate_bn`): statistics folded into the
    convolutions; ``"batch"``: in-place batch-statistics normalisation (same arithmetic as
    ``PaperBatchNorm`` with ``eval_stats="batch"``, without allocating its output).
    """
    if bn_mode not in ("batch", "running"):
        raise ValueError(f"bn_mode must be 'batch' or 'running' here, got {bn_mode!r}")
    out = copy.deepcopy(net).eval()
    if not has_batchnorm(out):
        return out
    if bn_mode == "running":
        return fuse_batchnorm(out)
    for parent, name, bn in _bn_slots(out):
        setattr(parent, name, BatchStatsNorm(bn, accumulate=False))
    return out
