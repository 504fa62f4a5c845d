"""Sparse slice annotation: which orthogonal slices are labelled, and the label they produce.

The paper annotates a few orthogonal xy, xz and yz slices per volume, "sampled as uniformly as
possible in all 3 dimensions", and gives every other voxel the label "unlabeled" (Sec. 3.1).

A *slice dict* maps an axis name (``"z"``, ``"y"``, ``"x"``, see
:data:`sparse3d.axes.AXES`) to slice indices along that axis: ``"z"`` lists xy slices,
``"y"`` xz slices and ``"x"`` yz slices. Missing axes mean no slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sparse3d.axes import AXES


def uniform_positions(length: int, count: int) -> tuple[int, ...]:
    """``count`` distinct indices in ``0..length-1``, spread as uniformly as possible.

    The axis is cut into ``count`` equal bins and the centre of each bin is taken, so positions
    keep half a bin away from the borders (Sec. 3.1: "sampled as uniformly as possible").
    E.g. ``uniform_positions(10, 2) == (2, 7)`` and ``uniform_positions(64, 1) == (32,)``.

    Raises:
        ValueError: ``length < 1``, ``count < 0`` or ``count > length``.
    """
    length, count = int(length), int(count)
    if length < 1:
        raise ValueError(f"uniform_positions: length must be >= 1, got {length}")
    if not 0 <= count <= length:
        raise ValueError(f"uniform_positions: count must be in 0..{length}, got {count}")
    # bin width length/count >= 1, so the floored bin centres are distinct
    return tuple(int(np.floor((k + 0.5) * length / count)) for k in range(count))


def normalize_slices(
    slices: Mapping[str, Sequence[int]], shape_zyx: Sequence[int] | None = None, where: str = ""
) -> dict[str, tuple[int, ...]]:
    """Validate a slice dict and return it with all three axes, sorted unique int indices.

    Args:
        slices: ``{"z": [...], "y": [...], "x": [...]}``; missing axes become empty.
        shape_zyx: when given, indices must lie in ``0..shape-1`` along their axis.
        where: prefix for error messages (e.g. a file or volume name).

    Raises:
        ValueError: unknown axis name, non-integer or out-of-range index.
    """
    prefix = f"{where}: " if where else ""
    unknown = set(slices) - set(AXES)
    if unknown:
        raise ValueError(f"{prefix}unknown slice axes {sorted(unknown)}; use {AXES}")
    out: dict[str, tuple[int, ...]] = {}
    for i, ax in enumerate(AXES):
        raw = list(slices.get(ax, ()))
        for v in raw:
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{prefix}slice index {v!r} on axis {ax} is not an integer")
        idx = tuple(sorted({int(v) for v in raw}))
        if shape_zyx is not None:
            n = int(shape_zyx[i])
            bad = [v for v in idx if not 0 <= v < n]
            if bad:
                raise ValueError(f"{prefix}{ax} slice indices {bad} outside 0..{n - 1}")
        out[ax] = idx
    return out


def slice_mask(shape_zyx: Sequence[int], slices: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Boolean (Z, Y, X) mask, True on every voxel of the listed orthogonal slices."""
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"slice_mask: shape_zyx must be 3 positive sizes, got {shape_zyx!r}")
    sl = normalize_slices(slices, shape, where="slice_mask")
    mask = np.zeros(shape, dtype=bool)
    mask[list(sl["z"]), :, :] = True
    mask[:, list(sl["y"]), :] = True
    mask[:, :, list(sl["x"])] = True
    return mask


def sparse_label(
    dense: np.ndarray, annotated: Mapping[str, Sequence[int]], ignore_index: int
) -> np.ndarray:
    """Keep ``dense`` on the annotated slices and set every other voxel to ``ignore_index``.

    Args:
        dense: (Z, Y, X) integer label (a dense ground truth, or an already sparse label whose
            annotated slices are a superset of ``annotated``).
        annotated: slice dict of the slices to keep.
        ignore_index: the "unlabeled" code (3 in the paper, Sec. 3.1).

    Returns:
        (Z, Y, X) array of ``dense``'s dtype.
    """
    dense = np.asarray(dense)
    if dense.ndim != 3:
        raise ValueError(f"sparse_label: dense must be 3D (Z,Y,X), got shape {dense.shape}")
    if not np.issubdtype(dense.dtype, np.integer):
        raise ValueError(f"sparse_label: dense dtype {dense.dtype} is not an integer type")
    info = np.iinfo(dense.dtype)
    if not info.min <= int(ignore_index) <= info.max:
        raise ValueError(f"sparse_label: ignore_index {ignore_index} does not fit {dense.dtype}")
    mask = slice_mask(dense.shape, annotated)
    out = np.full(dense.shape, ignore_index, dtype=dense.dtype)
    out[mask] = dense[mask]
    return out


def count_slices(slices: Mapping[str, Sequence[int]]) -> int:
    """Number of distinct slices in a slice dict (all axes together)."""
    return sum(len(v) for v in normalize_slices(slices).values())
