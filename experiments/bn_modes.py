"""Test-time batch normalisation: which statistics segment best? (issue: seamless prediction)

For every trained 3D network with batch normalisation under the given run folders, predicts the
volumes the run was tested on with each BN mode of ``sparse3d.inference.Predictor`` and scores
IoU against the dense ground truth of the synthetic benchmark (every voxel, not only the
annotated slices):

* ``batch-tile``: the paper's choice (Sec. 2), statistics of each tile, with the training input
  tile (the tiling then shows as seams);
* ``recalibrate``: statistics re-estimated once over the volume being predicted, then fixed
  (the predictor's default; seamless);
* ``running``: the running statistics accumulated in training (seamless).

    python experiments/bn_modes.py runs/semi_cv runs/slice_sweep runs/full_auto

Volumes scored per run: the volumes of ``split.json``'s test part (semi_cv: all three, which the
run also trained on, in other slices; slice_sweep: its sample; full_auto: the unseen volume).
Writes a markdown table (default ``experiments/results/bn_modes.md``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from sparse3d.checkpoint import load_model
from sparse3d.data.sources import benchmark_folder
from sparse3d.data.volume import load_volume
from sparse3d.inference.compare import bn_mode_iou

RESULTS = Path(__file__).resolve().parent / "results" / "bn_modes.md"
MODES = ("batch-tile", "recalibrate", "running")


def runs_under(roots: list[Path]) -> list[Path]:
    found = sorted({p.parent for r in roots for p in r.rglob("model.pt")})
    return [r for r in found if (r / "metrics.json").is_file() and (r / "split.json").is_file()]


def score_run(run: Path, data_root: Path | None) -> list[dict]:
    """One row per test volume of ``run``: mean IoU per mode on every voxel."""
    net, meta = load_model(run / "model.pt")
    if net.dim != 3 or not net.has_batchnorm:
        return []
    cfg = OmegaConf.load(run / "config.yaml")
    input_tile = tuple(int(n) for n in cfg["data"]["input_tile"])
    root = data_root if data_root is not None else Path(cfg["data"]["root"])
    folder = benchmark_folder(root, float(cfg["data"]["scale"]))
    split = json.loads((run / "split.json").read_text())
    rows = []
    for name in split["test"]:
        vol = load_volume(folder / f"{name}.h5")
        if vol.dense_label is None:
            continue
        image = np.asarray(vol.image)
        dense = np.asarray(vol.dense_label)
        common = {"precision": "fp32", "progress": False}
        seamless = bn_mode_iou(net, meta, image, dense, ("recalibrate", "running"), **common)
        per_tile = bn_mode_iou(net, meta, image, dense, ("batch",), input_tile=input_tile, **common)
        rows.append(
            {
                "run": str(run),
                "volume": name,
                "input_tile": "x".join(map(str, input_tile)),
                "tiles": per_tile["batch"]["tiles"],
                "batch-tile": per_tile["batch"]["mean"],
                "recalibrate": seamless["recalibrate"]["mean"],
                "running": seamless["running"]["mean"],
            }
        )
    return rows


def table(rows: list[dict], roots: list[Path]) -> str:
    lines = [
        "# Test-time batch normalisation: mean IoU on every voxel (dense ground truth)",
        "",
        f"Runs under {', '.join(map(str, roots))}; {time.strftime('%Y-%m-%d %H:%M')}. "
        "`batch-tile`: the paper's per-tile statistics with the training input tile; "
        "`recalibrate`: statistics of the predicted volume, fixed (the predictor's default); "
        "`running`: the training running statistics.",
        "",
        "| run | volume | tiles (batch-tile) | batch-tile | recalibrate | running |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = "/".join(Path(r["run"]).parts[-3:])
        lines.append(
            f"| {run} | {r['volume']} | {r['tiles']} x {r['input_tile']} | {r['batch-tile']:.3f} | "
            f"{r['recalibrate']:.3f} | {r['running']:.3f} |"
        )
    if rows:
        means = {m: float(np.mean([r[m] for r in rows])) for m in MODES}
        best = {m: sum(r[m] == max(r[k] for k in MODES) for r in rows) for m in MODES}
        lines.append(
            f"| **mean of {len(rows)}** | | | {means['batch-tile']:.3f} | "
            f"{means['recalibrate']:.3f} | {means['running']:.3f} |"
        )
        lines += ["", "Best mode per row: " + ", ".join(f"{m} {best[m]}" for m in MODES) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", type=Path, help="run or sweep folders")
    ap.add_argument("--data-root", type=Path, help="benchmark root (default: each run's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    for run in runs_under(args.roots):
        t0 = time.perf_counter()
        new = score_run(run, args.data_root)
        rows += new
        for r in new:
            print(
                f"{run} {r['volume']}: batch-tile {r['batch-tile']:.3f} recalibrate "
                f"{r['recalibrate']:.3f} running {r['running']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    text = table(rows, args.roots)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
