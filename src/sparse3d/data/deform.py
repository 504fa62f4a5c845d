"""Geometry of the paper's spatial augmentation (Sec. 3.2): spline field, rotation, coordinates.

Sec. 3.2: "we sample random vectors from a normal distribution with standard deviation of 4 in a
grid with a spacing of 32 voxels in each direction and then apply a B-spline interpolation."

* Deformation: random displacement vectors ``N(0, sigma_voxels^2)`` per axis at control nodes
  ``grid_spacing`` voxels apart, interpolated with a cubic B-spline (the interpolating spline
  through the node values, not-a-knot ends). The tensor-product spline is evaluated EXACTLY at
  full resolution, separably: per axis an ``(N, n_nodes)`` interpolation matrix; the last
  contraction is one matrix product that also adds the affine part (and any normalisation the
  sampler needs). No reduced-resolution field is needed: the whole coordinate map costs a few
  milliseconds. Error: float32 round-off, about 2e-5 voxels.
* Rotation and scaling are done in physical space (micrometres): voxel offsets are scaled by the
  voxel size, rotated and scaled, and converted back, ``A = V^-1 R V / s``; exact.

Output voxel ``p`` of a tile reads input position ``q = start + c + A (p - c) + d(p)`` with ``c``
the tile centre and ``d`` the spline field (input voxels). :class:`SamplingPlan` holds ``q`` over
one output box in factorised form; :func:`plan_coordinates` evaluates it;
:mod:`sparse3d.data.resample` samples a volume at it. Works for 3D ``(z, y, x)`` and 2D
``(y, x)``. Pure numpy / torch: no MONAI, no config.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import make_interp_spline

# --------------------------------------------------------------------------------------------
# B-spline deformation field
# --------------------------------------------------------------------------------------------


def control_points(length: int, spacing: float) -> np.ndarray:
    """Positions (voxel coordinates) of the control nodes along one axis of length ``length``.

    Nodes are ``spacing`` apart, centred on the axis, cover ``[0, length - 1]`` and reach one node
    beyond each end (at least 4 nodes, as a cubic spline needs). Returns ``(n,)`` float64.
    """
    if length < 1 or spacing <= 0:
        raise ValueError(f"transforms: need length >= 1 and spacing > 0, got {length}, {spacing}")
    covering = math.ceil((length - 1) / spacing) + 1
    n = max(4, covering + 2)
    return (length - 1) / 2.0 + (np.arange(n) - (n - 1) / 2.0) * float(spacing)


@functools.lru_cache(maxsize=256)
def _spline_matrix(length: int, spacing: float) -> np.ndarray:
    nodes = control_points(length, spacing)
    spline = make_interp_spline(nodes, np.eye(nodes.size), k=3)  # not-a-knot cubic B-spline
    matrix = np.ascontiguousarray(spline(np.arange(length, dtype=np.float64)))
    matrix.setflags(write=False)
    return matrix


def spline_matrix(length: int, spacing: float) -> np.ndarray:
    """``(length, n_nodes)`` matrix: node values -> cubic B-spline interpolant at every voxel.

    Row ``i`` holds the weights of the interpolating cubic spline through the nodes of
    :func:`control_points` evaluated at voxel ``i`` (read-only, cached).
    """
    return _spline_matrix(int(length), float(spacing))


def deformation_field(node_values: np.ndarray, shape: Sequence[int], spacing: float) -> np.ndarray:
    """Dense displacement ``(D, *shape)`` (float64) from node values ``(D, *n_nodes)``.

    The tensor-product spline evaluated separably, axis by axis (exact).
    """
    field = np.asarray(node_values, dtype=np.float64)
    for axis, length in enumerate(shape):
        m = spline_matrix(length, spacing)
        field = np.moveaxis(np.tensordot(m, field, axes=([1], [axis + 1])), 0, axis + 1)
    return field


# --------------------------------------------------------------------------------------------
# rotation and scaling
# --------------------------------------------------------------------------------------------


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation acting on ``(z, y, x)`` (3D: angles about the z, y, x axes) or ``(y, x)`` (2D).

    3D: ``R = R_z @ R_y @ R_x``; the rotation about z turns the xy plane.
    """
    if len(angles_rad) == 1:
        c, s = math.cos(angles_rad[0]), math.sin(angles_rad[0])
        return np.array([[c, -s], [s, c]])
    az, ay, ax = angles_rad
    cz, sz, cy, sy, cx, sx = (f(a) for a in (az, ay, ax) for f in (math.cos, math.sin))
    r_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # turns (y, x)
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # turns (z, x)
    r_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # turns (z, y)
    return r_z @ r_y @ r_x


def voxel_affine(
    angles_rad: Sequence[float], scale: float, voxel_size: Sequence[float]
) -> np.ndarray:
    """``(D, D)`` map from output-voxel offsets to input-voxel offsets: ``V^-1 R V / scale``.

    The rotation happens in physical space (``V = diag(voxel_size)``), so anisotropic voxels rotate
    correctly; ``scale > 1`` magnifies the image (structures get bigger).
    """
    v = np.asarray(voxel_size, dtype=np.float64)
    rot = rotation_matrix(angles_rad)
    return rot * v[None, :] / v[:, None] / float(scale)


def required_margin(
    shape: Sequence[int],
    rotate_range_deg: Sequence[float],
    min_scale: float,
    voxel_size: Sequence[float],
    sigma_voxels: float,
    grid_spacing: float,
) -> tuple[int, ...]:
    """Context per side (voxels) an input needs beyond an output ``shape`` for nearly all draws.

    Worst case of rotation and scaling over a grid of angles (extremes, multiples of 45
    degrees and 24 steps per range), plus 4 sigma of the spline field and 2 voxels slack.
    """
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    axes = []
    for r in rotate_range_deg:
        values = set(np.linspace(-r, r, 25).tolist()) | {
            float(a) for a in range(-180, 181, 45) if abs(a) <= r
        }
        axes.append(np.radians(sorted(values)))
    worst = np.zeros(len(shape))
    for angles in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes)):
        a_mat = voxel_affine(angles, min_scale, voxel_size)
        worst = np.maximum(worst, np.abs(a_mat) @ half)
    lebesgue = 1.0
    for s in shape:
        lebesgue *= float(np.abs(spline_matrix(s, grid_spacing)).sum(axis=1).max())
    field = 4.0 * sigma_voxels * lebesgue
    return tuple(
        int(math.ceil(max(w - h, 0.0) + field)) + 2 for w, h in zip(worst, half, strict=True)
    )


# --------------------------------------------------------------------------------------------
# sampling coordinates of one output box
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPlan:
    """Input coordinates of one output box, kept factorised (see :func:`sampling_plan`).

    ``q_c(p) = sum_i m0[p0, i] u[c, i, p1..] + alpha_c p0 + beta[c, p1..]`` for output voxel
    ``p = (p0, p1, ...)`` of the box, in input voxels. Shapes (``D`` axes, ``n0`` nodes on axis 0):
    ``m0 (box0, n0)``, ``p0 (box0,)``, ``u (D, n0, *box[1:])``, ``alpha (D,)``,
    ``beta (D, *box[1:])``; ``lo``/``hi`` ``(D,)`` bound every coordinate; ``box`` the output
    box shape.
    """

    m0: np.ndarray
    p0: np.ndarray
    u: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    box: tuple[int, ...]

    def reaches_outside(self, spatial: Sequence[int]) -> list[bool]:
        """Per axis: may a coordinate fall outside ``[0, spatial - 1]`` (the input volume)?"""
        return [bool(self.lo[c] < 0 or self.hi[c] > s - 1) for c, s in enumerate(spatial)]


def sampling_plan(
    node_values: np.ndarray,
    affine: np.ndarray,
    out_shape: Sequence[int],
    grid_spacing: float,
    start: Sequence[int],
    box_lo: Sequence[int],
    box: Sequence[int],
) -> SamplingPlan:
    """Factorised input coordinates of the output box ``[box_lo, box_lo + box)`` of a tile.

    ``node_values (D, *n_nodes)`` and ``affine (D, D)`` are one draw for a tile of shape
    ``out_shape``; ``start`` is the input position of tile voxel 0 for the un-deformed map. The
    spline part ``u`` contracts the node values with the interpolation matrices of axes 1..D-1;
    ``alpha``/``beta`` are the affine part. ``lo``/``hi`` bound all coordinates: exact box
    corners of the affine part plus a bound of the field (``|M0 U| <= L max|U|``).
    """
    nd = len(out_shape)
    mats = [
        spline_matrix(out_shape[a], grid_spacing)[box_lo[a] : box_lo[a] + box[a]] for a in range(nd)
    ]
    coords = [np.arange(box_lo[a], box_lo[a] + box[a], dtype=np.float64) for a in range(nd)]
    centre = (np.asarray(out_shape, dtype=np.float64) - 1.0) / 2.0
    const = np.asarray(start, dtype=np.float64) + centre - affine @ centre  # (D,)
    if nd == 3:
        u = mats[1] @ (node_values @ mats[2].T)  # (c, i, j, k) -> (c, i, Y, X)
        beta = (
            const[:, None, None]
            + affine[:, 1, None, None] * coords[1][None, :, None]
            + affine[:, 2, None, None] * coords[2][None, None, :]
        )  # (c, Y, X)
    else:
        u = node_values @ mats[1].T  # (c, i, X)
        beta = const[:, None] + affine[:, 1, None] * coords[1][None, :]  # (c, X)
    alpha = affine[:, 0].copy()
    corners = np.stack(np.meshgrid(*[[c[0], c[-1]] for c in coords], indexing="ij"), -1).reshape(
        -1, nd
    )
    aff = const[None, :] + corners @ affine.T  # (2^D, c): affine extremes at the corners
    lebesgue = float(np.abs(mats[0]).sum(axis=1).max())
    field = lebesgue * np.abs(u).reshape(nd, -1).max(axis=1)
    return SamplingPlan(
        mats[0], coords[0], u, alpha, beta,
        aff.min(axis=0) - field, aff.max(axis=0) + field, tuple(int(b) for b in box),
    )  # fmt: skip


def _factors(
    plan: SamplingPlan,
    crop_lo: Sequence[int],
    scale: Sequence[float],
    shift: Sequence[float],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``lhs (box0, K)`` and ``rhs (D, K, M)`` with ``lhs @ rhs`` = coordinates.

    ``lhs = [M0 | p0 | 1]`` (spline rows of axis 0, the axis-0 coordinate, ones),
    ``rhs = [U; alpha; beta]`` per component, with ``(q_c - crop_lo_c) * scale_c + shift_c``
    folded in; ``M = prod(box[1:])``.
    """
    nd = len(crop_lo)
    sc = np.asarray(scale, dtype=np.float64)
    sh = np.asarray(shift, dtype=np.float64) - np.asarray(crop_lo, dtype=np.float64) * sc
    n0 = plan.u.shape[1]
    inner = int(np.prod(plan.box[1:]))
    per_c = (nd,) + (1,) * (plan.beta.ndim - 1)
    rhs = np.empty((nd, n0 + 2, inner), dtype=np.float32)
    rhs[:, :n0] = (plan.u * sc.reshape(nd, 1, *per_c[1:])).reshape(nd, n0, inner)
    rhs[:, n0] = (plan.alpha * sc)[:, None]
    rhs[:, n0 + 1] = (plan.beta * sc.reshape(per_c) + sh.reshape(per_c)).reshape(nd, inner)
    lhs = np.empty((plan.box[0], n0 + 2), dtype=np.float32)
    lhs[:, :n0] = plan.m0
    lhs[:, n0] = plan.p0
    lhs[:, n0 + 1] = 1.0
    return torch.from_numpy(lhs).to(device), torch.from_numpy(rhs).to(device)


def plan_coordinates(
    plan: SamplingPlan,
    crop_lo: Sequence[int] | None = None,
    scale: Sequence[float] | None = None,
    shift: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Planar coordinates ``(D, *box)`` float32: ``(q_c - crop_lo_c) * scale_c + shift_c``.

    Defaults: input voxels (``crop_lo = 0``, ``scale = 1``, ``shift = 0``). A sampler folds its
    own normalisation in through ``scale``/``shift`` (one matrix product, no extra pass).
    """
    nd = len(plan.box)
    crop_lo = (0,) * nd if crop_lo is None else crop_lo
    scale = (1.0,) * nd if scale is None else scale
    shift = (0.0,) * nd if shift is None else shift
    lhs, rhs = _factors(plan, crop_lo, scale, shift, device)
    return torch.matmul(lhs, rhs).view(nd, *plan.box)


def source_box(
    plan: SamplingPlan, spatial: Sequence[int], padded: Sequence[bool]
) -> tuple[list[int], list[int]]:
    """Source box ``[a, b)`` per axis of a volume with ``spatial`` shape that ``plan`` reads.

    The whole axis where coordinates get mirrored/clamped (``padded``), else the (conservative)
    coordinate range plus the linear-interpolation neighbour, clipped to the volume and at least
    2 voxels.
    """
    starts, stops = [], []
    for c, s in enumerate(spatial):
        if padded[c]:
            a, b = 0, int(s)
        else:
            a = min(max(math.floor(plan.lo[c]), 0), s - 2)
            b = min(max(math.floor(plan.hi[c]) + 2, a + 2), s)
        starts.append(int(a))
        stops.append(int(b))
    return starts, stops
