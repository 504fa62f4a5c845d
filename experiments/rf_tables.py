"""densify's learners beside the 3D U-Net on the paper's Tables 1-3 (preset=cpu).

Each job is composed as on the training command line (``experiment=... fold=/sample=/setup=
preset=cpu model=unet3d``) and built by ``sparse3d.experiment.build``: the learner gets the
network's volumes, training slices and held-out voxels; confusions are pooled as
``sparse3d.evaluation`` pools them. Two learners (``--method``):

* ``rf``: an ilastik-style random forest (``sparse3d.densify.forests``, ``rf:`` block of
  ``sparse3d/densify/options.py``), one per job, fitted on the training voxels of all training volumes,
  predicting each test volume (Tables 1-3);
* ``refine``: densify's default, ``method=refine`` with the ``refine:`` and ``rf:`` blocks of
  ``sparse3d/densify/options.py`` (step-bound: ``time_budget_s`` is ignored), run on each test volume
  with that volume's own training slices, as a user densifies one volume (the semi-automated
  Tables 1 and 2 only: Table 3's test volumes have no annotated slice).

The 3D U-Net figures are quoted from ``experiments/results/tables_cpu.md``.

    python experiments/rf_tables.py [--method rf|refine] [--tables 1,2,3] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np

from sparse3d.mdtables import md_tables

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
EXPERIMENT = {1: "semi_cv", 2: "slice_sweep", 3: "full_auto"}
TITLE = {
    1: "Table 1 — semi-automated segmentation, 3-fold cross-validation (IoU)",
    2: "Table 2 — effect of the number of annotated slices (IoU)",
    3: "Table 3 — fully-automated segmentation, leave one volume out (IoU)",
}
#: Job keys: ``(fold,)`` for Tables 1 and 3, ``(setup, sample)`` for Table 2.
FOLDS = [(1,), (2,), (3,)]
JOBS = {1: FOLDS, 2: [(u, s) for u in (1, 2, 3, 4) for s in (1, 2, 3)], 3: FOLDS}
#: Column names of the voxel sets (``sparse3d.evaluation.VOXEL_SETS``).
SET_NAMES = dict(
    heldout="held-out", heldout_all="held-out incl. crossings", all_voxels="all voxels"
)
Key = tuple[int, ...]
Scores = dict[str, float | None]  # voxel set -> mean IoU


def overrides(table: int, key: Key) -> list[str]:
    """The command-line overrides of one job."""
    job = [f"setup={key[0]}", f"sample={key[1]}"] if table == 2 else [f"fold={key[0]}"]
    base = [f"experiment={EXPERIMENT[table]}", "preset=cpu", "model=unet3d"]
    return [*base, *job, f"data.root={ROOT / 'data'}"]


def pooled_training(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled voxels of several ``(features (F, Z, Y, X), label (Z, Y, X))`` pairs as one
    ``(F, N, 1, 1)`` / ``(N, 1, 1)`` grid a forest can be fitted on."""
    xs, ys = [], []
    for features, label in pairs:
        on = label != ignore_index
        xs.append(features[:, on])
        ys.append(label[on])
    return np.concatenate(xs, 1)[:, :, None, None], np.concatenate(ys)[:, None, None]


def pooled_scores(
    preds: Mapping[str, np.ndarray], volumes: Sequence[Any], names: Sequence[str], ignore: int
) -> Scores:
    """Mean IoU per voxel set of ``preds`` (name -> labels), confusions pooled over ``volumes``
    exactly as ``sparse3d.evaluation.evaluate_volumes`` pools them."""
    from sparse3d.evaluation import VOXEL_SETS, add_confusions, score, summaries

    total: dict[str, np.ndarray | None] = dict.fromkeys(VOXEL_SETS)
    for vol in volumes:
        refs = {
            "heldout": vol.eval_label,
            "heldout_all": vol.eval_label if vol.eval_label_all is None else vol.eval_label_all,
            "all_voxels": vol.dense_label,
        }
        add_confusions(total, score(preds[vol.name], refs, names, ignore))
    return {k: None if s is None else s["mean"] for k, s in summaries(total, names).items()}


def run_job(table: int, key: Key, rf_cfg: Any, features: Callable[..., np.ndarray]) -> Scores:
    """Build one job, fit its forest on the training volumes, score it on the test volumes."""
    from hydra import compose, initialize_config_dir

    from sparse3d.densify.methods import make_forest
    from sparse3d.experiment import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        job = build(compose("config", overrides=overrides(table, key)))
    spec, dm, voxel = job.facts.labels, job.datamodule, job.facts.voxel_size_zyx_um
    train = [dm.volumes[n] for n in sorted(job.split.train) if job.split.train[n]]
    x, y = pooled_training([(features(v, voxel), v.train_label) for v in train], spec.ignore_index)
    forest = make_forest(spec.num_classes, spec.ignore_index, rf_cfg).fit(x, y)
    del x, y
    tests = [dm.volumes[n] for n in sorted(job.split.test)]
    preds = {
        v.name: forest.predict_proba(features(v, voxel)).argmax(0).astype(np.uint8) for v in tests
    }
    return pooled_scores(preds, tests, spec.class_names, spec.ignore_index)


def run_refine_job(table: int, key: Key, rf_cfg: Any, refine_cfg: Any) -> Scores:
    """Build one semi-automated job and densify each test volume from its own training slices
    with ``method=refine``; score the arg-max as :func:`run_job` does."""
    from hydra import compose, initialize_config_dir

    from sparse3d.densify.methods import refine_volume
    from sparse3d.experiment import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        job = build(compose("config", overrides=overrides(table, key)))
    spec, dm, voxel = job.facts.labels, job.datamodule, job.facts.voxel_size_zyx_um
    tests = [dm.volumes[n] for n in sorted(job.split.test)]
    preds = {}
    for v in tests:
        slices = {a: tuple(i) for a, i in job.split.train.get(v.name, {}).items()}
        if not any(slices.values()):
            raise SystemExit(f"{v.name}: no training slice on this test volume (Table 3?)")
        probs, _ = refine_volume(
            v.image, v.train_label, slices, voxel, spec, rf_cfg, refine_cfg, progress_bar=False
        )
        preds[v.name] = probs.argmax(0).astype(np.uint8)
    return pooled_scores(preds, tests, spec.class_names, spec.ignore_index)


def feature_cache(sigmas: Sequence[float]) -> Callable[..., np.ndarray]:
    """``features(volume, voxel_size)``: ``sparse3d.densify.features.voxel_features`` of the volume's image,
    computed once per volume (jobs share the volumes; reused only for an identical image)."""
    from sparse3d.densify.features import voxel_features

    store: dict[tuple[str, tuple[float, ...]], tuple[np.ndarray, np.ndarray]] = {}

    def features(vol: Any, voxel: tuple[float, ...]) -> np.ndarray:
        hit = store.get((vol.name, voxel))
        if hit is None or not np.array_equal(hit[0], vol.image):
            hit = (vol.image, voxel_features(vol.image, voxel, tuple(sigmas)))
            store[(vol.name, voxel)] = hit
        return hit[1]

    return features


# -- the 3D U-Net figures, quoted from the results files ---------------------------------------
def unet_quotes(tables_md: str, setups: Mapping[str, str]) -> dict:
    """``{(table, key): (held-out, all voxels)}`` of the 3D U-Net with BN at ``preset=cpu``, all
    three tables quoted from ``tables_cpu.md`` (Table 2's held-out includes the crossings)."""
    out: dict[tuple[int, Key], tuple[float, float]] = {}
    setup_of = {label: int(k) for k, label in setups.items()}
    for rows in md_tables(tables_md):
        head = rows[0]
        if head[0] in ("test slices", "test volume"):
            table = 1 if head[0] == "test slices" else 3
            ours, every = head.index("3D with BN ours"), head.index("3D with BN ours, all voxels")
            for cells in rows[1:]:
                if cells[0].isdigit():
                    out[(table, (int(cells[0]),))] = (float(cells[ours]), float(cells[every]))
        elif head[0] == "GT slices":
            for cells in rows[1:]:
                for s in (1, 2, 3):
                    ours, every = (
                        float(cells[head.index(f"S{s} ours{t}")]) for t in ("", ", all voxels")
                    )
                    out[(2, (setup_of[cells[0]], s))] = (ours, every)
    return out


# -- the markdown -------------------------------------------------------------------------------
def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def table_lines(
    table: int,
    results: Mapping[Key, tuple[Scores, float]],
    unet: Mapping,
    paper: Mapping,
    name: str = "RF",
) -> list[str]:
    """One table: a row per job and the average, the learner ``name`` beside the quoted network
    and the paper."""
    sets = ("heldout", "heldout_all", "all_voxels") if table != 3 else ("heldout", "all_voxels")
    ours = "held-out incl. crossings" if table == 2 else "held-out"
    head = (
        ["GT slices", "sample"] if table == 2 else ["test slices" if table == 1 else "test volume"]
    )
    head += [f"{name} {SET_NAMES[s]}" for s in sets]
    head += [f"3D with BN ours, {ours}", "3D with BN ours, all voxels", "3D with BN paper"]
    head += [f"{name} s"]
    section = paper[EXPERIMENT[table]]
    rows, cols = [], []
    for key in JOBS[table]:
        scores, seconds = results[key]
        u = unet.get((table, key), (None, None))
        if table == 2:
            label = [section["setups"][str(key[0])], str(key[1])]
            p = section["rows"][str(key[0])][str(key[1])]
        else:
            label, p = [str(key[0])], section["rows"][str(key[0])]["unet3d"]
        vals = [scores[s] for s in sets] + [u[0], u[1], p, seconds]
        cols.append(vals)
        rows.append(label + [_f(v) for v in vals[:-1]] + [f"{seconds:.0f}"])
    avg = [None if None in c else mean(c) for c in zip(*cols, strict=True)]
    if table != 2:
        avg[-2] = section["rows"]["average"]["unet3d"]
    label = ["**average**", ""] if table == 2 else ["**average**"]
    rows.append(label + [_f(v) for v in avg[:-1]] + [f"{sum(c[-1] for c in cols):.0f} (sum)"])
    lines = [f"### {TITLE[table]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _machine() -> str:
    from sparse3d.bench.runs import cpu_capability, git_commit, nproc

    return (
        f"`get_cpu_capability()` = `{cpu_capability()}`, nproc {nproc()}, load average "
        f"{os.getloadavg()[0]:.1f} at the start, commit `{git_commit()}`"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="1,2,3", help="comma-separated subset of 1,2,3")
    ap.add_argument("--method", choices=("rf", "refine"), default="rf")
    ap.add_argument("--out", type=Path, help="default experiments/results/tables_METHOD.md")
    args = ap.parse_args(argv)
    tables = sorted({int(t) for t in args.tables.split(",")})
    if not set(tables) <= {1, 2, 3}:
        ap.error(f"--tables takes 1, 2 and 3, got {args.tables}")
    if args.method == "refine" and 3 in tables:
        ap.error("--method refine learns from a volume's own slices: Tables 1 and 2 only")
    out = args.out or RESULTS / f"tables_{args.method}.md"
    from omegaconf import OmegaConf

    from sparse3d.atomic import write_text_atomic
    from sparse3d.report import paper_results

    command = shlex.join(
        ["python", "experiments/rf_tables.py", *(sys.argv[1:] if argv is None else argv)]
    )
    started, machine = datetime.now(), _machine()
    from sparse3d.densify.api import method_options

    rf_cfg, refine_cfg = method_options(("refine.time_budget_s=null",))  # step-bound
    features = feature_cache(rf_cfg.sigmas)
    name = "RF" if args.method == "rf" else "refine"
    paper = paper_results()
    unet = unet_quotes(
        (RESULTS / "tables_cpu.md").read_text(),
        paper["slice_sweep"]["setups"],
    )
    t_all, body = time.perf_counter(), []
    for table in tables:
        results = {}
        for key in JOBS[table]:
            t0 = time.perf_counter()
            if args.method == "rf":
                scores = run_job(table, key, rf_cfg, features)
            else:
                scores = run_refine_job(table, key, rf_cfg, refine_cfg)
            results[key] = (scores, secs := time.perf_counter() - t0)
            job = " ".join([EXPERIMENT[table], *overrides(table, key)[3:-1]])
            print(f"{job}: held-out mean IoU {_f(scores['heldout'])}, {secs:.1f} s", flush=True)
        body += table_lines(table, results, unet, paper, name)
    wall = time.perf_counter() - t_all
    settings = {"rf": rf_cfg} if args.method == "rf" else {"refine": refine_cfg, "rf": rf_cfg}
    blocks = "; ".join(
        f"{block}: " + ", ".join(f"{k} {v}" for k, v in OmegaConf.to_container(c).items())
        for block, c in settings.items()
    )
    learner = (
        "Forest: `sparse3d.densify.forests`; one per job, fitted on the training voxels of all its training "
        "volumes, predicting each test volume (pooled)."
        if args.method == "rf"
        else "refine: `method=refine` on each test volume from that volume's own training "
        "slices (the network step-bound: `time_budget_s` ignored), scores pooled."
    )
    header = [
        f"# {name} beside the 3D U-Net: Tables {', '.join(map(str, tables))} on the preset=cpu "
        "splits",
        "",
        f"> - `{command}`, {started:%Y-%m-%d %H:%M}; {machine}. {wall / 60:.1f} min in all "
        f"({name} s: per job).",
        f"> - {learner} Settings of `sparse3d/densify/options.py`: {blocks}.",
        "> - Held-out: test slices less their crossings with training slices (the paper's); incl. "
        "crossings: all of the test slices; all voxels: the dense truth. 3D with BN ours "
        "(`preset=cpu`) is quoted from `experiments/results/tables_cpu.md` (Table 2: held-out "
        "incl. crossings).",
        "",
    ]
    text = "\n".join(header + body)
    write_text_atomic(out, text)
    print(f"wall time {wall:.0f} s; written: {out}")


if __name__ == "__main__":
    main()
