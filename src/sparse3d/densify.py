"""Semi-automated segmentation: ``python -m sparse3d.densify [inputs=[vol.h5,...]]`` (layer 3).

    python -m sparse3d.densify inputs=[a.h5,b.h5]
    python -m sparse3d.densify inputs=[stack.tif] labels=[stack_labels.tif] [class_names=[...]]

The paper's first use case (Sec. 1, Fig. 1a): the user annotates a few orthogonal slices of each
volume; the network learns from those slices alone and returns the dense 3D segmentation. This
command trains on every annotated slice of the inputs (warm-starting from ``init_ckpt`` when
given), predicts each input densely with the seamless tiling predictor, and writes
``<out>/<name>_seg.h5`` and ``<out>/<name>_seg.png``. Where the input carries a dense ground
truth (the synthetic benchmark), the IoU on the voxels nobody annotated is reported.

Inputs in any format the importer reads (TIFF, NIfTI, NRRD, Zarr; see
:mod:`sparse3d.data.convert`) are imported into ``<out>/inputs/<name>.h5`` first, each with its
label file from ``labels=[...]`` (one per non-HDF5 input, same order). By default label code 0
means unlabelled and code ``c >= 1`` is class ``c - 1``, as annotation tools write them;
``label_map=`` and ``class_names=`` change that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from sparse3d.cli import H5_SUFFIXES, UserError, run_hydra
from sparse3d.runfolder import write_json_atomic
from sparse3d.train import resolve_volumes, train

log = logging.getLogger("sparse3d.densify")


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
    for p in labels:
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
    return targets


def _configure_inputs(cfg: DictConfig, out: Path) -> None:
    """Point ``cfg.data`` at the inputs (importing non-HDF5 ones) or at the demo volumes."""
    with open_dict(cfg):
        if not cfg.inputs:
            if cfg.get("labels"):
                raise UserError("labels= given without inputs=[...]")
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


def densify(cfg: DictConfig) -> dict[str, Any]:
    """Train on the annotated slices, predict every input densely; returns the summary."""
    from sparse3d.checkpoint import load_model
    from sparse3d.data.volume import load_volume
    from sparse3d.inference import Predictor
    from sparse3d.metrics import confusion_matrix, iou_summary

    out = Path(str(cfg.out))
    _configure_inputs(cfg, out)
    paths = resolve_volumes(cfg.data)
    targets = _check_targets(cfg, out, list(paths))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    metrics = train(cfg, run_dir)
    net, meta = load_model(run_dir / "model.pt")
    predictor = Predictor(net, meta)
    summary: dict[str, Any] = {"run": str(run_dir), "volumes": {}}
    for name, src in paths.items():
        seg = targets[name]
        png = seg.with_suffix(".png")
        predictor.predict_file(
            src,
            seg,
            save_probabilities=bool(cfg.save_probabilities),
            overview_png=png,
            overwrite=bool(cfg.overwrite),
        )
        entry: dict[str, Any] = {"segmentation": str(seg), "picture": str(png)}
        vol = load_volume(src)
        if vol.dense_label is not None:
            import h5py

            with h5py.File(seg, "r") as f:
                pred = f["labels"][...]
            ref = np.asarray(vol.dense_label).copy()
            ign = meta.ignore_index
            ref[np.asarray(vol.label) != ign] = ign  # score only voxels nobody annotated
            cm = confusion_matrix(pred, ref, len(meta.class_names), ign)
            entry["unannotated"] = iou_summary(cm, tuple(meta.class_names))
            entry["annotated_fraction"] = float((np.asarray(vol.label) != ign).mean())
        summary["volumes"][name] = entry
    summary["training_seconds"] = metrics.get("seconds")
    write_json_atomic(out / "densify.json", summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    for name, e in summary["volumes"].items():
        print(f"{name}: dense segmentation {e['segmentation']}")
        print(f"{name}: picture            {e['picture']}")
        u = e.get("unannotated")
        if u:
            per = ", ".join(
                f"{k[4:]} {v:.3f}" for k, v in u.items() if k.startswith("iou/") and k != "iou/mean"
            )
            print(
                f"{name}: IoU on the {100 * (1 - e['annotated_fraction']):.1f}% of voxels nobody "
                f"annotated: mean {u['iou/mean']:.3f} ({per})"
            )


def main() -> None:
    run_hydra("densify", lambda cfg: _print_summary(densify(cfg)))


if __name__ == "__main__":
    main()
