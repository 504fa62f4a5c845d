"""Semi-automated segmentation: ``python -m sparse3d.densify [inputs=[vol.h5,...]]`` (layer 3).

The paper's first use case (Sec. 1, Fig. 1a): the user annotates a few orthogonal slices of each
volume; the network learns from those slices alone and returns the dense 3D segmentation. This
command trains on every annotated slice of the inputs (warm-starting from ``init_ckpt`` when
given), predicts each input densely with the seamless tiling predictor, and writes
``<out>/<name>_seg.h5`` and ``<out>/<name>_seg.png``. Where the input carries a dense ground
truth (the synthetic benchmark), the IoU on the voxels nobody annotated is reported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from sparse3d.cli import UserError, run_hydra
from sparse3d.runfolder import write_json_atomic
from sparse3d.train import resolve_volumes, train

log = logging.getLogger("sparse3d.densify")


def _configure_inputs(cfg: DictConfig) -> None:
    with open_dict(cfg):
        if cfg.inputs:
            paths = {}
            for p in cfg.inputs:
                p = Path(str(p))
                if not p.is_file():
                    raise UserError(f"input {p} does not exist")
                if p.suffix.lower() not in (".h5", ".hdf5"):
                    raise UserError(
                        f"input {p} is not HDF5: convert it first with "
                        f"`python -m sparse3d.data.convert {p} LABELS {p.with_suffix('.h5')} ...`"
                    )
                paths[p.stem] = str(p)
            cfg.data = OmegaConf.create(
                {
                    **OmegaConf.to_container(cfg.data),
                    "kind": "files",
                    "paths": paths,
                    "volumes": list(paths),
                }
            )
        else:
            cfg.data.volumes = list(cfg.demo_volumes)


def densify(cfg: DictConfig) -> dict[str, Any]:
    """Train on the annotated slices, predict every input densely; returns the summary."""
    from sparse3d.checkpoint import load_model
    from sparse3d.data.volume import load_volume
    from sparse3d.inference import Predictor
    from sparse3d.metrics import confusion_matrix, iou_summary

    _configure_inputs(cfg)
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    paths = resolve_volumes(cfg.data)
    targets = {n: out / f"{n}_seg.h5" for n in paths}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists: pass overwrite=true to replace it")
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
