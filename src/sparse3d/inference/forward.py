"""A memory-lean forward pass of the U-Net for prediction; same result as ``net(x)``.

``UNet.forward`` keeps every skip connection whole until the end of the pass and the input of each
block alive while the block runs. At prediction time that dominates memory: the first level's skip
(64 channels of the full tile in the paper network) is held through the whole synthesis path
although only its centre crop is used. :func:`lean_forward` runs the same modules in the same order
but (1) crops each skip when it is produced (the crop shapes come from a shape-only pass on the
meta device), (2) frees each block's input after its first module and the up-convolution output
after the concatenation. Peak memory of the paper network drops to about half.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparse3d.crop import center_crop
from sparse3d.models import UNet

Shape = tuple[int, ...]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        if not x.is_contiguous():
            return torch.channels_last_3d
    return torch.contiguous_format


def lean_forward(
    net: UNet,
    x: torch.Tensor,
    skip_shapes: list[Shape] | None = None,
    record: list[Shape] | None = None,
) -> torch.Tensor:
    """``net(x)`` with lower peak memory: ``(B, C, *s) -> (B, K, *net.output_shape(s))``.

    Args:
        net: a ``UNet`` (its ``down``, ``pool``, ``up`` and ``head`` modules are run in the order
            of ``UNet.forward``).
        x: input batch.
        skip_shapes: per level (top first) the spatial shape each skip is cropped to as soon as
            it is produced; None keeps skips whole (cropped when used, as in ``UNet.forward``).
        record: if given, the spatial shape each skip is cropped to is appended (deepest level
            first); used by :class:`SkipShapes` to learn ``skip_shapes``.
    """
    net.output_shape(tuple(x.shape[2:]))  # clear error for an illegal tile
    last = len(net.down) - 1
    skips: list[torch.Tensor] = []
    for i, block in enumerate(net.down):
        for module in block:  # the block input is freed after the first module
            x = module(x)
        if i < last:
            skip = x
            if skip_shapes is not None and tuple(skip.shape[2:]) != tuple(skip_shapes[i]):
                skip = center_crop(x, skip_shapes[i]).contiguous(memory_format=_memory_format(x))
            skips.append(skip)
            del skip
            x = net.pool(x)
    for block in net.up:
        skip = skips.pop()
        h = block.up(x)
        del x
        if record is not None:
            record.append(tuple(h.shape[2:]))
        h = torch.cat([center_crop(skip, h.shape[2:]), h], dim=1)
        del skip
        for module in block.conv:  # the concatenation is freed after the first convolution
            h = module(h)
        x = h
        del h
    return net.head(x)


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` on the meta device (shapes only, no memory, no compute)."""
    return copy.deepcopy(net).to("meta")


class SkipShapes:
    """Crop shapes of the skips of ``net`` for an input shape, from a meta-device pass (cached)."""

    def __init__(self, net: UNet) -> None:
        self._meta = meta_copy(net)
        self._cache: dict[Shape, list[Shape]] = {}

    def __call__(self, spatial: Shape) -> list[Shape]:
        spatial = tuple(int(n) for n in spatial)
        if spatial not in self._cache:
            record: list[Shape] = []
            x = torch.empty((1, self._meta.in_channels, *spatial), device="meta")
            with torch.no_grad():
                lean_forward(self._meta, x, None, record)
            self._cache[spatial] = record[::-1]
        return self._cache[spatial]
