"""Semi-automated segmentation: ``python -m sparse3d.densify [inputs=[vol.h5,...]]`` (layer 3).

    python -m sparse3d.densify inputs=[a.h5,b.h5]
    python -m sparse3d.densify inputs=[stack.tif] labels=[stack_labels.tif] [class_names=[...]]
    python -m sparse3d.densify method=rf inputs=[a.h5]        # random forest, no network

The paper's first use case (Sec. 1, Fig. 1a): the user annotates a few orthogonal slices of each
volume; a model learns from those slices alone and returns the dense 3D segmentation. Three
methods, ``method=``:

- ``refine`` (default): cross-fitted, stacked random forests on filter features, then a small
  3D U-Net trained on the annotated voxels and the forests' confident pseudo-labels, averaged
  with the forests; block by block with memory set by ``memory_budget``
  (:mod:`sparse3d.densify.pipeline`), on dask workers of this machine or a cluster.
- ``rf``: a random forest on filter features (``sparse3d.densify.forests``, ilastik-style),
  fitted to each input's own annotated voxels and applied to all of its voxels; settings in
  ``rf:``; block by block like ``refine``.
- ``unet``: the paper's network, trained on every annotated slice of the inputs (warm-starting
  from ``init_ckpt`` when given); each input is predicted with the seamless tiling predictor.

All write ``<out>/<name>_seg.h5`` (the predictor's result layout; ``output_format=ome-zarr``:
``<out>/<name>_seg.ome.zarr``, NGFF labels with a pyramid) and ``<out>/<name>_seg.png``,
and ``<out>/densify.json`` with the method, its wall time per volume and, where the input carries
a dense ground truth (the synthetic benchmark, or ``dense_labels=[...]``), the IoU on the voxels
nobody annotated (``unannotated``) and on every voxel (``all_voxels``).

Inputs in any format the importer reads (TIFF, NIfTI, NRRD, Zarr; see
:mod:`sparse3d.data.convert`) are imported into ``<out>/inputs/<name>.h5`` first, each with its
label file from ``labels=[...]`` (one per non-HDF5 input, same order). By default label code 0
means unlabelled and code ``c >= 1`` is class ``c - 1``, as annotation tools write them;
``label_map=`` and ``class_names=`` change that. ``dense_labels=[...]`` (optional, same order and
codes) adds a dense ground truth to each imported input, for scoring only.

This module runs the command and the paper's network; the inputs and their import are in
:mod:`sparse3d.densify.inputs`, the per-volume methods ``rf`` and ``refine`` in
:mod:`sparse3d.densify.methods`, result writing and scoring in :mod:`sparse3d.densify.results`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from sparse3d.atomic import write_json_atomic
from sparse3d.cli import UserError, run_hydra
from sparse3d.densify.inputs import check_targets, configure_inputs
from sparse3d.densify.methods import Segment, random_forest, refine, refine_probabilities
from sparse3d.densify.results import iou_line, score
from sparse3d.densify.setup import (
    Options,
    open_engine,
    read_options,
    register_configs,
    summary_of,
    workers_of,
)
from sparse3d.distributed import is_global_zero
from sparse3d.experiment import resolve_volumes
from sparse3d.train import train

log = logging.getLogger("sparse3d.densify")

__all__ = ["METHODS", "Segment", "densify", "main", "refine_probabilities"]

METHODS = ("refine", "unet", "rf")


def _prepare(
    cfg: DictConfig, suffix: str = "_seg.h5"
) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """Inputs of any method: ``(out, {name: volume file}, {name: <out>/<name><suffix>})``.

    Imports non-HDF5 inputs, generates the demo volume when ``inputs=[]``, refuses existing
    results without ``overwrite=true``, all before any training.
    """
    method = str(cfg.get("method", "unet"))
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    out = Path(str(cfg.out))
    configure_inputs(cfg, out)
    paths = resolve_volumes(cfg.data)
    targets = check_targets(cfg, out, list(paths), suffix)
    out.mkdir(parents=True, exist_ok=True)
    return out, paths, targets


def _train_unet(
    cfg: DictConfig, out: Path, summary: dict[str, Any]
) -> tuple[Segment | None, float]:
    """Train the U-Net on every annotated slice of the inputs (one run in ``<out>/run``).

    Returns the per-volume step (the predictor writing result file and picture) and the training
    wall time, which every volume's ``seconds`` includes.
    """
    from sparse3d.checkpoint import load_model
    from sparse3d.inference import Predictor

    run_dir = out / "run"
    t0 = time.perf_counter()
    metrics = train(cfg, run_dir)
    seconds = time.perf_counter() - t0
    if not is_global_zero():  # another process of a DDP run: rank 0 predicts and writes
        return None, seconds
    net, meta = load_model(run_dir / "model.pt")
    predictor = Predictor(net, meta)
    summary.update(run=str(run_dir), training_seconds=metrics.get("seconds"))

    def segment(src: Path, seg: Path, png: Path) -> float:
        report = predictor.predict_file(
            src,
            seg,
            save_probabilities=bool(cfg.save_probabilities),
            overview_png=png,
            overwrite=bool(cfg.overwrite),
            attrs={"method": "unet", "model": str(run_dir / "model.pt")},
        )
        return report.seconds

    return segment, seconds


#: options that need the whole volume in memory (the in-memory path of :mod:`.methods`)
IN_MEMORY_ONLY = ("deform", "pseudo_class_fraction", "rounds")


def _in_memory(options: Options, cfg: DictConfig) -> bool:
    """Whether to hold each whole volume in memory: asked for (``in_memory=true``), or needed by
    refine options the blockwise engine does not run."""
    r = options.refine
    needed = options.method == "refine" and (
        r.deform or r.pseudo_class_fraction is not None or r.rounds != 1
    )
    if needed:
        log.info("refine.%s: the whole volume is held in memory", "/".join(IN_MEMORY_ONLY))
    return needed or bool(cfg.get("in_memory", False))


#: bytes per voxel of the in-memory path: per channel (image, 50 float32 features and the
#: filters' temporaries) and per class (probabilities, cross-fitted copies, context features)
IN_MEMORY_BYTES_PER_CHANNEL = 400
IN_MEMORY_BYTES_PER_CLASS = 40


def _check_in_memory(paths: dict[str, Path], options: Options) -> None:
    """The memory guard of the in-memory path: a volume that would not fit the budget stops
    here, before any work, with what to change."""
    from sparse3d.data.volume import open_volume

    for name, src in paths.items():
        with open_volume(src, scan_values=False) as vol:
            c, voxels = int(vol.image.shape[0]), int(np.prod(vol.label.shape))
            k = vol.meta.labels.num_classes
        need = voxels * (IN_MEMORY_BYTES_PER_CHANNEL * c + IN_MEMORY_BYTES_PER_CLASS * k)
        if need > options.budget_bytes:
            raise UserError(
                f"{name}: in memory it needs about {need / 1e9:.1f}GB, more than "
                f"memory_budget={options.budget_bytes / 1e9:.1f}GB: drop in_memory=true (and "
                "refine.deform / rounds / pseudo_class_fraction) to work block by block"
            )


def _say_preset(cfg: DictConfig, method: str) -> None:
    preset = cfg.get("preset_name")
    if preset and method != "unet":
        log.info(
            "preset=%s sizes the paper's network of method=unet; method=%s does not use it "
            "(its options: %s)", preset, method, "refine.* and rf.*" if method == "refine" else "rf.*"
        )  # fmt: skip


def densify(cfg: DictConfig) -> dict[str, Any]:
    """Learn from the annotated slices with ``cfg.method``, segment every input densely, score
    where a dense truth exists; writes and returns the summary (``densify.json``)."""
    options = read_options(cfg)  # every option checked before any work
    method = options.method
    _say_preset(cfg, method)
    suffix = "_seg.ome.zarr" if options.output_format == "ome-zarr" else "_seg.h5"
    out, paths, targets = _prepare(cfg, suffix)
    summary: dict[str, Any] = {"method": method, "volumes": {}}
    if method == "unet" or _in_memory(options, cfg):
        if method == "unet":
            segment, shared_seconds = _train_unet(cfg, out, summary)
        elif method == "refine":
            _check_in_memory(paths, options)
            segment, shared_seconds = refine(cfg, summary)
        else:
            _check_in_memory(paths, options)
            segment, shared_seconds = random_forest(cfg, summary)
        if segment is None:
            return summary
        for name, src in paths.items():
            seg = targets[name]
            png = seg.with_suffix(".png")
            seconds = shared_seconds + segment(src, seg, png)
            entry: dict[str, Any] = {
                "segmentation": str(seg),
                "picture": str(png),
                "seconds": round(seconds, 2),
            }
            entry.update(score(src, seg))
            summary["volumes"][name] = entry
    else:
        summary.update(summary_of(options))
        summary["steps"] = {}
        for name, src in paths.items():
            summary["volumes"][name] = _blockwise_volume(name, src, targets[name], options, cfg)
            summary["steps"][name] = summary["volumes"][name].pop("facts")
    write_json_atomic(out / "densify.json", summary)
    return summary


def _blockwise_volume(
    name: str, src: Path, seg: Path, options: Options, cfg: DictConfig
) -> dict[str, Any]:
    """One volume through the blockwise engine; its densify.json entry."""
    import sys

    from sparse3d.data.volume import open_volume
    from sparse3d.densify.pipeline import densify_file, volume_plan

    with open_volume(src, scan_values=False) as vol:
        shape, channels = tuple(vol.label.shape), int(vol.image.shape[0])
        meta = vol.meta
    workers = workers_of(options.cluster)
    try:
        plan, halo = volume_plan(
            shape, channels, meta.labels.num_classes, meta.voxel_size_zyx_um, options.method,
            options.rf, options.refine, workers, options.budget_bytes, options.block,
            keep_features=options.cluster.address is None
            and options.cluster.kind != "slurm"
            and options.cluster.processes is not True,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(f"{name}: {err}") from None
    print(f"{name}: {plan.line()}", file=sys.stderr)
    engine, close = open_engine(
        options.cluster, workers, options.budget_bytes, plan, sys.stderr.isatty()
    )
    try:
        run = densify_file(
            src, seg, seg.with_name(f"{name}_seg.png"), options.method, options.rf,
            options.refine, engine, plan, halo, options.output_format,
            bool(cfg.save_probabilities),
        )  # fmt: skip
    except ValueError as err:
        raise UserError(f"{name}: {str(err).splitlines()[0]}") from None
    finally:
        close()
    entry: dict[str, Any] = {
        "segmentation": str(run.segmentation),
        "picture": str(run.picture),
        "seconds": round(run.seconds, 2),
        "plan": plan.line(),
        "suggestion": run.facts.pop("suggestion", None),
        "facts": run.facts,
    }
    entry.update(run.scores)
    return entry


def _print_summary(summary: dict[str, Any]) -> None:
    for name, e in summary["volumes"].items():
        print(f"{name}: dense segmentation {e['segmentation']}")
        print(f"{name}: picture            {e['picture']}")
        print(f"{name}: method {summary['method']}, {e['seconds']:.1f} s (training + prediction)")
        if e.get("unannotated"):
            share = 100 * (1 - e["annotated_fraction"])
            print(
                f"{name}: IoU on the {share:.1f}% of voxels nobody annotated: "
                f"{iou_line(e['unannotated'])}"
            )
            print(f"{name}: IoU on all voxels: {iou_line(e['all_voxels'])}")
        if e.get("suggestion"):
            print(f"{name}: annotate next: {e['suggestion']['line']}")


register_configs()


def _exit_on_sigterm() -> None:
    """A run ended by SIGTERM (``kill``, a batch system's time limit) leaves through Python's
    normal exit, as Ctrl-C does: its scratch folder (the forests' stores and the kept features,
    gigabytes of ``$TMPDIR``) is removed and its local cluster closed on the way out."""
    import signal

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main() -> None:
    _exit_on_sigterm()
    run_hydra("densify", lambda cfg: _print_summary(densify(cfg)), check=read_options)


if __name__ == "__main__":
    main()
