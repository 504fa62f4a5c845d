"""Development benchmark of the semi-automated use: ``python -m sparse3d.bench`` (layer 3).

    python -m sparse3d.bench densify [--cases mni_tissue,stardist_nuclei,...] [--k 1,2,3,5]
        [--method rf:method=rf] [--method unet:] [--out bench_runs] [--table FILE] [--force]
    python -m sparse3d.bench table [--out bench_runs] [--table FILE]

Every case of :mod:`sparse3d.data.realcases` (public volumes with a dense truth, and the
synthetic samples) is annotated on ``k`` evenly spaced planes per axis and written once to
``<out>/cases/<case>_k<k>.h5`` (with ``<case>_k<k>.json`` describing it). Each method then
densifies it in its own process::

    python -m sparse3d.densify inputs=[<case>_k<k>.h5] out=<out>/runs/<case>/k<k>/<label> \\
        overwrite=true logger=none <overrides>

``--method LABEL:OVERRIDES`` names a variant: OVERRIDES are space-separated Hydra overrides
handed to densify (``--method "w_none:loss.class_weights=null"``); the default methods are
``rf:method=rf`` and ``unet:`` (densify's defaults). Each run's wall time, peak resident memory
(of the child and its descendants, from ``os.wait4``) and its IoU on the voxels nobody annotated
and on all voxels are appended as one JSON line to ``<out>/results.jsonl`` as soon as it ends.
A run already recorded as finished (same case, k, label and overrides) is skipped unless
``--force``; a failed run is recorded with the last line of its log and retried next time.
At the end, and with ``table``, ``<out>/bench_densify.md`` (or ``--table``) gets the full table,
a pivot of mean IoU on unannotated voxels (rows case/k, columns methods) and, when a method is
labelled ``rf``, every method's margin over it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_METHODS = ("rf:method=rf", "unet:")
DEFAULT_KS = (1, 2, 3, 5)
RESULTS = "results.jsonl"
TABLE = "bench_densify.md"
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
#: IoU values from densify.json and the benchmark's own count must agree this closely.
_CROSSCHECK_TOL = 1e-6


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
            "'_', '-', '.', '+' (e.g. rf:method=rf, or unet: for densify's defaults)"
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
# environment facts


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """Short commit of the working tree, ``+dirty`` when tracked files differ; 'unknown'."""
    root = _repo_root()
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def nproc() -> int:
    """CPUs this process may run on (what ``nproc`` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def environment() -> dict[str, Any]:
    return {
        "cpu_capability": cpu_capability(),
        "nproc": nproc(),
        "commit": git_commit(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# cases


def _case_paths(out: Path, case: str, k: int) -> tuple[Path, Path]:
    stem = out / "cases" / f"{case}_k{k}"
    return stem.with_suffix(".h5"), stem.with_suffix(".json")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_case(out: Path, case: str, ks: Sequence[int], force: bool = False) -> dict[int, Path]:
    """Write ``<out>/cases/<case>_k<k>.h5`` (+ ``.json``) for every k not already there.

    Raises:
        realcases.CaseUnavailable: the case's package is not installed.
    """
    from sparse3d.data import realcases
    from sparse3d.data.annotation import slice_mask
    from sparse3d.runfolder import write_json_atomic

    folder = out / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    todo = []
    for k in ks:
        h5, info = _case_paths(out, case, k)
        known = _read_json(info)
        fresh = known is not None and known.get("version") == realcases.REALCASES_VERSION
        if force or not (h5.is_file() and fresh):
            todo.append(k)
    if todo:
        loaded = realcases.load_case(case, folder.resolve())
        for k in todo:
            h5, info = _case_paths(out, case, k)
            _, planes = realcases.write_case(loaded, k, h5, overwrite=True)
            annotated = slice_mask(loaded.shape_zyx, planes)
            write_json_atomic(
                info,
                {
                    "case": case,
                    "k": k,
                    "version": realcases.REALCASES_VERSION,
                    "description": loaded.description,
                    "shape_zyx": list(loaded.shape_zyx),
                    "voxels": int(loaded.truth.size),
                    "channels": list(loaded.channel_names),
                    "class_names": list(loaded.class_names),
                    "class_fractions": loaded.class_fractions(),
                    "voxel_size_zyx_um": list(loaded.voxel_size_zyx_um),
                    "planes": {ax: list(v) for ax, v in planes.items()},
                    "annotated_fraction": float(annotated.mean()),
                },
            )
    return {k: _case_paths(out, case, k)[0] for k in ks}


# --------------------------------------------------------------------------------------------
# one run


def _hydra_path(path: Path) -> str:
    """An absolute path as a Hydra override value, quoted when it holds special characters."""
    text = str(path.resolve())
    return text if re.fullmatch(r"[\w/.+-]+", text) else "'" + text.replace("'", "\\'") + "'"


def densify_command(case_h5: Path, run_dir: Path, overrides: str) -> list[str]:
    """The densify command line of one run (absolute paths)."""
    return [
        sys.executable,
        "-m",
        "sparse3d.densify",
        f"inputs=[{_hydra_path(case_h5)}]",
        f"out={_hydra_path(run_dir)}",
        "overwrite=true",
        "logger=none",
        *shlex.split(overrides),
    ]


_ERROR_RE = re.compile(r"^(error: |[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b)")


def error_line(log_text: str) -> str:
    """The line of a failed run's log that says what went wrong.

    The last ``error: ...`` line or exception line (``SomeError: ...``), else the first line of
    the last paragraph; Hydra's hint about ``HYDRA_FULL_ERROR`` and the command line are skipped.
    """
    lines = [
        ln.split("\r")[-1].strip()
        for ln in log_text.splitlines()
        if "HYDRA_FULL_ERROR" not in ln and not ln.startswith("$ ")
    ]
    for ln in reversed(lines):
        if _ERROR_RE.match(ln):
            return ln
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        return "no output"
    start = len(lines) - 1
    while start > 0 and lines[start - 1]:
        start -= 1
    return lines[start]


#: Run by a small interpreter between the benchmark and densify: it waits for densify and writes
#: densify's exit code and ``ru_maxrss`` (KiB) to the file named by its first argument.
_MEASURE = """import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": code, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(code if 0 <= code < 256 else 1)
"""


def run_child(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` with stdout and stderr into ``log``; wall seconds, peak RSS, exit code.

    The peak resident set size is ``ru_maxrss`` from ``os.wait4`` on the command: the largest of
    its own and of the descendants it waited for. A forked process inherits its parent's
    high-water mark at ``exec``, so the command is started by a small interpreter
    (:data:`_MEASURE`), not by this process, whose memory would otherwise count as the
    command's.
    """
    import signal

    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_name(f".{log.name}.rusage.json")
    usage_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("MPLBACKEND", "Agg")
    wrapped = [sys.executable, "-c", _MEASURE, str(usage_file), *command]
    with log.open("w") as f:
        f.write("$ " + shlex.join(command) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            wrapped, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode = proc.wait()
        except BaseException:  # interrupted: take the command down with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    measured = _read_json(usage_file)
    usage_file.unlink(missing_ok=True)
    if measured is None:  # the interpreter itself failed
        return {"returncode": returncode or 1, "wall_s": wall, "peak_rss_gib": float("nan")}
    return {
        "returncode": int(measured["returncode"]),
        "wall_s": wall,
        "peak_rss_gib": float(measured["maxrss_kib"]) * 1024 / 2**30,  # KiB on Linux
    }


def _mean_of(summary: dict[str, float]) -> float:
    return float(summary.get("iou/mean", float("nan")))


def score_run(run_dir: Path, case_h5: Path) -> dict[str, Any]:
    """IoU of a finished run on unannotated voxels and on all voxels.

    Read from ``<run>/densify.json`` where it has them; always also counted here from the
    written ``<name>_seg.h5`` and the case's truth, and the two compared (``crosscheck``).
    """
    import h5py

    from sparse3d.data.volume import load_volume
    from sparse3d.metrics import confusion_matrix, iou_summary

    name = case_h5.stem
    vol = load_volume(case_h5)
    spec = vol.meta.labels
    classes = tuple(spec.class_names)
    truth = np.asarray(vol.dense_label)
    seg_path = run_dir / f"{name}_seg.h5"
    with h5py.File(seg_path, "r") as f:
        pred = np.asarray(f["labels"][...])
    if pred.shape != truth.shape:
        raise ValueError(f"{seg_path}: labels {pred.shape} != truth {truth.shape}")
    ign, n = spec.ignore_index, spec.num_classes
    unannotated_ref = np.where(vol.label == ign, truth, ign)
    own = {
        "unannotated": iou_summary(confusion_matrix(pred, unannotated_ref, n, ign), classes),
        "all_voxels": iou_summary(confusion_matrix(pred, truth, n, ign), classes),
    }
    reported = (_read_json(run_dir / "densify.json") or {}).get("volumes", {}).get(name, {})
    out: dict[str, Any] = {
        "annotated_fraction": float((vol.label != ign).mean()),
        "class_names": list(classes),
        "shape_zyx": list(truth.shape),
    }
    diffs = []
    for key, mine in own.items():
        theirs = reported.get(key)
        if theirs:
            out[key] = theirs
            out[f"{key}_source"] = "densify.json"
            diffs += [
                abs(float(theirs[m]) - float(v))
                for m, v in mine.items()
                if m.startswith("iou/") and m in theirs and np.isfinite(v)
            ]
        else:
            out[key] = mine
            out[f"{key}_source"] = "bench"
    if reported.get("seconds") is not None:
        out["method_seconds"] = float(reported["seconds"])  # densify's own time for the volume
    out["crosscheck_max_abs_diff"] = max(diffs) if diffs else None
    if diffs and max(diffs) > _CROSSCHECK_TOL:
        out["crosscheck_warning"] = "densify.json IoU differs from the benchmark's own count"
    return out


def run_key(rec: dict[str, Any]) -> tuple[str, int, str, str]:
    return str(rec["case"]), int(rec["k"]), str(rec["label"]), str(rec["overrides"])


def read_results(out: Path) -> list[dict[str, Any]]:
    """Every record of ``<out>/results.jsonl`` (a torn last line is ignored)."""
    path = out / RESULTS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def append_result(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / RESULTS).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def bench_one(
    out: Path, case: str, k: int, case_h5: Path, label: str, overrides: str, env: dict[str, Any]
) -> dict[str, Any]:
    """Densify one case file with one method in a child process; the record to append."""
    run_dir = out / "runs" / case / f"k{k}" / label
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale run folder would let densify skip its training
    command = densify_command(case_h5, run_dir, overrides)
    log = run_dir / "bench.log"
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    rec: dict[str, Any] = {
        "case": case,
        "k": k,
        "label": label,
        "overrides": overrides,
        "run_dir": str(run_dir),
        "log": str(log),
        "command": shlex.join(command),
        "started": started,
        **env,
    }
    child = run_child(command, log)
    rec.update(child)
    if child["returncode"] != 0:
        rec.update(status="failed", error=error_line(log.read_text(errors="replace")))
    else:
        try:
            rec.update(score_run(run_dir, case_h5))
            rec.update(status="ok", error=None)
        except (OSError, KeyError, ValueError) as err:
            rec.update(status="failed", error=f"scoring: {type(err).__name__}: {err}")
    rec["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return rec


# --------------------------------------------------------------------------------------------
# the table


def _fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if not np.isfinite(f) else f"{f:.{digits}f}"


def _latest(records: list[dict[str, Any]]) -> dict[tuple[str, int, str, str], dict[str, Any]]:
    """The last record of every run key, in file order of their first appearance."""
    latest: dict[tuple[str, int, str, str], dict[str, Any]] = {}
    for rec in records:
        latest[run_key(rec)] = rec
    return latest


def _case_rows(out: Path, cases: list[str]) -> list[str]:
    rows = [
        "| case | shape z×y×x | voxels | voxel µm z,y,x | classes (fraction of voxels) | source |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        infos = sorted((out / "cases").glob(f"{case}_k*.json"))
        info = _read_json(infos[0]) if infos else None
        if info is None:
            continue
        fractions = info["class_fractions"]
        classes = ", ".join(f"{c} {fractions[c]:.1%}" for c in info["class_names"])
        shape = "×".join(str(s) for s in info["shape_zyx"])
        voxel = ", ".join(f"{v:g}" for v in info["voxel_size_zyx_um"])
        rows.append(
            f"| {case} | {shape} | {info['voxels']:,} | {voxel} | {classes} | "
            f"{info['description']} |"
        )
    return rows


def render_table(out: Path, records: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The markdown report of ``records`` (latest record per run)."""
    latest = list(_latest(records).values())
    cases = list(dict.fromkeys(r["case"] for r in latest))
    ks = sorted({int(r["k"]) for r in latest})
    labels = list(dict.fromkeys(r["label"] for r in latest))
    lines = [
        "# Densify benchmark: dense segmentation from k annotated planes per axis",
        "",
        f"`python -m sparse3d.bench` — torch.backends.cpu.get_cpu_capability() "
        f"`{env['cpu_capability']}`, nproc {env['nproc']}, {env['date']}, commit "
        f"`{env['commit']}`.",
        "",
        "IoU = TP / (TP + FP + FN) per class; *unannotated*: voxels off the annotated planes "
        "(what densify has to infer), *all*: every voxel. Wall time and peak resident memory "
        "are of the whole densify process (training, prediction, writing).",
        "",
        "## Cases",
        "",
        *_case_rows(out, cases),
        "",
        "## Methods",
        "",
        "| label | densify overrides |",
        "|---|---|",
    ]
    pairs = dict.fromkeys((r["label"], r["overrides"]) for r in latest)
    lines += [f"| {lab} | `{ovr}` |" if ovr else f"| {lab} | (defaults) |" for lab, ovr in pairs]
    lines += [
        "",
        "## Every run",
        "",
        "| case | k | method | annotated | mean IoU unannotated | per class (unannotated) "
        "| mean IoU all | wall s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {c: i for i, c in enumerate(cases)}
    by_label = {lab: i for i, lab in enumerate(labels)}
    for r in sorted(latest, key=lambda r: (order[r["case"]], int(r["k"]), by_label[r["label"]])):
        if r.get("status") != "ok":
            err = str(r.get("error") or "").replace("|", "\\|")[:160]
            lines.append(
                f"| {r['case']} | {r['k']} | {r['label']} | | failed: {err} | | | "
                f"{_fmt(r.get('wall_s'), 0)} | {_fmt(r.get('peak_rss_gib'), 2)} |"
            )
            continue
        un = r.get("unannotated") or {}
        names = r.get("class_names") or [
            k[4:] for k in un if k.startswith("iou/") and k != "iou/mean"
        ]
        per = ", ".join(f"{n} {_fmt(un.get(f'iou/{n}'))}" for n in names)
        lines.append(
            f"| {r['case']} | {r['k']} | {r['label']} | {_fmt(100 * r['annotated_fraction'], 1)}% "
            f"| {_fmt(_mean_of(un))} | {per} | {_fmt(_mean_of(r.get('all_voxels') or {}))} "
            f"| {_fmt(r.get('wall_s'), 0)} | {_fmt(r.get('peak_rss_gib'), 2)} |"
        )
    # pivot: the latest finished run per (case, k, label)
    cell: dict[tuple[str, int, str], float] = {}
    for r in latest:
        if r.get("status") == "ok":
            cell[(r["case"], int(r["k"]), r["label"])] = _mean_of(r.get("unannotated") or {})
    lines += [
        "",
        "## Mean IoU on unannotated voxels",
        "",
        "| case | k | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    rows = [(c, k) for c in cases for k in ks if any((c, k, lab) in cell for lab in labels)]
    for c, k in rows:
        vals = [_fmt(cell.get((c, k, lab))) for lab in labels]
        lines.append(f"| {c} | {k} | " + " | ".join(vals) + " |")
    others = [lab for lab in labels if lab != "rf"]
    if "rf" in labels and others:
        lines += [
            "",
            "## Margin over rf (mean IoU on unannotated voxels, method − rf)",
            "",
            "| case | k | " + " | ".join(others) + " |",
            "|---|---|" + "---|" * len(others),
        ]
        margins: dict[str, list[float]] = {lab: [] for lab in others}
        for c, k in rows:
            base = cell.get((c, k, "rf"))
            vals = []
            for lab in others:
                v = cell.get((c, k, lab))
                if base is None or v is None or not (np.isfinite(base) and np.isfinite(v)):
                    vals.append("–")
                    continue
                margins[lab].append(v - base)
                vals.append(f"{v - base:+.3f}")
            lines.append(f"| {c} | {k} | " + " | ".join(vals) + " |")
        means = [f"{np.mean(m):+.3f}" if m else "–" for m in margins.values()]
        lines.append("| **mean** | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: Path, env: dict[str, Any] | None = None) -> Path:
    """Write the markdown report of ``<out>/results.jsonl`` to ``table`` (atomically)."""
    records = read_results(out)
    text = render_table(out, records, env or environment())
    table.parent.mkdir(parents=True, exist_ok=True)
    tmp = table.with_name(f".{table.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, table)
    return table


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
