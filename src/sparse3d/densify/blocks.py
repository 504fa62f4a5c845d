"""Blocks of a volume and what they cost (layer 1: numpy only).

A volume ``(Z, Y, X)`` is cut into a grid of *core* blocks that tile it without overlap; each
block is computed from its core grown by a *halo* on every side, clipped at the volume's edge,
so a filter sees the same neighbours as in a whole-volume pass and, at the volume's edge, the
same boundary (SciPy's reflection happens at the edge of the data in both cases). With a halo at
least the filters' radius, blockwise results equal one pass (tested).

The block size follows from a memory budget: a block's working set is its grown region times
the bytes per voxel that the step holds at once (:func:`block_for_budget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

ZYX = tuple[int, int, int]
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Block:
    """One block: ``core`` (what it writes, volume coordinates), ``ext`` (what it reads: the
    core grown by the halo and clipped to the volume) and ``crop`` (the core inside ``ext``)."""

    index: ZYX
    core: Box
    ext: Box

    @property
    def crop(self) -> Box:
        return tuple(
            slice(c.start - e.start, c.stop - e.start)
            for c, e in zip(self.core, self.ext, strict=True)
        )  # type: ignore[return-value]

    @property
    def core_shape(self) -> ZYX:
        return tuple(s.stop - s.start for s in self.core)  # type: ignore[return-value]

    @property
    def ext_shape(self) -> ZYX:
        return tuple(s.stop - s.start for s in self.ext)  # type: ignore[return-value]


def grow(box: Box, halo: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``halo (z, y, x)`` voxels on each side, clipped to ``shape``."""
    return tuple(
        slice(max(0, s.start - h), min(n, s.stop + h))
        for s, h, n in zip(box, halo, shape, strict=True)
    )  # type: ignore[return-value]


@dataclass(frozen=True)
class BlockGrid:
    """A volume of ``shape (Z, Y, X)`` cut into blocks of ``block (z, y, x)`` voxels (the last
    of each axis may be smaller), each read with ``halo (z, y, x)`` voxels around it."""

    shape: ZYX
    block: ZYX
    halo: ZYX = (0, 0, 0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.block) != 3 or len(self.halo) != 3:
            raise ValueError("shape, block and halo are (z, y, x) triples")
        if min(self.block) < 1 or min(self.halo) < 0:
            raise ValueError(
                f"blocks need sides >= 1 and halos >= 0, got {self.block}, {self.halo}"
            )

    @property
    def counts(self) -> ZYX:
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block, strict=True))  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def block_at(self, index: Sequence[int]) -> Block:
        core = tuple(
            slice(i * b, min(n, (i + 1) * b))
            for i, b, n in zip(index, self.block, self.shape, strict=True)
        )
        return Block(tuple(int(i) for i in index), core, grow(core, self.halo, self.shape))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Block]:
        for index in np.ndindex(*self.counts):
            yield self.block_at(index)

    def store_chunks(self, most: int = 64) -> ZYX:
        """Chunks ``(z, y, x)`` of a store the blocks write into: no chunk is shared by two
        blocks (along an axis cut into several blocks, the side divides the block's), and none
        is larger than ``most`` voxels a side where that can be, so reading a small tile (the
        network's) decompresses little more than the tile."""
        out = []
        for n, b, count in zip(self.shape, self.block, self.counts, strict=True):
            if count == 1:
                out.append(min(n, most))
            else:
                out.append(max(d for d in range(1, min(b, most) + 1) if b % d == 0))
        return tuple(out)  # type: ignore[return-value]

    def with_halo(self, halo: Sequence[int]) -> BlockGrid:
        return BlockGrid(self.shape, self.block, tuple(int(h) for h in halo))  # type: ignore[arg-type]

    def block_of(self, zyx: np.ndarray) -> np.ndarray:
        """``(N,)`` flat block number of each voxel ``zyx (N, 3)``."""
        idx = np.asarray(zyx) // np.asarray(self.block)
        return np.ravel_multi_index(tuple(idx.T), self.counts)


def block_for_budget(
    shape: Sequence[int],
    cost: Callable[[Sequence[int]], float],
    budget_bytes: float,
    multiple: int = 16,
    largest: int = 256,
    halo: Sequence[int] = (0, 0, 0),
    workers: int = 1,
) -> ZYX:
    """The block (sides multiples of ``multiple``, at most ``largest`` and the volume's) whose
    working set ``cost(block)`` (bytes) fits ``budget_bytes`` and that finishes the volume
    soonest on ``workers`` workers.

    The largest cube that fits sets the scale; then each axis is cut into that many blocks or a
    few more, of equal sides (no sliver of a few voxels that costs a whole halo), and the
    shape with the least work per worker wins: rounds of ``workers`` blocks times a block's
    grown plus core voxels (filters run over the grown block, the forest over the core); a
    single block counts as shared by all workers (it runs on every core of this process).

    Raises ValueError when even the smallest block does not fit: the message says what it needs.
    """
    shape = [int(n) for n in shape]

    def block(side: int) -> ZYX:
        return tuple(min(side, n) for n in shape)  # type: ignore[return-value]

    side = multiple
    if cost(block(side)) > budget_bytes:
        raise ValueError(
            f"a block of {side}^3 voxels with its halo needs {cost(block(side)) / 2**30:.2f} GiB "
            f"per worker, more than the {budget_bytes / 2**30:.2f} GiB each may use"
        )
    while side + multiple <= largest and cost(block(side + multiple)) <= budget_bytes:
        side += multiple

    def sides(n: int) -> set[int]:
        """Equal cuts of an axis of ``n`` voxels near ``side``, rounded up to ``multiple``."""
        first = max(1, math.ceil(n / largest))
        out = set()
        for count in range(first, max(first, math.ceil(n / side)) + 3):
            b = min(n, multiple * math.ceil(math.ceil(n / count) / multiple))
            out.add(min(b, largest) if b < n else n)
        return out

    def work(b: Sequence[int]) -> tuple[float, int]:
        count = math.prod(math.ceil(n / s) for n, s in zip(shape, b, strict=True))
        grown = math.prod(min(s + 2 * h, n) for s, h, n in zip(b, halo, shape, strict=True))
        # one block runs in this process on every core; more are shared out to the workers
        rounds = math.ceil(count / max(1, workers)) if count > 1 else 1 / max(1, workers)
        return rounds * (grown + math.prod(b)), count

    best = block(side)
    best_work = work(best)
    for bz in sides(shape[0]):
        for by in sides(shape[1]):
            for bx in sides(shape[2]):
                b = (bz, by, bx)
                if cost(b) > budget_bytes:
                    continue
                w = work(b)
                if w < best_work:
                    best, best_work = b, w
    return best  # type: ignore[return-value]
