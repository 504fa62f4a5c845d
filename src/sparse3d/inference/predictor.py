"""Whole-volume prediction with a trained U-Net: seamless overlap-tile, any volume size.

:class:`Predictor` segments an image ``(C, Z, Y, X)`` held in memory (:meth:`Predictor.predict_array`)
or stored in a volume file (:meth:`Predictor.predict_file`), tile by tile:

1. the image is normalised as in training (per-channel percentiles, ``ModelMeta.normalization``;
   computed from a strided subsample, ``sparse3d.data.normalize``);
2. a tile layout is chosen (``sparse3d.inference.memory.choose_plan``): the layout of least
   compute whose largest tile fits the memory budget, so small volumes run as one tile;
3. valid-convolution networks use the overlap-tile strategy (paper Sec. 1.1, 2): mirror padding at
   the volume border, edge-to-edge output tiles on the pooling grid, identical to one pass over the
   whole padded volume; same-padded networks blend overlapping tiles;
4. batch normalisation at test time follows ``bn_mode`` (``sparse3d.inference.bn``):
   ``"recalibrate"`` (default) estimates the statistics of the volume in one extra pass and fixes
   them, ``"batch"`` is the paper's per-tile statistics, ``"running"`` the training statistics;
5. passes run under ``torch.inference_mode`` with channels-last memory layout, bf16 autocast where
   the hardware supports it natively, through the network's own (memory-lean) forward.

Volumes larger than the memory budget are streamed: tiles are read from the HDF5 file and results
written into a chunked HDF5 output as they come (``sparse3d.inference.file_prediction``). Tile
logits go to the sinks of ``sparse3d.inference.sinks``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparse3d.data.normalize import apply_percentiles, channel_percentiles
from sparse3d.inference.bn import BN_MODES, has_batchnorm, prepare_for_inference, recalibrate_bn
from sparse3d.inference.memory import (
    MAX_TENSOR_ELEMENTS,
    PlanChoice,
    choose_plan,
    default_memory_budget,
    format_bytes,
    net_profile,
)
from sparse3d.inference.precision import (
    autocast_context,
    enable_cpu_huge_pages,
    resolve_device,
    resolve_precision,
)
from sparse3d.inference.sinks import Stores, make_sink
from sparse3d.inference.tiling import Tile, TilePlan, read_mirrored
from sparse3d.models import UNet

if TYPE_CHECKING:
    from sparse3d.checkpoint import ModelMeta

logger = logging.getLogger(__name__)

Reader = Callable[[tuple[slice, slice, slice]], np.ndarray]


class PredictionInputError(ValueError):
    """The input does not fit the model (channels) or is unreadable; one-line message."""


@dataclass
class PredictionReport:
    """What a prediction did: layout, modes, memory estimate and timings."""

    shape_zyx: tuple[int, int, int]
    input_tile: tuple[int, int, int]
    grid_zyx: tuple[int, int, int]
    num_tiles: int
    bn_mode: str
    precision: str
    device: str
    peak_estimate_bytes: float
    budget_bytes: float
    streamed: bool = False
    calibration_seconds: float = 0.0
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Predictor:
    """Dense prediction of whole volumes with a trained U-Net.

    Args:
        net: trained 3D ``UNet`` (copied; the caller's network is never modified).
        meta: model meta (normalisation, class and channel names); None = no normalisation.
        input_tile: explicit input tile (must be legal for the network); None = chosen from the
            memory budget.
        memory_budget_gb: memory one tile may use on the prediction device (activations,
            estimated by ``memory.NetProfile``); None = half of the free host memory (CPU) or
            85 % of the free GPU memory (counting the allocator's cache; emptied between
            volumes). No tensor of a pass exceeds ``memory.MAX_TENSOR_ELEMENTS`` elements,
            whatever the budget (tiles and batches are made smaller).
        precision: ``"auto"`` | ``"bf16"`` | ``"fp32"`` (see ``inference.precision``).
        bn_mode: ``"recalibrate"`` (default) | ``"batch"`` (paper, per tile) | ``"running"``.
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:1"`` ...
        batch_size: tiles per pass (tiles of equal shape). ``bn_mode="batch"`` always uses 1, so
            that each tile is normalised by itself as in the paper.
        channels_last: channels-last memory layout (default: yes; faster convolutions on CPU and
            GPU).
        overlap: overlap fraction of neighbouring tiles for same-padded networks.
        probabilities_dtype: dtype of stored probabilities (``"float16"`` or ``"float32"``).
        progress: show tqdm progress bars.
        memory_model: how tile memory is estimated: ``"traced"`` (the real pass traced on the
            meta device through a torch hook; exact) or ``"plain"`` (from the channel counts;
            conservative, smaller tiles); see ``memory.net_profile``. An explicit ``input_tile``
            needs neither to be right.

    On CPU the constructor sets ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for large
    tensors, see ``precision.enable_cpu_huge_pages``) unless the variable is already set; set it to
    0 to opt out.
    """

    def __init__(
        self,
        net: UNet,
        meta: ModelMeta | None = None,
        input_tile: Sequence[int] | None = None,
        memory_budget_gb: float | None = None,
        precision: str = "auto",
        bn_mode: str = "recalibrate",
        device: str | torch.device = "auto",
        batch_size: int = 1,
        channels_last: bool | None = None,
        overlap: float = 0.25,
        probabilities_dtype: str = "float16",
        progress: bool = True,
        memory_model: str = "traced",
    ) -> None:
        if not isinstance(net, UNet) or net.dim != 3:
            raise ValueError(
                "the tiled predictor needs a 3D sparse3d UNet; the paper's 2D baseline predicts "
                "slice by slice (sparse3d.evaluation.predict_volume_2d)"
            )
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if probabilities_dtype not in ("float16", "float32"):
            raise ValueError(
                f"probabilities_dtype must be float16 or float32, got {probabilities_dtype!r}"
            )
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cpu":
            enable_cpu_huge_pages()
        self.bn_mode = bn_mode
        self.meta = meta
        self.input_tile = None if input_tile is None else tuple(int(n) for n in input_tile)
        if self.input_tile is not None:
            if len(self.input_tile) != 3:
                raise ValueError(f"input_tile must have 3 sizes, got {input_tile!r}")
            net.output_shape(self.input_tile)  # ValueError naming the legal sizes
        self.memory_budget_gb = memory_budget_gb
        self.batch_size = int(batch_size)
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.overlap = float(overlap)
        self.probabilities_dtype = probabilities_dtype
        self.progress = progress
        self.net = copy.deepcopy(net).to(self.device).eval()
        self.profile = net_profile(self.net, memory_model)
        self.last_report: PredictionReport | None = None
        if (
            meta is not None
            and int(meta.net.get("in_channels", net.in_channels)) != net.in_channels
        ):
            raise ValueError("meta.net does not describe the network")

    # -- configuration -------------------------------------------------------------------------
    @property
    def bytes_per_value(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def budget_bytes(self) -> float:
        """Memory a tile pass may use on the prediction device."""
        if self.memory_budget_gb is not None:
            return float(self.memory_budget_gb) * 2**30
        return float(default_memory_budget(self.device))

    def host_budget_bytes(self) -> float:
        """Host RAM the in-memory path may hold: the budget itself on the CPU (tiles, volume and
        results share it), half of the free host memory when predicting on a GPU."""
        if self.device.type == "cpu":
            return self.budget_bytes()
        return float(default_memory_budget(torch.device("cpu")))

    def _batch_for(self, input_tile: Sequence[int], wanted: int) -> int:
        """Tiles per pass: ``wanted``, fewer if the batch would make a tensor of more than
        :data:`~sparse3d.inference.memory.MAX_TENSOR_ELEMENTS` elements."""
        per_tile = max(float(self.profile.max_elements(tuple(input_tile))), 1.0)
        return max(1, min(int(wanted), int(MAX_TENSOR_ELEMENTS // per_tile)))

    def _free_device_cache(self) -> None:
        """Return the CUDA allocator's cached blocks, so that the next volume's layout is chosen
        from (and may use) all free memory, and other processes see it free."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def plan(self, shape_zyx: Sequence[int], auto: bool = False) -> PlanChoice:
        """The tile layout used for a volume of ``shape_zyx`` (``auto``: ignore ``input_tile``,
        the largest tiles the memory budget allows)."""
        return choose_plan(
            self.profile,
            self.net,
            shape_zyx,
            self.budget_bytes(),
            self.bytes_per_value,
            self.overlap,
            None if auto else self.input_tile,
        )

    def _percentiles(self, image) -> np.ndarray | None:
        norm = {} if self.meta is None else self.meta.normalization
        if norm.get("kind", "none") == "none":
            return None
        return channel_percentiles(image, float(norm["low"]), float(norm["high"]))

    def _check_channels(self, num_channels: int, where: str) -> None:
        want = self.net.in_channels
        if num_channels != want:
            names = "" if self.meta is None else f" ({', '.join(self.meta.channel_names)})"
            raise PredictionInputError(
                f"model expects {want} channel{'s' if want != 1 else ''}{names}, input has "
                f"{num_channels}: {where}"
            )

    # -- tiles -----------------------------------------------------------------------------------
    def _load(self, read: Reader, shape_zyx, tile: Tile, pct, where: str) -> np.ndarray:
        x = read_mirrored(read, shape_zyx, tile.input_start, tile.input_tile)
        if pct is not None:
            x = apply_percentiles(x, pct)
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise PredictionInputError(f"{where}: image contains NaN or Inf values")
        return x

    def _batches(self, tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
        groups: dict[tuple[int, ...], list[Tile]] = {}
        for t in tiles:
            groups.setdefault(t.input_tile, []).append(t)
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                yield group[i : i + batch_size]

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return t.to(self.device, non_blocking=True).contiguous(memory_format=fmt)

    def _forward(self, net: UNet, x: torch.Tensor) -> torch.Tensor:
        return net(x)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="tile", disable=not self.progress, leave=False)

    def _inference_net(
        self, plan: TilePlan, read: Reader, pct, where: str
    ) -> tuple[UNet, str, float]:
        """(network for the prediction pass, bn mode used, calibration seconds).

        Recalibration runs over the largest tiles the memory budget allows (whatever tile the
        prediction uses): each tile's statistics include its context, which dominates small
        valid-convolution tiles and biases the estimate toward the (mirrored) borders; large tiles
        come close to the statistics of one pass over the whole volume, and a single tile equals
        it. When the prediction itself is one tile, its batch statistics are used directly.
        """
        mode = self.bn_mode if has_batchnorm(self.net) else "running"
        seconds = 0.0
        source = self.net
        if mode == "recalibrate" and plan.num_tiles == 1:
            mode = "batch"  # statistics of the one tile = statistics of the volume: exact
        elif mode == "recalibrate":
            t0 = time.perf_counter()
            calib_plan = plan
            if self.input_tile is not None:
                auto = self.plan(plan.shape_zyx, auto=True)
                if auto.fits and auto.plan.num_tiles < plan.num_tiles:
                    calib_plan = auto.plan
            source = copy.deepcopy(self.net)
            tiles = calib_plan.tiles
            bar = self._bar(len(tiles), "recalibrating BN")

            calib_bs = self._batch_for(calib_plan.input_tile, self.batch_size)

            def batches() -> Iterator[torch.Tensor]:
                for group in self._batches(tiles, calib_bs):
                    x = np.stack([self._load(read, plan.shape_zyx, t, pct, where) for t in group])
                    yield self._to_device(x)
                    bar.update(len(group))

            try:
                recalibrate_bn(
                    source,
                    batches(),
                    forward=self._forward,
                    autocast=autocast_context(self.device, self.precision),
                )
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
        net = prepare_for_inference(source, "batch" if mode == "batch" else "running")
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        return net, mode, seconds

    def _run(self, read: Reader, shape_zyx, sink, pct, where: str, streamed: bool) -> None:
        t0 = time.perf_counter()
        self._free_device_cache()
        try:
            self._run_tiles(read, shape_zyx, sink, pct, where, streamed, t0)
        finally:
            self._free_device_cache()

    def _run_tiles(self, read: Reader, shape_zyx, sink, pct, where: str, streamed, t0) -> None:
        choice = self.plan(shape_zyx)
        plan = choice.plan
        if not choice.fits:
            logger.warning(
                "even the smallest tile layout needs about %s, more than the budget of %s",
                format_bytes(choice.peak_bytes),
                format_bytes(choice.budget_bytes),
            )
        logger.info(
            "%s: %d tile(s) %s of input %s, estimated peak %s (budget %s)",
            where,
            plan.num_tiles,
            "x".join(map(str, plan.grid_zyx)),
            "x".join(map(str, plan.input_tile)),
            format_bytes(choice.peak_bytes),
            format_bytes(choice.budget_bytes),
        )
        net, mode, calib_s = self._inference_net(plan, read, pct, where)
        bs = 1 if mode == "batch" else self._batch_for(plan.input_tile, self.batch_size)
        tiles = plan.tiles
        autocast = autocast_context(self.device, self.precision)
        with self._bar(len(tiles), "predicting") as bar, torch.inference_mode():
            for group in self._batches(tiles, bs):
                x = np.stack([self._load(read, shape_zyx, t, pct, where) for t in group])
                xt = self._to_device(x)
                del x
                with autocast:
                    y = self._forward(net, xt)
                del xt
                y = y.float().cpu()
                for t, yt in zip(group, y, strict=True):
                    sink.add(t, yt)
                del y
                bar.update(len(group))
        sink.finish()
        self.last_report = PredictionReport(
            shape_zyx=tuple(shape_zyx),
            input_tile=plan.input_tile,
            grid_zyx=plan.grid_zyx,
            num_tiles=plan.num_tiles,
            bn_mode=mode,
            precision=self.precision,
            device=str(self.device),
            peak_estimate_bytes=choice.peak_bytes,
            budget_bytes=choice.budget_bytes,
            streamed=streamed,
            calibration_seconds=calib_s,
            seconds=time.perf_counter() - t0,
        )

    def _sink(self, stores: Stores, shape_zyx, acc=None, wsum=None):
        padding, k = self.net.geometry.padding, self.net.num_classes
        return make_sink(stores, padding, k, shape_zyx, acc, wsum)

    # -- in memory -----------------------------------------------------------------------------
    def predict_array(
        self, image: np.ndarray, probabilities: bool = False, normalize: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment ``image (C, Z, Y, X)``.

        Args:
            image: raw image (normalised here as in training unless ``normalize=False``).
            probabilities: also return softmax probabilities.
            normalize: apply ``meta.normalization``.

        Returns:
            ``labels (Z, Y, X) uint8`` and ``probabilities (K, Z, Y, X)`` (``probabilities_dtype``)
            or None.
        """
        image = self._check_image(image)
        shape = tuple(image.shape[1:])
        labels = np.zeros(shape, dtype=np.uint8)
        probs = (
            np.zeros((self.net.num_classes, *shape), dtype=self.probabilities_dtype)
            if probabilities
            else None
        )
        pct = self._percentiles(image) if normalize else None
        sink = self._sink(Stores(labels, probs), shape)
        self._run(self._array_reader(image), shape, sink, pct, "array", streamed=False)
        return labels, probs

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 4:
            raise PredictionInputError(f"image must be (C, Z, Y, X), got shape {image.shape}")
        self._check_channels(image.shape[0], "array")
        return image

    @staticmethod
    def _array_reader(image: np.ndarray) -> Reader:
        return lambda box: image[(slice(None), *box)]

    # -- files -----------------------------------------------------------------------------------
    def predict_file(
        self,
        input_path: str | Path,
        output_path: str | Path,
        save_probabilities: bool = False,
        tiff: str | Path | None = None,
        overview_png: str | Path | None = None,
        overwrite: bool = False,
        stream: bool | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> PredictionReport:
        """Segment a volume file and write the result file (see ``inference.writers``).

        Args:
            input_path: a sparse3d volume (``.h5``, ``sparse3d.data.volume``).
            output_path: result ``.h5`` (labels, optional probabilities).
            save_probabilities: store per-class probabilities.
            tiff: also write the labels as a TIFF stack here.
            overview_png: also write a PNG overview (orthogonal slices) here.
            overwrite: replace existing outputs (otherwise FileExistsError before any work).
            stream: read tiles from the file and stream results to disk; None = only when the
                volume and its results do not fit the host's memory (``memory.needs_streaming``:
                with the tile pass on the CPU, its host-side copies on a GPU).
            attrs: extra root attributes of the result file (e.g. the model file).

        Returns:
            The :class:`PredictionReport` (also ``self.last_report``).
        """
        from sparse3d.inference.file_prediction import predict_file

        return predict_file(
            self,
            input_path,
            output_path,
            save_probabilities=save_probabilities,
            tiff=tiff,
            overview_png=overview_png,
            overwrite=overwrite,
            stream=stream,
            attrs=attrs,
        )
