"""Tile sampling and extraction for a network with valid convolutions (the paper's overlap-tile).

With valid (unpadded) convolutions the network maps an input tile ``input_tile`` to a smaller,
centred output tile ``output_tile`` (paper Sec. 2: 132x132x116 -> 44x44x28 voxels in x, y, z). The
input tile therefore reaches ``(input - output) // 2`` voxels beyond the output tile on each side;
at the volume border that context is filled by mirroring the image, as in the u-net's overlap-tile
strategy, while the label outside the volume is "unlabelled" (the ignore code) and never a class.

Positions are sampled in OUTPUT space, because the loss only sees the output crop: the
``"labelled"`` sampler picks a random annotated voxel and then a random output-tile offset that
contains it, so every training crop contains annotated voxels even for a sparse slice annotation
(Sec. 3.2 trains on sparsely annotated slices; unlabelled voxels get weight 0 in the loss).

Everything here works for any number of spatial axes (3 for volumes, 2 for the 2D baseline's
slices); the docstrings say ``zyx`` for the 3D case. The network geometry (which output a given
input tile produces) is passed in, never computed here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse3d.mirror import reflect_indices

PADDING_MODES = ("reflect", "edge", "constant")


def _as_shape(value: Sequence[int], name: str, ndim: int | None = None) -> tuple[int, ...]:
    shape = tuple(int(v) for v in value)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"tiles: {name} must have {ndim} entries, got {tuple(value)!r}")
    return shape


def map_indices(start: int, stop: int, length: int, mode: str) -> np.ndarray:
    """Source index in a volume of ``length`` for each of ``start .. stop-1`` under ``mode``.

    ``"reflect"``: mirrored (:func:`sparse3d.mirror.reflect_indices`); ``"edge"``: clamped;
    ``"constant"``: ``-1`` marks positions outside ``[0, length)``.
    """
    if mode == "reflect":
        return reflect_indices(start, stop - start, length)
    idx = np.arange(start, stop, dtype=np.int64)
    if mode == "edge":
        return np.clip(idx, 0, length - 1)
    if mode == "constant":
        return np.where((idx >= 0) & (idx < length), idx, -1)
    raise ValueError(f"tiles: padding mode must be one of {PADDING_MODES}, got {mode!r}")


def read_region(
    array: Any,
    start: Sequence[int],
    size: Sequence[int],
    mode: str = "reflect",
    fill: float | int = 0,
    channel_axis: bool = True,
) -> np.ndarray:
    """Read the box ``[start, start + size)`` of ``array``, padding whatever lies outside.

    ``array`` is ``(C, *S)`` when ``channel_axis`` else ``(*S)``; a numpy array or anything that
    supports numpy basic slicing (an ``h5py.Dataset``). Only the part of the volume the padded box
    actually needs is read (its bounding box inside the volume), and the padding is done in
    memory. A box entirely inside the volume of an in-memory array comes back as a view (no copy).
    ``mode``: ``"reflect"`` (mirror, the overlap-tile), ``"edge"`` or ``"constant"`` (``fill``).
    """
    lead = 1 if channel_axis else 0
    spatial = tuple(int(s) for s in array.shape[lead:])
    start = _as_shape(start, "start", len(spatial))
    size = _as_shape(size, "size", len(spatial))
    maps = [map_indices(b, b + n, s, mode) for b, n, s in zip(start, size, spatial, strict=True)]
    # bounding box (inside the volume) of every source index that is used
    boxes = []
    for m, s in zip(maps, spatial, strict=True):
        valid = m[m >= 0]
        boxes.append((int(valid.min()), int(valid.max()) + 1) if valid.size else (0, min(1, s)))
    region = array[(slice(None),) * lead + tuple(slice(a, b) for a, b in boxes)]
    region = np.asarray(region)
    outside = []
    copied = not isinstance(array, np.ndarray)  # h5py & co. hand out fresh arrays
    for axis, (m, (a, _b)) in enumerate(zip(maps, boxes, strict=True)):
        local = np.where(m >= 0, m - a, 0)
        if not (
            local.size == region.shape[lead + axis] and np.array_equal(local, np.arange(local.size))
        ):
            region = np.take(region, local, axis=lead + axis)
            copied = True
        outside.append(m < 0)
    if mode == "constant" and any(o.any() for o in outside):
        if not copied:  # never write into the caller's array
            region = region.copy()
        for axis, o in enumerate(outside):
            if o.any():
                index = [slice(None)] * region.ndim
                index[lead + axis] = o
                region[tuple(index)] = fill
    return region


def input_start(
    output_start: Sequence[int], input_tile: Sequence[int], output_tile: Sequence[int]
) -> tuple[int, ...]:
    """Start of the input tile whose centred valid-convolution output starts at ``output_start``.

    The network's output is the centred crop of its input, offset ``(input - output) // 2``.
    """
    return tuple(
        int(o) - (int(i) - int(p)) // 2
        for o, i, p in zip(output_start, input_tile, output_tile, strict=True)
    )


def extract_tile(
    image: Any,
    label: Any | None,
    output_start: Sequence[int],
    input_tile: Sequence[int],
    output_tile: Sequence[int],
    margin_zyx: Sequence[int] = (0, 0, 0),
    ignore_index: int = 3,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cut the input tile (plus ``margin`` per side) belonging to an output tile.

    Args:
        image: ``(C, Z, Y, X)`` numpy array or h5py dataset (only the needed region is read).
        label: ``(Z, Y, X)`` array / dataset, or ``None``.
        output_start: first voxel of the OUTPUT tile in volume coordinates.
        input_tile / output_tile: the network's input tile and the output it produces from it.
        margin_zyx: extra context per side (e.g. room for a rotation/deformation).

    Returns:
        ``image`` tile ``(C, *(input + 2 * margin))`` with the image mirrored at the volume border
        (the paper's overlap-tile) and ``label`` tile of the same spatial size (or ``None``) with
        ``ignore_index`` outside the volume. Boxes fully inside an in-memory volume are views.
    """
    ndim = len(image.shape) - 1
    input_tile = _as_shape(input_tile, "input_tile", ndim)
    output_tile = _as_shape(output_tile, "output_tile", ndim)
    margin_zyx = _as_shape(margin_zyx, "margin_zyx", ndim)
    if any(i < o for i, o in zip(input_tile, output_tile, strict=True)):
        raise ValueError(f"tiles: input tile {input_tile} smaller than output tile {output_tile}")
    if any(m < 0 for m in margin_zyx):
        raise ValueError(f"tiles: margin_zyx must be >= 0, got {margin_zyx}")
    start = tuple(
        s - m
        for s, m in zip(input_start(output_start, input_tile, output_tile), margin_zyx, strict=True)
    )
    size = tuple(i + 2 * m for i, m in zip(input_tile, margin_zyx, strict=True))
    image_tile = read_region(image, start, size, mode="reflect")
    label_tile = None
    if label is not None:
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(
                f"tiles: label shape {tuple(label.shape)} != image spatial shape {tuple(image.shape[1:])}"
            )
        label_tile = read_region(
            label, start, size, mode="constant", fill=ignore_index, channel_axis=False
        )
    return image_tile, label_tile


class TileSampler:
    """Random output-tile positions for training (paper Sec. 3.2: learn from annotated slices).

    Args:
        shape_zyx: spatial shape of the volume.
        input_tile / output_tile: network input tile and the output tile it yields (given, not
            computed here).
        labelled_mask: ``(Z, Y, X)`` bool, True where a voxel is annotated; required for
            ``mode="labelled"``.
        seed: seed of the sampler's own generator (used when ``sample`` gets no ``rng``).
        mode: ``"labelled"`` -- a uniformly drawn annotated voxel, then a uniformly drawn output
            tile containing it (clipped to the volume: the crop always contains that voxel);
            ``"uniform"`` -- every output-tile position inside the volume equally likely.

    Positions are output-tile starts; where the volume is smaller than the output tile along an
    axis, the tile overhangs it (start < 0) and covers the whole axis.
    """

    def __init__(
        self,
        shape_zyx: Sequence[int],
        input_tile: Sequence[int],
        output_tile: Sequence[int],
        labelled_mask: np.ndarray | None = None,
        seed: int = 0,
        mode: str = "labelled",
    ) -> None:
        self.shape_zyx = _as_shape(shape_zyx, "shape_zyx")
        ndim = len(self.shape_zyx)
        self.input_tile = _as_shape(input_tile, "input_tile", ndim)
        self.output_tile = _as_shape(output_tile, "output_tile", ndim)
        if any(i < o for i, o in zip(self.input_tile, self.output_tile, strict=True)):
            raise ValueError(
                f"tiles: input {self.input_tile} smaller than output {self.output_tile}"
            )
        if mode not in ("labelled", "uniform"):
            raise ValueError(f"tiles: mode must be 'labelled' or 'uniform', got {mode!r}")
        self.mode = mode
        self.labelled_mask = None
        self._labelled_flat = None
        if labelled_mask is not None:
            mask = np.asarray(labelled_mask, dtype=bool)
            if mask.shape != self.shape_zyx:
                raise ValueError(
                    f"tiles: labelled_mask shape {mask.shape} != shape_zyx {self.shape_zyx}"
                )
            self.labelled_mask = mask
        if mode == "labelled":
            if self.labelled_mask is None:
                raise ValueError("tiles: mode='labelled' needs a labelled_mask")
            self._labelled_flat = np.flatnonzero(self.labelled_mask)
            if self._labelled_flat.size == 0:
                raise ValueError("tiles: labelled_mask has no labelled voxel to sample around")
        # allowed range of output-tile starts per axis
        self._lo = tuple(
            min(0, s - o) for s, o in zip(self.shape_zyx, self.output_tile, strict=True)
        )
        self._hi = tuple(
            max(0, s - o) for s, o in zip(self.shape_zyx, self.output_tile, strict=True)
        )
        self.rng = np.random.default_rng(seed)
        self._table: np.ndarray | None = None

    @property
    def num_labelled(self) -> int:
        """Number of annotated voxels (0 without a mask)."""
        return 0 if self.labelled_mask is None else int(np.count_nonzero(self.labelled_mask))

    def sample(self, rng: np.random.Generator | None = None) -> tuple[int, ...]:
        """One output-tile start ``(z, y, x)``; draws from ``rng`` if given, else the own one."""
        rng = self.rng if rng is None else rng
        if self.mode == "uniform":
            return tuple(
                int(rng.integers(a, b + 1)) for a, b in zip(self._lo, self._hi, strict=True)
            )
        flat = self._labelled_flat[int(rng.integers(self._labelled_flat.size))]
        voxel = np.unravel_index(flat, self.shape_zyx)
        start = []
        for v, o, a, b in zip(voxel, self.output_tile, self._lo, self._hi, strict=True):
            s = int(v) - int(rng.integers(o))  # tile [s, s + o) contains v
            start.append(min(max(s, a), b))  # clipping keeps v inside (see class docstring)
        return tuple(start)

    def input_start(self, output_start: Sequence[int]) -> tuple[int, ...]:
        """Input-tile start for an output-tile start (see :func:`input_start`)."""
        return input_start(output_start, self.input_tile, self.output_tile)

    def labelled_fraction(self, output_start: Sequence[int]) -> float:
        """Fraction of the output crop's voxels that are annotated (outside the volume counts 0)."""
        if self.labelled_mask is None:
            raise ValueError("tiles: labelled_fraction needs a labelled_mask")
        if self._table is None:  # summed-area table with a zero border
            table = self.labelled_mask.astype(np.int64)
            for axis in range(table.ndim):
                table = np.cumsum(table, axis=axis)
            self._table = np.pad(table, [(1, 0)] * table.ndim)
        lo = [min(max(int(s), 0), n) for s, n in zip(output_start, self.shape_zyx, strict=True)]
        hi = [
            min(max(int(s) + o, 0), n)
            for s, o, n in zip(output_start, self.output_tile, self.shape_zyx, strict=True)
        ]
        total = 0
        for corner in itertools.product((0, 1), repeat=len(lo)):
            index = tuple(h if c else low for c, low, h in zip(corner, lo, hi, strict=True))
            sign = (-1) ** (len(lo) - sum(corner))
            total += sign * int(self._table[index])
        return total / float(np.prod(self.output_tile))


def labelled_yield(sampler: TileSampler, n: int, rng: np.random.Generator | None = None) -> float:
    """Mean fraction of annotated voxels in the output crop over ``n`` draws of ``sampler``."""
    if n < 1:
        raise ValueError(f"tiles: labelled_yield needs n >= 1, got {n}")
    return float(np.mean([sampler.labelled_fraction(sampler.sample(rng)) for _ in range(n)]))
