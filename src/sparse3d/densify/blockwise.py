"""densify's forests, block by block (layer 1): the same numbers as the whole-volume pass of
:mod:`sparse3d.densify.forests`, with memory set by the block size instead of the volume.

The steps, each a pass of per-block tasks on an :class:`~sparse3d.densify.engine.Engine`:

1. **scan**: every labelled voxel's flat index per class, from the label alone (no features);
   the forests draw their training voxels from these lists exactly as from a whole label. The
   draws are seeded, so every stage trains on the same voxels.
2. **rows**: filter features only around the drawn training voxels (each block computes the
   box of its drawn voxels on one plane grown by the filters' halo), once for all stages; a
   stage after the first adds the context features of the previous stage's cross-fitted
   probabilities at the same voxels, read from their store.
3. **predict**: features of each block grown by the halo, the forest's probabilities of its
   core, written to a chunked store (``full``), and the same into ``crossfit`` except on the
   annotated planes:
4. **folds** (cross-fitting), in the same pass and from the same features: the voxels of each
   fold's planes are predicted by that fold's forest, fitted without them.

A stage after the first learns from the base features plus the previous stage's ``crossfit``
smoothed at ``context_sigmas`` (auto-context), read from its store with its own halo.

Where the filter features can be kept (:mod:`.block_features`: in this process's memory, or as
one file per block on the scratch disk), step 2 computes whole blocks and every later pass
reads them: each block's filter features are computed once in the whole run, as the in-memory
path computes the volume's once.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.axes import AXES
from sparse3d.densify.block_features import FeatureSpec, block_features, drop_cache, kept_file
from sparse3d.densify.blocks import Block, BlockGrid, grow
from sparse3d.densify.engine import Engine
from sparse3d.densify.forests import RandomForestSegmenter, context_features, plane_folds
from sparse3d.densify.stores import Stores, ZarrSink, create_store

# --------------------------------------------------------------------------------------------
# per-block tasks (module level, so a cluster's worker processes can unpickle them)


def _scan(label_core: np.ndarray, core: Sequence[slice], shape, num_classes: int):
    """``(codes present, [sorted flat indices of class c in this block, for each c])``."""
    zyx = [np.arange(s.start, s.stop) for s in core]
    label_core = np.asarray(label_core)
    per_class = []
    for c in range(num_classes):
        local = np.nonzero(label_core == c)
        if local[0].size:
            idx = np.ravel_multi_index(tuple(z[i] for z, i in zip(zyx, local, strict=True)), shape)
        else:
            idx = np.zeros(0, np.int64)
        per_class.append(idx.astype(np.int64))
    return np.unique(label_core), per_class


def _rows(image_ext, image_box, context_ext, context_box, region, points, spec) -> np.ndarray:
    """Feature rows ``(n, F)`` at ``points (n, 3)`` (volume coordinates) inside ``region``."""
    feats = block_features(image_ext, image_box, context_ext, context_box, region, spec)
    local = tuple((points[:, a] - region[a].start) for a in range(3))
    return np.ascontiguousarray(feats[(slice(None), *local)].T)


def _context_rows(context_ext, context_box, region, points, sigmas) -> np.ndarray:
    """Context feature rows ``(n, E)`` at ``points (n, 3)`` inside ``region``, from the
    previous stage's probabilities read over ``context_box``."""
    crop = tuple(
        slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, context_box, strict=True)
    )
    feats = context_features(context_ext, sigmas, crop)
    local = tuple((points[:, a] - region[a].start) for a in range(3))
    return np.ascontiguousarray(feats[(slice(None), *local)].T)


def _predict(
    image_ext, image_box, context_ext, context_box, core, spec, forest, full, crossfit, held
) -> int:
    """Probabilities ``(K, *core)`` of the block's core into ``full``, and into ``crossfit``
    with the voxels of each fold's planes (``held``: ``[(boxes, fold forest)]`` in fold order,
    each box one plane's part of the core) predicted by the forest that did not see them, from
    the same features (a voxel on two folds' planes keeps the later fold's). Returns voxels."""
    feats = block_features(image_ext, image_box, context_ext, context_box, core, spec)
    probs = forest.predict_proba(feats, chunk_voxels=1 << 18, progress=False)
    full(core, probs)
    if held:
        probs = probs.copy()
    for boxes, fold_forest in held:
        for box in boxes:
            part = (slice(None), *_within(box, core))
            probs[part] = fold_forest.predict_proba(feats[part], progress=False)
    crossfit(core, probs)
    return int(np.prod(probs.shape[1:]))


def _context_read(context, region, spec: FeatureSpec, shape) -> tuple[Any, Any]:
    """``(the context probabilities over region grown by their halo, that box)`` as dask
    slices, or ``(None, None)`` in a stage without context."""
    if context is None:
        return None, None
    box = grow(region, spec.context_halo, shape)
    return context[(slice(None), *box)], box


def _within(inner: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    return tuple(
        slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
    )


# --------------------------------------------------------------------------------------------
# the passes


@dataclass
class LazyInput:
    """One volume as dask arrays: ``image (C, Z, Y, X)``, sparse ``label (Z, Y, X)`` (class
    codes ``0..K-1``, ``ignore_index`` unlabelled) and its annotated planes; ``path``: the
    sparse3d volume file they read, if any (its ``image`` and ``label`` datasets), for a process
    that reads many small tiles straight from it."""

    image: Any
    label: Any
    num_classes: int
    ignore_index: int
    slices: Mapping[str, Sequence[int]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.label.shape)  # type: ignore[return-value]


def labelled_indices(vol: LazyInput, grid: BlockGrid, engine: Engine) -> list[np.ndarray]:
    """Sorted flat indices of every labelled voxel, per class (step 1), checking the codes."""
    import dask

    tasks = [
        dask.delayed(_scan)(vol.label[b.core], b.core, vol.shape, vol.num_classes)
        for b in grid.with_halo((0, 0, 0))
    ]
    found = engine.run(tasks, "scan labels")
    codes = np.unique(np.concatenate([c for c, _ in found]))
    RandomForestSegmenter(vol.num_classes, vol.ignore_index).check_codes(codes)
    return [np.sort(np.concatenate([f[1][c] for f in found])) for c in range(vol.num_classes)]


def feature_rows(
    vol: LazyInput,
    grid: BlockGrid,
    flat: np.ndarray,
    spec: FeatureSpec,
    context: Any,
    engine: Engine,
) -> np.ndarray:
    """Feature rows ``(N, F)`` float32 of the voxels ``flat (N,)`` (sorted flat indices), in
    that order (step 2); ``context``: the previous stage's crossfit probabilities (dask
    ``(K, Z, Y, X)``) or None."""
    import dask

    shape = vol.shape
    tasks, spans = [], []
    for region, part, pts in _row_regions(vol, grid, flat, whole_blocks=spec.keeps):
        img_box = grow(region, spec.halo, shape)
        ctx, ctx_box = _context_read(context, region, spec, shape)
        tasks.append(
            dask.delayed(_rows)(
                vol.image[(slice(None), *img_box)], img_box, ctx, ctx_box, region, pts, spec
            )
        )
        spans.append(part)
    return _gather(engine.run(tasks, "training features"), spans, flat.size)


def context_rows(
    vol: LazyInput, grid: BlockGrid, flat: np.ndarray, spec: FeatureSpec, context: Any,
    engine: Engine,
) -> np.ndarray:  # fmt: skip
    """Context feature rows ``(N, E)`` float32 of the voxels ``flat (N,)`` (sorted flat
    indices), from the previous stage's crossfit probabilities ``context`` (dask ``(K, Z, Y,
    X)``) alone: a later stage's filter-feature rows are the first stage's (same voxels, same
    image), so only these are new."""
    import dask

    tasks, spans = [], []
    for region, part, pts in _row_regions(vol, grid, flat, whole_blocks=False):
        ctx, ctx_box = _context_read(context, region, spec, vol.shape)
        tasks.append(dask.delayed(_context_rows)(ctx, ctx_box, region, pts, spec.context_sigmas))
        spans.append(part)
    return _gather(engine.run(tasks, "training context"), spans, flat.size)


def _row_regions(vol: LazyInput, grid: BlockGrid, flat: np.ndarray, whole_blocks: bool):
    """``(region, positions in flat, points (n, 3))`` per group of the voxels ``flat``: by
    block (``whole_blocks``: the region is the block's core, whose features are kept for every
    pass), else by block and annotated plane (the region is the box around the group's voxels:
    thin slabs, not the block)."""
    shape = vol.shape
    zyx = np.stack(np.unravel_index(flat, shape), axis=1)
    owner = grid.block_of(zyx)
    group = owner
    if not whole_blocks:
        group = owner * (sum(shape) + 1) + _plane_of(zyx, vol.slices, shape)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for part in np.split(order, bounds):
        if part.size == 0:
            continue
        pts = zyx[part]
        if whole_blocks:
            region = grid.block_at(np.unravel_index(owner[part[0]], grid.counts)).core
        else:
            region = tuple(slice(int(p.min()), int(p.max()) + 1) for p in pts.T)
        yield region, part, pts


def _gather(rows: Sequence[np.ndarray], spans: Sequence[np.ndarray], n: int) -> np.ndarray:
    out = np.empty((n, rows[0].shape[1]), np.float32)
    for part, r in zip(spans, rows, strict=True):
        out[part] = r
    return out


def _plane_of(zyx: np.ndarray, slices: Mapping[str, Sequence[int]], shape) -> np.ndarray:
    """``(N,)`` a number for the first annotated plane through each voxel ``zyx (N, 3)``: z
    planes ``0..Z-1``, then y, then x; ``Z + Y + X`` for voxels on none (scribbles)."""
    out = np.full(len(zyx), sum(shape), np.int64)
    offset = 0
    for a, ax in reversed(list(enumerate(AXES))):  # z last, so it wins
        offset = sum(shape[:a])
        on = np.isin(zyx[:, a], np.asarray(list(slices.get(ax, ())), dtype=np.int64))
        out[on] = offset + zyx[on, a]
    return out


def predict_pass(
    vol: LazyInput,
    grid: BlockGrid,
    spec: FeatureSpec,
    context: Any,
    forest: RandomForestSegmenter,
    full: ZarrSink,
    crossfit: ZarrSink,
    engine: Engine,
    desc: str = "forest",
    held_out: Sequence[tuple[Mapping[str, Sequence[int]], RandomForestSegmenter]] = (),
) -> None:
    """Every block's probabilities into ``full`` and ``crossfit`` (steps 3 and 4): in
    ``crossfit`` the planes of each fold of ``held_out`` (``[(fold, forest fitted without
    it)]``) are those forests' predictions. The block's features serve both, computed once."""
    import dask

    shape = vol.shape
    forest_d = engine.share(_for_workers(forest, spec.threads))
    folds_d = [(fold, engine.share(_for_workers(f, spec.threads))) for fold, f in held_out]
    tasks = []
    for b in grid.with_halo(spec.halo):
        ctx, ctx_box = _context_read(context, b.core, spec, shape)
        held = [(boxes, f) for fold, f in folds_d if (boxes := _plane_boxes(b, fold))]
        kept = kept_file(spec, b.core)
        image = None if kept is not None and kept.exists() else vol.image[(slice(None), *b.ext)]
        tasks.append(
            dask.delayed(_predict)(
                image,
                b.ext,
                ctx,
                ctx_box,
                b.core,
                spec,
                forest_d,
                full,
                crossfit,
                held,
            )  # fmt: skip
        )
    engine.run(tasks, desc)


def _for_workers(forest: RandomForestSegmenter, threads: int) -> RandomForestSegmenter:
    """A copy of ``forest`` predicting with ``threads`` threads (a worker's share)."""
    out = copy.copy(forest)
    out.forest = copy.copy(forest.forest)
    out.forest.n_jobs = int(threads)
    return out


def _plane_boxes(b: Block, fold: Mapping[str, Sequence[int]]) -> list[tuple[slice, ...]]:
    """Each plane of ``fold`` crossing the block's core, as a box of one voxel's thickness."""
    boxes = []
    for a, ax in enumerate(AXES):
        for i in fold.get(ax, ()):
            if b.core[a].start <= int(i) < b.core[a].stop:
                box = list(b.core)
                box[a] = slice(int(i), int(i) + 1)
                boxes.append(tuple(box))
    return boxes


def _held(flat: np.ndarray, shape, fold: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Boolean ``(N,)``: which voxels ``flat`` lie on a plane of ``fold``."""
    zyx = np.unravel_index(flat, shape)
    held = np.zeros(flat.size, bool)
    for a, ax in enumerate(AXES):
        if fold.get(ax):
            held |= np.isin(zyx[a], np.asarray(fold[ax]))
    return held


def stacked_forests_blockwise(
    vol: LazyInput,
    grid: BlockGrid,
    spec: FeatureSpec,
    forest: RandomForestSegmenter,
    fold_forest: RandomForestSegmenter | None,
    stages: int,
    n_folds: int,
    scratch: Path,
    engine: Engine,
) -> Stores:
    """:func:`sparse3d.densify.forests.stacked_probabilities`, block by block: ``stages``
    cross-fitted forests (one plain forest with ``stages=1, fold_forest=None``: ``method=rf``),
    each stage's probabilities in float32 stores under ``scratch``; returns the last stage's.
    """
    import dask.array as da

    shape, k = vol.shape, vol.num_classes
    per_class = labelled_indices(vol, grid, engine)
    folds = plane_folds(vol.slices, n_folds) if fold_forest is not None else []
    if len(folds) < 2:
        folds = []
    chunks = (k, *grid.store_chunks())
    # training voxels of the forest and of each fold's forest (the same in every stage: the
    # draws are seeded), their filter-feature rows computed once
    draws = [forest.sample_indices(per_class)]
    for fold in folds:
        keep = [idx[~_held(idx, shape, fold)] for idx in per_class]
        assert fold_forest is not None
        draws.append(fold_forest.sample_indices(keep) if any(len(i) for i in keep) else None)
    union = np.unique(np.concatenate([d for d in draws if d is not None]))
    labels = _labels_at(per_class, union)
    if spec.keep_dir is not None:
        Path(spec.keep_dir).mkdir(parents=True, exist_ok=True)
    try:
        base_rows = feature_rows(vol, grid, union, _stage_spec(spec, False), None, engine)
        context = None
        stores = None
        for stage in range(int(stages)):
            stage_spec = _stage_spec(spec, context is not None)
            rows = base_rows
            if context is not None:  # the filter features' rows and the new context rows
                extra = context_rows(vol, grid, union, stage_spec, context, engine)
                rows = np.concatenate([base_rows, extra], axis=1)

            def fit(model, drawn, rows=rows) -> RandomForestSegmenter:
                pos = np.searchsorted(union, drawn)
                with engine.fitting():
                    return model.fit_rows(rows[pos], labels[pos])

            fit(forest, draws[0])
            held_out = []  # each fold's forest, fitted without its planes
            for fold, drawn in zip(folds, draws[1:], strict=True):
                if drawn is not None:
                    assert fold_forest is not None
                    held_out.append((fold, fit(copy.deepcopy(fold_forest), drawn)))
            stores = Stores(
                create_store(scratch / f"full{stage + 1}.zarr", (k, *shape), chunks, "float32"),
                create_store(scratch / f"crossfit{stage + 1}.zarr", (k, *shape), chunks, "float32"),
            )
            predict_pass(
                vol, grid, stage_spec, context, forest, stores.full, stores.crossfit, engine,
                desc=f"forest, stage {stage + 1}", held_out=held_out,
            )  # fmt: skip
            del held_out, rows
            context = da.from_zarr(stores.crossfit.path)
    finally:
        drop_cache(spec.cache)
        if spec.keep_dir is not None:
            shutil.rmtree(spec.keep_dir, ignore_errors=True)
    assert stores is not None
    return stores


def _stage_spec(spec: FeatureSpec, context: bool) -> FeatureSpec:
    """``spec`` for one stage: without context features in the first."""
    import dataclasses

    return dataclasses.replace(spec, context_sigmas=spec.context_sigmas if context else ())


def _labels_at(per_class: Sequence[np.ndarray], flat: np.ndarray) -> np.ndarray:
    """Class of each labelled voxel ``flat (N,)`` (sorted) from the per-class index lists."""
    out = np.full(flat.size, -1, np.int64)
    for c, idx in enumerate(per_class):
        pos = np.searchsorted(idx, flat)
        pos = np.minimum(pos, max(len(idx) - 1, 0))
        if len(idx):
            out[idx[pos] == flat] = c
    assert (out >= 0).all()
    return out
