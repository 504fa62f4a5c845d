"""Tile layouts for whole-volume prediction (paper Sec. 1.1 and 2: seamless overlap-tile).

Valid-convolution networks (the paper's) use the overlap-tile strategy of the 2D u-net: the volume
is mirror-padded at its borders, output tiles are laid edge to edge, and each input tile carries
the context the valid convolutions consume. The result equals one pass of the network over the
whole mirror-padded volume if every tile starts on the network's pooling grid: with ``p = depth - 1``
poolings the input start offset (relative to the padded origin) must be a multiple of
``a = 2**p``, otherwise max pooling sees a different phase. Legal output sizes of the paper net are
``8 b - 28`` (4 mod 8), so the step between tiles is the output size rounded down to a multiple of
``a``; neighbouring output tiles then overlap by a few voxels that carry identical values, and each
voxel is written once. The last tile along an axis may be smaller (any legal size that covers the
rest) or overhang the volume; its overhanging output is cropped.

Same-padded networks get overlapping tiles whose outputs are blended with a smooth window; the
window is 1 on sides that touch the volume border, so every voxel gets a positive weight.

Pure index arithmetic and numpy; the network answers its own geometry (``output_shape`` and
``geometry.is_legal``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# the one mirror-index helper; also imported from here (sparse3d.evaluation)
from sparse3d.mirror import reflect_indices as reflect_indices

ZYX = tuple[int, int, int]


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis, in volume voxel coordinates.

    ``in_start`` (may be negative or run past the volume: mirrored) and ``in_size`` locate the
    input window; ``out_lo:out_hi`` is the part of the volume this tile writes, taken from the
    tile's output at ``crop_lo:crop_lo + (out_hi - out_lo)``. ``weight`` is the blending profile
    over the whole tile output (same-padded networks) or None (valid: written once, no blending).
    """

    in_start: int
    in_size: int
    out_size: int
    out_lo: int
    out_hi: int
    crop_lo: int
    weight: np.ndarray | None = None


@dataclass(frozen=True)
class AxisPlan:
    """The tiles along one axis of length ``length``."""

    length: int
    tiles: tuple[AxisTile, ...]

    @property
    def count(self) -> int:
        return len(self.tiles)

    @property
    def in_sizes(self) -> tuple[int, ...]:
        return tuple(t.in_size for t in self.tiles)


@dataclass(frozen=True)
class Tile:
    """A 3D tile: product of one :class:`AxisTile` per axis (z, y, x)."""

    index: ZYX
    axes: tuple[AxisTile, AxisTile, AxisTile]

    @property
    def input_start(self) -> ZYX:
        """Where the tile's input window starts in the volume (may lie outside: mirrored)."""
        return tuple(a.in_start for a in self.axes)  # type: ignore[return-value]

    @property
    def input_tile(self) -> ZYX:
        """This tile's network input size (the last tile along an axis may be smaller)."""
        return tuple(a.in_size for a in self.axes)  # type: ignore[return-value]

    @property
    def out_slices(self) -> tuple[slice, slice, slice]:
        """Where the tile's result goes in the volume (Z, Y, X)."""
        return tuple(slice(a.out_lo, a.out_hi) for a in self.axes)  # type: ignore[return-value]

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        """Which part of the tile's output goes there."""
        return tuple(  # type: ignore[return-value]
            slice(a.crop_lo, a.crop_lo + a.out_hi - a.out_lo) for a in self.axes
        )

    def weight(self) -> np.ndarray | None:
        """(z, y, x) float32 blending weights over the cropped output, or None (valid nets)."""
        if self.axes[0].weight is None:
            return None
        w = [a.weight[self.crop_slices[i]] for i, a in enumerate(self.axes)]  # type: ignore[index]
        return (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """All tiles of a volume of shape ``shape_zyx``, z-major order."""

    shape_zyx: ZYX
    axes: tuple[AxisPlan, AxisPlan, AxisPlan]
    padding: str

    @property
    def tiles(self) -> list[Tile]:
        out = []
        for idx in itertools.product(*(range(a.count) for a in self.axes)):
            axes = tuple(a.tiles[i] for a, i in zip(self.axes, idx, strict=True))
            out.append(Tile(index=idx, axes=axes))  # type: ignore[arg-type]
        return out

    @property
    def num_tiles(self) -> int:
        return math.prod(a.count for a in self.axes)

    @property
    def input_tile(self) -> ZYX:
        """The largest input tile (the first along each axis)."""
        return tuple(a.tiles[0].in_size for a in self.axes)  # type: ignore[return-value]

    @property
    def grid_zyx(self) -> ZYX:
        return tuple(a.count for a in self.axes)  # type: ignore[return-value]

    def input_voxels(self) -> int:
        """Input voxels summed over all tiles (a proxy of the compute)."""
        return math.prod(sum(a.in_sizes) for a in self.axes)


# ---------------------------------------------------------------------------------------------
# mirror padding


def read_mirrored(
    read: Callable[[tuple[slice, slice, slice]], np.ndarray],
    shape_zyx: Sequence[int],
    start_zyx: Sequence[int],
    size_zyx: Sequence[int],
) -> np.ndarray:
    """Read the window ``start .. start + size`` of a volume, mirrored at its borders.

    ``read(zyx_slices) -> (C, z, y, x)`` reads an in-bounds box (a numpy view or an HDF5 read);
    only the bounding box of the needed voxels is read (mirror indices:
    :func:`sparse3d.mirror.reflect_indices`). Returns ``(C, *size_zyx)``.
    """
    idx = [reflect_indices(s, n, L) for s, n, L in zip(start_zyx, size_zyx, shape_zyx, strict=True)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    block = read(box)
    for axis, (i, b) in enumerate(zip(idx, box, strict=True)):
        local = i - b.start
        if not (len(local) == block.shape[axis + 1] and np.array_equal(local, np.arange(len(i)))):
            block = np.take(block, local, axis=axis + 1)
    return block


# ---------------------------------------------------------------------------------------------
# per-axis layouts


def valid_axis_plan(
    length: int,
    in_size: int,
    output_size: Callable[[int], int | None],
    align: int,
    shrink_last: bool = True,
) -> AxisPlan:
    """Edge-to-edge output tiles along one axis for a valid-convolution network.

    Args:
        length: voxels along the axis.
        in_size: legal input tile size.
        output_size: the network's output size for an input size (None if illegal).
        align: pooling grid ``2**(depth - 1)``; tile input starts are multiples of it relative
            to the padded origin.
        shrink_last: let the last tile be the smallest legal size that covers the rest.
    """
    out = output_size(in_size)
    if out is None:
        raise ValueError(f"illegal tile size {in_size}")
    context = in_size - out
    if context % 2:
        raise ValueError(f"input {in_size} and output {out} differ by an odd number of voxels")
    lo_ctx = context // 2
    step = out - out % align
    if step <= 0:
        raise ValueError(
            f"tile {in_size} gives output {out} < the pooling grid {align}; use a larger tile"
        )
    count = 1 if out >= length else 1 + math.ceil((length - out) / step)
    tiles = []
    for t in range(count):
        start = t * step  # output start in volume coordinates; input start is start - lo_ctx
        n = in_size
        if t == count - 1 and shrink_last:
            need = length - start
            n = _smallest_input_for(need, output_size, in_size)
        o = output_size(n)
        if o is None or n - o != context:
            raise ValueError(f"tile size {n}: the network's context is not constant")
        hi = length if t == count - 1 else start + step
        tiles.append(AxisTile(start - lo_ctx, n, o, start, hi, 0))
    return AxisPlan(length, tuple(tiles))


def _smallest_input_for(need: int, output_size: Callable[[int], int | None], upto: int) -> int:
    best = upto
    for n in range(upto, 0, -1):
        o = output_size(n)
        if o is None:
            continue
        if o >= need:
            best = n
        else:
            break
    return best


def blend_profile(size: int, ramp_lo: int, ramp_hi: int) -> np.ndarray:
    """1D weights over a same-padded tile: raised-cosine ramps of ``ramp_lo`` / ``ramp_hi``
    voxels at the two ends (strictly positive; 0 voxels = no taper), 1 elsewhere."""
    w = np.ones(size, dtype=np.float64)
    for ramp, side in ((ramp_lo, 0), (ramp_hi, 1)):
        ramp = max(0, min(ramp, size // 2))
        if not ramp:
            continue
        r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        if side == 0:
            w[:ramp] = np.minimum(w[:ramp], r)
        else:
            w[size - ramp :] = np.minimum(w[size - ramp :], r[::-1])
    return w


def same_axis_plan(length: int, in_size: int, overlap: float) -> AxisPlan:
    """Overlapping tiles of ``in_size`` along one axis for a same-padded network.

    Neighbours overlap by about ``overlap * in_size`` voxels; the last tile is moved back to end
    at the volume border (no overhang unless the volume is shorter than one tile, which is then
    mirror-padded). Each tile's output is its whole input window.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if in_size >= length:
        return AxisPlan(
            length,
            (AxisTile(0, in_size, in_size, 0, length, 0, np.ones(in_size)),),
        )
    ov = int(round(overlap * in_size))
    step = max(1, in_size - ov)
    count = 1 + math.ceil((length - in_size) / step)
    starts = [min(t * step, length - in_size) for t in range(count)]
    tiles = []
    for t, s in enumerate(starts):
        prev_end = starts[t - 1] + in_size if t else None
        next_start = starts[t + 1] if t + 1 < count else None
        ramp_lo = 0 if prev_end is None else prev_end - s
        ramp_hi = 0 if next_start is None else s + in_size - next_start
        w = blend_profile(in_size, ramp_lo, ramp_hi)
        tiles.append(AxisTile(s, in_size, in_size, s, s + in_size, 0, w))
    return AxisPlan(length, tuple(tiles))
