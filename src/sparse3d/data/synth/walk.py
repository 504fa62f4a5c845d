"""Centre-line growth: a worm-like chain with smooth curvature that avoids committed tubes.

:class:`World` holds every committed centre-line point and its outer radius for collision
checks; :func:`walk` grows one centre line in it, one ``step`` (um) at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from sparse3d.data.synth.body import Body

#: Tubes bend less in z than in the plane: the tissue slab is thin.
_FLAT_ZYX = np.array([0.7, 1.0, 1.0])


class World:
    """Committed centre-line points (n, 3) zyx um and their outer radii, for collision checks."""

    def __init__(self) -> None:
        self.pts = np.zeros((4096, 3))
        self.rad = np.zeros(4096)
        self.n = 0
        self.tree: cKDTree | None = None
        self.n_tree = 0
        self.rmax = 0.0

    def add(self, p: np.ndarray, r: float) -> int:
        """Commit point ``p`` (3,) with outer radius ``r``; returns its index."""
        if self.n == len(self.rad):
            self.pts = np.concatenate([self.pts, np.zeros_like(self.pts)])
            self.rad = np.concatenate([self.rad, np.zeros_like(self.rad)])
        self.pts[self.n] = p
        self.rad[self.n] = r
        self.n += 1
        self.rmax = max(self.rmax, r)
        if self.n - self.n_tree >= 64:
            self.tree = cKDTree(self.pts[: self.n])
            self.n_tree = self.n
        return self.n - 1

    def gaps(
        self, q: np.ndarray, r: float, exclude: Sequence[tuple[int, int]], buffer: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaps (surface-to-surface, um) between a tube of radius ``r`` at ``q`` and committed
        points closer than ``buffer`` beyond contact, and unit vectors from them to ``q``.
        Point-index ranges ``[lo, hi)`` in ``exclude`` are skipped."""
        reach = r + self.rmax + buffer + 1.0
        idx_list = []
        if self.tree is not None:
            idx_list.append(np.asarray(self.tree.query_ball_point(q, reach), dtype=np.int64))
        if self.n > self.n_tree:
            idx_list.append(np.arange(self.n_tree, self.n))
        if not idx_list:
            return np.zeros(0), np.zeros((0, 3))
        idx = np.concatenate(idx_list)
        keep = np.ones(len(idx), dtype=bool)
        for lo, hi in exclude:
            keep &= (idx < lo) | (idx >= hi)
        idx = idx[keep]
        vec = q - self.pts[idx]
        dist = np.linalg.norm(vec, axis=1)
        gap = dist - r - self.rad[idx]
        near = gap < buffer
        return gap[near], vec[near] / (dist[near, None] + 1e-9)

    def clearance(self, q: np.ndarray, r: float, exclude: Sequence[tuple[int, int]]) -> float:
        """Smallest gap between a tube of radius ``r`` at ``q`` and committed tubes (inf if none
        is near)."""
        gap, _ = self.gaps(q, r, exclude)
        return float(gap.min()) if len(gap) else math.inf


def perp(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The part of ``v`` perpendicular to the unit vector ``t``."""
    return v - np.dot(v, t) * t


def unit_perp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to the unit vector ``t``."""
    v = perp(t, rng.standard_normal(3))
    return v / (np.linalg.norm(v) + 1e-12)


def _steer(
    body: Body,
    p: np.ndarray,
    r: float,
    exiting: bool,
    exit_face: int | None,
    coil: tuple[float, float, float] | None,
    coil_weight: float | None,
) -> tuple[np.ndarray, float, float]:
    """Soft steering (3,) at ``p``: stay within the slab (z) and, until exiting, inside the
    field (y, x) and the coil; when exiting, head for ``exit_face`` (or the nearest side face).
    Also returns the slab's allowed depth range (zlo, zhi) at ``p``."""
    extent = np.asarray(body.extent)
    steer = np.zeros(3)
    zlo, zhi = body.tube_z_range(p[1], p[2], r)
    margin = 10.0
    if p[0] < zlo + margin:
        steer[0] += min((zlo + margin - p[0]) / margin, 2.0)
    if p[0] > zhi - margin:
        steer[0] -= min((p[0] - zhi + margin) / margin, 2.0)
    if exiting:
        k = exit_face
        if k is None:
            k = int(np.argmin([p[1], extent[1] - p[1], p[2], extent[2] - p[2]]))
        steer[1 + k // 2] += 1.0 if k % 2 else -1.0
        return steer, zlo, zhi
    if coil is not None and coil_weight is not None and coil_weight > 0:
        dv = np.array([coil[0] - p[1], coil[1] - p[2]])
        dist = float(np.linalg.norm(dv))
        over = (dist - coil[2]) / 30.0
        if over > 0:
            steer[1:] += coil_weight * min(over, 1.5) * dv / dist
    m = r + 10.0
    for a in (1, 2):
        if p[a] < m:
            steer[a] += min((m - p[a]) / m, 2.0)
        if p[a] > extent[a] - m:
            steer[a] -= min((p[a] - extent[a] + m) / m, 2.0)
    return steer, zlo, zhi


def _obstacle_push(
    world: World, look: np.ndarray, r: float, exclude: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Sideways push (3,) away from committed tubes within 6 um of a tube at ``look``."""
    gap, away = world.gaps(look, r, exclude, buffer=6.0)
    push = np.zeros(3)
    if len(gap):
        wgt = np.clip((6.0 - gap) / 6.0, 0.0, 2.0)
        push = (wgt[:, None] * away).sum(0)
    return push


def _keep_inside(
    p: np.ndarray, tn: np.ndarray, zlo: float, zhi: float, extent: np.ndarray, exiting: bool
) -> None:
    """Hard limit on the new direction ``tn`` (in place): never leave the slab further, nor the
    field until exiting (the soft steering normally suffices)."""
    if (p[0] < zlo and tn[0] < 0) or (p[0] > zhi and tn[0] > 0):
        tn[0] = -0.3 * tn[0]
    if not exiting:
        for a in (1, 2):
            if (p[a] < 0 and tn[a] < 0) or (p[a] > extent[a] and tn[a] > 0):
                tn[a] = -0.3 * tn[a]


def _escape(
    world: World,
    rng: np.random.Generator,
    p: np.ndarray,
    tn: np.ndarray,
    r: float,
    exclude: Sequence[tuple[int, int]],
    step: float,
) -> tuple[np.ndarray, float]:
    """Sharper turns away from ``tn`` until one does not overlap: the best unit direction and
    its clearance."""
    best_cl, best = -math.inf, None
    for c in range(1, 9):
        td = tn + (0.15 * c) * unit_perp(tn, rng)
        td /= np.linalg.norm(td)
        cl = world.clearance(p + td * step, r, exclude)
        if cl > best_cl:
            best_cl, best = cl, td
        if cl >= -1.0:
            break
    assert best is not None
    return best, best_cl


def walk(  # a stateful step loop: its state (curvature, push, clearance) stays in one place
    world: World,
    body: Body,
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    r_out: np.ndarray,
    persistence: np.ndarray,
    corr: float,
    min_bend: float,
    exit_when_done: bool,
    exclude: Sequence[tuple[int, int]] = (),
    exit_face: int | None = None,
    coil: tuple[float, float, float] | None = None,
    coil_weight: np.ndarray | None = None,
    step: float = 1.0,
) -> tuple[np.ndarray, int]:
    """Grow one centre line as a worm-like chain with smooth curvature (Ornstein-Uhlenbeck
    angular velocity), steered to stay in the tissue slab and away from committed tubes.

    The curvature is limited to ``1 / (min_bend * r)``; tubes ahead (looked for one radius in
    front) push the walk aside, and a walk that cannot move without overlapping for a while ends
    blind. ``r_out`` and ``persistence`` are per-step profiles whose length bounds the number of
    steps. After ``length`` um the walk heads for the nearest side face of the field (or
    ``exit_face``: 0..3 = y low, y high, x low, x high) and stops outside, when
    ``exit_when_done``; otherwise it stops. With ``coil = (y, x, radius)`` the walk is kept
    within ``radius`` of (y, x) in the plane, weighted per step by ``coil_weight`` (the compact
    proximal coil of the pronephros). Returns the points (n, 3) and the world index of the first
    point."""
    extent = np.asarray(body.extent)
    p = np.asarray(start, dtype=np.float64)
    t = np.asarray(direction, dtype=np.float64)
    t /= np.linalg.norm(t)
    omega = np.zeros(3)
    rho = math.exp(-step / corr)
    pts = [p.copy()]
    first = world.add(p, float(r_out[0]))
    exiting = False
    stuck = 0
    push = np.zeros(3)
    last_cl = -math.inf
    for i in range(1, len(r_out)):
        r = float(r_out[i])
        sigma_k = 1.0 / math.sqrt(float(persistence[i]) * corr)
        kmax = 1.0 / (min_bend * r)
        if not exiting and i * step >= length:
            if not exit_when_done:
                break
            exiting = True
        cw = None if coil_weight is None or exiting else float(coil_weight[i])
        steer, zlo, zhi = _steer(body, p, r, exiting, exit_face, coil, cw)
        excl = [*exclude, (first + max(0, i - int(2.4 * r / step) - 2), world.n + 1)]
        if i % 2 == 1:  # obstacles ahead push sideways (the push changes slowly)
            own_ahead = (first + max(0, i - int(3.4 * r) - 2), world.n + 1)
            push = _obstacle_push(world, p + t * r, r, [*exclude, own_ahead])
        noise = rng.standard_normal(3) * _FLAT_ZYX
        # the random curvature persists (OU process); steering acts on this step only
        omega = perp(t, rho * omega + math.sqrt(1 - rho * rho) * sigma_k * noise)
        turn = omega + perp(t, 0.5 * kmax * steer + 0.8 * kmax * push)
        norm = np.linalg.norm(turn)
        if norm > kmax:
            turn *= kmax / norm
        tn = t + turn * step
        _keep_inside(p, tn, zlo, zhi, extent, exiting)
        tn /= np.linalg.norm(tn)
        q = p + tn * step
        # Clearance changes by at most one step per step, so a walk far from everything
        # (last clearance > 3 um) only needs an occasional check.
        if last_cl > 3.0 and i % 4:
            last_cl -= step
        else:
            last_cl = world.clearance(q, r, excl)
        if last_cl < -1.0:  # tubes may touch, not overlap: try sharper escapes before giving up
            tn, last_cl = _escape(world, rng, p, tn, r, excl, step)
            q = p + tn * step
            stuck = 0 if last_cl >= -1.0 else stuck + 1
            if stuck > 12:
                break
        else:
            stuck = 0
        p, t = q, tn
        pts.append(p.copy())
        world.add(p, r)
        if exiting and (
            p[1] < -r - 2 or p[1] > extent[1] + r + 2 or p[2] < -r - 2 or p[2] > extent[2] + r + 2
        ):
            break
    return np.asarray(pts), first
