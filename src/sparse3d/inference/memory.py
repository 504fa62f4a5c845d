"""Activation memory and compute of a prediction pass as functions of the tile shape.

The estimate comes from the network itself, not from a formula per architecture: the prediction
forward (``UNet.forward``, written for low peak memory; normalisation folded or in place) is run
on the meta device (shapes only, no memory) under a dispatch mode that records every tensor the
pass allocates and when Python frees it. Two such traces at two legal tile sizes give, for every
tensor, its channel count and the affine map ``size = (n + beta) / gamma`` from tile size to its
spatial size along each axis (exact for legal sizes of a U-Net). From that:

* **peak memory** of a tile ``(nz, ny, nx)`` = the largest sum of simultaneously live tensors over
  the pass (times 2 bytes instead of 4 under bf16), plus the input tile and the output logits held
  on the host, times a safety factor :data:`SAFETY` for allocator slack and convolution
  workspaces;
* **compute** of a tile = sum over convolutions of multiply-accumulates
  (``output voxels x C_in x kernel volume x C_out``), used to compare tile layouts.

Both are evaluated vectorised for thousands of candidate layouts at once by :func:`choose_plan`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparse3d.inference.tiling import AxisPlan, TilePlan, same_axis_plan, valid_axis_plan
from sparse3d.models import UNet

logger = logging.getLogger(__name__)

#: Multiplier on the traced peak for allocator slack and convolution workspaces.
SAFETY = 1.15
#: At most this many candidate tile sizes per axis are compared.
MAX_AXIS_CANDIDATES = 40
#: Most elements one tensor of a pass may have: CUDA kernels (and some CPU ones) index with
#: 32-bit integers, so a bigger activation fails however much memory the device has.
MAX_TENSOR_ELEMENTS = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# tracing


_TRACER: type | None = None


def _tracer() -> Any:
    """A recorder of allocations, frees and convolutions of a pass on the meta device.

    Built on torch's dispatch-mode hook (``torch.utils._python_dispatch``, a private module):
    if a torch release moves it, this raises and :func:`net_profile` falls back to
    :class:`~sparse3d.inference.plain_profile.PlainProfile`."""
    global _TRACER
    if _TRACER is None:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Tracer(TorchDispatchMode):
            """Records allocations, frees and convolutions of a pass on the meta device."""

            def __init__(self) -> None:
                super().__init__()
                self.events: list[tuple] = []  # ("a", tid, shape, itemsize) | ("f", tid)
                self.convs: list[
                    tuple[int, float]
                ] = []  # (tid of reference tensor, MACs per element)
                self._ids: dict[int, int] = {}
                self._next = itertools.count()

            def _free(self, tid: int, key: int) -> None:
                self.events.append(("f", tid))
                self._ids.pop(key, None)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for ret, val in zip(func._schema.returns, outs, strict=False):
                    if isinstance(val, torch.Tensor) and ret.alias_info is None:
                        tid = next(self._next)
                        self.events.append(("a", tid, tuple(val.shape), val.element_size()))
                        self._ids[id(val)] = tid
                        weakref.finalize(val, self._free, tid, id(val))
                if func is torch.ops.aten.convolution.default:
                    inp, weight, transposed = args[0], args[1], args[6]
                    if transposed:  # each input element meets C_out/groups x kernel weights
                        ref = self._ids.get(id(inp))
                        per = weight.numel() / weight.shape[0]
                    else:
                        ref = self._ids.get(id(outs[0]))
                        per = weight.numel() / weight.shape[0]
                    if ref is not None:
                        self.convs.append((ref, float(per)))
                return out

        _TRACER = _Tracer
    return _TRACER()


def count_macs(module: torch.nn.Module, input_shape: Sequence[int]) -> float:
    """Multiply-accumulates of the convolutions of one ``module(x)`` with ``x`` of shape
    ``input_shape`` (``(B, C, *spatial)``), counted on the meta device (any network)."""
    meta = meta_copy(module).eval()
    tracer = _tracer()
    with torch.no_grad(), tracer:
        x = torch.empty(tuple(input_shape), device="meta")
        meta(x)
    shapes = {e[1]: e[2] for e in tracer.events if e[0] == "a"}
    return float(sum(math.prod(shapes[tid]) * per for tid, per in tracer.convs))


def meta_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` on the meta device (shapes only, no memory, no compute)."""
    return copy.deepcopy(net).to("meta")


def _trace(meta_net: UNet, spatial: tuple[int, ...]):
    tracer = _tracer()
    with torch.no_grad(), tracer:
        x = torch.empty((1, meta_net.in_channels, *spatial), device="meta")
        y = meta_net(x)
        del x, y
    return tracer


@dataclass
class _TensorModel:
    const: float  # product of non-spatial sizes (x itemsize for bytes)
    itemsize: int
    beta: np.ndarray  # (3,) per axis; size = (n + beta) / gamma, gamma 0 = not spatial
    gamma: np.ndarray

    def axis_factor(self, axis: int, n: np.ndarray) -> np.ndarray:
        if self.gamma[axis] == 0:
            return np.ones_like(n, dtype=np.float64)
        return (np.asarray(n, dtype=np.float64) + self.beta[axis]) / self.gamma[axis]


def _normalise_for_profile(net: UNet) -> UNet:
    """Copy of ``net`` on the meta device with normalisation removed: prediction folds it into
    the convolutions or applies it in place, so it allocates nothing."""
    from sparse3d.inference.bn import strip_batchnorm

    return strip_batchnorm(meta_copy(net))


class NetProfile:
    """Memory and compute of prediction passes of ``net`` as functions of the tile shape."""

    def __init__(self, net: UNet) -> None:
        if net.dim != 3:
            raise ValueError("NetProfile supports 3D networks")
        self.net = net
        self.in_channels = net.in_channels
        self.num_classes = net.num_classes
        self.geometry = net.geometry
        self._meta = _normalise_for_profile(net)
        legal = [n for n in range(1, 4096) if self.geometry.is_legal(n)]
        n1 = legal[min(2, len(legal) - 1)]
        n2 = legal[min(6, len(legal) - 1)]
        t1 = _trace(self._meta, (n1,) * 3)
        t2 = _trace(self._meta, (n2,) * 3)
        if [e[0] for e in t1.events] != [e[0] for e in t2.events]:
            raise RuntimeError("the prediction pass differs between tile sizes; cannot profile")
        self._events = t1.events
        self._convs = t1.convs
        shapes2 = {e[1]: e[2] for e in t2.events if e[0] == "a"}
        self._models: dict[int, _TensorModel] = {}
        for e in t1.events:
            if e[0] != "a":
                continue
            tid, s1, itemsize = e[1], e[2], e[3]
            s2 = shapes2[tid]
            const = float(itemsize)
            beta, gamma = np.zeros(3), np.zeros(3)
            nd = len(s1)
            for d, (a, b) in enumerate(zip(s1, s2, strict=True)):
                axis = d - (nd - 3)
                if a == b or axis < 0:
                    const *= a
                    continue
                g = (n2 - n1) / (b - a)
                gamma[axis], beta[axis] = g, a * g - n1
            self._models[tid] = _TensorModel(const, int(itemsize), beta, gamma)

    # -- evaluation ------------------------------------------------------------------------------
    def _numel_bytes(self, tid: int, nz, ny, nx) -> np.ndarray:
        m = self._models[tid]
        return m.const * m.axis_factor(0, nz) * m.axis_factor(1, ny) * m.axis_factor(2, nx)

    def peak_bytes(self, input_tile, bytes_per_value: int = 4) -> np.ndarray | float:
        """Estimated peak memory of one tile (or arrays of tiles) in bytes.

        Live activations of the traced pass, scaled by ``bytes_per_value / 4``, plus the input
        tile (float32) and the output logits on the host, times :data:`SAFETY`.
        """
        nz, ny, nx = (np.asarray(v, dtype=np.float64) for v in input_tile)
        live = np.zeros(np.broadcast(nz, ny, nx).shape)
        peak = live.copy()
        sizes: dict[int, np.ndarray] = {}
        scale = bytes_per_value / 4.0
        for e in self._events:
            if e[0] == "a":
                b = self._numel_bytes(e[1], nz, ny, nx) * scale
                sizes[e[1]] = b
                live = live + b
                peak = np.maximum(peak, live)
            else:
                live = live - sizes.pop(e[1])
        total = SAFETY * (peak + self._host(nz, ny, nx))
        return float(total) if total.ndim == 0 else total

    def _host(self, nz, ny, nx) -> np.ndarray:
        host_in = 4.0 * self.in_channels * nz * ny * nx
        return host_in + 4.0 * self.num_classes * self._out(nz) * self._out(ny) * self._out(nx)

    def host_bytes(self, input_tile) -> np.ndarray | float:
        """Host memory of one tile (or arrays of tiles) outside the pass itself: the input tile
        and the output logits, float32, times :data:`SAFETY` (part of :meth:`peak_bytes`)."""
        nz, ny, nx = (np.asarray(v, dtype=np.float64) for v in input_tile)
        total = SAFETY * self._host(nz, ny, nx)
        return float(total) if np.ndim(total) == 0 else total

    def max_elements(self, input_tile) -> np.ndarray | float:
        """Elements of the largest tensor of a pass over one tile (or arrays of tiles), batch
        of one (see :data:`MAX_TENSOR_ELEMENTS`)."""
        nz, ny, nx = (np.asarray(v, dtype=np.float64) for v in input_tile)
        top = np.zeros(np.broadcast(nz, ny, nx).shape)
        for m in self._models.values():
            n = m.const / m.itemsize * m.axis_factor(0, nz) * m.axis_factor(1, ny)
            top = np.maximum(top, n * m.axis_factor(2, nx))
        return float(top) if top.ndim == 0 else top

    def _out(self, n: np.ndarray) -> np.ndarray:
        flat = [self.geometry.output_size(int(v)) or 0 for v in np.ravel(n)]
        return np.reshape(np.asarray(flat, dtype=np.float64), np.shape(n))

    def macs(self, input_tile) -> float:
        """Multiply-accumulates of one pass over a tile ``(nz, ny, nx)``."""
        return self.grid_macs([[int(n)] for n in input_tile])

    def grid_macs(self, sizes_per_axis: Sequence[Sequence[int]]) -> float:
        """Multiply-accumulates of a tile grid whose tiles along axis ``a`` have the input sizes
        ``sizes_per_axis[a]``."""
        sums = [np.asarray(float(sum(s))) for s in sizes_per_axis]
        counts = [np.asarray(float(len(s))) for s in sizes_per_axis]
        return float(self.grid_macs_from_sums(sums, counts))

    def grid_macs_from_sums(self, sums: Sequence[np.ndarray], counts: Sequence[np.ndarray]):
        """Vectorised :meth:`grid_macs` from the per-axis sum of tile sizes and tile count (each
        spatial size is affine in the tile size, so the sum over tiles needs only these two)."""
        total = 0.0
        for tid, per in self._convs:
            m = self._models[tid]
            term = m.const / 4.0 * per  # const holds the itemsize 4 of the fp32 trace
            for a in range(3):
                if m.gamma[a] == 0:
                    term = term * counts[a]
                else:
                    term = term * (sums[a] + counts[a] * m.beta[a]) / m.gamma[a]
            total = total + term
        return total


MEMORY_MODELS = ("traced", "plain")


def net_profile(net: UNet, model: str = "traced"):
    """The memory and compute model of ``net``'s prediction passes.

    ``"traced"``: :class:`NetProfile` (the real pass traced on the meta device; exact, the
    largest tiles). ``"plain"``: :class:`~sparse3d.inference.plain_profile.PlainProfile` (from
    the channel counts; conservative, no torch internals). A traced model that cannot be built
    (a torch release without the hook it uses) falls back to the plain one with a warning."""
    from sparse3d.inference.plain_profile import PlainProfile

    if model not in MEMORY_MODELS:
        raise ValueError(f"memory_model must be one of {MEMORY_MODELS}, got {model!r}")
    if model == "plain":
        return PlainProfile(net)
    try:
        return NetProfile(net)
    except Exception as err:  # noqa: BLE001 - any failure of the tracer means: use the fallback
        logger.warning(
            "tracing the network's memory failed (%s: %s); using the plain memory model "
            "(memory_model=plain)",
            type(err).__name__,
            err,
        )
        return PlainProfile(net)


# ---------------------------------------------------------------------------------------------
# memory budget


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory PyTorch's allocator holds but no tensor uses is free for this process too
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_memory_budget(device: torch.device) -> int:
    """Half of the free host memory on CPU (the machine is shared with the data and the output),
    85 % of the free GPU memory on CUDA."""
    frac = 0.85 if device.type == "cuda" else 0.5
    return int(frac * available_memory_bytes(device))


def needs_streaming(
    held_bytes: float,
    tile_peak_bytes: float,
    tile_host_bytes: float,
    device: torch.device,
    host_budget_bytes: float,
) -> bool:
    """Whether predicting a volume in memory would overrun the host's memory budget.

    Like is compared with like: the in-memory path holds ``held_bytes`` of host RAM (the image
    and the results); on the CPU the tile pass (``tile_peak_bytes``, :meth:`NetProfile.peak_bytes`)
    runs in that same RAM, on a GPU only its host-side input and output copies
    (``tile_host_bytes``, :meth:`NetProfile.host_bytes`) do: the pass itself lives in device
    memory, which the tile layout already fits to the GPU's budget.
    """
    tile = tile_peak_bytes if device.type == "cpu" else tile_host_bytes
    return held_bytes + tile > host_budget_bytes


# ---------------------------------------------------------------------------------------------
# layout choice


def _axis_candidates(length: int, net: UNet, overlap: float) -> list[AxisPlan]:
    """Balanced layouts along one axis, one per tile count, largest tiles first."""
    g = net.geometry
    valid = g.padding == "valid"
    align = 2 ** (g.depth - 1)
    hi = g.input_for_output(length) if valid else _ceil_legal(g, length)
    sizes = [n for n in range(g.smallest_input(), hi + 1) if g.is_legal(n)]
    by_count: dict[int, AxisPlan] = {}
    for n in sizes:
        if valid:
            o = g.output_size(n)
            if o is None or o - o % align <= 0:
                continue
            plan = valid_axis_plan(length, n, g.output_size, align)
        else:
            plan = same_axis_plan(length, n, overlap)
        if plan.count not in by_count or n < by_count[plan.count].tiles[0].in_size:
            by_count[plan.count] = plan
    plans = [by_count[k] for k in sorted(by_count)]
    if not plans:
        raise ValueError(f"no legal tile fits an axis of {length} voxels")
    if len(plans) > MAX_AXIS_CANDIDATES:
        head = plans[: MAX_AXIS_CANDIDATES // 2]
        rest = plans[MAX_AXIS_CANDIDATES // 2 :]
        pick = np.unique(
            np.round(np.geomspace(1, len(rest), MAX_AXIS_CANDIDATES // 2)).astype(int) - 1
        )
        plans = head + [rest[i] for i in pick]
    return plans


def _ceil_legal(g, n: int) -> int:
    m = max(n, g.smallest_input())
    while not g.is_legal(m):
        m += 1
    return m


def axis_plans_for_tile(
    shape_zyx: Sequence[int], input_tile: Sequence[int], net: UNet, overlap: float
) -> tuple[AxisPlan, AxisPlan, AxisPlan]:
    """Layout for an explicit input tile (validated by the network)."""
    net.output_shape(tuple(int(n) for n in input_tile))  # ValueError names legal sizes
    g = net.geometry
    align = 2 ** (g.depth - 1)
    out = []
    for length, n in zip(shape_zyx, input_tile, strict=True):
        if g.padding == "valid":
            out.append(valid_axis_plan(int(length), int(n), g.output_size, align))
        else:
            out.append(same_axis_plan(int(length), int(n), overlap))
    return tuple(out)  # type: ignore[return-value]


@dataclass(frozen=True)
class PlanChoice:
    plan: TilePlan
    peak_bytes: float
    macs: float
    budget_bytes: float
    fits: bool


def choose_plan(
    profile: NetProfile,
    net: UNet,
    shape_zyx: Sequence[int],
    budget_bytes: float,
    bytes_per_value: int = 4,
    overlap: float = 0.25,
    input_tile: Sequence[int] | None = None,
    tile_overhead_macs: float = 2e9,
    max_elements: float = MAX_TENSOR_ELEMENTS,
) -> PlanChoice:
    """Tile layout of least compute whose largest tile fits ``budget_bytes``.

    Candidates per axis are the balanced layouts for 1, 2, ... tiles (the smallest legal tile
    that covers the axis with that many tiles, so a tile is never much bigger than the padded
    volume); all combinations are compared at once. With ``input_tile`` the layout of that input
    tile is returned. If nothing fits, the layout of least memory is returned with
    ``fits=False``. ``tile_overhead_macs`` charges each tile a fixed cost (per-tile work
    outside the convolutions, about 30 ms on a 2-core CPU), so that of two layouts of nearly equal
    compute the one with fewer tiles wins. No tile's largest tensor may exceed ``max_elements``
    (:data:`MAX_TENSOR_ELEMENTS`, whatever the budget); an explicit ``input_tile`` beyond it is a
    ValueError.
    """
    shape_zyx = tuple(int(n) for n in shape_zyx)
    padding = net.geometry.padding
    if input_tile is not None:
        axes = axis_plans_for_tile(shape_zyx, input_tile, net, overlap)
        plan = TilePlan(shape_zyx, axes, padding)
        elements = float(profile.max_elements(plan.input_tile))
        if elements > max_elements:
            raise ValueError(
                f"tile {tuple(plan.input_tile)} makes a tensor of {elements:.3g} elements, more than "
                f"the {max_elements:.0f} one tensor may have: choose a smaller tile"
            )
        peak = float(profile.peak_bytes(plan.input_tile, bytes_per_value))
        macs = profile.grid_macs([a.in_sizes for a in axes])
        return PlanChoice(plan, peak, macs, budget_bytes, peak <= budget_bytes)
    cands = [_axis_candidates(n, net, overlap) for n in shape_zyx]
    # vectorise over the grid of combinations
    grids = np.meshgrid(*[np.arange(len(c)) for c in cands], indexing="ij")
    idx = [g.ravel() for g in grids]
    first = [np.array([p.tiles[0].in_size for p in c], dtype=np.float64) for c in cands]
    input_tile = [first[a][idx[a]] for a in range(3)]  # each candidate's largest input tile
    peak = profile.peak_bytes(input_tile, bytes_per_value)
    peak = np.broadcast_to(peak, idx[0].shape)
    sums = [np.array([float(sum(p.in_sizes)) for p in c])[idx[a]] for a, c in enumerate(cands)]
    counts = [np.array([float(p.count) for p in c])[idx[a]] for a, c in enumerate(cands)]
    total = profile.grid_macs_from_sums(sums, counts)
    ntiles = counts[0] * counts[1] * counts[2]
    cost = total + tile_overhead_macs * ntiles + 1e-6 * ntiles
    small = np.broadcast_to(profile.max_elements(input_tile) <= max_elements, idx[0].shape)
    ok = (peak <= budget_bytes) & small
    if ok.any():
        best = int(np.argmin(np.where(ok, cost, np.inf)))
        fits = True
    else:
        best = int(np.argmin(np.where(small, peak, np.inf) if small.any() else peak))
        fits = False
    axes = tuple(cands[a][idx[a][best]] for a in range(3))
    plan = TilePlan(shape_zyx, axes, padding)  # type: ignore[arg-type]
    return PlanChoice(plan, float(peak[best]), float(total[best]), budget_bytes, fits)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


__all__ = [
    "MAX_TENSOR_ELEMENTS",
    "NetProfile",
    "PlanChoice",
    "axis_plans_for_tile",
    "available_memory_bytes",
    "choose_plan",
    "count_macs",
    "default_memory_budget",
    "format_bytes",
    "needs_streaming",
]
