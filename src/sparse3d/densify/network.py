"""Shallow first, deep second: the refining network of densify's ``refine`` method (layer 1):
its pseudo-labels, training tiles and same-padded prediction. The forests are
:mod:`sparse3d.densify.forests`.

A random forest on filter features (:mod:`sparse3d.densify.forests`) turns the user's few annotated planes
into dense class probabilities in about a minute; a small 3D U-Net then learns from the image
*and* those probabilities, on the annotated voxels (weight 1) and on the forest's confident
predictions elsewhere (pseudo-labels, a lower weight), and its softmax is averaged with the
forest's. The network adds what a voxel-wise forest lacks: spatial coherence and context beyond
the largest filter; the forest gives the network a dense, cheap training signal that a few
planes alone cannot.

Two pitfalls this module handles:

* **Stacking leak.** On its own training planes the forest is nearly always right, so a network
  that sees those probabilities as input learns to copy them. The input channels on the
  annotated planes therefore come from forests that did not see those planes (cross-fitting:
  the planes are dealt diagonally into folds, each fold is predicted by a forest fitted on the
  other folds); everywhere else from the forest fitted on all planes.
* **Pseudo-labels outweighing the truth.** Pseudo-labels count only where no plane is
  annotated, only where the forest's top probability reaches a threshold, and with a weight
  below the annotation's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from sparse3d.axes import AXES


def pseudo_labels(
    probabilities: np.ndarray,
    label: np.ndarray,
    ignore_index: int,
    threshold: float,
    class_fraction: float | None = None,
) -> np.ndarray:
    """``(Z, Y, X)`` uint8: the arg-max class where ``probabilities (K, Z, Y, X)`` reach
    ``threshold`` and the voxel is not annotated, ``ignore_index`` elsewhere.

    ``class_fraction`` (class-balanced self-training): a class also keeps at least that
    fraction of the unannotated voxels it wins, its most confident ones, even below
    ``threshold``. A rare or hard class seldom reaches a global threshold (a forest that saw
    31 ventricle voxels may win 1,700 voxels, none at 0.8); without its share of pseudo-labels
    the network learns that it does not exist.
    """
    top = probabilities.max(0)
    win = probabilities.argmax(0)
    free = label == ignore_index
    thresholds = np.full(probabilities.shape[0], float(threshold), np.float32)
    if class_fraction:
        keep_from = 1.0 - min(float(class_fraction), 1.0)  # quantile of a class's confidences
        for c in range(probabilities.shape[0]):
            conf = top[free & (win == c)]
            if conf.size:
                thresholds[c] = min(thresholds[c], float(np.quantile(conf, keep_from)))
    keep = (top >= thresholds[win]) & free
    return np.where(keep, win, ignore_index).astype(np.uint8)


def fit_tile(input_tile: Sequence[int], shape_zyx: Sequence[int], multiple: int) -> tuple[int, ...]:
    """The largest input tile no bigger than ``input_tile`` or the volume, each side a multiple
    of ``multiple`` (the network's pooling factor); at least ``multiple``."""
    return tuple(
        max(multiple, (min(int(t), int(s)) // multiple) * multiple)
        for t, s in zip(input_tile, shape_zyx, strict=True)
    )


#: Choices of :class:`PlaneTiles`' ``centre_sampling``.
CENTRE_SAMPLING = ("voxel", "class")


class PlaneTiles(IterableDataset):
    """Endless random training tiles for the refining network.

    Each tile is centred (with jitter of a quarter tile) on a voxel drawn at random from the
    annotated ones with probability ``1 - pseudo_fraction``, else from the pseudo-labelled
    ones, so the sparse truth is always in view while the network also sees the rest of the
    volume. ``centre_sampling="class"`` draws the centre's class first, uniformly among the
    classes of that pool, then a voxel of it, so a class with a few hundred annotated voxels is
    in view as often as the background (``"voxel"``: every voxel of the pool equally likely,
    rare classes seldom seen). Tiles are flipped at random along each axis of ``flip_axes`` (a
    subset of ``"zyx"``; flips keep class identity, but make an upside-down or mirrored volume
    look as likely as the real one: leave out the axes along which the anatomy is not
    symmetric). Volumes thinner than the tile are padded by reflection, the label with
    ``ignore_index``. ``deform``: an optional spatial transform of the dict ``{"image",
    "label", "pseudo", "tile_start_zyx"}`` (whole volumes and the tile's start) to the tile,
    e.g. the paper's :class:`sparse3d.data.transforms.RandPaperDeformd` with ``label`` and
    ``pseudo`` as label keys; without it the tile is cut as it is.

    Yields dicts with ``image (C, *tile)`` float32, ``label (*tile)`` and ``pseudo (*tile)``
    int64.
    """

    def __init__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        pseudo: np.ndarray,
        ignore_index: int,
        input_tile: Sequence[int],
        seed: int = 0,
        pseudo_fraction: float = 0.5,
        flip_axes: Sequence[str] = AXES,
        centre_sampling: str = "voxel",
        deform: Callable[[dict], dict] | None = None,
    ) -> None:
        super().__init__()
        self.deform = deform
        need = [max(0, int(t) - int(s)) for t, s in zip(input_tile, label.shape, strict=True)]
        pads = [(n // 2, n - n // 2) for n in need]
        self.image = torch.from_numpy(
            np.pad(image, [(0, 0), *pads], mode="reflect") if any(need) else image
        )
        self.label = torch.from_numpy(
            np.pad(label, pads, constant_values=ignore_index).astype(np.int64)
        )
        self.pseudo = torch.from_numpy(
            np.pad(pseudo, pads, constant_values=ignore_index).astype(np.int64)
        )
        self.input_tile = tuple(int(t) for t in input_tile)
        self.shape_zyx = tuple(int(n) for n in self.label.shape)
        self.seed = int(seed)
        self.pseudo_fraction = float(pseudo_fraction)
        unknown = set(flip_axes) - set(AXES)
        if unknown:
            raise ValueError(f"flip_axes must be among {AXES}, got {list(flip_axes)}")
        self.flip_dims = tuple(AXES.index(a) for a in AXES if a in set(flip_axes))
        if centre_sampling not in CENTRE_SAMPLING:
            raise ValueError(f"centre_sampling must be 'voxel' or 'class', got {centre_sampling!r}")
        self.centre_sampling = centre_sampling
        self.centres = np.argwhere(self.label.numpy() != ignore_index)
        self.pseudo_centres = np.argwhere(self.pseudo.numpy() != ignore_index)
        if len(self.centres) == 0:
            raise ValueError("no annotated voxel to train on")
        # per-class copies of the centres only when drawn by class (they double their memory)
        by_class = centre_sampling == "class"
        self.by_class = self._group(self.centres, self.label.numpy()) if by_class else []
        self.pseudo_by_class = (
            self._group(self.pseudo_centres, self.pseudo.numpy()) if by_class else []
        )

    @staticmethod
    def _group(centres: np.ndarray, codes: np.ndarray) -> list[np.ndarray]:
        """``centres (N, 3)`` split by their class in ``codes``, one array per class present."""
        if len(centres) == 0:
            return []
        cls = codes[tuple(centres.T)]
        return [centres[cls == c] for c in np.unique(cls)]

    def _draw(self, rng: np.random.Generator, use_pseudo: bool) -> np.ndarray:
        if self.centre_sampling == "class":
            groups = self.pseudo_by_class if use_pseudo else self.by_class
            pool = groups[rng.integers(len(groups))]
        else:
            pool = self.pseudo_centres if use_pseudo else self.centres
        return pool[rng.integers(len(pool))]

    def _tile(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        use_pseudo = len(self.pseudo_centres) > 0 and rng.random() < self.pseudo_fraction
        centre = self._draw(rng, use_pseudo)
        shape = self.shape_zyx
        start = []
        for c, t, n in zip(centre, self.input_tile, shape, strict=True):
            jitter = int(rng.integers(-(t // 4), t // 4 + 1))
            start.append(int(np.clip(c - t // 2 + jitter, 0, n - t)))
        image, label, pseudo = self._read(start)
        for axis in range(3):
            if rng.random() < 0.5 and axis in self.flip_dims:  # one draw per axis, always
                image, label, pseudo = image.flip(axis + 1), label.flip(axis), pseudo.flip(axis)
        return {"image": image.contiguous(), "label": label.contiguous(), "pseudo": pseudo}

    def _read(self, start: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image (C, *tile), label (*tile), pseudo (*tile))`` of the tile at ``start``."""
        if self.deform is not None:
            d = self.deform(
                {"image": self.image, "label": self.label, "pseudo": self.pseudo,
                 "tile_start_zyx": start}
            )  # fmt: skip
            return d["image"], d["label"], d["pseudo"]
        box = tuple(slice(s, s + t) for s, t in zip(start, self.input_tile, strict=True))
        return self.image[(slice(None), *box)], self.label[box], self.pseudo[box]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        while True:
            yield self._tile(rng)


#: Test-time flips: the identity and one flip along each spatial axis of ``(C, Z, Y, X)``.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (3,))


@torch.no_grad()
def predict_same_padded(
    net: torch.nn.Module,
    image: np.ndarray,
    multiple: int,
    halo: int,
    max_voxels: int,
    flips: Sequence[Sequence[int]] = ((),),
    precision: str = "fp32",
) -> np.ndarray:
    """Softmax ``(K, Z, Y, X)`` float32 of a same-padded network over ``image (C, Z, Y, X)``.

    The volume is reflected up to a multiple of the pooling factor and predicted in one pass,
    or, when that exceeds ``max_voxels``, in z slabs that overlap by ``halo`` voxels (rounded up
    to the pooling factor) on each side; only each slab's centre is kept, which equals the
    one-pass result when ``halo`` covers the network's receptive field. ``flips``: the image
    axes flipped in each pass (test-time augmentation, e.g. :data:`TTA_FLIPS`); the softmax
    volumes, flipped back, are averaged. ``precision``: fp32, or bf16 (convolutions under bf16
    autocast, as the network trained with ``refine.precision`` bf16; the softmax in float32).
    """
    from sparse3d.inference.precision import autocast_context

    dev = next(net.parameters()).device
    c, z, y, x = image.shape

    def one(block: np.ndarray) -> np.ndarray:
        pads = [(0, (-n) % multiple) for n in block.shape[1:]]
        padded = (
            np.pad(block, [(0, 0), *pads], mode="reflect") if any(p[1] for p in pads) else block
        )
        t = torch.from_numpy(np.ascontiguousarray(padded))[None].to(dev)
        t = t.contiguous(memory_format=torch.channels_last_3d)
        with autocast_context(dev, precision):
            logits = net(t)[0]
        prob = torch.softmax(logits.float(), 0).cpu().numpy()
        return prob[:, : block.shape[1], : block.shape[2], : block.shape[3]]

    def run(block: np.ndarray) -> np.ndarray:
        total = None
        for axes in flips:
            axes = tuple(int(a) for a in axes)
            p = one(np.flip(block, axes)) if axes else one(block)
            p = np.flip(p, axes) if axes else p  # probabilities (K, ...) share the image's axes
            total = p.copy() if total is None else total + p
        assert total is not None, "flips must hold at least one entry"
        return total / len(flips)

    if z * y * x <= max_voxels:
        return run(image)
    # slab starts and halos on the pooling grid, so every slab pools like the whole volume
    halo = -(-int(halo) // multiple) * multiple
    # at least as thick as both halos together, so no more than half of each pass is context
    slab = max(2 * halo, ((max_voxels // (y * x)) - 2 * halo) // multiple * multiple)
    out = None
    for z0 in range(0, z, slab):
        z1 = min(z, z0 + slab)
        a, b = max(0, z0 - halo), min(z, z1 + halo)
        prob = run(image[:, a:b])
        if out is None:
            out = np.empty((prob.shape[0], z, y, x), np.float32)
        out[:, z0:z1] = prob[:, z0 - a : z0 - a + (z1 - z0)]
    assert out is not None
    return out
