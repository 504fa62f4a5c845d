"""The voxel grid of one rendering and nearest-point maps on it (vectorised Voronoi cells).

Geometry is drawn in micrometres; the grid only decides where it is sampled, so the same seed
gives the same tissue at every ``scale``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class Grid:
    """Voxel grid of one rendering: shape (Z, Y, X), voxel size and physical extent in um."""

    shape: tuple[int, int, int]
    voxel: tuple[float, float, float]
    extent: tuple[float, float, float]  # physical extent of the scale-1 volume (geometry frame)

    def centres(self, axis: int) -> np.ndarray:
        """(n,) float32 voxel-centre coordinates (um) along ``axis``."""
        return ((np.arange(self.shape[axis]) + 0.5) * self.voxel[axis]).astype(np.float32)

    def broadcast_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel centres (um) as broadcastable z (Z, 1, 1), y (1, Y, 1), x (1, 1, X)."""
        z = self.centres(0)[:, None, None]
        y = self.centres(1)[None, :, None]
        x = self.centres(2)[None, None, :]
        return z, y, x


def make_grid(shape_zyx: Sequence[int], voxel_size_zyx_um: Sequence[float], scale: float) -> Grid:
    """The grid of a sample of full-resolution ``shape_zyx`` rendered at ``scale``: shape times
    ``scale`` (at least 4 voxels per axis), voxel size divided by it, same physical extent."""
    extent = tuple(n * v for n, v in zip(shape_zyx, voxel_size_zyx_um, strict=True))
    shape = tuple(max(4, int(round(n * scale))) for n in shape_zyx)
    voxel = tuple(e / n for e, n in zip(extent, shape, strict=True))
    return Grid(shape=shape, voxel=voxel, extent=extent)  # type: ignore[arg-type]


def interp_axis(arr: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices ``coords``."""
    n = arr.shape[axis]
    c = np.clip(coords, 0, n - 1.000001)
    i0 = np.floor(c).astype(np.int64)
    shape = [1] * arr.ndim
    shape[axis] = len(c)
    w = (c - i0).astype(np.float32).reshape(shape)
    return np.take(arr, i0, axis=axis) * (1 - w) + np.take(arr, i0 + 1, axis=axis) * w


def nearest_point_map(
    points_um: np.ndarray,
    grid: Grid,
    pad_um: float | Sequence[float],
    metric: tuple[float, float, float] = (1.0, 1.0, 1.0),
    z_from: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel centre: index of the nearest point (-1 if none) and the exact distance to
    it in the scaled ``metric`` (distance along axis a counts ``metric[a]`` times).

    Args:
        points_um: (N, 3) zyx points in um.
        grid: the voxel grid.
        pad_um: the points are rasterised into a grid padded by this (per axis, so points just
            outside the volume still count) and a Euclidean distance transform finds the
            nearest rasterised point.
        metric: per-axis distance weights.
        z_from: only slices ``z >= z_from`` are computed (the rest get -1 / inf).

    Returns:
        ids (Z, Y, X) int32 and distances (Z, Y, X) float32 (um).
    """
    shape = grid.shape
    ids_full = np.full(shape, -1, np.int32)
    dist_full = np.full(shape, np.inf, np.float32)
    z_from = int(np.clip(z_from, 0, shape[0]))
    if len(points_um) == 0 or z_from >= shape[0]:
        return ids_full, dist_full
    voxel = np.asarray(grid.voxel)
    pad = np.ceil(np.broadcast_to(np.asarray(pad_um, float), (3,)) / voxel).astype(int)
    sub = (shape[0] - z_from, shape[1], shape[2])
    origin = np.array([z_from, 0, 0]) - pad  # voxel index of the padded grid's first voxel
    pshape = tuple(int(s + 2 * q) for s, q in zip(sub, pad, strict=True))
    cell = np.floor(points_um / voxel).astype(np.int64) - origin
    ok = np.all((cell >= 0) & (cell < np.asarray(pshape)), axis=1)
    if not ok.any():
        return ids_full, dist_full
    seeds = np.full(pshape, -1, dtype=np.int32)
    seeds[tuple(cell[ok].T)] = np.nonzero(ok)[0].astype(np.int32)
    ind = ndi.distance_transform_edt(
        seeds < 0,
        sampling=tuple(voxel * np.asarray(metric)),
        return_distances=False,
        return_indices=True,
    )
    crop = tuple(slice(q, q + s) for q, s in zip(pad, sub, strict=True))
    ids = seeds[ind[0][crop], ind[1][crop], ind[2][crop]]
    del ind
    pts = points_um.astype(np.float32)
    z, y, x = grid.broadcast_centres()
    z = z[z_from:]
    dist2 = ((z - pts[ids, 0]) * metric[0]) ** 2
    dist2 += ((y - pts[ids, 1]) * metric[1]) ** 2
    dist2 += ((x - pts[ids, 2]) * metric[2]) ** 2
    ids_full[z_from:] = ids
    dist_full[z_from:] = np.sqrt(dist2)
    return ids_full, dist_full
