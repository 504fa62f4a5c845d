"""The microscope (Zeiss LSM 510, Plan-Apochromat 40x/1.3 oil, Sec. 3.1): from fluorophore
densities to 8-bit grey values.

Whole-mount stain penetration falls with depth below the embryo surface; excitation/emission
light is attenuated with depth (stronger for blue); the confocal PSF is a Gaussian whose axial
width grows with depth (refractive-index mismatch between oil and tissue); the 2x down-sampling
of the paper (0.88 -> 1.76 um, 1.02 -> 2.04 um) is a box filter and averages 8 recorded voxels;
the four stitched tiles each show vignetting; photon shot noise (Poisson), detector read noise
(Gaussian), 8-bit range with saturation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from sparse3d.data.synth.grid import Grid
from sparse3d.data.synth.params import (
    EXCITATION_NM,
    IMMERSION_INDEX,
    NUMERICAL_APERTURE,
    RECORDED_VOXEL_ZYX_UM,
    SampleParams,
)


def psf_sigmas_um(p: SampleParams, grid: Grid, depth_um: float) -> list[tuple[float, ...]]:
    """Per channel (sigma_z, sigma_y, sigma_x) in um of the effective blur at ``depth_um``: the
    confocal PSF (lateral FWHM 0.51 lambda/NA; axial FWHM 0.88 lambda/(n - sqrt(n^2 - NA^2)),
    growing with depth) combined with the box filter of binning recorded voxels into one voxel."""
    n, na = IMMERSION_INDEX, NUMERICAL_APERTURE
    out = []
    for lam_nm in EXCITATION_NM:
        lam = lam_nm / 1000.0
        fwhm_lat = 0.51 * lam / na
        fwhm_ax = 0.88 * lam / (n - math.sqrt(n * n - na * na)) + p.axial_psf_growth * depth_um
        sig = []
        for a, fwhm in ((0, fwhm_ax), (1, fwhm_lat), (2, fwhm_lat)):
            box = grid.voxel[a] / math.sqrt(12.0)
            sig.append(math.hypot(fwhm / 2.355, box))
        out.append(tuple(sig))
    return out


def vignetting(grid: Grid, p: SampleParams) -> np.ndarray:
    """(1, Y, X) float32 relative brightness of 2 x 2 stitched tiles: quadratic fall-off from
    each tile centre."""
    _, y, x = grid.broadcast_centres()
    vig = np.ones((1, grid.shape[1], grid.shape[2]), dtype=np.float32)
    for a, coord in ((1, y), (2, x)):
        half = grid.extent[a] / 2
        u = (coord % half) / half * 2 - 1  # -1..1 within a tile
        vig = vig * (1 - 0.5 * p.vignetting * u**2)
    return vig


def record(
    dens: list[np.ndarray],
    grid: Grid,
    p: SampleParams,
    surface_z: np.ndarray,
    unevenness: list[np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Image the densities ``dens`` (3 x (Z, Y, X)) -> (3, Z, Y, X) float32 grey values 0..255
    (8-bit detector range averaged over the recorded voxels in one voxel).

    Args:
        surface_z: (1, Y, X) depth (um) of the embryo surface.
        unevenness: three unit smooth fields (Z, Y, X): staining unevenness per channel.
        rng: draws the photon and read noise.
    """
    shape, voxel = grid.shape, grid.voxel
    z = grid.broadcast_centres()[0]
    depth = np.broadcast_to(np.maximum(z - surface_z, 0.0), shape)  # um below the surface
    max_depth = float(depth.max())
    sig0 = psf_sigmas_um(p, grid, 0.0)
    sig1 = psf_sigmas_um(p, grid, max_depth)
    wdepth = (depth / max(max_depth, 1e-6)).astype(np.float32)
    vig = vignetting(grid, p)
    # recorded voxels averaged into one voxel: 8 at scale 1 (the paper's 2x down-sampling)
    n_avg = float(np.prod(voxel) / np.prod(RECORDED_VOXEL_ZYX_UM))
    image = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        f = dens[c] * np.exp(-depth / p.penetration_um[c])
        f *= np.exp(p.staining_unevenness * unevenness[c])
        blur0 = ndi.gaussian_filter(f, [s / v for s, v in zip(sig0[c], voxel, strict=True)])
        blur1 = ndi.gaussian_filter(f, [s / v for s, v in zip(sig1[c], voxel, strict=True)])
        f = blur0 * (1 - wdepth) + blur1 * wdepth
        att = p.attenuation_um_488 * (EXCITATION_NM[c] / 488.0) ** 1.5
        f *= np.exp(-depth / att) * vig
        photons = f * p.peak_photons[c] + p.background_photons[c]
        counts = rng.poisson(np.maximum(photons, 0) * n_avg).astype(np.float32) / n_avg
        grey = counts * (p.grey_at_unit / p.peak_photons[c]) + p.grey_offset
        grey += rng.normal(0, p.read_noise_grey / math.sqrt(n_avg), shape)
        image[c] = np.clip(grey, 0, 255)
    return image
