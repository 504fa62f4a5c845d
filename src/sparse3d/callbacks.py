"""Lightning callbacks (layer 2): progress log lines and the periodic held-out evaluation.

Lightning's progress bar redraws itself with carriage returns; piped into a file (a SLURM log, a
CI log, ``| tee``) every redraw becomes a line. :class:`ProgressLog` writes one log line every
``every_n_steps`` steps instead: ``step i/N, loss, elapsed, ETA``.

:class:`PeriodicEvaluation` scores the held-out voxels every ``every_n_steps`` steps with the one
predictor (``sparse3d.evaluation``) and logs ``val/iou`` and ``val/iou_<class>`` to every logger
(metrics CSV, W&B): the learning curve of a run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("sparse3d.progress")


def _hms(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLog(L.Callback):
    """Log ``step i/N, loss L, elapsed h:mm:ss, ETA h:mm:ss`` every ``every_n_steps`` steps.

    Args:
        every_n_steps: steps between lines; ``None``: about ``lines`` lines per run, from the
            trainer's number of steps.
        lines: lines per run when ``every_n_steps`` is None.
        logger: where the lines go (default ``sparse3d.progress``).

    The last step is always logged. Only the global-zero process logs.
    """

    def __init__(
        self, every_n_steps: int | None = None, lines: int = 15, logger: logging.Logger = log
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if lines < 1:
            raise ValueError(f"lines must be >= 1, got {lines}")
        self.every_n_steps = every_n_steps
        self.lines = lines
        self.logger = logger
        self._every = every_n_steps or 1
        self._total = 0
        self._t0 = 0.0
        self._step0 = 0

    @staticmethod
    def _total_steps(trainer: L.Trainer) -> int:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # no finite estimate (e.g. an iterable of unknown length)
            return 0
        return int(total) if math.isfinite(total) else 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = self._total_steps(trainer)
        self._every = self.every_n_steps or max(1, math.ceil(self._total / self.lines))
        self._t0 = time.perf_counter()
        self._step0 = int(trainer.global_step)  # > 0 when resuming

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        last = self._total > 0 and step >= self._total
        if step % self._every and not last:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        parts = [f"step {step}/{self._total}" if self._total else f"step {step}"]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"elapsed {_hms(elapsed)}")
        if self._total and done > 0:
            parts.append(f"ETA {_hms(elapsed / done * max(self._total - step, 0))}")
        self.logger.info(", ".join(parts))


def heldout_values(summary: dict[str, Any] | None) -> dict[str, float]:
    """``{"val/iou": mean, "val/iou_<class>": IoU}`` of an IoU summary
    (``sparse3d.metrics.iou_summary``); classes without a value are left out."""
    if not summary:
        return {}
    values = {f"val/iou_{name}": float(v) for name, v in summary["iou"].items() if v is not None}
    if summary.get("mean") is not None:
        values["val/iou"] = float(summary["mean"])
    return values


class PeriodicEvaluation(L.Callback):
    """Score the held-out voxels every ``every_n_steps`` training steps (the learning curve).

    Each evaluation predicts the held-out volumes with the one predictor and scores the held-out
    voxels exactly as the final evaluation after training does (``sparse3d.evaluation``:
    whole volumes, test-time batch statistics, fp32), then logs ``val/iou`` (mean over classes),
    ``val/iou_<class>`` and ``val/seconds`` (the evaluation's wall time) at the global step to
    every logger of the trainer. The network's training mode, gradients and the random number
    generators are left as they were, so training continues exactly as without the callback.

    Args:
        volumes: objects with ``name``, a normalised ``image (C, Z, Y, X)`` and ``eval_label
            (Z, Y, X)`` (the held-out voxels, ``ignore_index`` elsewhere), e.g. the DataModule's
            ``PreparedVolume``; volumes without a held-out voxel are skipped (nothing to score).
        class_names: the data's classes.
        ignore_index: the unlabelled code.
        every_n_steps: steps between evaluations (>= 1).
        skip_steps: steps not to evaluate at (the final step, which the evaluation after training
            scores anyway).

    Only the global-zero process evaluates. ``history`` keeps ``(step, values)`` of every
    evaluation of this process.
    """

    def __init__(
        self,
        volumes: Sequence[Any],
        class_names: Sequence[str],
        ignore_index: int,
        every_n_steps: int,
        skip_steps: Sequence[int] = (),
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.volumes = [v for v in volumes if np.any(np.asarray(v.eval_label) != ignore_index)]
        self.class_names = tuple(class_names)
        self.ignore_index = int(ignore_index)
        self.every_n_steps = int(every_n_steps)
        self.skip_steps = {int(s) for s in skip_steps}
        self.history: list[tuple[int, dict[str, float]]] = []

    def evaluate(self, net: torch.nn.Module) -> dict[str, float]:
        """``val/...`` values of ``net`` on the held-out voxels (random state untouched)."""
        from sparse3d.evaluation import evaluate_volumes

        t0 = time.perf_counter()
        devices = [net_device] if (net_device := _device(net)).type == "cuda" else []
        quiet = logging.getLogger("sparse3d.inference.predictor")
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))  # no layout line per volume and evaluation
        with torch.random.fork_rng(devices=devices):
            state = np.random.get_state()
            try:
                scores, _ = evaluate_volumes(
                    net, self.volumes, self.class_names, self.ignore_index, ("heldout",)
                )
            finally:
                np.random.set_state(state)
                quiet.setLevel(level)
        values = heldout_values(scores["heldout"])
        values["val/seconds"] = time.perf_counter() - t0
        return values

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = int(trainer.global_step)
        if not self.volumes or not trainer.is_global_zero:
            return
        if step % self.every_n_steps or step in self.skip_steps:
            return
        values = self.evaluate(pl_module.net)
        self.history.append((step, values))
        for lg in trainer.loggers:
            lg.log_metrics(values, step=step)
            lg.save()  # the curve so far on disk (the CSV log flushes every 100 steps only)
        log.info(
            "step %d: held-out IoU %.4f (%.1f s)",
            step,
            values.get("val/iou", float("nan")),
            values["val/seconds"],
        )


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device
