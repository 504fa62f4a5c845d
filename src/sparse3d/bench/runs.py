"""One run of the densify benchmark (layer 3): the environment it ran in, its case file, its
densify child process (wall time, peak memory, the error line of a failure), its score, and its
record in ``<out>/results.jsonl``. The loop over runs and the command line are in
:mod:`sparse3d.bench`, the markdown table in :mod:`sparse3d.bench.table`.
"""

from __future__ import annotations

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

from sparse3d.atomic import write_json_atomic

RESULTS = "results.jsonl"
#: IoU values from densify.json and the benchmark's own count must agree this closely.
_CROSSCHECK_TOL = 1e-6


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


def score_run(run_dir: Path, case_h5: Path) -> dict[str, Any]:
    """IoU of a finished run on unannotated voxels and on all voxels.

    Read from ``<run>/densify.json`` where it has them; always also counted here from the
    written ``<name>_seg.h5`` and the case's truth, and the two compared (``crosscheck``).
    """
    import h5py

    from sparse3d.data.volume import load_volume
    from sparse3d.metrics import confusion_matrix, iou_summary, summary_class_iou

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
            ours_iou, their_iou = summary_class_iou(mine), summary_class_iou(theirs)
            diffs += [
                abs(their_iou[n] - v)
                for n, v in ours_iou.items()
                if n in their_iou and np.isfinite(v) and np.isfinite(their_iou[n])
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
