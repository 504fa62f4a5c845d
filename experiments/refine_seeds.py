"""densify ``method=refine`` taken apart on one benchmark case, over several network seeds.

The forests run once; the refining network is trained once per seed (step-bound, so the
machine's load cannot cut training short). Printed per seed, on the voxels no annotated plane
covers: the stacked forests alone, the network alone and their average (what densify writes),
with per-class IoU; then the mean over seeds. Variance between seeds is the yardstick for any
refine setting: a change smaller than it is not a change.

    python -m sparse3d.bench densify --k 3 --cases mni_aparc --method rf:method=rf  # the case
    python experiments/refine_seeds.py mni_aparc 3 --seeds 0,1,2 [refine.x=y ...]

The case file comes from the benchmark's folder (``--cases-dir``, default ``bench_runs/cases``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def mean_iou(prob: np.ndarray, ref: np.ndarray, k: int, ign: int) -> tuple[float, np.ndarray]:
    """Mean and per-class IoU of the arg-max of ``prob (K, Z, Y, X)`` against ``ref``."""
    from sparse3d.metrics import confusion_matrix, iou_from_confusion

    iou = iou_from_confusion(confusion_matrix(prob.argmax(0), ref, k, ign))
    return float(np.nanmean(iou)), iou


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sparse3d.cli import quiet_lightning
    from sparse3d.data.volume import load_volume
    from sparse3d.densify.methods import network_rounds, stacked_forests

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("k", type=int)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cases-dir", default="bench_runs/cases")
    ap.add_argument(
        "--forest-weights",
        default="",
        help="also score the last network averaged with the forests at these weights, e.g. 0.25,0.75",
    )
    ap.add_argument("overrides", nargs="*", help="densify overrides, e.g. refine.lr=0.001")
    args = ap.parse_intermixed_args(argv)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("densify", overrides=["refine.time_budget_s=null", *args.overrides])
    quiet_lightning()
    vol = load_volume(Path(args.cases_dir) / f"{args.case}_k{args.k}.h5")
    if vol.dense_label is None:
        print(f"{vol.path}: no dense truth to score against", file=sys.stderr)
        return 2
    spec = vol.meta.labels
    k, ign = spec.num_classes, spec.ignore_index
    label, image = np.asarray(vol.label), np.asarray(vol.image, np.float32)
    ref = np.where(label == ign, vol.dense_label, ign)
    print(
        f"{args.case} k={args.k} {' '.join(args.overrides)}; "
        f"cpu {torch.backends.cpu.get_cpu_capability()}; classes {list(spec.class_names)}"
    )
    t0 = time.perf_counter()
    full, crossfit = stacked_forests(
        image,
        label,
        vol.meta.annotated_slices,
        vol.meta.voxel_size_zyx_um,
        spec,
        cfg.rf,
        cfg.refine,
    )
    forest, forest_iou = mean_iou(full, ref, k, ign)
    print(f"forests      {forest:.3f} {np.round(forest_iou, 3)} ({time.perf_counter() - t0:.0f} s)")
    nets, refines = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        refine_cfg = OmegaConf.merge(cfg.refine, {"seed": seed})
        facts: dict = {}
        avg, net = network_rounds(
            image, label, full, crossfit, spec, refine_cfg, False, facts, vol.meta.voxel_size_zyx_um
        )
        n, n_iou = mean_iou(net, ref, k, ign)
        r, r_iou = mean_iou(avg, ref, k, ign)
        nets.append(n)
        refines.append(r)
        print(f"seed {seed} net  {n:.3f} {np.round(n_iou, 3)} ({facts['network_seconds']} s)")
        print(f"seed {seed} refine {r:.3f} {np.round(r_iou, 3)}")
        for fw in (float(v) for v in args.forest_weights.split(",") if v):
            a, a_iou = mean_iou((1 - fw) * net + fw * full, ref, k, ign)
            print(f"seed {seed} net + forests at weight {fw:g}: {a:.3f} {np.round(a_iou, 3)}")
    print(
        f"mean over seeds: net {np.mean(nets):.3f} (min {min(nets):.3f}), "
        f"refine {np.mean(refines):.3f} (min {min(refines):.3f}, max {max(refines):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
