"""LightningDataModule serving sparse training tiles and whole evaluation volumes (layer 2).

Built from plain arguments: volume files, a split (which slices train, which test) and tile
sizes from the model. Training labels keep only the split's training slices (every other voxel
becomes unlabelled); evaluation labels keep only its test slices (paper Sec. 4.1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sparse3d.data.annotation import slice_mask
from sparse3d.data.dataset import SliceDataset, TileDataset
from sparse3d.data.normalize import apply_percentiles, channel_percentiles
from sparse3d.data.volume import load_volume
from sparse3d.labels import LabelSpec

log = logging.getLogger(__name__)

SliceSet = dict[str, dict[str, list[int]]]


@dataclass
class PreparedVolume:
    """One volume in memory: normalised image ``(C, Z, Y, X)`` and labels ``(Z, Y, X)``."""

    name: str
    image: np.ndarray
    train_label: np.ndarray
    eval_label: np.ndarray
    dense_label: np.ndarray | None


def restrict_to_slices(
    label: np.ndarray, slices: dict[str, Sequence[int]] | None, ignore_index: int
) -> np.ndarray:
    """Copy of ``label (Z, Y, X)`` with every voxel outside the given slices set to ignore."""
    out = np.full_like(label, ignore_index)
    if slices:
        mask = slice_mask(label.shape, {a: tuple(v) for a, v in slices.items()})
        out[mask] = label[mask]
    return out


class _WholeVolumes(Dataset):
    def __init__(self, volumes: list[PreparedVolume]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v = self.volumes[i]
        dense = v.dense_label if v.dense_label is not None else np.zeros(1, np.uint8)
        return {
            "name": v.name,
            "image": torch.from_numpy(v.image),
            "eval_label": torch.from_numpy(v.eval_label.astype(np.int64)),
            "dense_label": torch.from_numpy(dense.astype(np.int64)),
            "has_dense": v.dense_label is not None,
        }


class SparseDataModule(L.LightningDataModule):
    """Tiles from sparsely labelled volumes for training, whole volumes for evaluation.

    Args:
        volume_paths: ``{name: path}`` of HDF5 volumes (``sparse3d.data.volume`` format).
        train_slices / test_slices: ``{name: {"z"|"y"|"x": [indices]}}`` from a protocol split.
        label_source: ``"sparse"`` (the file's annotation) or ``"dense"`` (the dense ground truth,
            for the slice-count sweep that chooses its own slices).
        labels: class names and ignore code.
        dim: 3 for 3D tiles, 2 for the 2D baseline's slices.
        input_tile / output_tile: network input and output tile (``zyx`` or ``yx`` for 2D).
        transform: training augmentation on ``{"image", "label"}`` dicts, or None.
        margin: extra context read around each tile for the transform (voxels per axis).
    """

    def __init__(
        self,
        volume_paths: dict[str, str],
        train_slices: SliceSet,
        test_slices: SliceSet,
        label_source: str,
        labels: LabelSpec,
        dim: int,
        input_tile: Sequence[int],
        output_tile: Sequence[int],
        batch_size: int = 1,
        samples_per_epoch: int = 100,
        num_workers: int = 0,
        transform: Callable[[dict], dict] | None = None,
        margin: Sequence[int] | None = None,
        seed: int = 0,
        pct_low: float = 1.0,
        pct_high: float = 99.5,
    ) -> None:
        super().__init__()
        if label_source not in ("sparse", "dense"):
            raise ValueError(f"label_source must be 'sparse' or 'dense', got {label_source!r}")
        self.volume_paths = dict(volume_paths)
        self.train_slices = train_slices
        self.test_slices = test_slices
        self.label_source = label_source
        self.labels = labels
        self.dim = dim
        self.input_tile = tuple(int(v) for v in input_tile)
        self.output_tile = tuple(int(v) for v in output_tile)
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.transform = transform
        self.margin = tuple(margin) if margin is not None else None
        self.seed = seed
        self.pct = (pct_low, pct_high)
        self.volumes: dict[str, PreparedVolume] = {}
        self.percentiles: dict[str, list[list[float]]] = {}

    # -- preparation -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.volumes:
            return
        names = sorted(set(self.train_slices) | set(self.test_slices))
        for name in names:
            arr = load_volume(self.volume_paths[name])
            if arr.meta.labels.ignore_index != self.labels.ignore_index:
                raise ValueError(
                    f"{arr.path}: ignore value {arr.meta.labels.ignore_index} differs from the "
                    f"configured {self.labels.ignore_index}"
                )
            if self.label_source == "dense":
                if arr.dense_label is None:
                    raise ValueError(f"{arr.path}: this protocol needs a dense ground truth")
                source = np.asarray(arr.dense_label)
            else:
                source = np.asarray(arr.label)
            pct = channel_percentiles(arr.image, *self.pct)
            self.percentiles[name] = pct.tolist()
            ign = self.labels.ignore_index
            self.volumes[name] = PreparedVolume(
                name=name,
                image=apply_percentiles(arr.image, pct),
                train_label=restrict_to_slices(source, self.train_slices.get(name), ign),
                eval_label=restrict_to_slices(source, self.test_slices.get(name), ign),
                dense_label=None if arr.dense_label is None else np.asarray(arr.dense_label),
            )
        log.info("prepared volumes %s", {n: v.image.shape for n, v in self.volumes.items()})

    def train_class_counts(self) -> list[int]:
        """Labelled training voxels per class (for the paper's balanced weights, Sec. 3.2)."""
        self.setup()
        k = self.labels.num_classes
        counts = np.zeros(k, np.int64)
        for name in self.train_slices:
            lab = self.volumes[name].train_label
            counts += np.bincount(lab[lab != self.labels.ignore_index].ravel(), minlength=k)[:k]
        return counts.tolist()

    @property
    def num_channels(self) -> int:
        self.setup()
        return next(iter(self.volumes.values())).image.shape[0]

    # -- loaders -----------------------------------------------------------------------------
    def _train_volumes(self) -> list[PreparedVolume]:
        return [self.volumes[n] for n in sorted(self.train_slices) if self.train_slices[n]]

    def train_dataset(self) -> Dataset:
        vols = self._train_volumes()
        pairs = [(v.image, v.train_label) for v in vols]
        if self.dim == 3:
            return TileDataset(
                pairs,
                input_zyx=self.input_tile,
                output_zyx=self.output_tile,
                samples_per_epoch=self.samples_per_epoch,
                transform=self.transform,
                ignore_index=self.labels.ignore_index,
                seed=self.seed,
                margin_zyx=self.margin,
            )
        slices = [self.train_slices[v.name] for v in vols]
        return SliceDataset(
            pairs,
            annotated_slices=slices,
            input_yx=self.input_tile,
            output_yx=self.output_tile,
            samples_per_epoch=self.samples_per_epoch,
            transform=self.transform,
            ignore_index=self.labels.ignore_index,
            seed=self.seed,
            margin_yx=self.margin,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        if hasattr(ds, "set_epoch") and self.trainer is not None:
            ds.set_epoch(self.trainer.current_epoch)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        vols = [self.volumes[n] for n in sorted(self.test_slices)]
        return DataLoader(_WholeVolumes(vols), batch_size=1, num_workers=0)

    def volume_files(self) -> dict[str, Path]:
        return {n: Path(p) for n, p in self.volume_paths.items()}
