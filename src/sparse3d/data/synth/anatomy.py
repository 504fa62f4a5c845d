"""Anatomy: the centre lines and radii of every tube of a sample (tubules, branches, vessels).

Pronephric tubules at Nieuwkoop-Faber stage 36-37 are smooth, convoluted, branching tubes: each
main tubule is grown by :func:`~sparse3d.data.synth.walk.walk` within a compact coil region
(proximal part) and then leaves the field (distal part); short side branches stand for the
proximal branches towards the nephrostomes; blood vessels (posterior cardinal vein) cross the
field along the body axis (x). All in micrometres, independent of the voxel grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparse3d.data.synth.body import Body
from sparse3d.data.synth.fields import smooth_1d
from sparse3d.data.synth.params import SampleParams
from sparse3d.data.synth.walk import World, unit_perp, walk

#: Tube kinds.
TUBULE_KIND, VESSEL_KIND = 0, 1


@dataclass
class Tube:
    """One centre line with per-point profiles (n points, 1 um apart)."""

    points: np.ndarray  # (n, 3) zyx um
    r_out: np.ndarray  # (n,)
    r_lum: np.ndarray  # (n,)  0 for vessels
    lectin: np.ndarray  # (n,) relative brush-border level
    kind: int  # TUBULE_KIND or VESSEL_KIND
    world_start: int = 0
    branch: bool = False


@dataclass(frozen=True)
class TubePoints:
    """All tubes' points concatenated (N points), for nearest-point maps and lookups.

    Attributes:
        points: (N, 3) zyx um. r_out, r_lum, lectin: (N,) float32.
        kind: (N,) int8 tube kind. tube: (N,) int32 index into ``tubes``.
        layer: (N,) int8, 0 for main tubes and vessels, 1 for branches.
    """

    tubes: list[Tube]
    points: np.ndarray
    r_out: np.ndarray
    r_lum: np.ndarray
    lectin: np.ndarray
    kind: np.ndarray
    tube: np.ndarray
    layer: np.ndarray

    @classmethod
    def of(cls, tubes: list[Tube]) -> TubePoints:
        return cls(
            tubes=tubes,
            points=np.concatenate([t.points for t in tubes]),
            r_out=np.concatenate([t.r_out for t in tubes]).astype(np.float32),
            r_lum=np.concatenate([t.r_lum for t in tubes]).astype(np.float32),
            lectin=np.concatenate([t.lectin for t in tubes]).astype(np.float32),
            kind=np.concatenate([np.full(len(t.points), t.kind, np.int8) for t in tubes]),
            tube=np.concatenate([np.full(len(t.points), i, np.int32) for i, t in enumerate(tubes)]),
            layer=np.concatenate([np.full(len(t.points), int(t.branch), np.int8) for t in tubes]),
        )


def tube_profiles(
    rng: np.random.Generator, n: int, r0: float, p: SampleParams, wall0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Outer and lumen radius (n,) along a tube (per 1 um step): calibre varies smoothly."""
    r_out = r0 * (1 + p.calibre_variation * smooth_1d(rng, n, 40.0))
    wall = wall0 * (1 + 0.6 * p.calibre_variation * smooth_1d(rng, n, 30.0))
    r_lum = np.maximum(r_out - wall, p.min_lumen_radius_um)
    r_out = np.maximum(r_out, r_lum + 5.0)
    return r_out, r_lum


def _random_in_coil(
    rng: np.random.Generator,
    body: Body,
    r: float,
    coil: tuple[float, float, float],
    widen: float = 1.0,
) -> np.ndarray:
    """A random tube start (3,) inside the coil region (disc of radius ``coil[2] * widen``)."""
    ext = body.extent
    rad = coil[2] * widen * math.sqrt(rng.uniform())
    a = rng.uniform(0, 2 * np.pi)
    y = float(np.clip(coil[0] + rad * math.sin(a), r, ext[1] - r))
    x = float(np.clip(coil[1] + rad * math.cos(a), r, ext[2] - r))
    lo, hi = body.tube_z_range(y, x, r)
    return np.array([rng.uniform(lo, hi), y, x])


def _flat_direction(rng: np.random.Generator) -> np.ndarray:
    """A random unit direction (3,) close to the xy plane."""
    a = rng.uniform(0, 2 * np.pi)
    d = np.array([rng.normal(0, 0.15), np.sin(a), np.cos(a)])
    return d / np.linalg.norm(d)


def _branches(
    world: World,
    body: Body,
    rng: np.random.Generator,
    p: SampleParams,
    tubes: list[Tube],
    main: Tube,
    wall0: float,
) -> None:
    """Side branches from the proximal part of ``main`` that end blind (nephrostome funnels),
    appended to ``tubes``."""
    pts, m = main.points, len(main.points)
    corr = p.curvature_correlation_um
    for _b in range(p.n_branches):
        if m < 60:
            return
        j = int(rng.uniform(0.05, max(0.1, min(0.4, p.proximal_fraction * 0.5))) * m)
        j = int(np.clip(j, 10, m - 10))
        tvec = pts[min(j + 3, m - 1)] - pts[max(j - 3, 0)]
        tvec /= np.linalg.norm(tvec) + 1e-12
        d = unit_perp(tvec, rng) * np.array([0.4, 1.0, 1.0])
        d /= np.linalg.norm(d)
        fac = rng.uniform(*p.branch_radius_factor)
        blen = rng.uniform(*p.branch_length_um)
        nb = int(blen) + 2
        rb_out, rb_lum = tube_profiles(rng, nb, main.r_out[j] * fac, p, wall0 * 0.9)
        win = int(3 * main.r_out[j]) + 2
        first = main.world_start
        bpts, bfirst = walk(
            world,
            body,
            rng,
            pts[j],
            d,
            blen,
            rb_out,
            np.full(nb, p.persistence_proximal_um * 1.5),
            corr,
            p.min_bend_radius_factor,
            exit_when_done=False,
            exclude=[(first + max(0, j - win), first + j + win)],
        )
        mb = len(bpts)
        lectin = np.full(mb, p.lectin_branch) * (1 + 0.1 * smooth_1d(rng, mb, 40.0))
        tubes.append(
            Tube(
                bpts,
                rb_out[:mb],
                rb_lum[:mb],
                lectin,
                kind=TUBULE_KIND,
                world_start=bfirst,
                branch=True,
            )
        )


def _vessels(world: World, body: Body, rng: np.random.Generator, p: SampleParams) -> list[Tube]:
    """Posterior cardinal vein-like vessels crossing the field along the body axis (x)."""
    ext = body.extent
    tubes = []
    for _ in range(p.n_vessels):
        r0 = rng.uniform(*p.vessel_radius_um)
        n = int(ext[2] * 1.6)
        r_out = r0 * (1 + 0.08 * smooth_1d(rng, n, 60.0))
        y = rng.uniform(0.15, 0.85) * ext[1]
        lo, hi = body.tube_z_range(y, 0.0, r0)
        start = np.array([rng.uniform(lo, hi), y, -r0])
        d = np.array([rng.normal(0, 0.05), rng.normal(0, 0.25), 1.0])
        pts, first = walk(
            world,
            body,
            rng,
            start,
            d,
            ext[2] * 0.9,
            r_out,
            np.full(n, p.vessel_persistence_um),
            p.curvature_correlation_um * 3,
            p.min_bend_radius_factor * 2,
            exit_when_done=True,
            exit_face=3,
        )
        m = len(pts)
        tubes.append(
            Tube(pts, r_out[:m], np.zeros(m), np.zeros(m), kind=VESSEL_KIND, world_start=first)
        )
    return tubes


def _tubule(
    world: World,
    body: Body,
    rng: np.random.Generator,
    p: SampleParams,
    coil: tuple[float, float, float],
    tubes: list[Tube],
) -> None:
    """One main tubule (proximal coil, then distal exit) and its branches, appended to
    ``tubes``. A walk that runs into a dead end stops (a blind end, like a nephrostome); the rest
    of the tubule's length then continues as a new pass elsewhere in the field."""
    ext = body.extent
    r0 = rng.uniform(*p.outer_radius_um)
    wall0 = rng.uniform(*p.wall_thickness_um)
    n = int(p.tubule_length_um + 1.5 * max(ext[1], ext[2]))
    r_out, r_lum = tube_profiles(rng, n, r0, p, wall0)
    s = np.arange(n, dtype=np.float64)
    s_prox = p.proximal_fraction * p.tubule_length_um
    w = 1.0 / (1.0 + np.exp(-(s - s_prox) / 25.0))  # 0 proximal -> 1 distal
    persistence = p.persistence_proximal_um * (1 - w) + p.persistence_distal_um * w
    coil_weight = 1.0 - w
    lectin = p.lectin_brush_border * (
        (1 - w) * (1 + 0.12 * smooth_1d(rng, n, 50.0)) + w * p.lectin_distal
    )
    s_done = 0
    for piece in range(6):
        remaining = p.tubule_length_um - s_done
        if piece > 0 and remaining < 80.0:
            break
        start = _random_in_coil(rng, body, r0, coil)
        for _attempt in range(40):
            if world.clearance(start, r0, ()) > 4.0:
                break
            start = _random_in_coil(rng, body, r0, coil, 1.0 + _attempt / 10)
        sl = slice(s_done, n)
        pts, first = walk(
            world,
            body,
            rng,
            start,
            _flat_direction(rng),
            remaining,
            r_out[sl],
            persistence[sl],
            p.curvature_correlation_um,
            p.min_bend_radius_factor,
            exit_when_done=True,
            coil=coil,
            coil_weight=coil_weight[sl],
        )
        m = len(pts)
        tubes.append(
            Tube(
                pts,
                r_out[sl][:m],
                r_lum[sl][:m],
                lectin[sl][:m],
                kind=TUBULE_KIND,
                world_start=first,
            )
        )
        s_done += m
        if piece == 0:
            _branches(world, body, rng, p, tubes, tubes[-1], wall0)
        if m >= remaining:
            break


def centrelines(p: SampleParams, body: Body, rng: np.random.Generator) -> list[Tube]:
    """All tubes of a sample: vessels first (long, straight, along x), then tubules + branches.
    The proximal parts of the tubules coil within a compact region of the field."""
    world = World()
    tubes = _vessels(world, body, rng, p)
    ext = body.extent
    cy = ext[1] * (0.5 + rng.uniform(-0.12, 0.12))
    cx = ext[2] * (0.5 + rng.uniform(-0.12, 0.12))
    coil = (cy, cx, p.coil_radius_um)
    for _ in range(p.n_tubules):
        _tubule(world, body, rng, p, coil, tubes)
    return tubes
