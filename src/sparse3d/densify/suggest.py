"""Where to annotate next (layer 1, numpy only): from a dense result's per-voxel uncertainty and
the planes already painted, the orthogonal plane ``(axis, index)`` whose annotation should help
most.

Strategies (:data:`STRATEGIES`):

``uncertainty``
    Each candidate plane is scored by the uncertainty of the result (``1 - top probability``,
    :attr:`sparse3d.densify.api.DensifyResult.uncertainty`) on its voxels that no painted plane
    covers, averaged over a slab of ``2 * halo + 1`` planes around it, weighted by a triangle that
    peaks on the plane (painting one plane also teaches its neighbours) and counted in voxels (``mean * plane area``: the voxels the result
    is likely wrong on that the plane shows). Planes closer than ``min_gap`` to a painted plane
    of the same axis are left out: the forests are already sure there and a plane next to a
    painted one adds little that is new.
``spacing``
    Even spacing without the result: the axis with the fewest painted planes (the longest axis
    first among ties), the middle of its widest gap between painted planes and the borders.

``random_plane`` draws an unpainted plane at random (the baseline of the study
``experiments/suggest_planes.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sparse3d.axes import AXES

__all__ = [
    "STRATEGIES",
    "PlaneSuggestion",
    "best_plane",
    "plane_scores",
    "plane_sums",
    "scores_from_sums",
    "random_plane",
    "spaced_plane",
    "suggest_plane",
]

#: Strategies of :func:`suggest_plane`.
STRATEGIES = ("uncertainty", "spacing")


@dataclass(frozen=True)
class PlaneSuggestion:
    """The plane to paint next: ``axis`` (``"z"``, ``"y"`` or ``"x"``), its ``index`` along
    that axis, the ``score`` that chose it (strategy ``uncertainty``: uncertain voxels it
    shows; ``spacing``: the width of the gap it splits) and the ``strategy``."""

    axis: str
    index: int
    score: float
    strategy: str

    @property
    def dim(self) -> int:
        """Position of ``axis`` in ``(Z, Y, X)``."""
        return AXES.index(self.axis)

    def describe(self) -> str:
        """One line for a viewer or a log: ``paint z = 17 next (uncertainty 412 voxels)``."""
        unit = "uncertain voxels" if self.strategy == "uncertainty" else "planes wide gap"
        return f"paint {self.axis} = {self.index} next ({self.score:.0f} {unit})"


def _planes(annotated: Mapping[str, Sequence[int]], shape_zyx: Sequence[int]) -> dict[str, list]:
    out = {}
    for ax, n in zip(AXES, shape_zyx, strict=True):
        idx = sorted({int(i) for i in annotated.get(ax, ())})
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"annotated {ax} planes {bad} outside 0..{n - 1}")
        out[ax] = idx
    return out


def _distance_to(indices: Sequence[int], n: int) -> np.ndarray:
    """``(n,)`` distance of each plane to the nearest of ``indices`` (n + 1 when none)."""
    if not indices:
        return np.full(n, n + 1, dtype=np.int64)
    pos = np.arange(n)[:, None]
    return np.abs(pos - np.asarray(indices)[None, :]).min(1)


def default_min_gap(n: int) -> int:
    """Planes kept clear of a painted plane on an axis of length ``n``: 1/16 of it, at least 2."""
    return max(2, n // 16)


def plane_scores(
    uncertainty: np.ndarray,
    annotated: Mapping[str, Sequence[int]],
    *,
    halo: int = 1,
    min_gap: int | None = None,
) -> dict[str, np.ndarray]:
    """Score of every plane of every axis for the ``uncertainty`` strategy.

    Args:
        uncertainty: ``(Z, Y, X)`` per-voxel uncertainty, >= 0 (e.g. 1 - top probability).
        annotated: painted planes, ``{"z": [...], "y": [...], "x": [...]}``.
        halo: planes on each side averaged with a plane, with triangular weights (0: the plane
            alone).
        min_gap: planes closer than this to a painted plane of their axis score -inf
            (None: :func:`default_min_gap` of the axis length).

    Returns:
        ``{"z": (Z,), "y": (Y,), "x": (X,)}`` float64: uncertain voxels a plane shows off the
        painted planes (its slab's mean uncertainty times the plane's area); -inf where left out.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.ndim != 3:
        raise ValueError(f"uncertainty must be (Z, Y, X), got shape {u.shape}")
    if not np.isfinite(u).all() or (u < 0).any():
        raise ValueError("uncertainty must be finite and >= 0")
    full = tuple(slice(0, n) for n in u.shape)
    return scores_from_sums(plane_sums(u, annotated, full, u.shape), u.shape, annotated,
                            halo=halo, min_gap=min_gap)  # fmt: skip


def plane_sums(
    uncertainty: np.ndarray,
    annotated: Mapping[str, Sequence[int]],
    box: Sequence[slice],
    shape_zyx: Sequence[int],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plane of each axis, the ``(sum of uncertainty, count)`` of the voxels no painted
    plane covers, for the block ``uncertainty`` at ``box`` of a volume of ``shape_zyx``, as
    ``(Z,)``, ``(Y,)``, ``(X,)`` arrays of the whole volume (zero outside the block): blocks'
    sums add up to the whole volume's."""
    u = np.asarray(uncertainty, dtype=np.float64)
    planes = _planes(annotated, shape_zyx)
    painted = np.zeros(u.shape, dtype=bool)
    for dim, ax in enumerate(AXES):
        local = [i - box[dim].start for i in planes[ax] if box[dim].start <= i < box[dim].stop]
        index: list = [slice(None)] * 3
        index[dim] = local
        painted[tuple(index)] = True
    free_u = np.where(painted, 0.0, u)
    out = {}
    for dim, ax in enumerate(AXES):
        other = tuple(d for d in range(3) if d != dim)
        total = np.zeros(int(shape_zyx[dim]))
        count = np.zeros(int(shape_zyx[dim]))
        total[box[dim]] = free_u.sum(axis=other)
        count[box[dim]] = (~painted).sum(axis=other)
        out[ax] = (total, count)
    return out


def scores_from_sums(
    sums: Mapping[str, tuple[np.ndarray, np.ndarray]],
    shape_zyx: Sequence[int],
    annotated: Mapping[str, Sequence[int]],
    *,
    halo: int = 1,
    min_gap: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`plane_scores` from the per-plane sums of :func:`plane_sums`."""
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    planes = _planes(annotated, shape_zyx)
    size = float(np.prod(shape_zyx))
    scores = {}
    for dim, ax in enumerate(AXES):
        n = int(shape_zyx[dim])
        total, count = sums[ax]
        kernel = (halo + 1.0 - np.abs(np.arange(-halo, halo + 1))) / (halo + 1.0)  # triangle
        slab_total = np.convolve(total, kernel, mode="same")
        slab_count = np.convolve(count, kernel, mode="same")
        mean = np.divide(slab_total, slab_count, out=np.zeros(n), where=slab_count > 0)
        score = mean * (size / n)
        gap = default_min_gap(n) if min_gap is None else int(min_gap)
        score[_distance_to(planes[ax], n) < max(gap, 1)] = -np.inf
        scores[ax] = score
    return scores


def best_plane(scores: Mapping[str, np.ndarray], shape_zyx, annotated) -> PlaneSuggestion:
    """The highest-scoring plane of ``scores`` (even spacing when every plane is left out)."""
    best_ax, best_i, best = "", -1, -np.inf
    for ax in AXES:
        i = int(np.argmax(scores[ax]))
        if scores[ax][i] > best:
            best_ax, best_i, best = ax, i, float(scores[ax][i])
    if best_i < 0:
        return spaced_plane(tuple(shape_zyx), annotated)
    return PlaneSuggestion(best_ax, best_i, best, "uncertainty")


def spaced_plane(
    shape_zyx: Sequence[int], annotated: Mapping[str, Sequence[int]]
) -> PlaneSuggestion:
    """The ``spacing`` strategy: on the axis with the fewest painted planes (ties: the longest
    axis, then z before y before x), the middle of the widest gap between its painted planes
    and the volume's borders.

    Raises:
        ValueError: every plane of every axis is painted.
    """
    shape = tuple(int(n) for n in shape_zyx)
    planes = _planes(annotated, shape)
    order = sorted(range(3), key=lambda d: (len(planes[AXES[d]]), -shape[d], d))
    for dim in order:
        ax, n = AXES[dim], shape[dim]
        if len(planes[ax]) >= n:
            continue
        bounds = [-1, *planes[ax], n]
        widths = [b - a - 1 for a, b in zip(bounds, bounds[1:], strict=False)]
        g = int(np.argmax(widths))
        a, b = bounds[g], bounds[g + 1]
        return PlaneSuggestion(ax, (a + b + 1) // 2, float(widths[g]), "spacing")
    raise ValueError("every plane is painted already")


def suggest_plane(
    uncertainty: np.ndarray,
    annotated: Mapping[str, Sequence[int]],
    *,
    strategy: str = "uncertainty",
    halo: int = 1,
    min_gap: int | None = None,
) -> PlaneSuggestion:
    """The plane to paint next.

    Args:
        uncertainty: ``(Z, Y, X)`` per-voxel uncertainty of the current result (the
            ``spacing`` strategy uses only its shape).
        annotated: painted planes, ``{"z": [...], "y": [...], "x": [...]}``.
        strategy: one of :data:`STRATEGIES` (see the module docstring).
        halo, min_gap: see :func:`plane_scores`.

    Returns:
        The best plane; ``uncertainty`` falls back to ``spacing`` when every plane is within
        ``min_gap`` of a painted one.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    shape = np.shape(uncertainty)
    if len(shape) != 3:
        raise ValueError(f"uncertainty must be (Z, Y, X), got shape {shape}")
    if strategy == "spacing":
        return spaced_plane(shape, annotated)
    scores = plane_scores(uncertainty, annotated, halo=halo, min_gap=min_gap)
    return best_plane(scores, shape, annotated)


def random_plane(
    shape_zyx: Sequence[int], annotated: Mapping[str, Sequence[int]], rng: np.random.Generator
) -> PlaneSuggestion:
    """An unpainted plane drawn uniformly among all unpainted planes of the three axes."""
    shape = tuple(int(n) for n in shape_zyx)
    planes = _planes(annotated, shape)
    free = [
        (ax, i) for ax, n in zip(AXES, shape, strict=True) for i in range(n) if i not in planes[ax]
    ]
    if not free:
        raise ValueError("every plane is painted already")
    ax, i = free[int(rng.integers(len(free)))]
    return PlaneSuggestion(ax, int(i), 0.0, "random")
