"""A plain, conservative memory and compute model of a U-Net pass (layer 1).

The fallback of :class:`~sparse3d.inference.memory.NetProfile`, which traces the real pass
through a private torch hook: this one reads only the network's channel counts and treats
every activation of a level as if it had the tile's full size at that level (valid convolutions
only make them smaller). Peak memory is bounded by what the top level can hold at once (the
synthesis path's concatenation, its inputs and outputs, every skip), so its layouts are safe,
if smaller than the traced model's. Same interface as ``NetProfile``, vectorised over tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from sparse3d.models import UNet

#: Multiplier on the estimated peak for allocator slack and convolution workspaces.
SAFETY = 1.5


def _volume(input_tile) -> np.ndarray | float:
    nz, ny, nx = (np.asarray(v, dtype=np.float64) for v in input_tile)
    return nz * ny * nx


def _out(result: np.ndarray | float) -> np.ndarray | float:
    return float(result) if np.ndim(result) == 0 else result


class PlainProfile:
    """Memory and compute of prediction passes of ``net`` from its channel counts alone."""

    def __init__(self, net: UNet) -> None:
        if net.dim != 3:
            raise ValueError("PlainProfile supports 3D networks")
        self.in_channels = net.in_channels
        self.num_classes = net.num_classes
        self.geometry = net.geometry
        first = next(m for m in net.down[0] if isinstance(m, nn.Conv3d))
        b = first.out_channels  # base channels
        depth = len(net.down)
        # per voxel of the tile: the widest moment of the top level (skip 2b, up-convolution
        # output 4b, their concatenation 6b, a convolution output 2b), plus every deeper skip
        deeper = sum(2 * b * 2**level / 8**level for level in range(1, depth))
        self._live_per_voxel = float(self.in_channels + 14 * b + deeper)
        self._largest_per_voxel = float(6 * b)
        self._macs_per_voxel = self._count_macs(net)

    @staticmethod
    def _count_macs(net: UNet) -> float:
        """Multiply-accumulates per tile voxel: each convolution at its level's resolution."""
        total = 0.0
        levels = [(block, level) for level, block in enumerate(net.down)]
        depth = len(net.down)
        levels += [(up, depth - 2 - i) for i, up in enumerate(net.up)]
        levels += [(net.head, 0)]
        for module, level in levels:
            for m in module.modules():
                if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                    k = float(np.prod(m.kernel_size))
                    per = m.in_channels * m.out_channels * k / 8**level
                    if isinstance(m, nn.ConvTranspose3d):
                        per /= 8  # runs on the coarser level's voxels
                    total += per
        return total

    def host_bytes(self, input_tile) -> np.ndarray | float:
        """Input tile and output logits on the host, float32, times :data:`SAFETY`."""
        v = _volume(input_tile)
        return _out(SAFETY * 4.0 * (self.in_channels + self.num_classes) * v)

    def peak_bytes(self, input_tile, bytes_per_value: int = 4) -> np.ndarray | float:
        """Estimated peak memory of one tile (or arrays of tiles) in bytes."""
        v = _volume(input_tile)
        live = bytes_per_value * self._live_per_voxel * v
        return _out(SAFETY * live + self.host_bytes(input_tile))

    def max_elements(self, input_tile) -> np.ndarray | float:
        """Elements of the largest tensor of a pass over one tile, batch of one."""
        return _out(self._largest_per_voxel * _volume(input_tile))

    def macs(self, input_tile) -> float:
        return float(self._macs_per_voxel * _volume(input_tile))

    def grid_macs(self, sizes_per_axis: Sequence[Sequence[int]]) -> float:
        """Compute of a tile grid with input sizes ``sizes_per_axis[a]`` along axis ``a``."""
        sums = [np.asarray(float(sum(s))) for s in sizes_per_axis]
        counts = [np.asarray(float(len(s))) for s in sizes_per_axis]
        return float(self.grid_macs_from_sums(sums, counts))

    def grid_macs_from_sums(self, sums: Sequence[np.ndarray], counts: Sequence[np.ndarray]):
        """Vectorised :meth:`grid_macs`: the voxels of a grid are the product of the per-axis
        sums of tile sizes (``counts`` are not needed here)."""
        return self._macs_per_voxel * sums[0] * sums[1] * sums[2]
