"""LightningModule: network, masked loss and optimiser in one place (layer 2).

Built from plain objects (a ``UNet``, a ``MaskedCrossEntropy``, optimiser and scheduler
partials); it never sees a config. Training steps take random tiles. Whole-volume evaluation
happens after training, outside Lightning (``sparse3d.evaluation``, the one predictor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from sparse3d.losses import MaskedCrossEntropy
from sparse3d.models import UNet


class SegmentationModule(L.LightningModule):
    """Train the U-Net on sparse tiles.

    Args:
        net: the network (returns logits).
        loss: the paper's weighted softmax loss, weight 0 for unlabelled voxels.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` or None; stepped every iteration.
        ignore_index: the unlabelled code.
        model_meta: plain dict stored in the checkpoint so the model can be loaded without this
            class (see ``sparse3d.checkpoint``).
        channels_last: train a 3D network in ``torch.channels_last_3d`` memory layout (weights
            and input tiles; the same arithmetic, faster convolution kernels on CPUs, see
            ``experiments/bench_train.py``). Ignored for 2D networks.
        compile: run the training steps through ``torch.compile`` of the network (the same
            weights; evaluation and the checkpoint use the plain network). The first step
            compiles (tens of seconds); it pays on long runs (``experiments/bench_train.py``).
    """

    def __init__(
        self,
        net: UNet,
        loss: MaskedCrossEntropy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        ignore_index: int,
        model_meta: dict[str, Any],
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"model_meta": model_meta})
        self.net = net
        self.loss = loss
        self._optimizer = optimizer
        self._scheduler = scheduler
        self.ignore_index = ignore_index
        self._t_last: float | None = None
        self.memory_format = (
            torch.channels_last_3d if channels_last and net.dim == 3 else torch.contiguous_format
        )
        self.compile_net = bool(compile)
        # the compiled wrapper shares self.net's parameters; kept outside the module tree so
        # that state dicts and checkpoints hold the plain network's keys
        self.__dict__["_train_net"] = net

    def on_fit_start(self) -> None:
        if self.memory_format is not torch.contiguous_format:
            self.net.to(memory_format=self.memory_format)
        if self.compile_net and self.__dict__["_train_net"] is self.net:
            self.__dict__["_train_net"] = torch.compile(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["image"].contiguous(memory_format=self.memory_format)
        logits = self.__dict__["_train_net"](x)  # (B, K, *out)
        loss = self.loss(logits, batch["label"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        labelled = (batch["label"] != self.ignore_index).float().mean()
        self.log("train/labelled_fraction", labelled, batch_size=bs)
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tiles_per_s", bs / max(now - self._t_last, 1e-9), batch_size=bs)
        self._t_last = now
        return loss

    def configure_optimizers(self) -> Any:
        opt = self._optimizer(self.parameters())
        if self._scheduler is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"},
        }
