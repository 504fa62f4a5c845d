"""Cells: seeds (micrometres, independent of the grid) and their voxel maps.

Every tube wall is a one-cell-thick epithelium whose cells are Voronoi cells of seeds on the
mid-wall surface, so lateral membranes run radially. Around the tubes lies non-empty tissue:
loose mesenchyme, a two-layer epidermis under the embryo surface, somitic muscle (cells
elongated along the body axis, x) deep in the stack, vessel endothelium and a few nucleated blood
cells. Every cell has a nucleus; a few are mitotic (condensed, brighter, smaller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from sparse3d.data.synth.anatomy import TUBULE_KIND, VESSEL_KIND, Tube, TubePoints
from sparse3d.data.synth.body import Body
from sparse3d.data.synth.grid import Grid, nearest_point_map
from sparse3d.data.synth.params import SampleParams
from sparse3d.data.synth.tissue import C_ENDO, C_EPI, C_MES, C_SOM, C_VLUMEN, C_WALL
from sparse3d.data.synth.walk import unit_perp

#: Kinds of the tissue (non-epithelial, non-muscle) seeds.
MESENCHYME, EPIDERMIS, ENDOTHELIUM, BLOOD = 0, 1, 2, 3

_TubeDistance = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CellSeeds:
    """Cell centres (um) and per-cell attributes; cells are indexed wall, tissue, somite.

    Attributes:
        wall: (n_wall, 3) epithelial cell seeds. tissue: (n_tis, 3) mesenchyme, epidermis,
            endothelium and blood cell seeds; tissue_kind: (n_tis,) int8 of ``MESENCHYME`` ...
            ``BLOOD``. somite: (n_som, 3) muscle cell seeds.
        r_nuc, nuc_bright, memb_bright: (n_cells,) float32 nucleus radius (um), DAPI and
            membrane brightness factors. nuc_c: (n_cells, 3) float32 nucleus centres (um).
        cell_r: (n_tis,) float32 radius of free-floating (blood) cells, inf for the others.
    """

    wall: np.ndarray
    tissue: np.ndarray
    tissue_kind: np.ndarray
    somite: np.ndarray
    r_nuc: np.ndarray
    nuc_bright: np.ndarray
    memb_bright: np.ndarray
    nuc_c: np.ndarray
    cell_r: np.ndarray

    @property
    def n_wall(self) -> int:
        return len(self.wall)

    @property
    def n_tis(self) -> int:
        return len(self.tissue)

    @property
    def n_cells(self) -> int:
        return len(self.wall) + len(self.tissue) + len(self.somite)


@dataclass(frozen=True)
class CellMaps:
    """Per voxel (Z, Y, X): own int32 global cell index (-1 outside cells), ownc = max(own, 0),
    cellular bool, memb bool one-voxel cell borders, nucleus float32 soft nucleus mask 0..1."""

    own: np.ndarray
    ownc: np.ndarray
    cellular: np.ndarray
    memb: np.ndarray
    nucleus: np.ndarray


def _random_packing(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: float, scale_zyx=(1, 1, 1)
) -> np.ndarray:
    """Irregular cell centres (n, 3) with mean spacing ``spacing``: uniform random points thinned
    so no two are closer than ~0.6 spacing (in coordinates divided by ``scale_zyx``)."""
    sc = np.asarray(scale_zyx, float)
    vol = float(np.prod((hi - lo) / sc))
    n = rng.poisson(1.95 * vol / spacing**3)
    pts = rng.uniform(0, 1, (n, 3)) * ((hi - lo) / sc)
    pairs = cKDTree(pts).query_pairs(0.62 * spacing, output_type="ndarray")
    keep = np.ones(n, dtype=bool)
    keep[pairs[:, 1]] = False
    return pts[keep] * sc + lo


def _jittered_lattice(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray, jitter: float
) -> np.ndarray:
    """Points (n, d) of a jittered cubic lattice (spacing per axis) covering the box [lo, hi]."""
    axes = [np.arange(a, b + s, s) for a, b, s in zip(lo, hi, spacing, strict=True)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    return g + rng.uniform(-jitter, jitter, g.shape) * spacing


def _wall_seeds(
    tp: TubePoints, p: SampleParams, rng: np.random.Generator, tube_distance: _TubeDistance
) -> np.ndarray:
    """Epithelial cell seeds (n_wall, 3): rings on the mid-wall surface, staggered, one every
    cell width; only seeds that lie in the wall of their own tube are kept."""
    wall_seeds = []
    for ti, t in enumerate(tp.tubes):
        if t.kind != TUBULE_KIND or len(t.points) < 3:
            continue
        tang = np.gradient(t.points, axis=0)
        tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-12
        stride = max(1, int(round(p.epithelial_cell_um * 0.9)))
        for j in range(0, len(t.points), stride):
            tv = tang[j]
            u = np.cross(tv, [1.0, 0.0, 0.0])
            if np.linalg.norm(u) < 0.3:
                u = np.cross(tv, [0.0, 1.0, 0.0])
            u /= np.linalg.norm(u)
            v = np.cross(tv, u)
            rmid = t.r_lum[j] + rng.uniform(0.45, 0.65) * (t.r_out[j] - t.r_lum[j])
            k = max(3, int(round(2 * np.pi * rmid / p.epithelial_cell_um)))
            ang = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k
            ang += rng.uniform(-0.25, 0.25, k) * 2 * np.pi / k
            along = rng.uniform(-0.25, 0.25, k) * p.epithelial_cell_um
            pts = (
                t.points[j][None]
                + rmid * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)
                + along[:, None] * tv
            )
            wall_seeds.append(np.concatenate([pts, np.full((k, 1), ti)], axis=1))
    ws = np.concatenate(wall_seeds) if wall_seeds else np.zeros((0, 4))
    if len(ws):
        d, i = tube_distance(ws[:, :3])
        ok = (tp.tube[i] == ws[:, 3]) & (d > tp.r_lum[i]) & (d < tp.r_out[i])
        ws = ws[ok, :3]
    return ws


def _epidermis_seeds(
    body: Body, p: SampleParams, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Two staggered epidermal layers (outer ciliated/goblet, inner sensorial), (n, 3)."""
    epi_xy = _jittered_lattice(rng, lo[1:], hi[1:], np.full(2, p.epidermis_cell_um), 0.35)
    epi = []
    for frac in (0.25, 0.72):
        zz = body.surface_z(epi_xy[:, 0], epi_xy[:, 1]) + frac * p.epidermis_thickness_um
        epi.append(np.column_stack([zz, epi_xy]))
        epi_xy = epi_xy + p.epidermis_cell_um * 0.5  # stagger the second layer
    return np.concatenate(epi)


def _vessel_seeds(
    tubes: list[Tube], p: SampleParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Endothelial cell seeds (rings in the vessel wall) and nucleated blood cells in the
    lumen, each (n, 3)."""
    endo, blood = [], []
    for t in tubes:
        if t.kind != VESSEL_KIND:
            continue
        for j in range(0, len(t.points), 14):
            tv = t.points[min(j + 1, len(t.points) - 1)] - t.points[max(j - 1, 0)]
            tv /= np.linalg.norm(tv) + 1e-12
            k = max(3, int(2 * np.pi * t.r_out[j] / 20.0))
            ang = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k
            u = unit_perp(tv, rng)
            v = np.cross(tv, u)
            rr = t.r_out[j] - 0.5 * p.endothelium_um
            endo.append(
                t.points[j][None] + rr * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)
            )
        nb = rng.poisson(p.blood_cells_per_100um * len(t.points) / 100.0)
        for _ in range(nb):
            j = int(rng.integers(len(t.points)))
            off = unit_perp(np.array([0.0, 0.0, 1.0]), rng) * rng.uniform(
                0, max(t.r_out[j] - 8.0, 0.0)
            )
            blood.append(t.points[j] + off)
    endo_pts = np.concatenate(endo) if endo else np.zeros((0, 3))
    return endo_pts, np.asarray(blood).reshape(-1, 3)


def _attributes(
    p: SampleParams, rng: np.random.Generator, ws: np.ndarray, tissue: np.ndarray, t_kind, som
) -> dict[str, np.ndarray]:
    """Per-cell nucleus radius, brightness factors and nucleus centres (drawn in um space,
    scale independent); nuclei sit off-centre in loose mesenchymal cells."""
    n_wall, n_tis = len(ws), len(tissue)
    n_cells = n_wall + n_tis + len(som)
    r_nuc = rng.uniform(*p.nucleus_radius_um, n_cells).astype(np.float32)
    nuc_bright = rng.lognormal(0.0, p.cell_variation, n_cells).astype(np.float32)
    memb_bright = rng.lognormal(0.0, p.cell_variation, n_cells).astype(np.float32)
    mitotic = rng.random(n_cells) < p.mitotic_fraction
    r_nuc[mitotic] *= 0.75
    nuc_bright[mitotic] *= 1.8
    r_nuc[n_wall : n_wall + n_tis][t_kind == ENDOTHELIUM] = 2.2  # flat endothelial nuclei
    r_nuc[n_wall : n_wall + n_tis][t_kind == BLOOD] = 2.6  # erythrocyte nuclei
    cell_r = np.full(n_tis, np.inf, np.float32)
    cell_r[t_kind == BLOOD] = 6.5  # blood cells are free-floating ellipsoid-ish bodies
    nuc_c = np.concatenate([ws, tissue, som]).astype(np.float32)
    off = rng.normal(0, 1, (n_tis, 3))
    off *= (rng.uniform(0, 0.18, n_tis) * p.mesenchyme_cell_um / np.linalg.norm(off, axis=1))[
        :, None
    ]
    nuc_c[n_wall : n_wall + n_tis][t_kind == MESENCHYME] += off[t_kind == MESENCHYME].astype(
        np.float32
    )
    return {
        "r_nuc": r_nuc,
        "nuc_bright": nuc_bright,
        "memb_bright": memb_bright,
        "nuc_c": nuc_c,
        "cell_r": cell_r,
    }


def cell_seeds(tp: TubePoints, body: Body, p: SampleParams, rng: np.random.Generator) -> CellSeeds:
    """All cell seeds of a sample and their attributes; no tissue seed sits inside a tube."""
    tree = cKDTree(tp.points)

    def tube_distance(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, i = tree.query(q, k=1)
        return d, i

    ws = _wall_seeds(tp, p, rng, tube_distance)
    lo = np.array([-15.0, -15.0, -15.0])
    hi = np.asarray(body.extent) + 15.0
    mes = _random_packing(rng, lo, hi, p.mesenchyme_cell_um)
    mz_s = body.surface_z(mes[:, 1], mes[:, 2])
    mz_m = body.somite_z(mes[:, 1], mes[:, 2])
    mes = mes[(mes[:, 0] > mz_s + p.epidermis_thickness_um) & (mes[:, 0] < mz_m)]
    epi_pts = _epidermis_seeds(body, p, rng, lo, hi)
    endo_pts, blood_pts = _vessel_seeds(tp.tubes, p, rng)
    d, i = tube_distance(mes)
    mes = mes[d > tp.r_out[i] + 1.0]
    d, i = tube_distance(epi_pts)
    epi_pts = epi_pts[d > tp.r_out[i] + 1.0]
    tissue = np.concatenate([mes, epi_pts, endo_pts, blood_pts])
    t_kind = np.concatenate(
        [
            np.full(len(mes), MESENCHYME, np.int8),
            np.full(len(epi_pts), EPIDERMIS, np.int8),
            np.full(len(endo_pts), ENDOTHELIUM, np.int8),
            np.full(len(blood_pts), BLOOD, np.int8),
        ]
    )
    # somitic muscle: packed in a metric that shrinks x, so cells are long along the body axis
    el = p.somite_elongation
    som = _random_packing(rng, lo, hi, p.somite_cell_um, scale_zyx=(1.0, 1.0, el))
    som = som[som[:, 0] >= body.somite_z(som[:, 1], som[:, 2])]
    d, i = tube_distance(som)
    som = som[d > tp.r_out[i] + 1.0]
    attrs = _attributes(p, rng, ws, tissue, t_kind, som)
    return CellSeeds(wall=ws, tissue=tissue, tissue_kind=t_kind, somite=som, **attrs)


def border(cell: np.ndarray) -> np.ndarray:
    """One-voxel cell borders (Z, Y, X) bool of cell ids ``cell`` (Z, Y, X): where the id changes
    along any axis, marked on the cellular side (id > 0), the lower voxel when both are
    cellular."""
    memb = np.zeros(cell.shape, dtype=bool)
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a] = slice(0, -1)
        hi[a] = slice(1, None)
        ca, cb = cell[tuple(lo)], cell[tuple(hi)]
        diff = ca != cb
        memb[tuple(lo)] |= diff & (ca > 0)
        memb[tuple(hi)] |= diff & (ca == 0)
    return memb


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function (soft step), computed through tanh."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ownership(
    seeds: CellSeeds, grid: Grid, p: SampleParams, region: np.ndarray, somite_z: np.ndarray
) -> np.ndarray:
    """(Z, Y, X) int32 global cell index per voxel (-1 outside cells): the nearest seed of the
    cell type of the voxel's compartment; blood cells only within their radius."""
    shape = grid.shape
    n_wall, n_tis = seeds.n_wall, seeds.n_tis
    wid, _ = nearest_point_map(seeds.wall, grid, pad_um=p.epithelial_cell_um)
    tid, td = nearest_point_map(seeds.tissue, grid, pad_um=p.mesenchyme_cell_um)
    z_som = int(np.floor(float(somite_z.min()) / grid.voxel[0])) - 1  # somites only below
    sc, el = p.somite_cell_um, p.somite_elongation
    sid, _ = nearest_point_map(
        seeds.somite, grid, pad_um=(sc, sc, sc * el), metric=(1.0, 1.0, 1.0 / el), z_from=z_som
    )
    own = np.full(shape, -1, dtype=np.int32)
    m = region == C_WALL
    if n_wall:
        own[m] = wid[m]
    if n_tis:
        m = np.isin(region, (C_EPI, C_MES, C_ENDO)) & (tid >= 0)
        own[m] = n_wall + tid[m]
        m = region == C_VLUMEN
        tc = np.maximum(tid, 0)
        inside_blood = m & (seeds.tissue_kind[tc] == BLOOD) & (td < seeds.cell_r[tc])
        own[inside_blood] = n_wall + tid[inside_blood]
    m = (region == C_SOM) & (sid >= 0)
    if len(seeds.somite):
        own[m] = n_wall + n_tis + sid[m]
    return own


def cell_maps(
    seeds: CellSeeds,
    grid: Grid,
    p: SampleParams,
    region: np.ndarray,
    somite_z: np.ndarray,
    texture: np.ndarray,
) -> CellMaps:
    """Voxel maps of the cells: ownership, borders and soft nuclei (edge 0.5 um, their surface
    roughened by the unit ``texture`` (Z, Y, X); muscle nuclei elongated along x)."""
    shape = grid.shape
    own = _ownership(seeds, grid, p, region, somite_z)
    cellular = own >= 0
    cell = np.zeros(shape, dtype=np.int32)
    cell[cellular] = own[cellular] * 16 + region[cellular].astype(np.int32) + 1
    memb = border(cell)
    ownc = np.maximum(own, 0)
    nucleus = np.zeros(shape, dtype=np.float32)
    edge = 0.5  # um, soft nuclear edge
    ci = ownc[cellular]
    zz, yy, xx = (np.broadcast_to(c, shape)[cellular] for c in grid.broadcast_centres())
    mx = np.where(region[cellular] == C_SOM, np.float32(1.0 / p.somite_elongation), np.float32(1.0))
    nuc_c = seeds.nuc_c
    d_nuc = np.sqrt(
        (zz - nuc_c[ci, 0]) ** 2 + (yy - nuc_c[ci, 1]) ** 2 + ((xx - nuc_c[ci, 2]) * mx) ** 2
    )
    d_nuc *= 1 + 0.1 * texture[cellular]
    nucleus[cellular] = sigmoid((seeds.r_nuc[ci] - d_nuc) / edge)
    return CellMaps(own=own, ownc=ownc, cellular=cellular, memb=memb, nucleus=nucleus)
