"""Run-folder files: what a finished run leaves behind, readable without torch (layer 1).

A run folder holds ``config.yaml`` (resolved), ``split.json``, ``checkpoints/``, ``model.pt``,
``metrics.json`` and ``predictions/``. ``metrics.json`` is written last, atomically; its
presence marks the run as finished, which is what makes re-launched sweeps skip done jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the one atomic writer (sparse3d.atomic); re-exported, run folders write through it
from sparse3d.atomic import write_json_atomic as write_json_atomic

METRICS = "metrics.json"
SPLIT = "split.json"
CONFIG = "config.yaml"


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
