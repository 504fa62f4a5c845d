"""The paper's on-the-fly augmentation (Sec. 3.2) as MONAI dictionary transforms.

Sec. 3.2: "Besides rotation, scaling and gray value augmentation, we apply a smooth dense
deformation field on both data and ground truth labels. For this, we sample random vectors from a
normal distribution with standard deviation of 4 in a grid with a spacing of 32 voxels in each
direction and then apply a B-spline interpolation."

:class:`RandPaperDeformd` composes that deformation with a random rotation and isotropic scaling
into ONE coordinate map and resamples image (linear) and labels (nearest neighbour) ONCE, with one
random draw for all keys. :class:`RandGrayValued` is the gray-value augmentation (a smooth random
monotone intensity curve per channel).

What is exact and what is approximated in :class:`RandPaperDeformd`:

* Deformation: random displacement vectors ``N(0, sigma_voxels^2)`` per axis at control nodes
  ``grid_spacing`` voxels apart, interpolated with a cubic B-spline (the interpolating spline
  through the node values, not-a-knot ends). The tensor-product spline is evaluated EXACTLY at
  full resolution, separably: per axis an ``(N, n_nodes)`` interpolation matrix; the last
  contraction is one matrix product that also adds the affine part (and the normalisation
  ``grid_sample`` needs). No reduced-resolution field is needed: the whole coordinate map costs a
  few milliseconds. Error: float32 round-off, about 2e-5 voxels.
* Rotation and scaling are done in physical space (micrometres): voxel offsets are scaled by the
  voxel size, rotated and scaled, and converted back, ``A = V^-1 R V / s``; exact.
* Resampling: trilinear for images, nearest neighbour for labels, at those coordinates; exact
  interpolation, the only approximation is float32 coordinate round-off. On CPU the 3D sampling
  goes through PyTorch's vectorised 2D sampler on a row-flattened ``(C, Z*Y, X)`` view (one
  grid, two z-slices blended, see ``_rows``); a normalised row index carries up to ``4e-3``
  voxels of float32 error there (measured image error 2.5e-4 on a [0, 1] image, labels differ
  from a 3D nearest-neighbour lookup in ~1e-6 of voxels, at half-voxel ties). On GPU, and for
  boxes with more than ``MAX_ROWS`` rows, PyTorch's 3D ``grid_sample`` is used.
  Speed comes from: no dense random field to smooth; one grid shared by all channels and both
  z-slices; only the source box the coordinates can reach is read (whole volumes are accepted
  without copying them); cache-sized chunks shared by Python threads (no OpenMP barrier per
  op); labels resampled only on ``label_spatial_size``.
* Labels: a label voxel pulled from outside the input volume becomes ``ignore_index``, never a
  class; the image outside is mirrored (``image_padding="reflection"``, the overlap-tile) or
  clamped (``"border"``).

The transforms work for 3D (``(C, Z, Y, X)``) and, for the 2D baseline, 2D (``(C, H, W)``) data.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable
from scipy.interpolate import make_interp_spline

from sparse3d.data.tiles import map_indices

IMAGE_PADDING = ("reflection", "border")
_TILES_MODE = {"reflection": "reflect", "border": "edge"}


# --------------------------------------------------------------------------------------------
# B-spline deformation field (Sec. 3.2)
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


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _to_tensor(x: Any) -> tuple[torch.Tensor, bool]:
    """Tensor view of ``x`` (no copy for numpy) and whether ``x`` was numpy."""
    if isinstance(x, torch.Tensor):
        if hasattr(x, "as_tensor"):  # monai MetaTensor -> plain tensor (no meta tracking cost)
            x = x.as_tensor()
        return x, False
    arr = np.asarray(x)
    if any(st < 0 for st in arr.strides):  # torch cannot view negative strides
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():  # read-only arrays: we never write to the source
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr), True


def _crop(
    x: torch.Tensor, start: Sequence[int], size: Sequence[int], mode: str, fill: float
) -> torch.Tensor:
    """Box ``[start, start + size)`` of the trailing spatial axes of ``x`` with padding ``mode``.

    ``mode`` as in :func:`sparse3d.data.tiles.map_indices`. Always returns a new tensor.
    """
    lead = x.ndim - len(size)
    spatial = x.shape[lead:]
    outside = []
    for axis, (b, n, s) in enumerate(zip(start, size, spatial, strict=True)):
        idx = map_indices(int(b), int(b) + int(n), int(s), mode)
        dim = lead + axis
        if idx[0] >= 0 and np.array_equal(idx, np.arange(idx[0], idx[0] + n)):
            x = x.narrow(dim, int(idx[0]), int(n))
            outside.append(None)
        else:
            mask = idx < 0
            x = x.index_select(dim, torch.from_numpy(np.where(mask, 0, idx)).to(x.device))
            outside.append(mask if mask.any() else None)
    x = x.clone(memory_format=torch.contiguous_format)
    for axis, mask in enumerate(outside):
        if mask is not None:
            index = [slice(None)] * x.ndim
            index[lead + axis] = torch.from_numpy(mask).to(x.device)
            x[tuple(index)] = fill
    return x


def _grid_sample_split(
    inp: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str
) -> torch.Tensor:
    """``grid_sample`` of ``inp (1, C, *S)`` at ``grid (*box, D)`` -> ``(C, *box)``.

    PyTorch's 3D CPU sampler parallelises over the batch only, so on CPU the output box is split
    into one batch entry per thread (the input is shared with a zero batch stride, no copy).
    """
    box = tuple(grid.shape[:-1])
    ndim = len(box)
    k = torch.get_num_threads() if (inp.device.type == "cpu" and ndim == 3) else 1
    axis = None
    if k > 1:
        axis = next((a for a in range(ndim) if box[a] % k == 0 and box[a] >= k), None)
    if axis is None:
        return F.grid_sample(
            inp, grid.unsqueeze(0), mode=mode, padding_mode=padding_mode, align_corners=True
        )[0]
    chunk = box[axis] // k
    g = grid.reshape(*box[:axis], k, chunk, *box[axis + 1 :], ndim).movedim(axis, 0)
    out = F.grid_sample(
        inp.expand(k, *inp.shape[1:]), g, mode=mode, padding_mode=padding_mode, align_corners=True
    )  # (k, C, *box with box[axis] -> chunk)
    return out.movedim(0, 1 + axis).reshape(inp.shape[1], *box)


def _pad_(q: torch.Tensor, a: float, b: float, mode: str, reach: float) -> torch.Tensor:
    """Map coordinates into ``[a, b]`` in place: mirror about ``a`` and ``b``
    (``"reflection"``, periodic) or clamp (``"border"``).

    ``reach`` bounds how far any value lies outside ``[a, b]``; within one interval length
    the mirror needs no division. ``a``/``b`` are the border voxel centres (in whatever units
    ``q`` is), so this equals ``np.pad(mode="reflect")`` followed by linear interpolation.
    """
    span = b - a
    if span <= 0:
        return q.fill_(a)
    if mode == "border":
        return q.clamp_(a, b)
    if reach <= span:
        return q.sub_(a).abs_().sub_(span).abs_().neg_().add_(b)
    return q.sub_(a).remainder_(2.0 * span).sub_(span).abs_().neg_().add_(b)


def _crop_box(
    lo: np.ndarray, hi: np.ndarray, spatial: Sequence[int], padded: Sequence[bool]
) -> tuple[list[int], list[int]]:
    """Source box ``[a, b)`` per axis: the whole axis where coordinates get mirrored/clamped
    (``padded``), else the (conservative) coordinate range plus the linear-interpolation
    neighbour, clipped to the volume and at least 2 voxels."""
    starts, stops = [], []
    for c, s in enumerate(spatial):
        if padded[c]:
            a, b = 0, int(s)
        else:
            a = min(max(math.floor(lo[c]), 0), s - 2)
            b = min(max(math.floor(hi[c]) + 2, a + 2), s)
        starts.append(int(a))
        stops.append(int(b))
    return starts, stops


#: largest ``Z * Y`` of a source box for the row-flattened sampler (float32 keeps the row index
#: of a normalised coordinate within ``2 * rows * 2**-24``, i.e. < 4e-3 voxels)
MAX_ROWS = 32768
#: output voxels per chunk of the row sampler: at most PyTorch's parallel grain size (32768),
#: so ops inside a chunk run serially, and temporaries stay in cache
CHUNK_POINTS = 1 << 15


def _run_chunks(n: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(p0, p1)`` on consecutive chunks of ``[0, n)`` of ``CHUNK_POINTS`` points.

    Chunks are small enough that PyTorch runs each op serially and its temporaries stay in
    cache. With ``torch.get_num_threads() > 1`` the chunks are shared out to that many Python
    threads (PyTorch releases the GIL inside ops): no OpenMP barrier per op, so the sampler
    degrades gracefully on a busy machine. In DataLoader workers (1 thread) it runs inline.
    """
    bounds = [(p, min(p + CHUNK_POINTS, n)) for p in range(0, n, CHUNK_POINTS)]
    threads = min(torch.get_num_threads(), len(bounds))
    if threads <= 1:
        for p0, p1 in bounds:
            work(p0, p1)
        return
    todo = iter(bounds)  # shared: a thread that gets descheduled simply takes fewer chunks

    def run() -> None:
        for p0, p1 in todo:
            work(p0, p1)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(run) for _ in range(threads)]:
            future.result()


class _Plan:
    """Coordinate map of one output box, kept factorised (see ``RandPaperDeformd._plan``)."""

    __slots__ = ("m0", "p0", "u", "alpha", "beta", "lo", "hi", "box")

    def __init__(self, m0, p0, u, alpha, beta, lo, hi, box) -> None:
        self.m0, self.p0, self.u, self.alpha, self.beta = m0, p0, u, alpha, beta
        self.lo, self.hi, self.box = lo, hi, box


# --------------------------------------------------------------------------------------------
# spatial transform
# --------------------------------------------------------------------------------------------


class RandPaperDeformd(Randomizable, MapTransform):
    """Smooth B-spline deformation + rotation + isotropic scaling, one resampling (Sec. 3.2).

    Args:
        keys: keys to transform; those in ``label_keys`` are labels, the others images.
        label_keys: label keys (nearest neighbour; outside the input -> ``ignore_index``).
        spatial_size: output spatial size (e.g. the network input tile ``(Z, Y, X)``); ``None``:
            same as the input. The output is the central region (offset ``(in - out) // 2``)
            unless the data carries ``start_key`` (see below).
        sigma_voxels: std of the random node displacements, voxels (paper: 4).
        grid_spacing: control-node spacing in voxels (paper: 32).
        rotate_range_deg: uniform angle ranges ``(about z, about y, about x)`` in degrees
            (``[-r, r]``); 2D data uses the first entry. The paper gives no ranges.
        scale_range: isotropic scale factor drawn uniformly from ``(low, high)``; ``> 1`` zooms in.
        voxel_size_zyx_um: voxel size, so rotations are done in physical space.
        ignore_index: label code for unlabelled voxels.
        prob: probability of applying the spatial augmentation (else: plain central crop).
        label_spatial_size: resample labels only on this centred sub-box of the output (e.g. the
            network's output tile when the input is the network's input tile).
        image_padding: image values outside the input: ``"reflection"`` (mirror about the border
            voxel, the overlap-tile) or ``"border"`` (clamp).
        start_key: optional data entry with the integer position, in input voxels, of output voxel
            ``0`` for the un-deformed map (may lie outside the input). With it, a whole volume can
            be passed and the tile is cut and deformed in one resampling; mirroring then happens
            at the real volume border.

    Data: images ``(C, *S)``, labels ``(*S)`` or ``(1, *S)`` (kept as given), numpy arrays or torch
    tensors on any device (tensors stay there). Images come back as float32, labels in their
    dtype.

    Sampling: output voxel ``p`` reads input position
    ``q = start + c + A (p - c) + d(p)`` with ``c`` the output centre, ``A`` from
    :func:`voxel_affine` and ``d`` the spline field (input voxels).
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        label_keys: Sequence[str] = ("label",),
        spatial_size: Sequence[int] | None = None,
        sigma_voxels: float = 4.0,
        grid_spacing: float = 32,
        rotate_range_deg: Sequence[float] = (180.0, 15.0, 15.0),
        scale_range: tuple[float, float] = (0.9, 1.1),
        voxel_size_zyx_um: Sequence[float] = (1.0, 1.0, 1.0),
        ignore_index: int = 3,
        prob: float = 1.0,
        label_spatial_size: Sequence[int] | None = None,
        image_padding: str = "reflection",
        start_key: str = "tile_start_zyx",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_keys = tuple(label_keys)
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.label_spatial_size = (
            None if label_spatial_size is None else tuple(int(s) for s in label_spatial_size)
        )
        if self.spatial_size is not None:
            self.ndim = len(self.spatial_size)
        elif self.label_spatial_size is not None:
            self.ndim = len(self.label_spatial_size)
        else:
            self.ndim = len(voxel_size_zyx_um)
        if self.ndim not in (2, 3):
            raise ValueError(f"transforms: only 2D and 3D data, got {self.ndim} spatial axes")
        if len(voxel_size_zyx_um) != self.ndim:
            raise ValueError(
                f"transforms: voxel_size_zyx_um {tuple(voxel_size_zyx_um)} does not have "
                f"{self.ndim} entries"
            )
        if self.label_spatial_size is not None and self.spatial_size is not None:
            if len(self.label_spatial_size) != self.ndim or any(
                a > b for a, b in zip(self.label_spatial_size, self.spatial_size, strict=True)
            ):
                raise ValueError(
                    f"transforms: label_spatial_size {self.label_spatial_size} does not fit in "
                    f"spatial_size {self.spatial_size}"
                )
        if sigma_voxels < 0 or grid_spacing <= 0:
            raise ValueError("transforms: need sigma_voxels >= 0 and grid_spacing > 0")
        if not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"transforms: scale_range must be 0 < low <= high, got {scale_range}")
        if image_padding not in IMAGE_PADDING:
            raise ValueError(f"transforms: image_padding must be one of {IMAGE_PADDING}")
        ranges = tuple(float(r) for r in rotate_range_deg)
        self.rotate_range_deg = ranges[:1] if self.ndim == 2 else ranges
        if len(self.rotate_range_deg) != (1 if self.ndim == 2 else 3):
            raise ValueError(f"transforms: rotate_range_deg needs 3 entries, got {ranges}")
        self.sigma_voxels = float(sigma_voxels)
        self.grid_spacing = float(grid_spacing)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.voxel_size_zyx_um = tuple(float(v) for v in voxel_size_zyx_um)
        self.ignore_index = int(ignore_index)
        self.prob = float(prob)
        self.image_padding = image_padding
        self.start_key = start_key
        self._do = False
        self._angles: tuple[float, ...] = (0.0,) * len(self.rotate_range_deg)
        self._scale = 1.0
        self._nodes: np.ndarray | None = None
        self._out_shape: tuple[int, ...] | None = None

    # ---- randomness ----------------------------------------------------------------------

    def randomize(self, data: Sequence[int] | None = None) -> None:
        """Draw one augmentation for output spatial shape ``data`` (default ``spatial_size``)."""
        shape = self.spatial_size if data is None else tuple(int(s) for s in data)
        if shape is None:
            raise ValueError("transforms: randomize needs the output spatial shape")
        self._out_shape = shape
        self._do = bool(self.R.random_sample() < self.prob)
        self._angles = tuple(math.radians(self.R.uniform(-r, r)) for r in self.rotate_range_deg)
        self._scale = float(self.R.uniform(*self.scale_range))
        n_nodes = [control_points(s, self.grid_spacing).size for s in shape]
        self._nodes = self.R.standard_normal((self.ndim, *n_nodes)) * self.sigma_voxels

    @property
    def is_identity(self) -> bool:
        """True when the current draw leaves the tile unchanged (not applied, or no motion)."""
        if not self._do:
            return True
        no_field = self._nodes is None or not np.any(self._nodes)
        return no_field and self._scale == 1.0 and all(a == 0.0 for a in self._angles)

    @property
    def node_values(self) -> np.ndarray | None:
        """Node displacements ``(D, *n_nodes)`` (voxels) of the current draw."""
        return self._nodes

    def affine(self) -> np.ndarray:
        """``(D, D)`` output->input voxel-offset map of the current draw."""
        return voxel_affine(self._angles, self._scale, self.voxel_size_zyx_um)

    # ---- coordinate map --------------------------------------------------------------------

    def _plan(self, start: Sequence[int], box_lo: Sequence[int], box: Sequence[int]) -> _Plan:
        """Factorised input coordinates of the output box ``[box_lo, box_lo + box)``.

        ``q_c(p) = sum_i M0[p0, i] U[c, i, p1..] + alpha_c p0 + beta[c, p1..]``: the first sum is
        the spline field (``U`` = node values contracted with the interpolation matrices of
        axes 1..D-1), ``alpha``/``beta`` the affine part. ``lo``/``hi`` bound all coordinates
        (input voxels): exact box corners of the affine part plus a bound of the field.
        """
        out_shape = self._out_shape
        nd = self.ndim
        a_mat = self.affine()
        mats = [
            spline_matrix(out_shape[a], self.grid_spacing)[box_lo[a] : box_lo[a] + box[a]]
            for a in range(nd)
        ]
        coords = [np.arange(box_lo[a], box_lo[a] + box[a], dtype=np.float64) for a in range(nd)]
        centre = (np.asarray(out_shape, dtype=np.float64) - 1.0) / 2.0
        const = np.asarray(start, dtype=np.float64) + centre - a_mat @ centre  # (D,)
        if nd == 3:
            u = mats[1] @ (self._nodes @ mats[2].T)  # (c, i, j, k) -> (c, i, Y, X)
            beta = (
                const[:, None, None]
                + a_mat[:, 1, None, None] * coords[1][None, :, None]
                + a_mat[:, 2, None, None] * coords[2][None, None, :]
            )  # (c, Y, X)
        else:
            u = self._nodes @ mats[1].T  # (c, i, X)
            beta = const[:, None] + a_mat[:, 1, None] * coords[1][None, :]  # (c, X)
        alpha = a_mat[:, 0].copy()
        corners = np.stack(
            np.meshgrid(*[[c[0], c[-1]] for c in coords], indexing="ij"), -1
        ).reshape(-1, nd)
        aff = const[None, :] + corners @ a_mat.T  # (2^D, c): affine extremes at the corners
        lebesgue = float(np.abs(mats[0]).sum(axis=1).max())
        field = lebesgue * np.abs(u).reshape(nd, -1).max(axis=1)  # |M0 U| <= L max|U|
        return _Plan(
            mats[0], coords[0], u, alpha, beta,
            aff.min(axis=0) - field, aff.max(axis=0) + field, tuple(int(b) for b in box),
        )  # fmt: skip

    def _factors(
        self,
        plan: _Plan,
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

    def _coords(
        self,
        plan: _Plan,
        crop_lo: Sequence[int],
        scale: Sequence[float],
        shift: Sequence[float],
        device: torch.device | str,
    ) -> torch.Tensor:
        """Planar coordinates ``(D, *box)`` float32: ``(q_c - crop_lo_c) * scale_c + shift_c``."""
        lhs, rhs = self._factors(plan, crop_lo, scale, shift, device)
        return torch.matmul(lhs, rhs).view(len(crop_lo), *plan.box)

    def sampling_coordinates(
        self, input_shape: Sequence[int], start: Sequence[int] | None = None, label: bool = False
    ) -> np.ndarray:
        """Input-voxel coordinates ``(D, *out)`` (float64) of the current draw, via the fast
        path's factorised evaluation (before any mirroring). ``label=True``: the label box."""
        out_shape = self._out_shape
        if start is None:
            start = tuple((i - o) // 2 for i, o in zip(input_shape, out_shape, strict=True))
        box_lo, box = self._label_box() if label else ((0,) * self.ndim, out_shape)
        plan = self._plan(start, box_lo, box)
        zeros, ones = (0,) * self.ndim, (1.0,) * self.ndim
        return self._coords(plan, zeros, ones, (0.0,) * self.ndim, "cpu").double().numpy()

    def _label_box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_shape = self._out_shape
        if self.label_spatial_size is None:
            return (0,) * self.ndim, out_shape
        box = self.label_spatial_size
        return tuple((o - b) // 2 for o, b in zip(out_shape, box, strict=True)), box

    # ---- resampling -------------------------------------------------------------------------

    def _generic(
        self, src: torch.Tensor, plan: _Plan, crop_lo: Sequence[int], mode: str, padding: str
    ) -> torch.Tensor:
        """``grid_sample`` on ``src (C, *crop)`` with the crop-normalised grid -> ``(C, *box)``.

        Used for 2D data, on GPUs, and for boxes too tall for the row sampler.
        """
        nd = self.ndim
        size = np.asarray(src.shape[1:], dtype=np.float64)
        scale = 2.0 / np.maximum(size - 1.0, 1.0)
        q = self._coords(plan, crop_lo, scale, (-1.0,) * nd, src.device)
        grid = torch.stack([q[c] for c in reversed(range(nd))], dim=-1).to(src.dtype)
        if src.device.type == "cpu" and nd == 3 and src.shape[0] > 1:
            # channels-last: the 8 neighbours of all channels are adjacent in memory
            cl = torch.empty((*src.shape[1:], src.shape[0]), dtype=src.dtype)
            cl.copy_(src.movedim(0, -1))
            src = cl.movedim(-1, 0)
        return _grid_sample_split(src.unsqueeze(0), grid, mode, padding)

    def _sample_image(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Linear resampling of image ``x (C, *S)`` -> ``(C, *box)``."""
        nd = self.ndim
        spatial = tuple(x.shape[1:])
        padded = [bool(plan.lo[c] < 0 or plan.hi[c] > s - 1) for c, s in enumerate(spatial)]
        a, b = _crop_box(plan.lo, plan.hi, spatial, padded)
        off = [0] * nd  # position of x's voxel 0 in the input
        if x.dtype != torch.float32:
            x = x[(slice(None), *(slice(i, j) for i, j in zip(a, b, strict=True)))].float()
            off, a, b = list(a), [0] * nd, list(x.shape[1:])
        if nd == 3 and x.device.type == "cpu":
            # zero-copy: the whole y/x extent of the reachable z-range, when rows are contiguous
            slab = x[:, a[0] : b[0]]
            rows = slab.shape[1] * slab.shape[2]
            if slab.stride(1) == slab.shape[2] * slab.stride(2) and rows <= MAX_ROWS:
                return self._rows(slab, plan, (off[0] + a[0], off[1], off[2]), padded)
        src = x[(slice(None), *(slice(i, j) for i, j in zip(a, b, strict=True)))]
        lo = [o + i for o, i in zip(off, a, strict=True)]
        if nd == 3 and x.device.type == "cpu" and src.shape[1] * src.shape[2] <= MAX_ROWS:
            return self._rows(src, plan, lo, padded)  # copies the box once
        return self._generic(src, plan, lo, "bilinear", self.image_padding)

    def _sample_label(self, lab: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Nearest-neighbour resampling of ``lab (*S)`` -> ``(*box)``; outside -> ignore."""
        spatial = tuple(lab.shape)
        a, b = _crop_box(plan.lo, plan.hi, spatial, [False] * self.ndim)
        src = lab[tuple(slice(i, j) for i, j in zip(a, b, strict=True))]
        if (
            self.ndim == 3
            and src.device.type == "cpu"
            and (src.shape[0] + 2) * (src.shape[1] + 2) <= MAX_ROWS
        ):
            return self._label_rows(src, plan, a)
        src = src.to(torch.float32) + 1.0  # 0 now means "outside the input"
        out = self._generic(src[None], plan, a, "nearest", "zeros")[0]
        out = out.sub_(1.0)
        out = out.masked_fill_(out < 0, float(self.ignore_index))
        return out.to(lab.dtype)

    def _rows(
        self,
        src: torch.Tensor,
        plan: _Plan,
        crop_lo: Sequence[int],
        padded: Sequence[bool],
    ) -> torch.Tensor:
        """CPU trilinear sampling through PyTorch's vectorised 2D sampler.

        The source box ``(C, Z, Y, X)`` is viewed as a 2D image ``(C, Z*Y, X)`` (rows).
        Trilinear interpolation at ``(z, y, x)`` is the blend, with weight ``z - z0``, of the
        bilinear samples at row ``z0*Y + y`` of two views of it, rows ``[0, (Z-1)*Y)`` and rows
        ``[Y, Z*Y)`` (slices ``z0`` and ``z0 + 1``), read with ONE grid, so every coordinate is
        computed once. ``y`` is first mirrored/clamped into ``[0, Y-1]``, so a row never mixes
        slices (up to the float32 row error, see ``MAX_ROWS``). One (batched) matrix product
        gives all coordinates, planar; the rest runs in chunks (:func:`_run_chunks`) on
        contiguous data, and only the final ``(x, row)`` pairs are interleaved for the sampler.
        """
        c, zc, yc, xc = src.shape
        rows = zc * yc
        flat = src.reshape(c, rows, xc)  # a view if the box is row-contiguous, else a copy
        used = rows - yc  # rows reachable from a slice z0 <= Z-2
        step = 2.0 / (used - 1) if used > 1 else 1.0
        taps = (flat[None, :, :used], flat[None, :, yc : yc + used])
        sc, sh = (1.0, step, 2.0 / (xc - 1)), (0.0, -1.0, -1.0)
        n = int(np.prod(plan.box))
        coords = self._coords(plan, crop_lo, sc, sh, "cpu").view(3, n)  # planar z, y, x
        # interval of each coordinate (border voxel centres) and how far values reach beyond it
        lo_b = [0.0, -1.0, -1.0]
        hi_b = [zc - 1.0, (yc - 1.0) * step - 1.0, 1.0]
        reach = [
            max(crop_lo[i] - plan.lo[i], plan.hi[i] - (crop_lo[i] + size - 1), 0.0) * sc[i]
            for i, size in enumerate((zc, yc, xc))
        ]
        pads = [padded[0], padded[1], padded[2] and self.image_padding == "reflection"]
        out = torch.empty((c, n), dtype=src.dtype)

        def work(p0: int, p1: int) -> None:
            qz, qy, qx = coords[0, p0:p1], coords[1, p0:p1], coords[2, p0:p1]
            for i, q in enumerate((qz, qy, qx)):  # x with "border": the sampler clamps
                if pads[i]:
                    _pad_(q, lo_b[i], hi_b[i], self.image_padding, reach[i])
            z0 = qz.floor().clamp_(max=zc - 2)
            wz = qz.sub_(z0)  # weight of slice z0 + 1
            qy.add_(z0, alpha=yc * step)  # row in slice z0 (normalised)
            g = torch.empty((1, 1, p1 - p0, 2), dtype=src.dtype)
            g[0, 0, :, 0] = qx
            g[0, 0, :, 1] = qy
            r0 = F.grid_sample(taps[0], g, "bilinear", "border", True)  # (1, C, 1, k)
            r1 = F.grid_sample(taps[1], g, "bilinear", "border", True)
            torch.lerp(r0[0, :, 0], r1[0, :, 0], wz, out=out[:, p0:p1])

        _run_chunks(n, work)
        return out.view(c, *plan.box)

    def _label_rows(self, lab: torch.Tensor, plan: _Plan, crop_lo: Sequence[int]) -> torch.Tensor:
        """CPU nearest-neighbour sampling of a label box ``(Z, Y, X)`` -> ``(*box)``.

        The box is copied (as float32) into a frame one voxel wider on every side that holds
        ``ignore_index``; coordinates are rounded and clamped into the frame, so every voxel
        from outside the input reads ignore and the result needs no masking. Rows as in
        :meth:`_rows`: ``row = (round(z) + 1) * (Y + 2) + round(y) + 1``.
        """
        zc, yc, xc = lab.shape
        framed = torch.full((zc + 2, yc + 2, xc + 2), float(self.ignore_index), dtype=torch.float32)
        framed[1:-1, 1:-1, 1:-1] = lab
        rows = (zc + 2) * (yc + 2)
        step = 2.0 / (rows - 1)
        lo = [v - 1 for v in crop_lo]  # the frame starts one voxel before the box
        n = int(np.prod(plan.box))
        coords = self._coords(plan, lo, (1.0, 1.0, 2.0 / (xc + 1)), (0.0, 0.0, -1.0), "cpu")
        coords = coords.view(3, n)
        inp = framed.view(1, 1, rows, xc + 2)
        out = torch.empty(n, dtype=lab.dtype)

        def work(p0: int, p1: int) -> None:
            rz = coords[0, p0:p1].round_().clamp_(0.0, zc + 1.0)
            ry = coords[1, p0:p1].round_().clamp_(0.0, yc + 1.0)
            ry.add_(rz, alpha=float(yc + 2)).mul_(step).sub_(1.0)
            g = torch.empty((1, 1, p1 - p0, 2), dtype=torch.float32)
            g[0, 0, :, 0] = coords[2, p0:p1].clamp_(-1.0, 1.0)
            g[0, 0, :, 1] = ry
            res = F.grid_sample(inp, g, "nearest", "zeros", True)  # (1, 1, 1, k)
            out[p0:p1].copy_(res[0, 0, 0])

        _run_chunks(n, work)
        return out.view(plan.box)

    # ---- call ------------------------------------------------------------------------------

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        nd = self.ndim
        shapes = {}
        for key in keys:
            shape = tuple(d[key].shape)
            if key in self.label_keys:
                if len(shape) == nd + 1 and shape[0] == 1:
                    shape = shape[1:]
                elif len(shape) != nd:
                    raise ValueError(f"transforms: label {key!r} has shape {shape}, expected {nd}D")
            elif len(shape) != nd + 1:
                raise ValueError(
                    f"transforms: image {key!r} has shape {shape}, expected (C, {nd} axes)"
                )
            else:
                shape = shape[1:]
            shapes[key] = shape
        in_shape = shapes[keys[0]]
        if any(s != in_shape for s in shapes.values()):
            raise ValueError(f"transforms: spatial shapes differ between keys: {shapes}")
        out_shape = self.spatial_size if self.spatial_size is not None else in_shape
        if len(out_shape) != nd:
            raise ValueError(f"transforms: spatial_size {out_shape} is not {nd}D")
        start = d.get(self.start_key)
        if start is None:
            start = tuple((i - o) // 2 for i, o in zip(in_shape, out_shape, strict=True))
        else:
            start = tuple(int(s) for s in start)
            if len(start) != nd:
                raise ValueError(f"transforms: {self.start_key!r} = {start} is not {nd}D")
        self.randomize(out_shape)
        label_lo, label_box = self._label_box()
        warp = not self.is_identity
        if warp and any(s < 2 for s in in_shape):
            raise ValueError(
                f"transforms: input spatial shape {in_shape} needs >= 2 voxels per axis"
            )
        image_plan = label_plan = None
        for key in keys:
            x, was_numpy = _to_tensor(d[key])
            if key in self.label_keys:
                squeeze = x.ndim == nd + 1
                lab = x[0] if squeeze else x
                if warp:
                    if label_plan is None:
                        label_plan = self._plan(start, label_lo, label_box)
                    out = self._sample_label(lab, label_plan)
                else:
                    lstart = tuple(s + b for s, b in zip(start, label_lo, strict=True))
                    out = _crop(lab, lstart, label_box, "constant", self.ignore_index)
                if squeeze:
                    out = out.unsqueeze(0)
            else:
                if warp:
                    if image_plan is None:
                        image_plan = self._plan(start, (0,) * nd, out_shape)
                    out = self._sample_image(x, image_plan)
                else:
                    out = _crop(x, start, out_shape, _TILES_MODE[self.image_padding], 0.0)
                    out = out.float()
            d[key] = out.numpy() if was_numpy else out
        return d

    # ---- geometry for callers --------------------------------------------------------------

    def required_margin_zyx(self, spatial_size: Sequence[int] | None = None) -> tuple[int, ...]:
        """Context per side (voxels) an input needs beyond ``spatial_size`` for nearly all draws.

        Worst case of rotation and scaling over a grid of angles (extremes, multiples of 45
        degrees and 24 steps per range), plus 4 sigma of the spline field and 2 voxels slack.
        Beyond it the transform still works (mirror / ignore at the input's border).
        """
        shape = self.spatial_size if spatial_size is None else tuple(spatial_size)
        if shape is None:
            raise ValueError("transforms: required_margin_zyx needs a spatial size")
        half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
        axes = []
        for r in self.rotate_range_deg:
            values = set(np.linspace(-r, r, 25).tolist()) | {
                float(a) for a in range(-180, 181, 45) if abs(a) <= r
            }
            axes.append(np.radians(sorted(values)))
        worst = np.zeros(self.ndim)
        for angles in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes)):
            a_mat = voxel_affine(angles, self.scale_range[0], self.voxel_size_zyx_um)
            worst = np.maximum(worst, np.abs(a_mat) @ half)
        lebesgue = 1.0
        for s in shape:
            lebesgue *= float(np.abs(spline_matrix(s, self.grid_spacing)).sum(axis=1).max())
        field = 4.0 * self.sigma_voxels * lebesgue
        return tuple(
            int(math.ceil(max(w - h, 0.0) + field)) + 2 for w, h in zip(worst, half, strict=True)
        )


# --------------------------------------------------------------------------------------------
# gray values
# --------------------------------------------------------------------------------------------


class RandGrayValued(Randomizable, MapTransform):
    """Random smooth monotone gray-value curve per channel (Sec. 3.2 "gray value augmentation").

    Each channel is mapped to ``t in [0, 1]`` by its min/max in the sample, passed through a
    random curve ``f`` with ``f(0) = 0``, ``f(1) = 1`` and mapped back, so the intensity order of
    voxels is kept while contrast is redistributed. ``f`` is a Bernstein polynomial of
    ``degree`` whose control values ``0 = b_0 <= b_1 <= ... <= b_n = 1`` are
    ``(1 - strength) * k / n + strength * (random increasing sequence)``; non-decreasing control
    values make the polynomial monotone (its derivative is a non-negative combination of
    Bernstein polynomials) and smooth. Evaluated exactly (Horner), no lookup table.

    Args:
        keys: image keys, ``(C, *S)`` numpy arrays or tensors (tensors stay on their device).
        degree: polynomial degree (>= 1; 1 is the identity).
        strength: 0 = identity, 1 = fully random control values.
        prob: probability of applying it.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image",),
        degree: int = 4,
        strength: float = 0.5,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if degree < 1 or not 0.0 <= strength <= 1.0:
            raise ValueError("transforms: RandGrayValued needs degree >= 1 and 0 <= strength <= 1")
        self.degree = int(degree)
        self.strength = float(strength)
        self.prob = float(prob)
        self._do = False
        self._control: np.ndarray | None = None

    def randomize(self, data: int | None = None) -> None:
        """Draw one curve per channel; ``data`` is the number of channels."""
        channels = 1 if data is None else int(data)
        self._do = bool(self.R.random_sample() < self.prob)
        n = self.degree
        steps = self.R.dirichlet(np.ones(n), size=channels)  # (C, n), rows sum to 1
        rand = np.concatenate([np.zeros((channels, 1)), np.cumsum(steps, axis=1)], axis=1)
        rand[:, -1] = 1.0
        line = np.linspace(0.0, 1.0, n + 1)
        self._control = (1.0 - self.strength) * line[None, :] + self.strength * rand

    def monomial_coefficients(self) -> np.ndarray:
        """``(C, degree + 1)`` coefficients ``a_k`` of ``f(t) = sum_k a_k t^k`` (current draw)."""
        n = self.degree
        k = np.arange(n + 1)
        # Bernstein -> power basis: a_j = sum_{i<=j} b_i C(n, j) C(j, i) (-1)^(j-i)
        conv = np.zeros((n + 1, n + 1))
        for i in k:
            for j in range(i, n + 1):
                conv[i, j] = math.comb(n, j) * math.comb(j, i) * (-1) ** (j - i)
        return self._control @ conv

    def curve(self, t: np.ndarray, channel: int = 0) -> np.ndarray:
        """``f(t)`` of one channel of the current draw (``t`` in ``[0, 1]``)."""
        return np.polynomial.polynomial.polyval(t, self.monomial_coefficients()[channel])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x, was_numpy = _to_tensor(d[key])
            if x.ndim < 2:
                raise ValueError(
                    f"transforms: image {key!r} needs a channel axis, got {tuple(x.shape)}"
                )
            self.randomize(x.shape[0])
            if not self._do:
                continue
            flat = x.reshape(x.shape[0], -1)
            if not flat.is_floating_point():
                flat = flat.float()
            lo, hi = (v.tolist() for v in torch.aminmax(flat, dim=1))
            coef = self.monomial_coefficients()
            out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
            # out = lo + span * f(t), t = (x - lo) / span; Horner on t with span and lo folded in
            b = coef * np.maximum(np.asarray(hi) - np.asarray(lo), 0.0)[:, None]
            b[:, 0] += lo
            scale = [1.0 / (h - low) if h > low else 0.0 for low, h in zip(lo, hi, strict=True)]

            def work(p0: int, p1: int, flat=flat, out=out, b=b, lo=lo, scale=scale) -> None:
                for c in range(flat.shape[0]):
                    t = torch.sub(flat[c, p0:p1], lo[c]).mul_(scale[c])
                    y = torch.mul(t, float(b[c, -1])).add_(float(b[c, -2]))
                    for k in range(self.degree - 2, -1, -1):
                        y.mul_(t).add_(float(b[c, k]))
                    out[c, p0:p1] = y

            if flat.device.type == "cpu":
                _run_chunks(flat.shape[1], work)  # cache-sized chunks, see _run_chunks
            else:
                work(0, flat.shape[1])
            out = out.reshape(x.shape)
            d[key] = out.numpy() if was_numpy else out
        return d
