"""Development benchmark of the semi-automated use: ``python -m sparse3d.bench`` (layer 3).

    python -m sparse3d.bench densify [--cases mni_tissue,stardist_nuclei,...] [--k 1,2,3,5]
        [--method rf:method=rf] [--method refine:] [--out bench_runs] [--table FILE] [--force]
    python -m sparse3d.bench table [--out bench_runs] [--table FILE]

Every case of :mod:`sparse3d.data.realcases` (public volumes with a dense truth, and the
synthetic samples) is annotated on ``k`` evenly spaced planes per axis and written once to
``<out>/cases/<case>_k<k>.h5`` (with ``<case>_k<k>.json`` describing it). Each method then
densifies it in its own process::

    python -m sparse3d.densify inputs=[<case>_k<k>.h5] out=<out>/runs/<case>/k<k>/<label> \\
        overwrite=true logger=none <overrides>

``--method LABEL:OVERRIDES`` names a variant: OVERRIDES are space-separated Hydra overrides
handed to densify (``--method "w_none:loss.class_weights=null"``); the default methods are
``rf:method=rf`` and ``refine:`` (densify's defaults, method=refine). Each run's wall time, peak resident memory
(of the child and its descendants, from ``os.wait4``) and its IoU on the voxels nobody annotated
and on all voxels are appended as one JSON line to ``<out>/results.jsonl`` as soon as it ends.
A run already recorded as finished (same case, k, label and overrides) is skipped unless
``--force``; a failed run is recorded with the last line of its log and retried next time.
At the end, and with ``table``, ``<out>/bench_densify.md`` (or ``--table``) gets the full table,
a pivot of mean IoU on unannotated voxels (rows case/k, columns methods) and, when a method is
labelled ``rf``, every method's margin over it.

This module holds the command line and the loop over runs; one run (case file, child process,
score, record) is :mod:`sparse3d.bench.runs`, the table :mod:`sparse3d.bench.table`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.bench.runs import (
    RESULTS,
    append_result,
    bench_one,
    cpu_capability,
    densify_command,
    environment,
    error_line,
    git_commit,
    nproc,
    prepare_case,
    read_results,
    run_child,
    run_key,
    score_run,
)
from sparse3d.bench.table import _fmt, _mean_of, render_table, write_table

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_METHODS",
    "RESULTS",
    "TABLE",
    "BenchError",
    "append_result",
    "bench_one",
    "cpu_capability",
    "densify_command",
    "environment",
    "error_line",
    "git_commit",
    "main",
    "nproc",
    "parse_method",
    "prepare_case",
    "read_results",
    "render_table",
    "run_benchmark",
    "run_child",
    "run_key",
    "score_run",
    "write_table",
]

DEFAULT_METHODS = ("rf:method=rf", "refine:")
DEFAULT_KS = (1, 2, 3, 5)
TABLE = "bench_densify.md"
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


class BenchError(Exception):
    """Bad command-line input: reported as one line."""


# --------------------------------------------------------------------------------------------
# arguments


def parse_method(spec: str) -> tuple[str, str]:
    """``"LABEL:OVERRIDES"`` -> (label, overrides joined by single spaces)."""
    label, sep, overrides = spec.partition(":")
    label = label.strip()
    if not sep or not _LABEL_RE.match(label):
        raise BenchError(
            f"--method {spec!r}: expected LABEL:OVERRIDES with a label of letters, digits, "
            "'_', '-', '.', '+' (e.g. rf:method=rf, or refine: for densify's defaults)"
        )
    try:
        tokens = shlex.split(overrides)
    except ValueError as err:
        raise BenchError(f"--method {spec!r}: {err}") from None
    for tok in tokens:
        key = tok.split("=", 1)[0].lstrip("+~")
        if key in ("inputs", "out", "overwrite"):
            raise BenchError(f"--method {spec!r}: {key}= is set by the benchmark")
    return label, " ".join(shlex.quote(t) for t in tokens)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ks(text: str) -> list[int]:
    try:
        ks = [int(t) for t in _csv_list(text)]
    except ValueError:
        raise BenchError(f"--k {text!r}: expected comma-separated integers") from None
    if not ks or min(ks) < 1:
        raise BenchError(f"--k {text!r}: planes per axis must be >= 1")
    return ks


# --------------------------------------------------------------------------------------------
# the benchmark loop


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_benchmark(
    out: Path,
    cases: Sequence[str],
    ks: Sequence[int],
    methods: Sequence[tuple[str, str]],
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run every case × k × method not already finished; returns the records appended."""
    from sparse3d.data import realcases

    env = environment()
    env["bench_started"] = env.pop("date")
    done = {run_key(r) for r in read_results(out) if r.get("status") == "ok"}
    plan = [(c, k, lab, ovr) for c in cases for k in ks for lab, ovr in methods]
    todo = [p for p in plan if force or p not in done]
    print(f"bench: {len(plan)} runs, {len(plan) - len(todo)} already done, {len(todo)} to run")
    appended: list[dict[str, Any]] = []
    prepared: dict[str, dict[int, Path] | None] = {}
    t_start = time.perf_counter()
    walls: list[float] = []
    for i, (case, k, label, overrides) in enumerate(todo, 1):
        if case not in prepared:
            reason = realcases.unavailable_reason(case)
            if reason is not None:
                print(f"bench: skipping case {case}: {reason}", flush=True)
                prepared[case] = None
            else:
                case_ks = sorted({kk for c, kk, _, _ in todo if c == case})
                try:
                    prepared[case] = prepare_case(out, case, case_ks, force=force)
                except realcases.CaseUnavailable as err:
                    print(f"bench: skipping case {case}: {err}", flush=True)
                    prepared[case] = None
        files = prepared[case]
        if files is None:
            continue
        eta = ""
        if walls:
            left = np.mean(walls) * (len(todo) - i + 1)
            eta = f", about {_duration(left)} left"
        elapsed = _duration(time.perf_counter() - t_start)
        print(f"[{i}/{len(todo)}] start  {case} k={k} {label} ({elapsed} elapsed{eta})", flush=True)
        rec = bench_one(out, case, k, files[k], label, overrides, env)
        append_result(out, rec)
        appended.append(rec)
        walls.append(float(rec["wall_s"]))
        if rec["status"] == "ok":
            result = (
                f"mean IoU unannotated {_fmt(_mean_of(rec['unannotated']))}, "
                f"all {_fmt(_mean_of(rec['all_voxels']))}"
            )
        else:
            result = f"FAILED: {rec['error']}"
        print(
            f"[{i}/{len(todo)}] done   {case} k={k} {label}: {result} "
            f"({rec['wall_s']:.0f} s, {rec['peak_rss_gib']:.2f} GiB)",
            flush=True,
        )
    return appended


def _parser() -> argparse.ArgumentParser:
    from sparse3d.data.realcases import CASES

    ap = argparse.ArgumentParser(
        prog="python -m sparse3d.bench",
        description="Development benchmark of densify on volumes with a dense ground truth.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("densify", help="run the densify benchmark, then write the table")
    run.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases (default all: {','.join(CASES)})",
    )
    run.add_argument(
        "--k",
        default=",".join(str(k) for k in DEFAULT_KS),
        help="annotated planes per axis, comma-separated (default 1,2,3,5)",
    )
    run.add_argument(
        "--method",
        action="append",
        metavar="LABEL:OVERRIDES",
        help="a method: label and space-separated densify overrides; repeatable "
        f"(default {' and '.join(repr(m) for m in DEFAULT_METHODS)})",
    )
    run.add_argument("--force", action="store_true", help="redo runs and cases already done")
    for p in (run, sub.add_parser("table", help="rewrite the table from results.jsonl")):
        p.add_argument("--out", default="bench_runs", help="benchmark folder (default bench_runs)")
        p.add_argument("--table", default=None, help=f"markdown file (default <out>/{TABLE})")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from sparse3d.data.realcases import CASES

    args = _parser().parse_args(argv)
    out = Path(args.out)
    table = Path(args.table) if args.table else out / TABLE
    try:
        if args.command == "table":
            if not (out / RESULTS).is_file():
                raise BenchError(f"{out / RESULTS} does not exist: run the benchmark first")
            print(f"bench: table {write_table(out, table)}")
            return 0
        cases = _csv_list(args.cases)
        unknown = [c for c in cases if c not in CASES]
        if unknown or not cases:
            raise BenchError(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
        methods = [parse_method(m) for m in (args.method or DEFAULT_METHODS)]
        labels = [lab for lab, _ in methods]
        if len(set(labels)) != len(labels):
            raise BenchError(f"method labels must be unique, got {labels}")
        run_benchmark(out, cases, _ks(args.k), methods, force=args.force)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"bench: results {out / RESULTS}, table {write_table(out, table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
