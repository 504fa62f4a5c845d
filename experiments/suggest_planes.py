"""Does "annotate here next" help? Planes added one at a time, chosen by the suggestion
(``sparse3d.densify.suggest``, strategy ``uncertainty``), by even spacing (strategy
``spacing``) or at random, on the densify benchmark's cases (``sparse3d.data.realcases``).

Every run starts from the benchmark's 1 plane per axis (``plane_positions(shape, 1)``), paints
the truth on the chosen plane (a perfect annotator), refits ``method=rf`` (densify's random
forest on the filter features, which ``method=refine`` starts from; the refining network would
cost minutes per step) and scores the mean IoU on the voxels off the painted planes. The
filter features are computed once per case and reused by every step (they do not depend on the
labels). Seeds vary the forest (and the random draws); the first result is shared by the three
strategies of a seed.

    nice -n 10 python experiments/suggest_planes.py [--cases synth1,...] [--seeds 2] [--add 4]
        [--n-trees 20] [--out experiments/results/suggest_planes.md] [--json curves.json]

Prints a line per run; writes the markdown table (after every case) and, with --json, every curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("suggest", "spacing", "random")


def rf_step(features, truth, planes, k, n_trees, seed):
    """Forest on the truth painted on ``planes``: ``(probabilities (K,Z,Y,X), painted mask)``."""
    from sparse3d.data.annotation import slice_mask
    from sparse3d.densify.forests import RandomForestSegmenter

    painted = slice_mask(truth.shape, planes)
    label = np.where(painted, truth, k).astype(np.uint8)
    forest = RandomForestSegmenter(k, k, n_trees=n_trees, seed=seed, n_jobs=1)
    forest.fit(features, label)
    return forest.predict_proba(features), painted


def score(probs, truth, painted, names):
    from sparse3d.metrics import confusion_matrix, iou_summary, summary_mean

    k = len(names)
    pred = probs.argmax(0)
    off = np.where(painted, k, truth)
    return {
        "unannotated": summary_mean(iou_summary(confusion_matrix(pred, off, k, k), names)),
        "all": summary_mean(iou_summary(confusion_matrix(pred, truth, k, k), names)),
    }


def next_plane(strategy, uncertainty, planes, rng):
    from sparse3d.densify.suggest import random_plane, spaced_plane, suggest_plane

    if strategy == "suggest":
        return suggest_plane(uncertainty, planes, strategy="uncertainty")
    if strategy == "spacing":
        return spaced_plane(uncertainty.shape, planes)
    return random_plane(uncertainty.shape, planes, rng)


def run_case(name, workdir, seeds, add, n_trees, log):
    from sparse3d.data.realcases import load_case, plane_positions
    from sparse3d.densify.features import DEFAULT_SIGMAS, voxel_features

    case = load_case(name, workdir)
    sigmas = DEFAULT_SIGMAS  # rf.sigmas' default
    t0 = time.perf_counter()
    features = voxel_features(case.image, case.voxel_size_zyx_um, sigmas)
    feat_s = time.perf_counter() - t0
    log(f"{name}: shape {case.shape_zyx}, {features.shape[0]} features in {feat_s:.0f} s")
    k, truth = len(case.class_names), case.truth
    start = {ax: list(v) for ax, v in plane_positions(case.shape_zyx, 1).items()}
    curves = {s: [] for s in STRATEGIES}  # strategy -> per seed: [(unannotated, all, plane)]
    for seed in seeds:
        probs0, painted0 = rf_step(features, truth, start, k, n_trees, seed)
        first = score(probs0, truth, painted0, case.class_names)
        for strategy in STRATEGIES:
            rng = np.random.default_rng(1000 + seed)
            planes = {ax: list(v) for ax, v in start.items()}
            probs = probs0
            curve = [(first["unannotated"], first["all"], "start")]
            for _ in range(add):
                plane = next_plane(strategy, 1.0 - probs.max(0), planes, rng)
                planes[plane.axis].append(plane.index)
                probs, painted = rf_step(features, truth, planes, k, n_trees, seed)
                s = score(probs, truth, painted, case.class_names)
                curve.append((s["unannotated"], s["all"], f"{plane.axis}{plane.index}"))
            curves[strategy].append(curve)
            path = " ".join(c[2] for c in curve[1:])
            log(f"{name} seed {seed} {strategy:8s} {curve[-1][0]:.4f}  {path}")
    return {"case": name, "shape": case.shape_zyx, "feature_seconds": feat_s, "curves": curves}


def table(results, add, seeds, n_trees, seconds, capability, command):
    steps = list(range(add + 1))
    lines = [
        "# Annotate here next: suggested vs evenly spaced vs random planes",
        "",
        f"`{command}`: {seconds / 60:.1f} min on one core (n_jobs=1, "
        f"OMP_NUM_THREADS=1), torch.backends.cpu.get_cpu_capability() `{capability}`.",
        "",
        "Start: the benchmark's 1 plane per axis; then one plane at a time, painted with the "
        "truth, chosen by",
        "*suggest* (`sparse3d.densify.suggest.suggest_plane`, strategy `uncertainty`: the "
        "plane showing the most uncertain voxels, kept clear of painted planes), *spacing* "
        "(`spaced_plane`: the axis with the fewest planes, middle of its widest gap) or "
        "*random* (`random_plane`). Method: `rf` (densify's forest on the filter features, "
        f"{n_trees} trees instead of 100, features computed once per case) stands in for "
        "`refine`. Mean IoU on the voxels off the painted planes, mean over seeds "
        f"{', '.join(map(str, seeds))} (forest seed; random draws).",
        "",
        "## Mean IoU (unannotated voxels) after each added plane",
        "",
        "| case | strategy | " + " | ".join(f"+{s}" for s in steps) + " | mean gain vs spacing |",
        "|---|---|" + "---|" * len(steps) + "---|",
    ]
    overall = {s: [] for s in STRATEGIES}
    wins = {s: 0 for s in STRATEGIES}
    for res in results:
        curves = res["curves"]
        mean_curve = {
            s: np.mean([[p[0] for p in c] for c in curves[s]], axis=0) for s in STRATEGIES
        }
        for s in STRATEGIES:
            gain = float(np.mean(mean_curve[s][1:] - mean_curve["spacing"][1:]))
            overall[s].append(mean_curve[s])
            cells = " | ".join(f"{v:.4f}" for v in mean_curve[s])
            lines.append(f"| {res['case']} | {s} | {cells} | {gain:+.4f} |")
        final = {s: mean_curve[s][-1] for s in STRATEGIES}
        wins[max(final, key=final.get)] += 1
    lines += ["", "## Over all cases", ""]
    lines.append("| strategy | " + " | ".join(f"+{s}" for s in steps) + " | mean gain vs spacing |")
    lines.append("|---|" + "---|" * len(steps) + "---|")
    avg = {s: np.mean(overall[s], axis=0) for s in STRATEGIES}
    for s in STRATEGIES:
        gain = float(np.mean(avg[s][1:] - avg["spacing"][1:]))
        cells = " | ".join(f"{v:.4f}" for v in avg[s])
        lines.append(f"| {s} | {cells} | {gain:+.4f} |")
    lines += [
        "",
        "Cases where each strategy ends highest after the last plane: "
        + ", ".join(f"{s} {wins[s]}" for s in STRATEGIES)
        + f" (of {len(results)}).",
        "",
    ]
    return "\n".join(lines), float(np.mean(avg["suggest"][1:] - avg["spacing"][1:]))


def main(argv=None) -> int:
    from sparse3d.data.realcases import CASES, unavailable_reason

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--add", type=int, default=4, help="planes added after the start")
    p.add_argument("--n-trees", type=int, default=20)
    p.add_argument("--workdir", default=str(ROOT / "bench_runs" / "cases"))
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "suggest_planes.md"))
    p.add_argument("--json", default=None, help="also write every curve to this JSON file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    results = []
    for name in args.cases.split(","):
        reason = unavailable_reason(name)
        if reason:
            log(f"{name}: skipped, {reason}")
            continue
        results.append(run_case(name, args.workdir, seeds, args.add, args.n_trees, log))
        write(args, results, seeds, time.perf_counter() - t0, final=False)
    text = write(args, results, seeds, time.perf_counter() - t0, final=True)
    log(text)
    return 0


def write(args, results, seeds, seconds, final):
    """Write the table (after every case, so a long run leaves its cases done so far)."""
    import torch

    text, gain = table(
        results,
        args.add,
        seeds,
        args.n_trees,
        seconds,
        torch.backends.cpu.get_cpu_capability(),
        "nice -n 10 python experiments/suggest_planes.py " + " ".join(sys.argv[1:]),
    )
    text += (
        f"\nVerdict: the suggestion's mean gain over even spacing is {gain:+.4f} IoU "
        f"({'keep it as the default' if gain > 0 else 'even spacing stays the default'}).\n"
    )
    if not final:
        text += "\n(partial: the run is still going)\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return text


if __name__ == "__main__":
    sys.exit(main())
