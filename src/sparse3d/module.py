"""LightningModule: network, masked loss, IoU metrics and optimiser in one place (layer 2).

Built from plain objects (a ``UNet``, a ``MaskedCrossEntropy``, optimiser and scheduler
partials); it never sees a config. Training steps take random tiles; validation steps take whole
volumes, predict them densely and count IoU on the held-out labelled voxels (paper Sec. 4: test
slices less their crossings with training slices), on every voxel of the test slices
(``heldout_all``, crossings included) and, where a dense ground truth exists, on every voxel
(``all_voxels``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch

from sparse3d.losses import MaskedCrossEntropy
from sparse3d.metrics import LabelledConfusion, iou_from_confusion
from sparse3d.models import UNet

VolumePredictor = Callable[[UNet, np.ndarray], np.ndarray]


class SegmentationModule(L.LightningModule):
    """Train the U-Net on sparse tiles; evaluate on whole volumes.

    Args:
        net: the network (returns logits).
        loss: the paper's weighted softmax loss, weight 0 for unlabelled voxels.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` or None; stepped every iteration.
        class_names: names of the label classes (codes ``0..K-1``).
        ignore_index: the unlabelled code.
        predict_volume: ``(net, image (C, Z, Y, X)) -> labels (Z, Y, X)`` used for validation.
        model_meta: plain dict stored in the checkpoint so the model can be loaded without this
            class (see ``sparse3d.checkpoint``).
    """

    def __init__(
        self,
        net: UNet,
        loss: MaskedCrossEntropy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        class_names: tuple[str, ...],
        ignore_index: int,
        predict_volume: VolumePredictor,
        model_meta: dict[str, Any],
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"model_meta": model_meta})
        self.net = net
        self.loss = loss
        self._optimizer = optimizer
        self._scheduler = scheduler
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        self.predict_volume = predict_volume
        k = len(class_names)
        self.iou_heldout = LabelledConfusion(k, ignore_index)
        self.iou_heldout_all = LabelledConfusion(k, ignore_index)
        self.iou_all_voxels = LabelledConfusion(k, ignore_index)
        self.predictions: dict[str, np.ndarray] = {}
        self._t_last: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])  # (B, K, *out)
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

    # -- whole-volume evaluation -------------------------------------------------------------
    def evaluate_volume(self, batch: dict[str, Any]) -> None:
        """Predict one whole volume (batch of one) and count it into the IoU accumulators.

        A placeholder item (a DDP rank with fewer volumes than the others, see
        ``datamodule.EvaluationSampler``) counts nothing."""
        if "placeholder" in batch:
            return
        image = batch["image"][0].cpu().numpy()  # (C, Z, Y, X)
        was_training = self.net.training
        self.net.eval()
        pred = self.predict_volume(self.net, image)  # (Z, Y, X) uint8
        self.net.train(was_training)
        pred_t = torch.from_numpy(np.asarray(pred, dtype=np.int64)).to(self.device)
        self.iou_heldout.update(pred_t, batch["eval_label"][0].long().to(self.device))
        held_all = batch.get("eval_label_all", batch["eval_label"])
        self.iou_heldout_all.update(pred_t, held_all[0].long().to(self.device))
        if bool(batch["has_dense"][0]):
            self.iou_all_voxels.update(pred_t, batch["dense_label"][0].long().to(self.device))
        self.predictions[batch["name"][0]] = np.asarray(pred, dtype=np.uint8)

    def reset_evaluation(self) -> None:
        self.predictions = {}
        self.iou_heldout.reset()
        self.iou_heldout_all.reset()
        self.iou_all_voxels.reset()

    def _accumulators(self) -> dict[str, LabelledConfusion]:
        return {
            "heldout": self.iou_heldout,
            "heldout_all": self.iou_heldout_all,
            "all_voxels": self.iou_all_voxels,
        }

    def evaluation_confusion(self, sync: bool = True) -> dict[str, np.ndarray]:
        """Pooled confusion matrices ``(K, K)`` so far, by voxel set: ``"heldout"`` (test
        slices off the training slices), ``"heldout_all"`` (test slices, crossings with training
        slices included), ``"all_voxels"`` (every voxel of the dense ground truth); summed over
        DDP processes when ``sync`` (every process must call it then)."""
        if sync:
            return {k: m.compute().cpu().numpy() for k, m in self._accumulators().items()}
        return {k: m.confusion.cpu().numpy() for k, m in self._accumulators().items()}

    def evaluation_scalars(self, sync: bool = True) -> dict[str, float]:
        """``val/iou_<heldout|heldout_all|all_voxels>/<class|mean>`` for the loggers."""
        out: dict[str, float] = {}
        for tag, cm in self.evaluation_confusion(sync).items():
            if cm.sum() == 0:
                continue
            iou = iou_from_confusion(cm)
            for name, v in zip(self.class_names, iou, strict=True):
                if np.isfinite(v):
                    out[f"val/iou_{tag}/{name}"] = float(v)
            out[f"val/iou_{tag}/mean"] = float(np.nanmean(iou))
        return out

    def on_validation_epoch_start(self) -> None:
        self.reset_evaluation()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate_volume(batch)

    def on_validation_epoch_end(self) -> None:
        for key, value in self.evaluation_scalars().items():
            self.log(key, value, prog_bar=key.endswith("heldout/mean"))
