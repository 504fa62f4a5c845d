"""Lightning training of densify's refining network (layer 2; see :mod:`sparse3d.densify.network`).

:func:`fit_refiner` trains a same-padded U-Net on :class:`sparse3d.densify.network.PlaneTiles` with
Lightning's Trainer for at most ``max_steps`` steps or ``time_budget_s`` seconds, whichever
comes first. The learning rate warms up, then follows a cosine to zero over the *progress* of the
run, the larger of the step and the time fraction, so a run cut by its time budget still ends
annealed. The loss is the masked cross-entropy on the annotated voxels plus
``pseudo_weight`` times the masked cross-entropy on the pseudo-labelled ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from sparse3d.densify.network import PlaneTiles
from sparse3d.losses import MaskedCrossEntropy
from sparse3d.models import UNet


class RefineModule(L.LightningModule):
    """The refining network, its two-part loss and its time-aware schedule.

    Args:
        net: a same-padded :class:`UNet` (logits of the tile's own size).
        num_classes: K.
        ignore_index: the unlabelled code of ``label`` and ``pseudo``.
        pseudo_weight: weight of the pseudo-label term (the annotation's is 1).
        lr: peak Adam learning rate.
        max_steps: steps of a full run.
        time_budget_s: wall seconds of a full run (None: steps only).
        class_weights: per-class weights of both terms (None: all 1).
    """

    def __init__(
        self,
        net: UNet,
        num_classes: int,
        ignore_index: int,
        pseudo_weight: float,
        lr: float,
        max_steps: int,
        time_budget_s: float | None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss = MaskedCrossEntropy(num_classes, ignore_index, class_weights)
        self.ignore_index = ignore_index
        self.pseudo_weight = float(pseudo_weight)
        self.lr = float(lr)
        self.max_steps = int(max_steps)
        self.time_budget_s = None if time_budget_s is None else float(time_budget_s)
        self._t0: float | None = None

    def progress(self) -> float:
        """Fraction of the run done: the larger of steps and elapsed time, in [0, 1]."""
        frac = self.global_step / max(self.max_steps, 1)
        if self.time_budget_s and self._t0 is not None:
            frac = max(frac, (time.perf_counter() - self._t0) / self.time_budget_s)
        return min(frac, 1.0)

    def _factor(self, _: int) -> float:
        p = self.progress()
        warm = 0.05
        if p < warm:
            return 0.1 + 0.9 * p / warm
        return 0.5 * (1.0 + math.cos(math.pi * (p - warm) / (1.0 - warm))) + 1e-3

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        x = batch["image"].contiguous(memory_format=torch.channels_last_3d)
        logits = self.net(x)  # (B, K, *tile)
        label = batch["label"]
        pseudo = torch.where(label == self.ignore_index, batch["pseudo"], self.ignore_index)
        loss = self.loss(logits, label)
        if self.pseudo_weight > 0:
            loss = loss + self.pseudo_weight * self.loss(logits, pseudo)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ReportAndStop(L.Callback):
    """Reports the training's progress after each step as ``progress("network", fraction)`` and
    stops the run at the next step when ``should_stop()`` turns true (a viewer's Cancel)."""

    def __init__(
        self,
        progress: Callable[[str, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.progress = progress
        self.should_stop = should_stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is not None:
            self.progress("network", float(pl_module.progress()))
        if self.should_stop is not None and self.should_stop():
            trainer.should_stop = True


def fit_refiner(
    module: RefineModule,
    tiles: PlaneTiles,
    batch_size: int,
    accelerator: str = "auto",
    progress_bar: bool = True,
    callbacks: Sequence[L.Callback] = (),
    precision: str = "fp32",
) -> dict[str, float | str]:
    """Train ``module`` on ``tiles``; returns ``{"steps", "seconds", "precision"}``.

    Stops after ``module.max_steps`` steps or ``module.time_budget_s`` seconds. ``precision``:
    fp32, bf16 (mixed: bf16 convolutions, fp32 weights) or auto (bf16 where the training device
    computes it natively; ``sparse3d.inference.precision``).
    """
    from sparse3d.inference.precision import resolve_precision, training_device

    budget = module.time_budget_s
    chosen = resolve_precision(precision, training_device(accelerator))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed" if chosen == "bf16" else "32-true",
        max_steps=module.max_steps,
        max_time=None if budget is None else {"seconds": max(1, int(math.ceil(budget)))},
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
    )
    loader = DataLoader(tiles, batch_size=batch_size, num_workers=0)
    t0 = time.perf_counter()
    module.net.to(memory_format=torch.channels_last_3d)
    trainer.fit(module, train_dataloaders=loader)
    return {
        "steps": float(trainer.global_step),
        "seconds": time.perf_counter() - t0,
        "precision": chosen,
    }
