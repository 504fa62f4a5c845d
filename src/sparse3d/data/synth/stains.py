"""Stains (Sec. 3.1): relative fluorophore densities per voxel, before the microscope.

ch0 Tomato-Lectin/fluorescein: apical brush border of the proximal tubule (weak in the distal
part), some basal lamina, blood vessel endothelium (tomato lectin binds endothelium), yolk
platelet autofluorescence in all cells. ch1 DAPI: nuclei with chromatin texture, a few brighter
mitotic figures. ch2 beta-catenin/Cy3: cell borders, strongest in epithelia, weak in mesenchyme.
Spectral bleed-through between the channels is added last.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from sparse3d.data.synth.anatomy import TubePoints
from sparse3d.data.synth.cells import CellMaps, CellSeeds, sigmoid
from sparse3d.data.synth.grid import Grid
from sparse3d.data.synth.params import SampleParams
from sparse3d.data.synth.tissue import (
    C_ENDO,
    C_EPI,
    C_GAP,
    C_LUMEN,
    C_MES,
    C_SOM,
    C_VLUMEN,
    C_WALL,
    N_COMPARTMENTS,
    TubeMaps,
)


def _dapi(maps: CellMaps, seeds: CellSeeds, p: SampleParams, texture: np.ndarray) -> np.ndarray:
    """DAPI density (Z, Y, X): nuclei with chromatin ``texture`` (unit noise, (Z, Y, X))."""
    dapi = maps.nucleus * seeds.nuc_bright[maps.ownc] * p.dapi_nucleus
    dapi *= np.clip(1 + p.dapi_texture * texture, 0.2, None)
    return dapi


def _beta_catenin(
    maps: CellMaps,
    seeds: CellSeeds,
    region: np.ndarray,
    tubes: TubeMaps,
    p: SampleParams,
    texture: np.ndarray,
) -> np.ndarray:
    """Beta-catenin density (Z, Y, X): cell borders, strongest in epithelia, weaker on the
    tubule's basal side, patchy (``texture``) in mesenchyme and muscle; a cytoplasmic pool."""
    w_memb = np.zeros(N_COMPARTMENTS, dtype=np.float32)
    w_memb[C_WALL] = p.bcat_epithelium
    w_memb[C_EPI] = p.bcat_epidermis
    w_memb[C_MES] = p.bcat_mesenchyme
    w_memb[C_SOM] = p.bcat_somite
    w_memb[C_ENDO] = p.bcat_endothelium
    w_memb[C_VLUMEN] = 0.3 * p.bcat_mesenchyme  # blood cell membranes
    memb = maps.memb
    bcat = np.where(memb, w_memb[region] * seeds.memb_bright[maps.ownc], 0.0).astype(np.float32)
    # mesenchymal and muscle contacts are patchy, not continuous belts as in epithelia
    patchy = np.isin(region, (C_MES, C_SOM))
    bcat[patchy] *= np.clip(1 + 0.7 * texture[patchy], 0.05, None)
    basal = (region == C_WALL) & (tubes.d_tube > tubes.ro - 1.5) & memb
    bcat[basal] *= p.bcat_epithelium_basal / max(p.bcat_epithelium, 1e-6)
    bcat += maps.cellular * (p.bcat_cytoplasm * (1 - 0.6 * maps.nucleus))
    return bcat


def _lectin(tp: TubePoints, tubes: TubeMaps, region: np.ndarray, p: SampleParams) -> np.ndarray:
    """Lectin stain density (Z, Y, X): apical brush border (level per centre-line point), lumen
    content, basal lamina, vessel endothelium, interstitial matrix."""
    d_tube, ro, rl = tubes.d_tube, tubes.ro, tubes.rl
    lect_lvl = tp.lectin[tubes.pid]
    brush = sigmoid((d_tube - rl) / 0.35) * sigmoid((rl + p.brush_border_um - d_tube) / 0.35)
    lectin = np.where(region == C_WALL, brush * lect_lvl, 0.0).astype(np.float32)
    lectin += np.where(region == C_LUMEN, p.lectin_lumen * lect_lvl, 0.0)
    basal_lam = np.exp(-0.5 * ((d_tube - ro) / 0.7) ** 2)
    lectin += np.where(tubes.is_tubule, p.lectin_basal * basal_lam, 0.0)
    endo_prof = np.exp(-0.5 * ((d_tube - ro + 0.5 * p.endothelium_um) / 0.7) ** 2)
    lectin += np.where(~tubes.is_tubule, p.lectin_endothelium * endo_prof, 0.0)
    lectin += np.where(region == C_GAP, p.lectin_ecm, 0.0)  # glycoproteins of the interstitial ECM
    return lectin


def _yolk(
    grid: Grid, maps: CellMaps, region: np.ndarray, p: SampleParams, rng: np.random.Generator
) -> np.ndarray:
    """Yolk platelet density (Z, Y, X): Poisson points in um, rasterised and blurred to
    ~1.5 um blobs, in the cytoplasm only, fewer in the tubule epithelium."""
    shape, voxel, extent = grid.shape, grid.voxel, grid.extent
    vol_um3 = float(np.prod(extent))
    n_yolk = rng.poisson(p.yolk_per_1000um3 * vol_um3 / 1000.0)
    yolk_pts = rng.uniform(0, 1, (n_yolk, 3)) * np.asarray(extent)
    yolk_amp = rng.uniform(0.5, 1.0, n_yolk)
    yi = np.minimum((yolk_pts / np.asarray(voxel)).astype(np.int64), np.asarray(shape) - 1)
    yolk = np.zeros(shape, dtype=np.float32)
    np.add.at(yolk, tuple(yi.T), yolk_amp.astype(np.float32))
    vox_um3 = float(np.prod(voxel))
    yolk *= min(1.0, 3.0 / vox_um3)  # platelet (~3 um^3) dilutes into bigger voxels
    yolk = ndi.gaussian_filter(yolk, sigma=[max(1.0 / v, 0.3) for v in voxel]) * 6.0
    yolk *= maps.cellular * (1 - maps.nucleus)
    yolk[region == C_WALL] *= p.yolk_in_epithelium
    return yolk


def stain_densities(
    tp: TubePoints,
    tubes: TubeMaps,
    region: np.ndarray,
    seeds: CellSeeds,
    maps: CellMaps,
    grid: Grid,
    p: SampleParams,
    textures: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Fluorophore densities [lectin, DAPI, beta-catenin], each (Z, Y, X) float32: the stains
    scaled by the preparation's ``stain_strength``, plus autofluorescence (independent of the
    staining) and spectral bleed-through. ``textures``: two unit noise fields (Z, Y, X), fine
    (chromatin) and coarser (patchy contacts); ``rng`` draws the yolk platelets."""
    dapi = _dapi(maps, seeds, p, textures[0])
    bcat = _beta_catenin(maps, seeds, region, tubes, p, textures[1])
    lectin = _lectin(tp, tubes, region, p)
    yolk = _yolk(grid, maps, region, p, rng)
    cellular = maps.cellular
    lectin *= p.stain_strength[0]
    dapi *= p.stain_strength[1]
    bcat *= p.stain_strength[2]
    lectin += p.yolk_autofluorescence * yolk + p.tissue_autofluorescence * cellular
    lectin += np.where(region == C_VLUMEN, 0.15 * (maps.own >= 0), 0.0)  # erythrocytes
    dapi += 0.25 * p.yolk_autofluorescence * yolk + 0.02 * cellular
    dens = [lectin, dapi, bcat]
    # bleed-through between channels
    dens[2] = dens[2] + p.bleed_fitc_to_cy3 * dens[0]
    dens[0] = dens[0] + p.bleed_dapi_to_fitc * dens[1]
    return dens
