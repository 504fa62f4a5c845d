"""Torch datasets of training tiles from sparsely annotated volumes (layer 1, no Lightning).

:class:`TileDataset` serves 3D tiles for the 3D u-net: the network input tile (image, with
mirrored context at the volume border, Sec. 2 / the u-net's overlap-tile) and the label on the
network's OUTPUT tile (valid convolutions: the output is a centred crop of the input). Positions
are drawn around annotated voxels (:class:`~sparse3d.data.tiles.TileSampler`), volumes in
proportion to their annotated voxels, so every item has labelled voxels to learn from (Sec. 3.2:
unlabelled voxels have loss weight 0).

:class:`SliceDataset` is the paper's 2D baseline (Sec. 4: "a pure 2D implementation, that treats
all labelled slices as independent images"): every annotated xy, xz and yz slice is a separate
2D image, and 2D tiles are drawn inside it.

Normalisation is left to the caller: normalise each whole volume once (e.g.
:func:`sparse3d.data.normalize.normalize_volume`) before building a dataset, so training and
prediction see the same intensities.

Reproducibility: item ``i`` of epoch ``e`` draws everything (volume, position, augmentation) from
``numpy.random.default_rng([seed, e, i])``, so results do not depend on the number of DataLoader
workers or the order items are fetched in. Call :meth:`set_epoch` at the start of each epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset

from sparse3d.axes import AXES
from sparse3d.crop import center_crop
from sparse3d.data.tiles import TileSampler, extract_tile, input_start
from sparse3d.data.transforms import RandPaperDeformd

log = logging.getLogger(__name__)


def _arrays(volume: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)`` from a pair or an object with ``.image`` / ``.label`` (VolumeArrays)."""
    if hasattr(volume, "image") and hasattr(volume, "label"):
        image, label = volume.image, volume.label
    else:
        image, label = volume
    image = np.ascontiguousarray(image, dtype=np.float32)
    label = np.ascontiguousarray(label)
    if image.ndim != 4 or label.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(
            f"dataset: need image (C, Z, Y, X) and label (Z, Y, X) of the same spatial shape, "
            f"got {image.shape} and {label.shape}"
        )
    return image, label


def _split_transform(transform: Callable | None) -> tuple[RandPaperDeformd | None, Callable | None]:
    """``(deform, rest)``: a leading :class:`RandPaperDeformd` (cut + deformed straight from the
    volume in one resampling) and whatever follows it (applied to the tile)."""
    if isinstance(transform, RandPaperDeformd):
        return transform, None
    if isinstance(transform, Compose) and transform.transforms:
        first = transform.transforms[0]
        if isinstance(first, RandPaperDeformd):
            rest = list(transform.transforms[1:])
            return first, (Compose(rest) if rest else None)
    return None, transform


def _find_deform(transform: Any) -> RandPaperDeformd | None:
    if isinstance(transform, RandPaperDeformd):
        return transform
    for t in getattr(transform, "transforms", ()) or ():
        found = _find_deform(t)
        if found is not None:
            return found
    return None


def _seed(transform: Any, rng: np.random.Generator) -> None:
    if isinstance(transform, (Randomizable, Compose)):
        transform.set_random_state(seed=int(rng.integers(2**31 - 1)))


def _own(x: Any, source: np.ndarray) -> torch.Tensor:
    """``x`` as a tensor that does not share memory with the volume ``source``."""
    if torch.is_tensor(x):
        return x
    x = np.ascontiguousarray(x)
    if np.may_share_memory(x, source):
        x = x.copy()
    return torch.from_numpy(x)


class _TileSource:
    """Shared machinery: draw a position, cut (and augment) a tile, check its shapes."""

    def __init__(
        self,
        input_tile: tuple[int, ...],
        output_tile: tuple[int, ...],
        transform: Callable | None,
        ignore_index: int,
        margin: Sequence[int] | None,
    ) -> None:
        self.input_tile = input_tile
        self.output_tile = output_tile
        self.ignore_index = int(ignore_index)
        self.transform = transform
        self.deform, self.rest = _split_transform(transform)
        nd = len(input_tile)
        if self.deform is not None:
            if self.deform.spatial_size != input_tile:
                raise ValueError(
                    f"dataset: RandPaperDeformd spatial_size {self.deform.spatial_size} must be "
                    f"the input tile {input_tile}"
                )
            if self.deform.label_spatial_size not in (None, output_tile):
                raise ValueError(
                    f"dataset: RandPaperDeformd label_spatial_size "
                    f"{self.deform.label_spatial_size} must be the output tile {output_tile}"
                )
        if margin is None:
            inner = _find_deform(transform) if self.deform is None else None
            margin = inner.required_margin_zyx(input_tile) if inner is not None else (0,) * nd
        self.margin = tuple(int(m) for m in margin)
        if len(self.margin) != nd:
            raise ValueError(f"dataset: margin {self.margin} needs {nd} entries")

    def tile(
        self,
        image: np.ndarray,
        label: np.ndarray,
        output_start: Sequence[int],
        rng: np.random.Generator,
    ) -> dict[str, torch.Tensor]:
        """Image ``(C, *input)`` float32 and label ``(*output)`` int64 for an output position."""
        if self.deform is not None:
            _seed(self.deform, rng)
            key = self.deform.start_key
            d = {
                "image": torch.from_numpy(image),
                "label": torch.from_numpy(label),
                key: input_start(output_start, self.input_tile, self.output_tile),
            }
            d = self.deform(d)
            d.pop(key, None)
            if self.rest is not None:
                _seed(self.rest, rng)
                d = self.rest(d)
        else:
            margin = self.margin if self.transform is not None else (0,) * len(self.margin)
            img, lab = extract_tile(
                image, label, output_start, self.input_tile, self.output_tile, margin,
                self.ignore_index,
            )  # fmt: skip
            d = {"image": img, "label": lab}
            if self.transform is not None:
                _seed(self.transform, rng)
                d = self.transform(d)
        img, lab = _own(d["image"], image), _own(d["label"], label)
        if lab.ndim == len(self.output_tile) + 1 and lab.shape[0] == 1:
            lab = lab[0]
        img = center_crop(img, self.input_tile)
        lab = center_crop(lab, self.output_tile)
        return {
            "image": img.to(torch.float32).contiguous(),
            "label": lab.to(torch.int64).contiguous(),
        }


class _SeededTiles(Dataset):
    """What both datasets share: arguments, per-item seeding by (seed, epoch, index), length.

    Subclasses set up their sampling and implement :meth:`_item`.
    """

    def __init__(
        self,
        kind: str,
        volumes: Sequence[Any],
        input_tile: Sequence[int],
        output_tile: Sequence[int],
        dims: int,
        samples_per_epoch: int,
        ignore_index: int,
        seed: int,
    ) -> None:
        if not volumes:
            raise ValueError(f"dataset: {kind} needs at least one volume")
        if samples_per_epoch < 1:
            raise ValueError(f"dataset: samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.input_tile = tuple(int(v) for v in input_tile)
        self.output_tile = tuple(int(v) for v in output_tile)
        if len(self.input_tile) != dims or len(self.output_tile) != dims:
            raise ValueError(f"dataset: the input and output tiles of {kind} need {dims} entries")
        for i, o in zip(self.input_tile, self.output_tile, strict=True):
            # valid convolutions: the output is the centred crop of the input (paper Sec. 2)
            if i < o or (i - o) % 2:
                raise ValueError(
                    f"dataset: output tile {self.output_tile} is not a centred crop of the "
                    f"input tile {self.input_tile} (input - output must be even and >= 0)"
                )
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self.ignore_index = int(ignore_index)
        self.volumes = [_arrays(v) for v in volumes]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose items ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Item ``index`` of the current epoch, or of ``epoch`` for ``index = (epoch, i)`` (what
        a sampler passes to persistent DataLoader workers, whose copy of the dataset keeps the
        epoch it was made in)."""
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"dataset: index {index} out of range {self.samples_per_epoch}")
        return self._item(np.random.default_rng([self.seed, int(epoch), int(index)]))

    def _item(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TileDataset(_SeededTiles):
    """Random 3D training tiles for a valid-convolution network.

    Args:
        volumes: in-memory volumes, each ``(image (C, Z, Y, X) float32, label (Z, Y, X))`` or an
            object with ``.image`` / ``.label`` (e.g. ``VolumeArrays``); images already
            normalised.
        input_tile: network input tile (paper: 116 x 132 x 132 in z, y, x).
        output_tile: the output tile the network gives for it (paper: 28 x 44 x 44).
        samples_per_epoch: dataset length.
        transform: callable on ``{"image", "label"}`` or ``None``. A :class:`RandPaperDeformd`
            (alone or first in a ``Compose``) must have ``spatial_size=input_tile`` and
            ``label_spatial_size=output_tile``; it cuts the tile straight from the volume (image
            mirrored, label ignore outside the volume) in the same resampling. Any other
            transform gets the input tile plus ``margin_zyx`` (image mirrored, label ignore) and
            its result is centre-cropped to the input / output tile.
        ignore_index: label code of unlabelled voxels.
        seed: base seed (items use ``default_rng([seed, epoch, index])``).
        margin_zyx: context per side for a generic transform; ``None``: the
            ``required_margin_zyx`` of a ``RandPaperDeformd`` inside it, else 0.

    Items: ``{"image": float32 (C, Zi, Yi, Xi), "label": int64 (Zo, Yo, Xo)}``.
    """

    def __init__(
        self,
        volumes: Sequence[Any],
        input_tile: Sequence[int],
        output_tile: Sequence[int],
        samples_per_epoch: int,
        transform: Callable | None = None,
        ignore_index: int = 3,
        seed: int = 0,
        margin_zyx: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            "TileDataset",
            volumes,
            input_tile,
            output_tile,
            3,
            samples_per_epoch,
            ignore_index,
            seed,
        )
        self.samplers = []
        counts = []
        for i, (_, label) in enumerate(self.volumes):
            mask = label != self.ignore_index
            counts.append(int(np.count_nonzero(mask)))
            if counts[-1] == 0:
                log.warning("dataset: volume %d has no annotated voxel; never sampled", i)
                self.samplers.append(None)
                continue
            self.samplers.append(
                TileSampler(label.shape, self.input_tile, self.output_tile, mask, seed, "labelled")
            )
        total = sum(counts)
        if total == 0:
            raise ValueError("dataset: no volume has annotated voxels")
        self.volume_weights = np.asarray(counts, dtype=np.float64) / total
        self._source = _TileSource(
            self.input_tile, self.output_tile, transform, ignore_index, margin_zyx
        )

    def _item(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        v = int(rng.choice(len(self.volumes), p=self.volume_weights))
        image, label = self.volumes[v]
        output_start = self.samplers[v].sample(rng)
        return self._source.tile(image, label, output_start, rng)


class SliceDataset(_SeededTiles):
    """The paper's 2D baseline: annotated slices of all orientations as independent images.

    Every annotated xy (index along z), xz (along y) and yz (along x) slice becomes a 2D image
    ``(C, H, W)``: xy -> ``(Y, X)``, xz -> ``(Z, X)``, yz -> ``(Z, Y)``. Slices are chosen in
    proportion to their annotated pixels, 2D tiles around annotated pixels inside the slice.
    Anisotropy-agnostic: xz / yz slices keep their native (anisotropic) pixel grid; nothing is
    resampled, and one 2D transform (e.g. a 2D :class:`RandPaperDeformd`) serves all
    orientations.

    Args:
        volumes: as for :class:`TileDataset`.
        annotated_slices: per volume ``{"z": (...), "y": (...), "x": (...)}`` slice indices;
            ``None``: each volume's ``.meta.annotated_slices``.
        input_tile / output_tile: 2D network input tile and the output tile it gives.
        samples_per_epoch, transform, ignore_index, seed: as for :class:`TileDataset` (2D).
        margin_yx: as ``margin_zyx`` of :class:`TileDataset`.

    Items: ``{"image": float32 (C, Hi, Wi), "label": int64 (Ho, Wo)}``.
    """

    def __init__(
        self,
        volumes: Sequence[Any],
        annotated_slices: Sequence[Mapping[str, Sequence[int]]] | None,
        input_tile: Sequence[int],
        output_tile: Sequence[int],
        samples_per_epoch: int,
        transform: Callable | None = None,
        ignore_index: int = 3,
        seed: int = 0,
        margin_yx: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            "SliceDataset",
            volumes,
            input_tile,
            output_tile,
            2,
            samples_per_epoch,
            ignore_index,
            seed,
        )
        if annotated_slices is None:
            try:
                annotated_slices = [v.meta.annotated_slices for v in volumes]
            except AttributeError as err:
                raise ValueError(
                    "dataset: annotated_slices not given and volumes have no .meta"
                ) from err
        if len(annotated_slices) != len(volumes):
            raise ValueError("dataset: need one annotated_slices mapping per volume")
        self.slices: list[tuple[int, str, int]] = []
        self.samplers: list[TileSampler] = []
        counts = []
        for v, ((_image, label), annotated) in enumerate(
            zip(self.volumes, annotated_slices, strict=True)
        ):
            for axis, indices in annotated.items():
                if axis not in AXES:
                    raise ValueError(f"dataset: slice axis must be one of {AXES}, got {axis!r}")
                for k in indices:
                    if not 0 <= int(k) < label.shape[AXES.index(axis)]:
                        raise ValueError(f"dataset: volume {v} has no {axis} slice {k}")
                    mask = self._plane(label, axis, int(k)) != self.ignore_index
                    n = int(np.count_nonzero(mask))
                    if n == 0:
                        log.warning("dataset: volume %d %s slice %d has no labels", v, axis, k)
                        continue
                    self.slices.append((v, axis, int(k)))
                    counts.append(n)
                    self.samplers.append(
                        TileSampler(mask.shape, self.input_tile, self.output_tile, mask, seed)
                    )
        if not self.slices:
            raise ValueError("dataset: no annotated slice with labelled pixels")
        self.slice_weights = np.asarray(counts, dtype=np.float64) / sum(counts)
        self._source = _TileSource(
            self.input_tile, self.output_tile, transform, ignore_index, margin_yx
        )

    @staticmethod
    def _plane(array: np.ndarray, axis: str, index: int) -> np.ndarray:
        """Slice ``index`` along ``axis`` of a ``(..., Z, Y, X)`` array (a view)."""
        lead = array.ndim - 3
        sel = [slice(None)] * array.ndim
        sel[lead + AXES.index(axis)] = index
        return array[tuple(sel)]

    def _item(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        s = int(rng.choice(len(self.slices), p=self.slice_weights))
        v, axis, k = self.slices[s]
        image, label = self.volumes[v]
        output_start = self.samplers[s].sample(rng)
        return self._source.tile(
            self._plane(image, axis, k), self._plane(label, axis, k), output_start, rng
        )
