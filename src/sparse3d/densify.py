"""Semi-automated segmentation: ``python -m sparse3d.densify [inputs=[vol.h5,...]]`` (layer 3).

    python -m sparse3d.densify inputs=[a.h5,b.h5]
    python -m sparse3d.densify inputs=[stack.tif] labels=[stack_labels.tif] [class_names=[...]]
    python -m sparse3d.densify method=rf inputs=[a.h5]        # random forest, no network

The paper's first use case (Sec. 1, Fig. 1a): the user annotates a few orthogonal slices of each
volume; a model learns from those slices alone and returns the dense 3D segmentation. Two
methods, ``method=``:

- ``unet`` (default): the paper's network, trained on every annotated slice of the inputs
  (warm-starting from ``init_ckpt`` when given); each input is predicted with the seamless tiling
  predictor.
- ``rf``: a random forest on filter features (``sparse3d.rf``, ilastik-style), fitted to each
  input's own annotated voxels and applied to all of its voxels; settings in ``rf:``.

Both write ``<out>/<name>_seg.h5`` (the predictor's result layout) and ``<out>/<name>_seg.png``,
and ``<out>/densify.json`` with the method, its wall time per volume and, where the input carries
a dense ground truth (the synthetic benchmark, or ``dense_labels=[...]``), the IoU on the voxels
nobody annotated (``unannotated``) and on every voxel (``all_voxels``).

Inputs in any format the importer reads (TIFF, NIfTI, NRRD, Zarr; see
:mod:`sparse3d.data.convert`) are imported into ``<out>/inputs/<name>.h5`` first, each with its
label file from ``labels=[...]`` (one per non-HDF5 input, same order). By default label code 0
means unlabelled and code ``c >= 1`` is class ``c - 1``, as annotation tools write them;
``label_map=`` and ``class_names=`` change that. ``dense_labels=[...]`` (optional, same order and
codes) adds a dense ground truth to each imported input, for scoring only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from sparse3d.cli import H5_SUFFIXES, UserError, quiet_lightning, run_hydra
from sparse3d.distributed import is_global_zero
from sparse3d.runfolder import write_json_atomic
from sparse3d.train import resolve_volumes, train

if TYPE_CHECKING:
    from sparse3d.data.volume import VolumeArrays
    from sparse3d.labels import LabelSpec

log = logging.getLogger("sparse3d.densify")

METHODS = ("refine", "unet", "rf")
#: One volume through a method: (source volume, result file, picture) -> the seconds the method
#: spent on it (prediction; a shared training is added by the caller).
Segment = Callable[[Path, Path, Path], float]


def _input_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _inputs(cfg: DictConfig) -> dict[str, Path]:
    """``{name: path}`` of ``cfg.inputs`` (checked to exist, names unique)."""
    paths: dict[str, Path] = {}
    for p in cfg.inputs:
        p = Path(str(p))
        if not p.exists():
            raise UserError(f"input {p} does not exist")
        name = _input_name(p)
        if name in paths:
            raise UserError(f"inputs {paths[name]} and {p} have the same name {name!r}: rename one")
        paths[name] = p
    return paths


def _classes_and_map(cfg: DictConfig, label_files: list[Path]) -> tuple[list[str], Any]:
    """Class names and label map for imported inputs.

    Defaults follow what annotation tools write: code 0 is unlabelled and code ``c >= 1`` is
    class ``c - 1``; without ``class_names`` the classes are ``class1..classK`` with K the
    largest code in the label files.
    """
    from sparse3d.data.convert import ConvertError, read_zyx

    names = None if cfg.get("class_names") is None else [str(n) for n in cfg.class_names]
    if cfg.get("label_map") is not None:
        if names is None:
            raise UserError("label_map= needs class_names=[...] (the names of classes 0..K-1)")
        return names, str(cfg.label_map) if isinstance(cfg.label_map, str) else dict(cfg.label_map)
    if names is None:
        top = 0
        for f in label_files:
            try:
                codes, _ = read_zyx(f)
            except ConvertError as err:
                raise UserError(str(err)) from None
            if codes.dtype.kind not in "ui" and not np.all(codes == np.round(codes)):
                raise UserError(f"{f}: label codes must be whole numbers, got dtype {codes.dtype}")
            top = max(top, int(codes.max()))
        if top < 1:
            raise UserError(f"{label_files[0]}: no labelled voxel (code 0 means unlabelled)")
        names = [f"class{c}" for c in range(1, top + 1)]
    mapping: dict[int | str, int | str] = {0: "ignore"}
    mapping.update({c: c - 1 for c in range(1, len(names) + 1)})
    return names, mapping


def _import(cfg: DictConfig, images: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Import the non-HDF5 ``images`` (each with its file in ``cfg.labels``) into ``folder``."""
    from sparse3d.data.convert import ConvertError, convert

    labels = [Path(str(p)) for p in (cfg.get("labels") or [])]
    if len(labels) != len(images):
        listed = ", ".join(str(p) for p in images.values())
        raise UserError(
            f"{len(images)} input(s) not in HDF5 ({listed}) need one label file each, in the same "
            f"order, in labels=[...]; got {len(labels)}"
        )
    dense = [Path(str(p)) for p in (cfg.get("dense_labels") or [])]
    if dense and len(dense) != len(images):
        raise UserError(
            f"dense_labels=[...] needs one file per non-HDF5 input ({len(images)}), in the same "
            f"order as labels=[...]; got {len(dense)}"
        )
    for p in labels + dense:
        if not p.exists():
            raise UserError(f"label file {p} does not exist")
    targets = {name: folder / f"{name}.h5" for name in images}
    existing = [t for t in targets.values() if t.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists: pass overwrite=true to replace it")
    names, mapping = _classes_and_map(cfg, labels)
    voxel = cfg.get("voxel_size_zyx_um")
    folder.mkdir(parents=True, exist_ok=True)
    for (name, image), label in zip(images.items(), labels, strict=True):
        target = targets[name]
        try:
            convert(
                image,
                label,
                target,
                label_map=mapping,
                class_names=names,
                ignore_index=len(names),
                voxel_size_zyx_um=None if voxel is None else [float(v) for v in voxel],
                channel_axis=None if cfg.get("channel_axis") is None else int(cfg.channel_axis),
                overwrite=True,
            )
        except ConvertError as err:
            raise UserError(str(err)) from None
        log.info("imported %s + %s into %s", image, label, target)
    if dense:
        for target, truth in zip(targets.values(), dense, strict=True):
            _add_dense_label(target, truth, mapping)
    return targets


def _add_dense_label(volume: Path, truth: Path, mapping: Any) -> None:
    """Store ``truth`` (label codes mapped like the annotation) as the volume's dense label."""
    from sparse3d.data.convert import ConvertError, apply_label_map, parse_label_map, read_zyx
    from sparse3d.data.volume import load_volume, write_volume

    vol = load_volume(volume)
    try:
        codes, _ = read_zyx(truth)
        dense = apply_label_map(codes, parse_label_map(mapping, vol.meta.labels), truth)
    except ConvertError as err:
        raise UserError(str(err)) from None
    if dense.shape != vol.label.shape:
        raise UserError(f"{truth}: shape (z,y,x) {dense.shape} != label shape {vol.label.shape}")
    write_volume(volume, vol.image, vol.label, vol.meta, dense_label=dense, overwrite=True)
    log.info("added the dense ground truth %s to %s", truth, volume)


def _configure_inputs(cfg: DictConfig, out: Path) -> None:
    """Point ``cfg.data`` at the inputs (importing non-HDF5 ones) or at the demo volumes."""
    with open_dict(cfg):
        if not cfg.inputs:
            for key in ("labels", "dense_labels"):
                if cfg.get(key):
                    raise UserError(f"{key}= given without inputs=[...]")
            cfg.data.volumes = list(cfg.demo_volumes)
            return
        given = _inputs(cfg)
        others = {n: p for n, p in given.items() if p.suffix.lower() not in H5_SUFFIXES}
        _check_targets(cfg, out, list(given))
        imported = _import(cfg, others, out / "inputs") if others else {}
        paths = {n: str(imported.get(n, p)) for n, p in given.items()}
        cfg.data = OmegaConf.create(
            {
                **OmegaConf.to_container(cfg.data),
                "kind": "files",
                "paths": paths,
                "volumes": list(paths),
            }
        )


def _check_targets(cfg: DictConfig, out: Path, names) -> dict[str, Path]:
    """``{name: <out>/<name>_seg.h5}``; refuses existing ones unless ``overwrite=true``."""
    targets = {n: out / f"{n}_seg.h5" for n in names}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists: pass overwrite=true to replace it")
    return targets


def _prepare(cfg: DictConfig) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """Inputs of either method: ``(out, {name: volume file}, {name: <out>/<name>_seg.h5})``.

    Imports non-HDF5 inputs, generates the demo volume when ``inputs=[]``, refuses existing
    results without ``overwrite=true``, all before any training.
    """
    method = str(cfg.get("method", "unet"))
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    out = Path(str(cfg.out))
    _configure_inputs(cfg, out)
    paths = resolve_volumes(cfg.data)
    targets = _check_targets(cfg, out, list(paths))
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


def _rf_probabilities(
    image: np.ndarray,
    label: np.ndarray,
    labels: LabelSpec,
    voxel_size_zyx_um: tuple[float, float, float] | None,
    rf_cfg: DictConfig,
) -> np.ndarray:
    """The random forest on one volume: image ``(C, Z, Y, X)`` and sparse ``label (Z, Y, X)``
    -> class probabilities ``(K, Z, Y, X)`` float32 (settings from the ``rf:`` block)."""
    from sparse3d.rf import segment_rf

    kwargs = OmegaConf.to_container(rf_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs["sigmas"] = tuple(kwargs["sigmas"])
    return segment_rf(
        image, label, labels.num_classes, labels.ignore_index, voxel_size_zyx_um, **kwargs
    )


def _per_volume(
    cfg: DictConfig, probabilities: Callable[[VolumeArrays], np.ndarray], attrs: dict[str, Any]
) -> Segment:
    """The per-volume step of a method that learns from each volume alone: refuse existing
    outputs, ``probabilities(volume) -> (K, Z, Y, X)``, write result and picture; returns the
    seconds ``probabilities`` took."""
    from sparse3d.data.volume import load_volume
    from sparse3d.inference.writers import check_output

    def segment(src: Path, seg: Path, png: Path) -> float:
        check_output(seg, bool(cfg.overwrite))
        check_output(png, bool(cfg.overwrite))
        vol = load_volume(src)
        t0 = time.perf_counter()
        probs = probabilities(vol)
        seconds = time.perf_counter() - t0
        _write_result(vol, probs, seg, png, bool(cfg.save_probabilities), attrs)
        return seconds

    return segment


def _random_forest(cfg: DictConfig, summary: dict[str, Any]) -> tuple[Segment, float]:
    """The per-volume step of ``method=rf`` (nothing is shared between volumes)."""
    summary["rf"] = OmegaConf.to_container(cfg.rf, resolve=True)
    attrs = {"method": "rf", "rf_n_trees": int(cfg.rf.n_trees)}
    attrs["rf_sigmas"] = [float(s) for s in cfg.rf.sigmas]

    def probabilities(vol: VolumeArrays) -> np.ndarray:
        spec, voxel = vol.meta.labels, vol.meta.voxel_size_zyx_um
        return _rf_probabilities(vol.image, vol.label, spec, voxel, cfg.rf)

    return _per_volume(cfg, probabilities, attrs), 0.0


def _forest(num_classes: int, ignore_index: int, rf_cfg: DictConfig, **override: Any):
    from sparse3d.rf import RandomForestSegmenter

    kwargs = {k: v for k, v in OmegaConf.to_container(rf_cfg, resolve=True).items()}
    kwargs.pop("sigmas", None)
    kwargs.update(override)
    return RandomForestSegmenter(num_classes, ignore_index, **kwargs)


def refine_probabilities(
    vol: VolumeArrays, rf_cfg: DictConfig, refine_cfg: DictConfig, progress_bar: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """``method=refine`` on one volume: cross-fitted, stacked forests, then a small same-padded
    U-Net on the image and the forests' probabilities (annotation + confident pseudo-labels),
    averaged with the forest. Returns ``probabilities (K, Z, Y, X)`` and facts for the summary.
    """
    import torch

    from sparse3d.data.normalize import normalize_volume
    from sparse3d.models import UNet
    from sparse3d.refine import (
        PlaneTiles,
        fit_tile,
        predict_same_padded,
        pseudo_labels,
        stacked_probabilities,
    )
    from sparse3d.refine_module import RefineModule, fit_refiner
    from sparse3d.rf import voxel_features

    spec = vol.meta.labels
    k, ign = spec.num_classes, spec.ignore_index
    label = np.asarray(vol.label)
    image = np.asarray(vol.image, dtype=np.float32)
    facts: dict[str, Any] = {}
    t0 = time.perf_counter()
    features = voxel_features(image, vol.meta.voxel_size_zyx_um, tuple(rf_cfg.sigmas))
    slices = dict(vol.meta.annotated_slices)
    if not any(slices.values()):  # labels not on planes: hold out nothing
        slices = {}
    forest = _forest(k, ign, rf_cfg)
    fold_forest = _forest(k, ign, rf_cfg, n_trees=int(refine_cfg.fold_trees))
    full, crossfit = stacked_probabilities(
        features,
        label,
        slices,
        forest,
        fold_forest,
        stages=int(refine_cfg.rf_stages),
        context_sigmas=tuple(refine_cfg.context_sigmas),
        n_folds=int(refine_cfg.folds),
    )
    del features
    facts["forest_seconds"] = round(time.perf_counter() - t0, 1)
    if int(refine_cfg.max_steps) <= 0:
        return full, facts
    pseudo = pseudo_labels(full, label, ign, float(refine_cfg.pseudo_threshold))
    x = np.concatenate([normalize_volume(image), crossfit]).astype(np.float32)
    torch.manual_seed(int(refine_cfg.seed))
    net = UNet(
        x.shape[0],
        k,
        base_channels=int(refine_cfg.base_channels),
        depth=int(refine_cfg.depth),
        padding="same",
        norm="batch",
        bn_eval_stats="running",
    )
    multiple = 2 ** (int(refine_cfg.depth) - 1)
    tile = fit_tile(tuple(refine_cfg.tile_zyx), label.shape, multiple)
    tiles = PlaneTiles(x, label, pseudo, ign, tile, seed=int(refine_cfg.seed))
    module = RefineModule(
        net,
        k,
        ign,
        pseudo_weight=float(refine_cfg.pseudo_weight),
        lr=float(refine_cfg.lr),
        max_steps=int(refine_cfg.max_steps),
        time_budget_s=None if refine_cfg.time_budget_s is None else float(refine_cfg.time_budget_s),
    )
    from sparse3d.callbacks import ProgressLog

    callbacks = [] if progress_bar else [ProgressLog()]  # log lines when piped
    fit = fit_refiner(
        module, tiles, int(refine_cfg.batch_size), progress_bar=progress_bar, callbacks=callbacks
    )
    facts.update(steps=int(fit["steps"]), network_seconds=round(fit["seconds"], 1))
    net.eval()
    probs = predict_same_padded(
        net, x, multiple, halo=net.receptive_field, max_voxels=int(refine_cfg.max_voxels_per_pass)
    )
    w = float(refine_cfg.forest_weight)
    return (1.0 - w) * probs + w * full, facts


def _refine(cfg: DictConfig, summary: dict[str, Any]) -> tuple[Segment, float]:
    """The per-volume step of ``method=refine`` (each volume learns from its own planes)."""
    import sys

    quiet_lightning()
    summary["refine"] = OmegaConf.to_container(cfg.refine, resolve=True)
    summary["rf"] = OmegaConf.to_container(cfg.rf, resolve=True)
    summary["steps"] = {}

    def probabilities(vol: VolumeArrays) -> np.ndarray:
        probs, facts = refine_probabilities(vol, cfg.rf, cfg.refine, sys.stderr.isatty())
        summary["steps"][vol.path.stem] = facts
        log.info("%s: %s", vol.path.name, facts)
        return probs

    return _per_volume(cfg, probabilities, {"method": "refine"}), 0.0


def _write_result(
    vol: VolumeArrays,
    probs: np.ndarray,
    seg: Path,
    png: Path,
    save_probabilities: bool,
    attrs: dict[str, Any],
) -> None:
    """Write ``probs (K, Z, Y, X)`` of ``vol`` as the predictor writes its results: the result
    file (labels, float16 probabilities when asked; temporary name, then renamed) and the
    overview picture."""
    from sparse3d.inference.writers import ResultFile, write_overview

    spec = vol.meta.labels
    labels = probs.argmax(0).astype(np.uint8)
    meta_attrs = {
        "class_names": list(spec.class_names),
        "channel_names": list(vol.meta.channel_names),
        "voxel_size_zyx_um": list(vol.meta.voxel_size_zyx_um),
        "source": str(vol.path),
        **attrs,
    }
    dtype = "float16" if save_probabilities else None
    result = ResultFile(seg, labels.shape, spec.num_classes, dtype, meta_attrs)
    try:
        result.labels[...] = labels
        if result.probabilities is not None:
            result.probabilities[...] = probs
        write_overview(
            png,
            vol.image,
            labels,
            spec,
            title=f"{vol.path.name}: prediction",
            voxel_size_zyx_um=vol.meta.voxel_size_zyx_um,
            channel_names=tuple(vol.meta.channel_names),
            overwrite=True,
        )
        result.commit()
    except BaseException:
        result.abort()
        raise


def _score(src: Path, seg: Path) -> dict[str, Any]:
    """IoU of the result file ``seg`` against the dense ground truth of the volume ``src``.

    ``unannotated``: the voxels no annotated plane covers (sparse label == ignore), the paper's
    semi-automated score; ``all_voxels``: every voxel of the truth. Empty without a truth.
    """
    import h5py

    from sparse3d.data.volume import open_volume
    from sparse3d.metrics import confusion_matrix, iou_summary

    full = (slice(None),) * 3
    with open_volume(src, scan_values=False) as vol:
        if not vol.has_dense_label:
            return {}
        spec = vol.meta.labels
        truth = vol.read_dense_label(full)
        label = vol.read_label(full)
    with h5py.File(seg, "r") as f:
        pred = f["labels"][...]
    k, ign, names = spec.num_classes, spec.ignore_index, tuple(spec.class_names)
    annotated = label != ign
    unannotated_truth = np.where(annotated, ign, truth)
    return {
        "unannotated": iou_summary(confusion_matrix(pred, unannotated_truth, k, ign), names),
        "all_voxels": iou_summary(confusion_matrix(pred, truth, k, ign), names),
        "annotated_fraction": float(annotated.mean()),
    }


def densify(cfg: DictConfig) -> dict[str, Any]:
    """Learn from the annotated slices with ``cfg.method``, segment every input densely, score
    where a dense truth exists; writes and returns the summary (``densify.json``)."""
    out, paths, targets = _prepare(cfg)
    method = str(cfg.get("method", "unet"))
    summary: dict[str, Any] = {"method": method, "volumes": {}}
    if method == "unet":
        segment, shared_seconds = _train_unet(cfg, out, summary)
    elif method == "refine":
        segment, shared_seconds = _refine(cfg, summary)
    else:
        segment, shared_seconds = _random_forest(cfg, summary)
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
        entry.update(_score(src, seg))
        summary["volumes"][name] = entry
    write_json_atomic(out / "densify.json", summary)
    return summary


def _iou_line(summary: dict[str, float]) -> str:
    per = ", ".join(
        f"{k[4:]} {v:.3f}" for k, v in summary.items() if k.startswith("iou/") and k != "iou/mean"
    )
    return f"mean {summary['iou/mean']:.3f} ({per})"


def _print_summary(summary: dict[str, Any]) -> None:
    for name, e in summary["volumes"].items():
        print(f"{name}: dense segmentation {e['segmentation']}")
        print(f"{name}: picture            {e['picture']}")
        print(f"{name}: method {summary['method']}, {e['seconds']:.1f} s (training + prediction)")
        if e.get("unannotated"):
            share = 100 * (1 - e["annotated_fraction"])
            print(
                f"{name}: IoU on the {share:.1f}% of voxels nobody annotated: "
                f"{_iou_line(e['unannotated'])}"
            )
            print(f"{name}: IoU on all voxels: {_iou_line(e['all_voxels'])}")


def main() -> None:
    run_hydra("densify", lambda cfg: _print_summary(densify(cfg)))


if __name__ == "__main__":
    main()
