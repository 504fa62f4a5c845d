"""One volume through densify block by block (layer 3: plain options in, files out).

:func:`densify_file` reads a sparse3d volume lazily, plans the blocks from the memory budget
(:mod:`sparse3d.densify.plan`: one line, or a one-line error before any work), runs the forests
blockwise (:mod:`sparse3d.densify.blockwise`) and, for ``method=refine``, the refining network
on tiles read from the stores (:mod:`sparse3d.densify.network_lazy`), then writes the
segmentation block by block (chunked HDF5 or OME-Zarr), its overview picture from a
down-sampled view and its scores from blockwise confusion matrices.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.densify.block_features import FeatureSpec
from sparse3d.densify.blocks import BlockGrid
from sparse3d.densify.blockwise import LazyInput, stacked_forests_blockwise
from sparse3d.densify.engine import Engine
from sparse3d.densify.features import feature_halo, feature_names
from sparse3d.densify.forests import RandomForestSegmenter
from sparse3d.densify.options import RefineOptions, RfOptions
from sparse3d.densify.plan import Plan, forest_bytes, network_pass_voxels, plan_blocks
from sparse3d.densify.stores import ZarrSink, create_store

log = logging.getLogger("sparse3d.densify")


@dataclass
class VolumeRun:
    """What :func:`densify_file` did: the output, the plan, the seconds per step and the IoU
    summaries (``unannotated``, ``all_voxels``, ``annotated_fraction``) where a truth exists."""

    segmentation: Path
    picture: Path
    plan: Plan
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)


def volume_plan(
    shape: Sequence[int],
    channels: int,
    classes: int,
    voxel_size_zyx_um: Sequence[float] | None,
    method: str,
    rf: RfOptions,
    refine: RefineOptions,
    workers: int,
    budget_bytes: int,
    block: Sequence[int] | None = None,
    keep_features: bool = False,
) -> tuple[Plan, tuple[int, int, int]]:
    """The block plan of one volume and the halo its blocks are read with. ``keep_features``:
    prefer threads of this process keeping each block's filter features between passes, where
    the whole volume's fit half the budget (each block's are then computed once in the run, as
    in memory)."""
    f_base = len(feature_names(channels, tuple(rf.sigmas)))
    halo = feature_halo(tuple(rf.sigmas), voxel_size_zyx_um)
    f = f_base
    if method == "refine" and refine.rf_stages > 1:
        f += classes * (1 + len(refine.context_sigmas))
        r = max(int(4.0 * s + 0.5) for s in refine.context_sigmas)
        halo = tuple(max(h, r) for h in halo)  # type: ignore[assignment]
    forest = forest_bytes(rf.n_trees, classes, rf.samples_per_class)
    if method == "refine" and refine.folds > 1:  # the fold forests predict in the same pass
        forest += refine.folds * forest_bytes(refine.fold_trees, classes, rf.samples_per_class)
    rows = 4 * f * classes * rf.samples_per_class * (1 + refine.folds)
    kept = 4 * f_base * math.prod(shape)  # the filter features; the context is computed
    if keep_features and kept <= budget_bytes / 2:
        try:  # threads of this process, each block's features computed once in the run
            plan = plan_blocks(
                shape, channels, f, classes, halo, workers, budget_bytes, forest, rows + kept,
                block=block, in_process=True,
            )  # fmt: skip
            return plan, halo  # type: ignore[return-value]
        except ValueError:
            pass
    plan = plan_blocks(
        shape, channels, f, classes, halo, workers, budget_bytes, forest, rows, block=block
    )
    return plan, halo  # type: ignore[return-value]


def _confusions(pred: np.ndarray, label: np.ndarray, truth: np.ndarray | None, k: int, ign: int):
    from sparse3d.metrics import confusion_matrix

    if truth is None:
        return None
    unannotated = np.where(label != ign, ign, truth)
    return (
        confusion_matrix(pred, unannotated, k, ign),
        confusion_matrix(pred, truth, k, ign),
        int((label != ign).sum()),
    )


def _final_block(probs_core, label_core, truth_core, core, k, ign, sink, slices, shape):
    """Arg-max of one block's ``probs_core (K, ...)`` into the labels store; returns its
    confusion matrices against the truth (None without one) and the per-plane sums of its
    uncertainty for the next-plane suggestion (:func:`sparse3d.densify.suggest.plane_sums`)."""
    from sparse3d.densify.suggest import plane_sums

    p = np.asarray(probs_core)
    pred = p.argmax(0).astype(np.uint8)
    sink(core, pred, lead=False)
    truth = None if truth_core is None else np.asarray(truth_core)
    sums = plane_sums(1.0 - p.max(0), slices, core, shape)
    return _confusions(pred, np.asarray(label_core), truth, k, ign), sums


def densify_file(
    src: Path,
    seg: Path,
    png: Path,
    method: str,
    rf: RfOptions,
    refine: RefineOptions,
    engine: Engine,
    plan: Plan,
    halo: Sequence[int],
    output_format: str = "h5",
    save_probabilities: bool = False,
    scratch: Path | None = None,
) -> VolumeRun:
    """``method`` (``rf`` or ``refine``) on the sparse3d volume ``src``, block by block;
    writes ``seg`` (``.h5`` or ``.ome.zarr``) and the picture ``png``."""
    import dask
    import dask.array as da

    from sparse3d.data.lazy import lazy_volume
    from sparse3d.data.normalize import channel_percentiles

    t0 = time.perf_counter()
    lazy = lazy_volume(src, chunks=tuple(plan.block))
    meta = lazy.meta
    spec_l = meta.labels
    k, ign = spec_l.num_classes, spec_l.ignore_index
    voxel = tuple(float(v) for v in meta.voxel_size_zyx_um)
    own_scratch = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="sparse3d-")) if scratch is None else scratch
    scratch.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"plan": plan.line()}
    try:
        vol = LazyInput(lazy.image, lazy.label, k, ign, dict(meta.annotated_slices), src)
        shape = vol.shape
        grid = BlockGrid(shape, tuple(plan.block))  # type: ignore[arg-type]
        ctx = tuple(refine.context_sigmas) if method == "refine" else ()
        # each block's filter features are computed once in the whole run and kept for its
        # later passes: in memory where blocks run in this process and the whole volume's
        # features fit half the budget, else on the scratch disk where it has room
        keep = plan.keep_features and engine.client is None
        sigmas = tuple(float(s) for s in rf.sigmas)
        keep_dir = None if keep else _disk_keep(scratch, vol.image.shape[0], sigmas, shape)
        spec = FeatureSpec(
            sigmas,
            voxel,
            channel_percentiles(lazy.image),
            ctx,
            engine.threads_per_task,
            cache=f"{src}:{time.time_ns()}" if keep else None,
            keep_dir=None if keep_dir is None else str(keep_dir),
        )
        facts["features_kept"] = "memory" if keep else "disk" if keep_dir else "no"
        forest = RandomForestSegmenter(k, ign, **rf.forest_kwargs())
        stages, folds, fold_forest = 1, 0, None
        if method == "refine":
            stages, folds = refine.rf_stages, refine.folds
            kw = {**rf.forest_kwargs(), "n_trees": refine.fold_trees}
            fold_forest = RandomForestSegmenter(k, ign, **kw)
        t1 = time.perf_counter()
        stores = stacked_forests_blockwise(
            vol, grid, spec, forest, fold_forest, stages, folds, scratch, engine
        )
        facts["forest_seconds"] = round(time.perf_counter() - t1, 1)
        final = stores.full
        if method == "refine" and refine.max_steps > 0:
            from sparse3d.densify.network_lazy import refine_network_blockwise

            engine = engine.in_this_process()
            final = refine_network_blockwise(
                vol, grid, spec, stores, refine, engine, scratch, facts,
                network_pass_voxels(plan, refine.max_voxels_per_pass),
            )  # fmt: skip
        # labels and scores, block by block
        labels_path = scratch / "labels.zarr"
        labels_sink = create_store(labels_path, shape, grid.store_chunks(), "uint8")
        probs = da.from_zarr(final.path)
        truth = lazy.dense_label
        tasks = [
            dask.delayed(_final_block)(
                probs[(slice(None), *b.core)],
                vol.label[b.core],
                None if truth is None else truth[b.core],
                b.core,
                k,
                ign,
                labels_sink,
                vol.slices,
                shape,
            )
            for b in grid
        ]
        results = engine.run(tasks, "labels")
        found = [c for c, _ in results if c is not None]
        scores = _scores(found, spec_l, shape) if found else {}
        facts["suggestion"] = _suggestion([s for _, s in results], shape, vol.slices)
        _write_output(
            seg, png, labels_path, final if save_probabilities else None, lazy, output_format,
            method, grid,
        )  # fmt: skip
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return VolumeRun(seg, png, plan, time.perf_counter() - t0, facts, scores)


#: the filter features are kept on the scratch disk where they take at most this fraction of
#: its free space (else each pass computes them again)
DISK_KEEP_FRACTION = 0.5


def _disk_keep(scratch: Path, channels: int, sigmas: Sequence[float], shape) -> Path | None:
    """Where to keep every block's filter features between passes on disk (float32, 4 bytes per
    feature and voxel), or None where that would take more than :data:`DISK_KEEP_FRACTION` of
    the scratch disk's free space."""
    need = 4 * len(feature_names(channels, sigmas)) * math.prod(shape)
    free = shutil.disk_usage(scratch).free
    if need > DISK_KEEP_FRACTION * free:
        log.info(
            "filter features recomputed in each pass: keeping them would take %.1f GB of the "
            "%.1f GB free under %s", need / 1e9, free / 1e9, scratch,
        )  # fmt: skip
        return None
    log.info("filter features kept on disk between passes: %.1f GB under %s", need / 1e9, scratch)
    return scratch / "features"


def _suggestion(sums, shape, slices) -> dict[str, Any]:
    """The plane to annotate next, from the blocks' per-plane uncertainty sums."""
    from sparse3d.densify.suggest import best_plane, scores_from_sums

    total = {
        ax: (sum(s[ax][0] for s in sums), sum(s[ax][1] for s in sums)) for ax in ("z", "y", "x")
    }
    best = best_plane(scores_from_sums(total, shape, slices), shape, slices)
    return {"axis": best.axis, "index": best.index, "score": round(best.score, 2),
            "strategy": best.strategy, "line": best.describe()}  # fmt: skip


def _scores(found, spec, shape) -> dict[str, Any]:
    from sparse3d.metrics import iou_summary

    names = tuple(spec.class_names)
    una = sum(f[0] for f in found)
    allv = sum(f[1] for f in found)
    annotated = sum(f[2] for f in found)
    return {
        "unannotated": iou_summary(una, names),
        "all_voxels": iou_summary(allv, names),
        "annotated_fraction": annotated / float(np.prod(shape)),
    }


def _write_output(
    seg: Path,
    png: Path,
    labels_path: Path,
    probs: ZarrSink | None,
    lazy,
    output_format: str,
    method: str,
    grid: BlockGrid,
) -> None:
    """The result file from the labels store, block by block, and the overview picture."""
    import zarr

    from sparse3d.inference.writers import ResultFile, write_overview

    meta = lazy.meta
    spec = meta.labels
    labels = zarr.open_array(str(labels_path), mode="r")
    attrs = {
        "class_names": list(spec.class_names),
        "channel_names": list(meta.channel_names),
        "voxel_size_zyx_um": list(meta.voxel_size_zyx_um),
        "source": str(lazy.path),
        "method": method,
    }
    if output_format == "ome-zarr":
        from sparse3d.data.ome_zarr import OmeZarrLabelsWriter

        writer = OmeZarrLabelsWriter(
            seg,
            tuple(labels.shape),
            tuple(meta.voxel_size_zyx_um),
            ("unlabelled", *spec.class_names),
            chunks_zyx=grid.store_chunks(),
            overwrite=True,
        )
        try:
            for b in grid:  # napari's codes: 0 unlabelled, class c is c + 1
                writer.write(b.core, labels[b.core] + 1)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    else:
        dtype = "float16" if probs is not None else None
        result = ResultFile(seg, tuple(labels.shape), spec.num_classes, dtype, attrs)
        try:
            pz = None if probs is None else zarr.open_array(probs.path, mode="r")
            for b in grid:
                result.labels[b.core] = labels[b.core]
                if pz is not None and result.probabilities is not None:
                    result.probabilities[(slice(None), *b.core)] = pz[(slice(None), *b.core)]
            result.commit()
        except BaseException:
            result.abort()
            raise

    write_overview(
        png,
        lazy.image,
        labels,
        spec,
        title=f"{lazy.path.name}: prediction",
        voxel_size_zyx_um=meta.voxel_size_zyx_um,
        channel_names=tuple(meta.channel_names),
        overwrite=True,
    )
