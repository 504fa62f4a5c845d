"""Tile-size arithmetic of a U-Net, valid or same padded (paper Sec. 2).

Pure integer arithmetic, no torch. The model exposes these answers (``UNet.output_shape`` and
friends) so no other module redoes the arithmetic.

For the paper's valid 3D U-Net (depth 4, two 3x3x3 convolutions per level) an input of
132x132x116 voxels (x, y, z) gives 44x44x28; legal input sizes per axis are ``8 b + 60`` for a
bottom-level size ``b >= 4``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetGeometry:
    """Geometry of a U-Net with ``depth`` resolution levels (``depth - 1`` poolings).

    Each level applies ``convs_per_level`` convolutions of size ``kernel``; with ``padding="valid"``
    each removes ``kernel - 1`` voxels per axis, pooling halves, up-convolution doubles.
    """

    depth: int = 4
    padding: str = "valid"
    kernel: int = 3
    convs_per_level: int = 2

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {self.padding!r}")

    @property
    def _shrink(self) -> int:
        return (self.kernel - 1) * self.convs_per_level if self.padding == "valid" else 0

    def output_size(self, n: int) -> int | None:
        """Output length along one axis for input length ``n``, or None if ``n`` is illegal."""
        s = self._shrink
        size = n
        for _ in range(self.depth - 1):  # analysis path
            size -= s
            if size < 2 or size % 2:
                return None
            size //= 2
        size -= s  # bottom level
        if size < 1:
            return None
        for _ in range(self.depth - 1):  # synthesis path
            size = 2 * size - s
            if size < 1:
                return None
        return size

    def skip_sizes(self, n: int) -> list[int]:
        """Per level, top first, the length each skip connection is cropped to for input length
        ``n`` (the up-convolution's output length at that level); ``depth - 1`` entries."""
        if self.output_size(n) is None:
            raise ValueError(f"illegal input length {n}")
        s = self._shrink
        size = n
        for _ in range(self.depth - 1):
            size = (size - s) // 2
        size -= s
        crops = []
        for _ in range(self.depth - 1):
            crops.append(2 * size)
            size = 2 * size - s
        return crops[::-1]

    def is_legal(self, n: int) -> bool:
        return self.output_size(n) is not None

    def smallest_input(self) -> int:
        """Smallest legal input length along one axis."""
        n = 1
        while not self.is_legal(n):
            n += 1
        return n

    def input_for_output(self, wanted: int) -> int:
        """Smallest legal input length whose output length is at least ``wanted``."""
        n = self.smallest_input()
        while self.output_size(n) < wanted:  # type: ignore[operator]
            n += 1
            while not self.is_legal(n):
                n += 1
        return n

    def nearest_legal(self, n: int) -> tuple[int | None, int]:
        """The closest legal input lengths below (None if none) and above ``n``."""
        lo = n - 1
        while lo >= 1 and not self.is_legal(lo):
            lo -= 1
        hi = n + 1
        while not self.is_legal(hi):
            hi += 1
        return (lo if lo >= 1 else None), hi

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Output spatial shape for an input spatial shape; ValueError names legal sizes."""
        out = []
        for axis, n in enumerate(input_shape):
            o = self.output_size(int(n))
            if o is None:
                lo, hi = self.nearest_legal(int(n))
                near = f"{lo} or {hi}" if lo is not None else f"{hi}"
                raise ValueError(
                    f"illegal tile size {n} on spatial axis {axis} of {tuple(input_shape)} for a "
                    f"{self.padding} U-Net of depth {self.depth}; nearest legal sizes: {near}"
                )
            out.append(o)
        return tuple(out)

    def receptive_field(self) -> int:
        """Voxels of input one output voxel sees along an axis (``input - output + 1``).

        For the paper's network this is 89 voxels, i.e. 88 voxels of context: 155 um at 1.76 um
        and 180 um at 2.04 um, the figures of Sec. 2. For ``padding="same"`` the receptive field
        is the same as for the valid network.
        """
        g = UNetGeometry(self.depth, "valid", self.kernel, self.convs_per_level)
        n = g.smallest_input()
        return n - g.output_size(n) + 1  # type: ignore[operator]
