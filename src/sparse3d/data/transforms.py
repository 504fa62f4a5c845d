"""The paper's on-the-fly augmentation (Sec. 3.2) as MONAI dictionary transforms.

Sec. 3.2: "Besides rotation, scaling and gray value augmentation, we apply a smooth dense
deformation field on both data and ground truth labels. For this, we sample random vectors from a
normal distribution with standard deviation of 4 in a grid with a spacing of 32 voxels in each
direction and then apply a B-spline interpolation."

:class:`RandPaperDeformd` composes that deformation with a random rotation and isotropic scaling
into ONE coordinate map and resamples image (linear) and labels (nearest neighbour) ONCE, with one
random draw for all keys. :class:`RandGrayValued` is the gray-value augmentation (a smooth random
monotone intensity curve per channel).

The parts live in sibling modules, one job each: :mod:`sparse3d.data.deform` (spline field,
rotation, sampling coordinates; what is exact and what is approximated),
:mod:`sparse3d.data.resample` (the one resampling function and its ``"fast"`` / ``"plain"``
backends). The geometry functions are re-exported here, so ``sparse3d.data.transforms.<name>``
keeps working.

Labels: a label voxel pulled from outside the input volume becomes ``ignore_index``, never a
class; the image outside is mirrored (``image_padding="reflection"``, the overlap-tile) or
clamped (``"border"``). The transforms work for 3D (``(C, Z, Y, X)``) and, for the 2D baseline,
2D (``(C, H, W)``) data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from sparse3d.data.deform import (
    SamplingPlan,
    control_points,
    deformation_field,
    plan_coordinates,
    required_margin,
    rotation_matrix,
    sampling_plan,
    spline_matrix,
    voxel_affine,
)
from sparse3d.data.resample import IMAGE_PADDING, RESAMPLERS, check_resampler, resample
from sparse3d.data.tiles import map_indices

__all__ = [
    "IMAGE_PADDING",
    "RESAMPLERS",
    "RandGrayValued",
    "RandPaperDeformd",
    "control_points",
    "deformation_field",
    "rotation_matrix",
    "spline_matrix",
    "voxel_affine",
]

_TILES_MODE = {"reflection": "reflect", "border": "edge"}
#: voxels per chunk of the gray-value curve: its temporaries stay in cache
_GRAY_CHUNK = 1 << 15


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
        resampler: resampling backend of :func:`sparse3d.data.resample.resample`: ``"fast"``
            (machine-tuned, default) or ``"plain"`` (one ``grid_sample`` call; same result up to
            float32 round-off and label ties).

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
        resampler: str = "fast",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_keys = tuple(label_keys)
        # spatial_size / label_spatial_size: MONAI's names for the input tile / output tile
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
        self._check_sizes(voxel_size_zyx_um)
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
        self.resampler = check_resampler(resampler)
        self._do = False
        self._angles: tuple[float, ...] = (0.0,) * len(self.rotate_range_deg)
        self._scale = 1.0
        self._nodes: np.ndarray | None = None
        self._out_shape: tuple[int, ...] | None = None

    def _check_sizes(self, voxel_size_zyx_um: Sequence[float]) -> None:
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

    def plan(self, start: Sequence[int], box_lo: Sequence[int], box: Sequence[int]) -> SamplingPlan:
        """Input coordinates of the output box ``[box_lo, box_lo + box)`` for the current draw.

        ``start``: input position of output voxel 0 for the un-deformed map; see
        :func:`sparse3d.data.deform.sampling_plan`.
        """
        return sampling_plan(
            self._nodes, self.affine(), self._out_shape, self.grid_spacing, start, box_lo, box
        )

    def sampling_coordinates(
        self, input_shape: Sequence[int], start: Sequence[int] | None = None, label: bool = False
    ) -> np.ndarray:
        """Input-voxel coordinates ``(D, *out)`` (float64) of the current draw, via the
        factorised float32 evaluation (before any mirroring). ``label=True``: the label box."""
        out_shape = self._out_shape
        if start is None:
            start = tuple((i - o) // 2 for i, o in zip(input_shape, out_shape, strict=True))
        box_lo, box = self._label_box() if label else ((0,) * self.ndim, out_shape)
        return plan_coordinates(self.plan(start, box_lo, box)).double().numpy()

    def _label_box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_shape = self._out_shape
        if self.label_spatial_size is None:
            return (0,) * self.ndim, out_shape
        box = self.label_spatial_size
        return tuple((o - b) // 2 for o, b in zip(out_shape, box, strict=True)), box

    # ---- call ------------------------------------------------------------------------------

    def _input_shape(self, d: Mapping[Hashable, Any], keys: Sequence[Hashable]) -> tuple[int, ...]:
        """The spatial shape shared by all ``keys`` (images ``(C, *S)``, labels ``(*S)`` or
        ``(1, *S)``); ``ValueError`` otherwise."""
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
        return in_shape

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        nd = self.ndim
        in_shape = self._input_shape(d, keys)
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
                        label_plan = self.plan(start, label_lo, label_box)
                    out = resample(
                        lab, label_plan, "nearest", self.resampler, ignore_index=self.ignore_index
                    )
                else:
                    lstart = tuple(s + b for s, b in zip(start, label_lo, strict=True))
                    out = _crop(lab, lstart, label_box, "constant", self.ignore_index)
                if squeeze:
                    out = out.unsqueeze(0)
            else:
                if warp:
                    if image_plan is None:
                        image_plan = self.plan(start, (0,) * nd, out_shape)
                    out = resample(x, image_plan, "linear", self.resampler, self.image_padding)
                else:
                    out = _crop(x, start, out_shape, _TILES_MODE[self.image_padding], 0.0)
                    out = out.float()
            d[key] = out.numpy() if was_numpy else out
        return d

    # ---- geometry for callers --------------------------------------------------------------

    def required_margin_zyx(self, spatial_size: Sequence[int] | None = None) -> tuple[int, ...]:
        """Context per side (voxels) an input needs beyond ``spatial_size`` for nearly all draws
        (see :func:`~sparse3d.data.deform.required_margin`). Beyond it the transform still works
        (mirror / ignore at the input's border)."""
        shape = self.spatial_size if spatial_size is None else tuple(spatial_size)
        if shape is None:
            raise ValueError("transforms: required_margin_zyx needs a spatial size")
        return required_margin(
            shape,
            self.rotate_range_deg,
            self.scale_range[0],
            self.voxel_size_zyx_um,
            self.sigma_voxels,
            self.grid_spacing,
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
            out = self._apply_curves(flat)
            out = out.reshape(x.shape)
            d[key] = out.numpy() if was_numpy else out
        return d

    def _apply_curves(self, flat: torch.Tensor) -> torch.Tensor:
        """The current curves on ``flat (C, N)`` -> ``(C, N)``: each channel is mapped to
        ``[0, 1]`` by its own min/max, through its curve and back."""
        lo, hi = (v.tolist() for v in torch.aminmax(flat, dim=1))
        coef = self.monomial_coefficients()
        out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
        # out = lo + span * f(t), t = (x - lo) / span; Horner on t with span and lo folded in
        b = coef * np.maximum(np.asarray(hi) - np.asarray(lo), 0.0)[:, None]
        b[:, 0] += lo
        scale = [1.0 / (h - low) if h > low else 0.0 for low, h in zip(lo, hi, strict=True)]
        n = flat.shape[1]
        step = _GRAY_CHUNK if flat.device.type == "cpu" else max(n, 1)  # CPU: cache-sized chunks
        for p0 in range(0, n, step):
            p1 = min(p0 + step, n)
            for c in range(flat.shape[0]):
                t = torch.sub(flat[c, p0:p1], lo[c]).mul_(scale[c])
                y = torch.mul(t, float(b[c, -1])).add_(float(b[c, -2]))
                for k in range(self.degree - 2, -1, -1):
                    y.mul_(t).add_(float(b[c, k]))
                out[c, p0:p1] = y
        return out
