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
   the hardware supports it natively, and a memory-lean forward (``forward.lean_forward``).

Volumes larger than the memory budget are streamed: tiles are read from the HDF5 file and results
written into a chunked HDF5 output as they come.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
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
from sparse3d.inference.forward import SkipShapes, lean_forward
from sparse3d.inference.memory import (
    MAX_TENSOR_ELEMENTS,
    NetProfile,
    PlanChoice,
    choose_plan,
    default_memory_budget,
    format_bytes,
    needs_streaming,
)
from sparse3d.inference.precision import (
    autocast_context,
    enable_cpu_huge_pages,
    resolve_device,
    resolve_precision,
)
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
    tile_zyx: tuple[int, int, int]
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


class _Stores:
    """Where results go: numpy arrays or HDF5 datasets (both take slice assignment)."""

    def __init__(self, labels, probabilities=None, logits=None) -> None:
        self.labels = labels
        self.probabilities = probabilities
        self.logits = logits

    def put(self, region: tuple[slice, slice, slice], logits: torch.Tensor) -> None:
        """``logits (K, z, y, x)`` float32 of ``region``."""
        if self.labels is not None:
            self.labels[region] = logits.argmax(0).to(torch.uint8).numpy()
        if self.probabilities is not None:
            p = torch.softmax(logits, 0).numpy()
            self.probabilities[(slice(None), *region)] = p.astype(self.probabilities.dtype)
        if self.logits is not None:
            self.logits[(slice(None), *region)] = logits.numpy()


class _DirectSink:
    """Valid-convolution tiles: each voxel is written once."""

    def __init__(self, stores: _Stores) -> None:
        self.stores = stores

    def add(self, tile: Tile, logits: torch.Tensor) -> None:
        self.stores.put(tile.out_slices, logits[(slice(None), *tile.crop_slices)])

    def finish(self) -> None:
        pass


class _BlendSink:
    """Same-padded tiles: weighted sum of logits and of weights, normalised at the end."""

    def __init__(self, stores: _Stores, acc, wsum, shape_zyx: tuple[int, int, int]) -> None:
        self.stores, self.acc, self.wsum, self.shape = stores, acc, wsum, shape_zyx

    def add(self, tile: Tile, logits: torch.Tensor) -> None:
        region = tile.out_slices
        w = tile.weight()
        part = logits[(slice(None), *tile.crop_slices)].numpy() * w[None]
        self.acc[(slice(None), *region)] = self.acc[(slice(None), *region)] + part
        self.wsum[region] = self.wsum[region] + w

    def finish(self) -> None:
        z = self.shape[0]
        step = max(1, min(z, 16))
        for z0 in range(0, z, step):
            region = (slice(z0, min(z, z0 + step)), slice(None), slice(None))
            w = np.asarray(self.wsum[region])
            if (w <= 0).any():
                raise RuntimeError("blending left voxels without any tile")
            logits = np.asarray(self.acc[(slice(None), *region)]) / w[None]
            self.stores.put(region, torch.from_numpy(logits.astype(np.float32)))


class Predictor:
    """Dense prediction of whole volumes with a trained U-Net.

    Args:
        net: trained 3D ``UNet`` (copied; the caller's network is never modified).
        meta: model meta (normalisation, class and channel names); None = no normalisation.
        tile_zyx: explicit input tile (must be legal for the network); None = chosen from the
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

    On CPU the constructor sets ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for large
    tensors, see ``precision.enable_cpu_huge_pages``) unless the variable is already set; set it to
    0 to opt out.
    """

    def __init__(
        self,
        net: UNet,
        meta: ModelMeta | None = None,
        tile_zyx: Sequence[int] | None = None,
        memory_budget_gb: float | None = None,
        precision: str = "auto",
        bn_mode: str = "recalibrate",
        device: str | torch.device = "auto",
        batch_size: int = 1,
        channels_last: bool | None = None,
        overlap: float = 0.25,
        probabilities_dtype: str = "float16",
        progress: bool = True,
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
        self.tile_zyx = None if tile_zyx is None else tuple(int(n) for n in tile_zyx)
        if self.tile_zyx is not None:
            if len(self.tile_zyx) != 3:
                raise ValueError(f"tile_zyx must have 3 sizes, got {tile_zyx!r}")
            net.output_shape(self.tile_zyx)  # ValueError naming the legal sizes
        self.memory_budget_gb = memory_budget_gb
        self.batch_size = int(batch_size)
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.overlap = float(overlap)
        self.probabilities_dtype = probabilities_dtype
        self.progress = progress
        self.net = copy.deepcopy(net).to(self.device).eval()
        self.profile = NetProfile(self.net)
        self.skip_shapes = SkipShapes(self.net)
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

    def _batch_for(self, tile_zyx: Sequence[int], wanted: int) -> int:
        """Tiles per pass: ``wanted``, fewer if the batch would make a tensor of more than
        :data:`~sparse3d.inference.memory.MAX_TENSOR_ELEMENTS` elements."""
        per_tile = max(float(self.profile.max_elements(tuple(tile_zyx))), 1.0)
        return max(1, min(int(wanted), int(MAX_TENSOR_ELEMENTS // per_tile)))

    def _free_device_cache(self) -> None:
        """Return the CUDA allocator's cached blocks, so that the next volume's layout is chosen
        from (and may use) all free memory, and other processes see it free."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def plan(self, shape_zyx: Sequence[int], auto: bool = False) -> PlanChoice:
        """The tile layout used for a volume of ``shape_zyx`` (``auto``: ignore ``tile_zyx``,
        the largest tiles the memory budget allows)."""
        return choose_plan(
            self.profile,
            self.net,
            shape_zyx,
            self.budget_bytes(),
            self.bytes_per_value,
            self.overlap,
            None if auto else self.tile_zyx,
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
        x = read_mirrored(read, shape_zyx, tile.in_start_zyx, tile.in_shape_zyx)
        if pct is not None:
            x = apply_percentiles(x, pct)
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise PredictionInputError(f"{where}: image contains NaN or Inf values")
        return x

    def _batches(self, tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
        groups: dict[tuple[int, ...], list[Tile]] = {}
        for t in tiles:
            groups.setdefault(t.in_shape_zyx, []).append(t)
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                yield group[i : i + batch_size]

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return t.to(self.device, non_blocking=True).contiguous(memory_format=fmt)

    def _forward(self, net: UNet, x: torch.Tensor) -> torch.Tensor:
        return lean_forward(net, x, self.skip_shapes(tuple(x.shape[2:])))

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
            if self.tile_zyx is not None:
                auto = self.plan(plan.shape_zyx, auto=True)
                if auto.fits and auto.plan.num_tiles < plan.num_tiles:
                    calib_plan = auto.plan
            source = copy.deepcopy(self.net)
            tiles = calib_plan.tiles
            bar = self._bar(len(tiles), "recalibrating BN")

            calib_bs = self._batch_for(calib_plan.tile_zyx, self.batch_size)

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
            "x".join(map(str, plan.tile_zyx)),
            format_bytes(choice.peak_bytes),
            format_bytes(choice.budget_bytes),
        )
        net, mode, calib_s = self._inference_net(plan, read, pct, where)
        bs = 1 if mode == "batch" else self._batch_for(plan.tile_zyx, self.batch_size)
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
            tile_zyx=plan.tile_zyx,
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

    def _sink(self, stores: _Stores, shape_zyx, acc=None, wsum=None):
        if self.net.geometry.padding == "valid":
            return _DirectSink(stores)
        k = self.net.num_classes
        if acc is None:
            acc = np.zeros((k, *shape_zyx), dtype=np.float32)
            wsum = np.zeros(shape_zyx, dtype=np.float32)
        return _BlendSink(stores, acc, wsum, tuple(shape_zyx))

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
        sink = self._sink(_Stores(labels, probs), shape)
        self._run(self._array_reader(image), shape, sink, pct, "array", streamed=False)
        return labels, probs

    def predict_logits(self, image: np.ndarray, normalize: bool = True) -> np.ndarray:
        """``image (C, Z, Y, X)`` -> logits ``(K, Z, Y, X)`` float32 (blended for same-padded
        networks)."""
        image = self._check_image(image)
        shape = tuple(image.shape[1:])
        logits = np.zeros((self.net.num_classes, *shape), dtype=np.float32)
        pct = self._percentiles(image) if normalize else None
        sink = self._sink(_Stores(None, None, logits), shape)
        self._run(self._array_reader(image), shape, sink, pct, "array", streamed=False)
        return logits

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
        from sparse3d.data.volume import VolumeFormatError, open_volume
        from sparse3d.inference.writers import ResultFile, check_output, write_overview, write_tiff

        out = check_output(output_path, overwrite)
        tiff_path = check_output(tiff, overwrite)
        png_path = check_output(overview_png, overwrite)
        try:
            vol = open_volume(input_path, scan_values=False)
        except VolumeFormatError as err:
            raise PredictionInputError(str(err)) from None
        with vol:
            where = str(vol.path)
            self._check_channels(vol.num_channels, where)
            if self.meta is not None and tuple(vol.meta.channel_names) != tuple(
                self.meta.channel_names
            ):
                logger.warning(
                    "%s: channel names %s differ from the model's %s (order is what counts)",
                    where,
                    vol.meta.channel_names,
                    self.meta.channel_names,
                )
            self._warn_voxel_size(vol.meta.voxel_size_zyx_um, where)
            shape = vol.shape_zyx
            k = self.net.num_classes
            prob_dtype = self.probabilities_dtype if save_probabilities else None
            if stream is None:
                stream = self._needs_streaming(vol.num_channels, shape, save_probabilities)
            pct = self._percentiles(vol.image)
            labels_spec = _label_spec(self.meta, k)
            meta_attrs = {
                "class_names": list(labels_spec.class_names),
                "channel_names": list(vol.meta.channel_names),
                "voxel_size_zyx_um": list(vol.meta.voxel_size_zyx_um),
                "source": where,
                "bn_mode": self.bn_mode,
                "precision": self.precision,
                **(attrs or {}),
            }
            result = ResultFile(out, shape, k, prob_dtype, meta_attrs)
            try:
                if stream:
                    stores = _Stores(result.labels, result.probabilities)
                    with _scratch(out, k, shape, self.net.geometry.padding != "valid") as acc:
                        sink = self._sink(stores, shape, *acc)
                        self._run(vol.read_image, shape, sink, pct, where, streamed=True)
                    labels_src, image_src = result.labels, vol.image
                else:
                    image = vol.read_image((slice(None),) * 3)
                    labels = np.zeros(shape, dtype=np.uint8)
                    probs = np.zeros((k, *shape), dtype=prob_dtype) if prob_dtype else None
                    sink = self._sink(_Stores(labels, probs), shape)
                    self._run(self._array_reader(image), shape, sink, pct, where, streamed=False)
                    result.labels[...] = labels
                    if probs is not None:
                        result.probabilities[...] = probs
                    labels_src, image_src = labels, image
                report = self.last_report
                assert report is not None
                result._file.attrs["tile_zyx"] = list(report.tile_zyx)
                result._file.attrs["bn_mode"] = report.bn_mode
                if tiff_path is not None:
                    write_tiff(tiff_path, labels_src, vol.meta.voxel_size_zyx_um, overwrite)
                    report.outputs["tiff"] = str(tiff_path)
                if png_path is not None:
                    write_overview(
                        png_path,
                        image_src,
                        labels_src,
                        labels_spec,
                        title=f"{Path(where).name}: prediction",
                        voxel_size_zyx_um=vol.meta.voxel_size_zyx_um,
                        channel_names=tuple(vol.meta.channel_names),
                        overwrite=overwrite,
                    )
                    report.outputs["overview"] = str(png_path)
                result.commit()
            except BaseException:
                result.abort()
                raise
        report.outputs["labels"] = str(out)
        return report

    def _needs_streaming(self, channels: int, shape, probabilities: bool) -> bool:
        n = math.prod(shape)
        k = self.net.num_classes
        held = n * (4 * channels + 1)  # image float32 + labels uint8
        if probabilities:
            held += n * k * np.dtype(self.probabilities_dtype).itemsize
        if self.net.geometry.padding != "valid":
            held += n * 4 * (k + 1)  # blending accumulators
        tile = self.plan(shape).plan.tile_zyx
        return needs_streaming(
            held,
            float(self.profile.peak_bytes(tile, self.bytes_per_value)),
            float(self.profile.host_bytes(tile)) * self.batch_size,
            self.device,
            self.host_budget_bytes(),
        )

    def _warn_voxel_size(self, voxel_size, where: str) -> None:
        want = None if self.meta is None else self.meta.voxel_size_zyx_um
        if want is None:
            return
        ratio = [a / b for a, b in zip(voxel_size, want, strict=True)]
        if any(abs(r - 1) > 0.1 for r in ratio):
            logger.warning(
                "%s: voxel size %s um differs from the training data's %s um; consider resampling",
                where,
                tuple(voxel_size),
                tuple(want),
            )


@contextlib.contextmanager
def _scratch(next_to: Path, k: int, shape, needed: bool):
    """(acc, wsum) blending accumulators in a temporary HDF5 file beside the output, or
    (None, None) when not ``needed``; the file is deleted afterwards."""
    if not needed:
        yield None, None
        return
    import h5py

    from sparse3d.inference.writers import temp_name

    path = temp_name(next_to)
    try:
        with h5py.File(path, "w", rdcc_nbytes=256 * 2**20) as f:
            chunks = (1, min(shape[0], 32), min(shape[1], 128), min(shape[2], 128))
            acc = f.create_dataset("acc", (k, *shape), np.float32, chunks=chunks, fillvalue=0)
            wsum = f.create_dataset("wsum", shape, np.float32, chunks=chunks[1:], fillvalue=0)
            yield acc, wsum
    finally:
        if path.exists():
            path.unlink()


def _label_spec(meta, num_classes: int):
    from sparse3d.labels import LabelSpec

    if meta is not None:
        return meta.labels
    return LabelSpec(tuple(f"class{i}" for i in range(num_classes)), num_classes)
