"""Run-folder files: what a finished run leaves behind, readable without torch (layer 1).

A run folder holds ``config.yaml`` (resolved), ``split.json``, ``checkpoints/``, ``model.pt``,
``metrics.json`` and ``predictions/``. ``metrics.json`` is written last, atomically; its
presence marks the run as finished, which is what makes re-launched sweeps skip done jobs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

METRICS = "metrics.json"
SPLIT = "split.json"
CONFIG = "config.yaml"


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to a temporary name beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The finished run's metrics, or None when the run has not finished."""
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return None
    with p.open() as f:
        return json.load(f)


def find_runs(paths: list[Path]) -> list[Path]:
    """Every finished run folder at or below the given folders."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p)
        if (p / METRICS).is_file():
            found.add(p)
        found.update(m.parent for m in p.rglob(METRICS))
    return sorted(found)
