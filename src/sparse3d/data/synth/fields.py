"""Random fields and noise: smooth fields drawn in micrometres (the same at every scale), voxel
texture (depends on the grid) and smooth 1D profiles along centre lines."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from sparse3d.data.synth.grid import Grid, interp_axis


def smooth_field(rng: np.random.Generator, grid: Grid, corr_um: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field sampled at the voxel centres, (Z, Y, X) float32.

    Drawn on a coarse grid in micrometres (spacing ``corr_um / 2``) that depends only on the
    physical extent, then interpolated: the same seed gives the same field at every scale."""
    h = corr_um / 2.0
    n = [int(math.ceil(e / h)) + 5 for e in grid.extent]
    coarse = ndi.gaussian_filter(rng.standard_normal(n), sigma=1.0, mode="wrap")
    f = (coarse / (coarse.std() + 1e-12)).astype(np.float32)
    for a in range(3):
        f = interp_axis(f, grid.centres(a) / h + 2.0, a)
    return np.ascontiguousarray(f, dtype=np.float32)


def fine_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Unit-variance noise of ``shape`` smoothed over ``sigma_vox`` voxels (texture; depends on
    the grid), float32."""
    f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma_vox)
    return f / (f.std() + 1e-12)


def smooth_1d(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Unit-variance smooth 1D noise of length ``n`` with correlation ``corr`` samples, (n,)."""
    pad = int(3 * corr) + 1
    f = ndi.gaussian_filter1d(rng.standard_normal(n + 2 * pad), sigma=max(corr, 1e-3))[pad:-pad]
    return f / (f.std() + 1e-12) if n > 1 else np.zeros(n)
