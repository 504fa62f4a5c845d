"""Lightning plugins for multi-process training (layer 2).

:class:`PaperSyncBatchNorm` is what ``Trainer(sync_batchnorm=True)`` should do to the paper's
network: Lightning's own conversion turns every ``PaperBatchNorm`` into a
``torch.nn.SyncBatchNorm`` and, after ``fit``, into a plain BatchNorm, silently dropping the
paper's test-time batch statistics (Sec. 2) for the evaluation that follows training.
"""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sparse3d.models.blocks import sync_paper_batchnorm, unsync_paper_batchnorm


def _sync_other_batchnorm(module: nn.Module) -> nn.Module:
    """Plain BatchNorm layers (not the paper's) become ``torch.nn.SyncBatchNorm``."""
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, _sync_other_batchnorm(child))
    return module


class PaperSyncBatchNorm(TorchSyncBatchNorm):
    """Synchronised BatchNorm that keeps ``PaperBatchNorm``'s test-time behaviour.

    ``apply`` turns each ``PaperBatchNorm`` into a ``PaperSyncBatchNorm`` (any other BatchNorm
    into ``torch.nn.SyncBatchNorm``, as Lightning does); ``revert`` turns them back into
    ``PaperBatchNorm`` with the same ``eval_stats``. A ``TorchSyncBatchNorm`` subclass, so
    Lightning accepts it together with ``sync_batchnorm=True``.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return _sync_other_batchnorm(sync_paper_batchnorm(model))

    def revert(self, model: nn.Module) -> nn.Module:
        return super().revert(unsync_paper_batchnorm(model))


__all__ = ["PaperSyncBatchNorm"]
