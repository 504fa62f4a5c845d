"""Tissue compartments per voxel: tubes rasterised from their centre lines, then the layers of
the body around them (epidermis, mesenchyme with interstitial gaps, somites), and the dense
ground truth that follows from them (0 lumen, 1 tubule wall, 2 everything else)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from sparse3d.data.synth.anatomy import TUBULE_KIND, TubePoints
from sparse3d.data.synth.grid import Grid, nearest_point_map
from sparse3d.data.synth.params import BACKGROUND, LUMEN, TUBULE, SampleParams

#: Tissue compartment codes of the model (internal; ``region`` arrays hold them as uint8):
#: outside the embryo, epidermis, mesenchyme, interstitial gap, somite, tubule wall, tubule
#: lumen, vessel lumen, vessel endothelium.
C_OUT, C_EPI, C_MES, C_GAP, C_SOM, C_WALL, C_LUMEN, C_VLUMEN, C_ENDO = range(9)
N_COMPARTMENTS = 9


@dataclass
class TubeMaps:
    """Per voxel (Z, Y, X): the tube it belongs to and where it lies in it.

    Attributes:
        pid: int64 index of the nearest centre-line point (into :class:`TubePoints`) of the tube
            layer whose surface is relatively nearest.
        d_tube: float32 distance (um) to that point.
        ro, rl: float32 outer and lumen radius there, with surface roughness.
        in_lumen, in_tubule, in_vessel, in_vlumen: bool masks of tubule lumen, tubule (wall and
            lumen), vessel (endothelium and lumen) and vessel lumen.
        is_tubule: bool, the nearest tube is a tubule (not a vessel).
    """

    pid: np.ndarray
    d_tube: np.ndarray
    ro: np.ndarray
    rl: np.ndarray
    in_lumen: np.ndarray
    in_tubule: np.ndarray
    in_vessel: np.ndarray
    in_vlumen: np.ndarray
    is_tubule: np.ndarray


def rasterise_tubes(
    tp: TubePoints, grid: Grid, p: SampleParams, n_rough: np.ndarray, n_lum: np.ndarray
) -> TubeMaps:
    """Tubes as unions of layers (main tubes + vessels, branches): a branch starting inside its
    parent must not carve the parent's wall, so each layer gets its own nearest-point map.
    ``n_rough``, ``n_lum``: (Z, Y, X) unit smooth fields for the outer and lumen roughness."""
    shape = grid.shape
    r_max = float(tp.r_out.max())
    pid = np.zeros(shape, np.int64)
    d_tube = np.full(shape, np.inf, np.float32)
    ro = np.ones(shape, np.float32)
    rl = np.zeros(shape, np.float32)
    score = np.full(shape, np.inf, np.float32)
    in_lumen = np.zeros(shape, bool)
    in_tubule = np.zeros(shape, bool)
    in_vessel = np.zeros(shape, bool)
    in_vlumen = np.zeros(shape, bool)
    for layer in (0, 1):
        sel = np.nonzero(tp.layer == layer)[0]
        if len(sel) == 0:
            continue
        pid_l, d_l = nearest_point_map(tp.points[sel], grid, pad_um=r_max + 4.0)
        pid_l = sel[pid_l]
        ro_l = tp.r_out[pid_l] * (1 + p.surface_roughness * n_rough)
        rl_l = tp.r_lum[pid_l] * (1 + p.lumen_roughness * n_lum)
        tub = tp.kind[pid_l] == TUBULE_KIND
        in_lumen |= tub & (d_l < rl_l)
        in_tubule |= tub & (d_l < ro_l)
        in_vessel |= ~tub & (d_l < ro_l)
        in_vlumen |= ~tub & (d_l < ro_l - p.endothelium_um)
        sc = d_l / ro_l
        take = sc < score
        pid[take], d_tube[take], ro[take], rl[take], score[take] = (
            pid_l[take],
            d_l[take],
            ro_l[take],
            rl_l[take],
            sc[take],
        )
    is_tubule = tp.kind[pid] == TUBULE_KIND
    return TubeMaps(pid, d_tube, ro, rl, in_lumen, in_tubule, in_vessel, in_vlumen, is_tubule)


def compartments(
    grid: Grid,
    p: SampleParams,
    tubes: TubeMaps,
    surface_z: np.ndarray,
    somite_z: np.ndarray,
    n_gap: np.ndarray,
) -> np.ndarray:
    """(Z, Y, X) uint8 compartment codes ``C_*``: the body layers by depth (``surface_z``,
    ``somite_z``: (1, Y, X) um), interstitial gaps where the smooth field ``n_gap`` (Z, Y, X) is
    in its top ``interstitial_fraction``, then vessels and tubules over them."""
    shape = grid.shape
    z = grid.broadcast_centres()[0]
    region = np.full(shape, C_MES, dtype=np.uint8)
    region[np.broadcast_to(z >= somite_z, shape)] = C_SOM
    region[np.broadcast_to(z < surface_z + p.epidermis_thickness_um, shape)] = C_EPI
    region[np.broadcast_to(z < surface_z, shape)] = C_OUT
    gap = n_gap > ndtri(1.0 - p.interstitial_fraction)
    region[(region == C_MES) & gap] = C_GAP
    region[tubes.in_vessel] = C_ENDO
    region[tubes.in_vlumen] = C_VLUMEN
    region[tubes.in_tubule] = C_WALL
    region[tubes.in_lumen] = C_LUMEN
    return region


def dense_label(region: np.ndarray) -> np.ndarray:
    """(Z, Y, X) uint8 dense ground truth of compartments ``region``: 0 lumen, 1 tubule wall,
    2 background (everything else, vessels and epidermis included) (Sec. 3.1)."""
    dense = np.full(region.shape, BACKGROUND, dtype=np.uint8)
    dense[region == C_WALL] = TUBULE
    dense[region == C_LUMEN] = LUMEN
    return dense
