"""Lightning callbacks (layer 2): progress as log lines for runs whose output is not a terminal.

Lightning's progress bar redraws itself with carriage returns; piped into a file (a SLURM log, a
CI log, ``| tee``) every redraw becomes a line. :class:`ProgressLog` writes one log line every
``every_n_steps`` steps instead: ``step i/N, loss, elapsed, ETA``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
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
