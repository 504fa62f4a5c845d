"""LightningDataModule serving sparse training tiles and whole evaluation volumes (layer 2).

Built from plain arguments: volume files, a split (which slices train, which test) and tile
sizes from the model. Training labels keep only the split's training slices (every other voxel
becomes unlabelled); evaluation labels keep only its test slices (paper Sec. 4.1), less the voxels
where a test slice crosses a training slice: the network was trained on those, so they are not
held out. ``eval_label_all`` keeps the crossings too (the count of earlier versions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sparse3d.axes import SliceSet
from sparse3d.data.annotation import slice_mask, sparse_label
from sparse3d.data.dataset import SliceDataset, TileDataset
from sparse3d.data.normalize import apply_percentiles, channel_percentiles
from sparse3d.data.volume import load_volume
from sparse3d.labels import LabelSpec

log = logging.getLogger(__name__)


class EpochTileSampler(DistributedSampler):
    """Training items ``(epoch, index)``, split over processes as Lightning's
    ``DistributedSampler`` splits them (no shuffling: items are random already).

    The epoch travels with each index (``TileDataset`` accepts the pair), so persistent
    DataLoader workers, whose copy of the dataset never sees ``set_epoch``, draw the current
    epoch's tiles; Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        epoch = self.epoch
        for i in super().__iter__():
            yield (epoch, i)


@dataclass
class PreparedVolume:
    """One volume in memory: normalised image ``(C, Z, Y, X)`` and labels ``(Z, Y, X)``.

    ``eval_label``: the held-out voxels, on test slices and on no training slice;
    ``eval_label_all``: every voxel of the test slices, crossings with training slices included.
    """

    name: str
    image: np.ndarray
    train_label: np.ndarray
    eval_label: np.ndarray
    dense_label: np.ndarray | None
    eval_label_all: np.ndarray | None = None


class SparseDataModule(L.LightningDataModule):
    """Tiles from sparsely labelled volumes for training; the prepared whole volumes
    (``volumes``, with their evaluation labels) for ``sparse3d.evaluation`` after training.

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
        num_workers: DataLoader worker processes for the training tiles (0: in this process).
        pin_memory: page-locked training batches for fast copies to a GPU; None = when the
            trainer runs on CUDA.
        persistent_workers: keep the workers from epoch to epoch (only with ``num_workers > 0``;
            needs ``reload_dataloaders_every_n_epochs: 0`` to matter).
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
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
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
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
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
            train_slices = self.train_slices.get(name)
            eval_all = sparse_label(source, self.test_slices.get(name) or {}, ign)
            heldout = eval_all.copy()
            if train_slices:
                trained = slice_mask(source.shape, {a: tuple(v) for a, v in train_slices.items()})
                heldout[trained] = ign  # seen in training: not held out
            self.volumes[name] = PreparedVolume(
                name=name,
                image=apply_percentiles(arr.image, pct),
                train_label=sparse_label(source, train_slices or {}, ign),
                eval_label=heldout,
                dense_label=None if arr.dense_label is None else np.asarray(arr.dense_label),
                eval_label_all=eval_all,
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
                input_tile=self.input_tile,
                output_tile=self.output_tile,
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
            input_tile=self.input_tile,
            output_tile=self.output_tile,
            samples_per_epoch=self.samples_per_epoch,
            transform=self.transform,
            ignore_index=self.labels.ignore_index,
            seed=self.seed,
            margin_yx=self.margin,
        )

    def _ranks(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the trainer, ``(1, 0)`` without one."""
        if self.trainer is None:
            return 1, 0
        return int(self.trainer.world_size), int(self.trainer.global_rank)

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        epoch = 0 if self.trainer is None else int(self.trainer.current_epoch)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        world, rank = self._ranks()
        sampler = EpochTileSampler(ds, num_replicas=world, rank=rank)
        sampler.set_epoch(epoch)
        workers = int(self.num_workers)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self._pin(),
            persistent_workers=bool(self.persistent_workers) and workers > 0,
            drop_last=True,
        )
