"""experiments/gpu_check.py keeps working between GPU runs: its dry run on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_covers_every_section(tmp_path):
    out = tmp_path / "report.md"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = out.read_text()
    titles = ("Device and versions", "Training throughput", "GPU-only step time")
    titles += ("DDP on one device", "Predictor", "CUDA tests")
    for i, title in enumerate(titles, 1):
        assert f"## {i}. {title}" in report
    assert "failed" not in report.split("Total")[0] and "0 section(s) failed" in report
    assert "ranks_in_sync True" in report


def test_gpu_check_names_a_missing_dependency_in_one_line():
    code = (
        "import sys, runpy; sys.modules['monai'] = None; sys.argv = ['gpu_check', '--dry'];"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing dependencies: monai" in lines[0], r.stderr
