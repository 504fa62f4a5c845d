"""The refining network of ``method=refine`` on stores instead of arrays (layer 3: it uses
the refine options' class-weight rule of :mod:`.methods`).

Training tiles are read one at a time from the image (a lazy dask array), the last forest
stage's cross-fitted probabilities and its full probabilities (zarr stores): the network's
input is the normalised image and the cross-fitted probabilities, its targets the annotation
and the pseudo-labels thresholded from the full probabilities, as in memory. Tile centres are
the annotated voxels and a uniform sample of the pseudo-labelled ones (at most
:data:`MAX_PSEUDO_CENTRES`, drawn block by block in proportion to each block's count).

Prediction runs block by block with a halo of the network's receptive field (a same-padded
network sees zeros only where the volume ends), and each block's softmax is averaged with the
forests' probabilities into a store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse3d.densify.block_features import FeatureSpec
from sparse3d.densify.blocks import BlockGrid, grow
from sparse3d.densify.blockwise import LazyInput
from sparse3d.densify.engine import Engine
from sparse3d.densify.network import PlaneTiles, fit_tile, predict_same_padded
from sparse3d.densify.options import RefineOptions
from sparse3d.densify.stores import Stores, ZarrSink, create_store

#: pseudo-labelled voxels kept as tile centres (a uniform sample when more qualify)
MAX_PSEUDO_CENTRES = 2_000_000


def _pseudo_block(full_core, label_core, core, shape, threshold, ign, keep_fraction, seed):
    """This block's pseudo-labelled voxels: their count and, unless ``keep_fraction`` is 0, a
    uniform sample of that fraction as ``[flat indices of class c]`` per class."""
    p = np.asarray(full_core)
    hit = np.flatnonzero((p.max(0) >= threshold) & (np.asarray(label_core) == ign))
    count = int(hit.size)
    if keep_fraction <= 0:
        return count, None
    if keep_fraction < 1.0 and count:
        rng = np.random.default_rng(seed)
        hit = np.sort(rng.choice(hit, int(round(count * keep_fraction)), replace=False))
    cls = p.reshape(p.shape[0], -1)[:, hit].argmax(0)
    local = np.unravel_index(hit, p.shape[1:])
    flat = np.ravel_multi_index(tuple(i + s.start for i, s in zip(local, core, strict=True)), shape)
    return count, [flat[cls == c].astype(np.int64) for c in range(p.shape[0])]


class FileDataset:
    """A dataset ``key`` of the HDF5 file ``path``, sliced straight with h5py: a training tile
    reads only the file chunks it overlaps. (The same tile taken from the volume's dask array
    read and decompressed the whole dask chunk, a block: a 32x64x64 image tile cost ~10x as
    long; ``experiments/bench_tile_reads.py``.) The file is opened on the first read, in the
    reading process, and stays open until :meth:`close`."""

    def __init__(self, path: Path, key: str) -> None:
        import h5py

        self.path, self.key = Path(path), key
        with h5py.File(self.path, "r") as f:
            self.shape = tuple(int(n) for n in f[key].shape)
        self._file: Any = None

    def __getitem__(self, box: Any) -> np.ndarray:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.key][box]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def tile_sources(vol: LazyInput) -> tuple[Any, Any]:
    """``(image, label)`` to read the network's training tiles from: the volume file's datasets
    straight where ``vol`` has a file, else its (dask) arrays."""
    if vol.path is None:
        return vol.image, vol.label
    return FileDataset(vol.path, "image"), FileDataset(vol.path, "label")


def _here(part: Any) -> np.ndarray:
    """A tile of a lazy array read in this process (not sent to a cluster's workers, which
    would cost a round trip per tile and keep them busy while the network trains)."""
    if hasattr(part, "compute"):
        return np.asarray(part.compute(scheduler="sync"))
    return np.asarray(part)


class StoreTiles(PlaneTiles):
    """:class:`PlaneTiles` whose tiles are read from the stores: ``image`` ``(C, Z, Y, X)``
    (dask, array or :class:`FileDataset`), ``crossfit`` and ``full`` ``(K, Z, Y, X)`` zarr
    paths, ``label`` ``(Z, Y, X)`` (likewise); centres given as flat indices. The volume must be
    at least one tile large on every axis (:func:`fit_tile` shrinks the tile to it).
    :meth:`close` closes the files it opened."""

    def __init__(
        self,
        image: Any,
        label: Any,
        crossfit: str,
        full: str,
        percentiles: np.ndarray,
        ignore_index: int,
        threshold: float,
        centres: Sequence[np.ndarray],
        pseudo_centres: Sequence[np.ndarray],
        input_tile: Sequence[int],
        seed: int = 0,
        flip_axes: Sequence[str] = ("z", "y", "x"),
        centre_sampling: str = "voxel",
    ) -> None:
        torch.utils.data.IterableDataset.__init__(self)
        self.deform = None
        self.source_image, self.source_label = image, label
        self.crossfit_path, self.full_path = crossfit, full
        self.percentiles = percentiles
        self.ignore_index = int(ignore_index)
        self.threshold = float(threshold)
        self.shape_zyx = tuple(int(n) for n in label.shape)
        self.input_tile = tuple(int(t) for t in input_tile)
        if any(t > n for t, n in zip(self.input_tile, self.shape_zyx, strict=True)):
            raise ValueError(f"tile {self.input_tile} larger than the volume {self.shape_zyx}")
        self.seed = int(seed)
        self.pseudo_fraction = 0.5
        self.flip_dims = tuple(i for i, a in enumerate("zyx") if a in set(flip_axes))
        self.centre_sampling = centre_sampling

        def zyx(flat: np.ndarray) -> np.ndarray:
            return np.stack(np.unravel_index(np.asarray(flat, np.int64), self.shape_zyx), axis=1)

        # in flat-index order, as np.argwhere lists them in memory: the same draws
        self.centres = zyx(np.sort(np.concatenate(list(centres))))
        self.pseudo_centres = zyx(np.sort(np.concatenate(list(pseudo_centres))))
        if len(self.centres) == 0:
            raise ValueError("no annotated voxel to train on")
        self.by_class = self.pseudo_by_class = []
        if centre_sampling == "class":
            self.by_class = [zyx(c) for c in centres if len(c)]
            self.pseudo_by_class = [zyx(c) for c in pseudo_centres if len(c)]
        self._stores: tuple[Any, Any] | None = None

    def _open(self):
        import zarr

        if self._stores is None:
            self._stores = (
                zarr.open_array(self.crossfit_path, mode="r"),
                zarr.open_array(self.full_path, mode="r"),
            )
        return self._stores

    def close(self) -> None:
        self._stores = None
        for source in (self.source_image, self.source_label):
            if isinstance(source, FileDataset):
                source.close()

    def _read(self, start: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from sparse3d.data.normalize import apply_percentiles

        box = tuple(slice(s, s + t) for s, t in zip(start, self.input_tile, strict=True))
        crossfit, full = self._open()
        image = apply_percentiles(_here(self.source_image[(slice(None), *box)]), self.percentiles)
        x = np.concatenate([image, crossfit[(slice(None), *box)]]).astype(np.float32)
        label = _here(self.source_label[box]).astype(np.int64)
        p = full[(slice(None), *box)]
        keep = (p.max(0) >= self.threshold) & (label == self.ignore_index)
        pseudo = np.where(keep, p.argmax(0), self.ignore_index).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(label), torch.from_numpy(pseudo)


def _predict_block(image_ext, cross_ext, full_core, ext, core, net, multiple, pct, weight,
                   flips, threads, sink, halo=0, max_voxels=1 << 62,
                   precision="fp32") -> int:  # fmt: skip
    """The network's softmax over the grown block (in z slabs overlapping by ``halo`` beyond
    ``max_voxels``; convolutions in ``precision``), its core averaged with the forests'."""
    from sparse3d.data.normalize import apply_percentiles

    x = np.concatenate([apply_percentiles(np.asarray(image_ext), pct), np.asarray(cross_ext)])
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:  # blocks running as threads of the caller's process must not leave it at one thread
        prob = predict_same_padded(
            net, x.astype(np.float32), multiple, halo, max_voxels, flips, precision
        )
    finally:
        torch.set_num_threads(before)
    crop = tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(core, ext, strict=True))
    avg = (1.0 - weight) * prob[(slice(None), *crop)] + weight * np.asarray(full_core)
    sink(core, avg.astype(np.float32))
    return int(np.prod(avg.shape[1:]))


def refine_network_blockwise(
    vol: LazyInput,
    grid: BlockGrid,
    spec: FeatureSpec,
    stores: Stores,
    opts: RefineOptions,
    engine: Engine,
    scratch: Path,
    facts: dict[str, Any],
    max_voxels: int = 1 << 62,
) -> ZarrSink:
    """Train the refining network on tiles read from ``stores`` and predict it block by block;
    returns the store of the average with the forests (``(K, Z, Y, X)`` float32). A block
    grown by the receptive field beyond ``max_voxels`` is predicted in overlapping slabs."""
    import dask
    import dask.array as da

    from sparse3d.densify.blockwise import labelled_indices
    from sparse3d.densify.methods import refine_class_weights
    from sparse3d.densify.network import TTA_FLIPS
    from sparse3d.densify.network_fit import RefineModule, fit_refiner
    from sparse3d.models import UNet

    if opts.deform or opts.pseudo_class_fraction is not None or opts.rounds != 1:
        raise ValueError(
            "refine.deform, refine.pseudo_class_fraction and refine.rounds > 1 need the whole "
            "volume in memory; leave them at their defaults for blockwise runs"
        )
    shape, k, ign = vol.shape, vol.num_classes, vol.ignore_index
    per_class = labelled_indices(vol, grid, engine)
    full = da.from_zarr(stores.full.path)

    def pseudo_pass(keep: float, desc: str) -> list[Any]:
        return engine.run(
            [
                dask.delayed(_pseudo_block)(
                    full[(slice(None), *b.core)],
                    vol.label[b.core],
                    b.core,
                    shape,
                    opts.pseudo_threshold,
                    ign,
                    keep,
                    [opts.seed, *b.index],
                )  # fmt: skip
                for b in grid
            ],
            desc,
        )

    n_pseudo = sum(c for c, _ in pseudo_pass(0.0, "pseudo-labels: count"))
    keep = min(1.0, MAX_PSEUDO_CENTRES / max(n_pseudo, 1))
    found = [s for _, s in pseudo_pass(keep, "pseudo-labels: sample")]
    pseudo = [np.concatenate([f[c] for f in found]) for c in range(k)]
    facts["pseudo_labels"] = int(n_pseudo)
    facts["pseudo_centres"] = int(sum(len(p) for p in pseudo))
    del found

    torch.manual_seed(int(opts.seed))
    net = UNet(
        vol.image.shape[0] + k, k, base_channels=opts.base_channels, depth=opts.depth,
        padding="same", norm="batch", bn_eval_stats="running",
    )  # fmt: skip
    multiple = 2 ** (opts.depth - 1)
    input_tile = fit_tile(tuple(opts.input_tile), shape, multiple)
    tiles = StoreTiles(
        *tile_sources(vol), stores.crossfit.path, stores.full.path, spec.percentiles, ign,
        opts.pseudo_threshold, per_class, pseudo, input_tile, seed=opts.seed,
        flip_axes=tuple(opts.flip_axes), centre_sampling=opts.centre_sampling,
    )  # fmt: skip
    counts_k = np.asarray([len(i) for i in per_class])
    label_counts = np.repeat(np.arange(k), counts_k).astype(np.uint8)
    module = RefineModule(
        net, k, ign, pseudo_weight=opts.pseudo_weight, lr=opts.lr, max_steps=opts.max_steps,
        time_budget_s=opts.time_budget_s,
        class_weights=refine_class_weights(label_counts, k, opts.class_weights),
    )  # fmt: skip
    from sparse3d.callbacks import ProgressLog
    from sparse3d.cli import quiet_lightning

    quiet_lightning()
    t0 = time.perf_counter()
    callbacks = [] if engine.progress else [ProgressLog()]  # step, loss, ETA lines when piped
    try:
        fit = fit_refiner(
            module, tiles, opts.batch_size, progress_bar=engine.progress, callbacks=callbacks,
            precision=opts.precision,
        )  # fmt: skip
    finally:
        tiles.close()
    facts.update(
        steps=int(fit["steps"]),
        network_seconds=round(time.perf_counter() - t0, 1),
        network_precision=fit["precision"],
    )
    net.eval()
    net_d = engine.share(net.cpu())
    halo_net = -(-(net.receptive_field // 2 + 1) // multiple) * multiple
    out = create_store(scratch / "refined.zarr", (k, *shape), (k, *grid.store_chunks()), "float32")
    cross = da.from_zarr(stores.crossfit.path)
    flips = TTA_FLIPS if opts.tta else ((),)
    tasks = []
    for b in grid:
        ext = grow(b.core, (halo_net,) * 3, shape)
        tasks.append(
            dask.delayed(_predict_block)(
                vol.image[(slice(None), *ext)],
                cross[(slice(None), *ext)],
                full[(slice(None), *b.core)],
                ext,
                b.core,
                net_d,
                multiple,
                spec.percentiles,
                opts.forest_weight,
                flips,
                engine.threads_per_task,
                out,
                halo_net,
                max_voxels,
                str(fit["precision"]),
            )  # fmt: skip
        )
    t1 = time.perf_counter()
    engine.run(tasks, "network")
    facts["network_prediction_seconds"] = round(time.perf_counter() - t1, 1)
    return out
