"""Learning curves of Table 1, fold 1: held-out IoU against training iteration (issue 19).

Trains the paper's three networks (3D with BN, 3D without BN, 2D) on fold 1 of the semi-automated
cross-validation (``experiment=semi_cv fold=1``) at ``preset=cpu`` for ``--steps`` iterations,
with the periodic held-out evaluation every ``--every`` steps (``val_every_n_steps``, the same
predictor and score as ``metrics.json``); ``--init-ablation`` adds the network without BN with
PyTorch's default initialisation, ``--reference`` the network with BN in plain fp32. Each job is
one ``python -m sparse3d.train`` process with one torch thread (``OMP_NUM_THREADS=1``) under
``nice``; ``--jobs`` of them run side by side. The preset's learning-rate schedule stretches with
``--steps``, so a curve shows where the recipe goes with a longer budget, not the preset's run.

    python experiments/convergence.py --steps 2000 --every 80 --jobs 2 --runs-root runs/convergence
    python experiments/convergence.py --plot-only --runs-root runs/convergence   # (partial) runs

Writes ``experiments/results/convergence.png`` (IoU against iteration, the paper's Table 1
averages as horizontal lines) and ``convergence.md`` (the curves' figures, times, evaluation
overhead), read from the runs' metrics CSV; finished jobs are not re-run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sparse3d.atomic import atomic_path, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = Path(__file__).resolve().parents[1] / "src" / "sparse3d" / "paper_results.json"

#: (label, model config, extra overrides) of each curve
CURVES = (
    ("3D with BN", "unet3d", ()),
    ("3D w/o BN", "unet3d_nobn", ()),  # He initialisation, the model's default
    ("2D with BN", "unet2d", ()),
)
COLOURS = {"unet3d": "tab:blue", "unet3d_nobn": "tab:red", "unet2d": "tab:green"}
#: the accuracy check of a faster setting (``--set``): 3D with BN in plain fp32, contiguous
REFERENCE = (
    "3D with BN, fp32 reference",
    "unet3d",
    ("trainer.precision=32-true", "channels_last=false"),
)
#: the initialisation the network without BN had before (``--init-ablation``)
TORCH_INIT = ("3D w/o BN, PyTorch init", "unet3d_nobn", ("model.net.init=torch",))


def curves(args) -> tuple:
    return (
        CURVES
        + ((TORCH_INIT,) if args.init_ablation else ())
        + ((REFERENCE,) if args.reference else ())
    )


def run_dir(root: Path, model: str, extra: tuple[str, ...]) -> Path:
    tag = "-".join(e.rsplit(".", 1)[-1].replace("=", "").replace("-", "") for e in extra)
    tag = tag or "default"
    return root / f"{model}-{tag}"


def command(args, model: str, extra: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sparse3d.train",
        "experiment=semi_cv",
        "fold=1",
        f"model={model}",
        "preset=cpu",
        f"trainer.max_steps={args.steps}",
        f"val_every_n_steps={args.every_2d if model == 'unet2d' else args.every}",
        f"checkpoint_every_n_steps={args.steps}",
        "logger=none",
        f"data.root={args.data_root}",
        f"hydra.run.dir={run_dir(args.runs_root, model, extra)}",
        *args.set,
        *extra,
    ]


def train_one(args, label: str, model: str, extra: tuple[str, ...]) -> None:
    out = run_dir(args.runs_root, model, extra)
    if (out / "metrics.json").is_file():
        print(f"{label}: finished already ({out})", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = ["nice", "-n", str(args.nice), *command(args, model, extra)]
    print(f"{label}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    print(f"{label}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)


def read_curve(out: Path) -> dict:
    """``{"steps", "iou", "classes", "eval_seconds", "metrics"}`` of one run (so far)."""
    steps, iou, classes, eval_s = [], [], {}, 0.0
    path = out / "csv" / "metrics.csv"
    if path.is_file():
        with open(path) as f:
            for row in csv.DictReader(f):
                if not row.get("val/iou"):
                    continue
                steps.append(int(row["step"]))
                iou.append(float(row["val/iou"]))
                for k, v in row.items():
                    if k.startswith("val/iou_") and "/" not in k[4:] and v:
                        classes.setdefault(k[8:], []).append(float(v))
                eval_s += float(row.get("val/seconds") or 0.0)
    m = out / "metrics.json"
    return {
        "steps": steps,
        "iou": iou,
        "classes": classes,
        "eval_seconds": eval_s,
        "metrics": json.loads(m.read_text()) if m.is_file() else None,
    }


def at(curve: dict, step: int) -> str:
    for s, v in zip(curve["steps"], curve["iou"], strict=True):
        if s == step:
            return f"{v:.3f}"
    return "–"


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = json.loads(PAPER.read_text())["semi_cv"]["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    found = {}
    for label, model, extra in curves(args):
        c = read_curve(run_dir(args.runs_root, model, extra))
        found[label] = c
        if not c["steps"]:
            continue
        style = ":" if (label, model, extra) == REFERENCE else "--" if extra else "-"
        marker = "." if len(c["steps"]) <= 60 else None
        ax.plot(c["steps"], c["iou"], style, marker=marker, color=COLOURS[model], label=label)
    for model, colour in COLOURS.items():
        ax.axhline(paper["average"][model], color=colour, lw=0.8, ls=":")
        ax.text(0, paper["average"][model] + 0.004, f"paper {paper['average'][model]:.3f}",
                color=colour, fontsize=7)  # fmt: skip
    ax.set(xlabel="training iteration (batch of 2 tiles)", ylabel="held-out IoU (mean of 3)",
           title="Table 1, fold 1, preset=cpu: held-out IoU during training", ylim=(0, 1))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    png = RESULTS / "convergence.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    checkpoints = sorted(
        {s for s in (160, 320, 480, 960, 1440, 2000, args.steps) if s <= args.steps}
    )
    head = "| curve |" + "".join(f" step {s} |" for s in checkpoints)
    head += " best (step) | final | final per class | train s | eval s (share) |"
    lines = [head, "|---" * (len(checkpoints) + 6) + "|"]
    for label, c in found.items():
        if not c["steps"]:
            lines.append(f"| {label} |" + " – |" * (len(checkpoints) + 5))
            continue
        best = max(range(len(c["iou"])), key=c["iou"].__getitem__)
        m = c["metrics"]
        per_class = (
            ", ".join(f"{k} {v:.3f}" for k, v in m["heldout"]["iou"].items()) if m else "running"
        )
        secs = f"{m['seconds']:.0f}" if m else "–"
        share = f"{c['eval_seconds']:.0f} ({c['eval_seconds'] / m['seconds']:.0%})" if m else "–"
        lines.append(
            f"| {label} |"
            + "".join(f" {at(c, s)} |" for s in checkpoints)
            + f" {c['iou'][best]:.3f} ({c['steps'][best]}) | {c['iou'][-1]:.3f} (step "
            f"{c['steps'][-1]}) | {per_class} | {secs} | {share} |"
        )
    fold1 = ", ".join(f"{k} {v:.3f}" for k, v in paper["1"].items())
    avg = ", ".join(f"{k} {v:.3f}" for k, v in paper["average"].items())
    cmd = " ".join(command(args, "MODEL", ("[EXTRA]",))[1:])
    text = f"""# Learning curves: Table 1, fold 1, at preset=cpu

![held-out IoU against iteration](convergence.png)

Held-out IoU (the test slices of fold 1 less their crossings with training slices, mean of the
three classes; `metrics.json`'s `heldout`) every {args.every} iterations (2D: every
{args.every_2d}), from the periodic
evaluation during training (`val/iou` in each run's `csv/metrics.csv`), {args.steps} iterations
per curve. Paper (dotted lines): Table 1 averages {avg}; fold 1 alone {fold1}.

{chr(10).join(lines)}

`train s`: the job's wall time (training, periodic evaluations, final evaluation);
`eval s`: the periodic evaluations' share of it.

Machine: `torch.backends.cpu.get_cpu_capability()` = `{torch.backends.cpu.get_cpu_capability()}`,
{os.cpu_count()} cores, one torch thread per job, {args.jobs} job(s) at a time under
`nice -n {args.nice}`.

    python experiments/convergence.py --steps {args.steps} --every {args.every} --every-2d {args.every_2d} --jobs {args.jobs} --runs-root {args.runs_root}{" --reference" if args.reference else ""}{" --init-ablation" if args.init_ablation else ""}{" --set " + " ".join(args.set) if args.set else ""}
    # each job: python {cmd}
"""
    write_text_atomic(RESULTS / "convergence.md", text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=480, help="training iterations per curve")
    ap.add_argument("--every", type=int, default=24, help="iterations between evaluations")
    ap.add_argument(
        "--every-2d",
        type=int,
        help="for the 2D network (default: 2 x --every; its tri-planar "
        "evaluation predicts every slice of three orientations, several times a 3D pass)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--runs-root", type=Path, default=Path("runs/convergence"))
    ap.add_argument("--data-root", type=Path, default=Path("data"))
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="overrides for every curve, e.g. trainer.precision=auto",
    )
    ap.add_argument("--reference", action="store_true", help=f"also '{REFERENCE[0]}'")
    ap.add_argument("--init-ablation", action="store_true", help=f"also '{TORCH_INIT[0]}'")
    ap.add_argument("--plot-only", action="store_true", help="report the runs there are")
    args = ap.parse_args()
    if args.steps < 1 or args.every < 1 or args.jobs < 1:
        ap.error("--steps, --every and --jobs must be >= 1")
    args.every_2d = args.every_2d or 2 * args.every
    args.runs_root = args.runs_root.resolve()
    args.data_root = args.data_root.resolve()
    if not args.plot_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: train_one(args, *c), curves(args)))
    report(args)


if __name__ == "__main__":
    main()
