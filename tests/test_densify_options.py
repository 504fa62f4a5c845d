"""Every bad option of ``python -m sparse3d.densify`` is one ``error:`` line, exit code 2, before
any work: no traceback, no Hydra dump, nothing written to ``out=``.

The argument-only cases call the entry point in this process (sys.argv patched); the cases that
reach the command's own checks, and two argument cases, run as a user runs them, in a subprocess.
Each case also names an input that does not exist, so that a check that is gone fails at once
(an error about the input, not about the option) instead of running densify on the demo volume.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MISSING_INPUT = "inputs=[/nonexistent/never.h5]"


def _assert_one_line(rc: int, err: str, needle: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _written(out: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    if not out.exists():
        return []
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0] not in allowed
    )


def _subprocess(args: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "sparse3d.densify", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def in_process(monkeypatch, capsys):
    """``run(args, out)`` -> (exit code, stderr) of densify's entry point in this process."""
    from hydra.core.global_hydra import GlobalHydra

    from sparse3d.densify import command

    def run(args: list[str], out: Path) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["sparse3d.densify", *args, MISSING_INPUT, f"out={out}"])
        try:
            with pytest.raises(SystemExit) as exc:
                command.main()
        finally:
            GlobalHydra.instance().clear()
        return exc.value.code, capsys.readouterr().err

    return run


ARGUMENT_CASES = [
    (["method=rf", "rf.n_trees=abc"], "rf.n_trees=abc: Value 'abc'"),
    (["+rf.bogus=1"], "+rf.bogus=1: Key 'bogus' not in 'RfOptions'"),
    (["rf.bogus=1"], "rf.bogus=1: Key 'bogus' not in 'RfOptions'"),
    (["refine.forest_weight=2"], "refine.forest_weight must be in [0, 1]"),
    (["refine.pseudo_threshold=1.5"], "refine.pseudo_threshold must be in [0, 1]"),
    (["refine.input_tile=[32,64]"], "refine.input_tile must be three positive sizes"),
    (["refine.time_budget_s=-5"], "refine.time_budget_s must be a number > 0"),
    (["cluster.n_workers=0"], "cluster.n_workers must be null or >= 1"),
    (["refine.input_tile=abc"], "refine.input_tile=abc: Invalid value assigned"),
    (["nonsense_key=1"], "nonsense_key=1: Key 'nonsense_key' is not in struct"),
]


@pytest.mark.parametrize(("args", "needle"), ARGUMENT_CASES, ids=lambda v: str(v))
def test_bad_option_is_one_line_before_hydra_runs(in_process, tmp_path, args, needle):
    out = tmp_path / "out"
    rc, err = in_process(args, out)
    _assert_one_line(rc, err, needle)
    assert not out.exists(), _written(out)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["+rf.bogus=1"], "+rf.bogus=1: Key 'bogus' not in 'RfOptions'"),
        (["method=rf", "rf.n_trees=abc"], "rf.n_trees=abc: Value 'abc' of type 'str'"),
        (["memory_budget=lots"], "memory_budget must look like 2GB"),
        (["output_format=png"], "output_format must be h5 or ome-zarr"),
    ],
    ids=lambda v: str(v),
)
def test_bad_option_as_a_user_runs_it(tmp_path, args, needle):
    out = tmp_path / "out"
    rc, stdout, err = _subprocess([*args, MISSING_INPUT, f"out={out}"], tmp_path)
    _assert_one_line(rc, err, needle)
    assert "Traceback" not in stdout
    assert not out.exists(), _written(out)


def test_unlabelled_labels_with_class_names(tmp_path):
    """All-zero labels with ``class_names=``: one line naming the label file, nothing imported."""
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).random((6, 12, 12), "float32"))
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((6, 12, 12), np.uint8))
    out = tmp_path / "out"
    rc, _, err = _subprocess(
        ["method=rf", "inputs=[img.tif]", "labels=[lab.tif]", "class_names=[a,b]", f"out={out}"],
        tmp_path,
    )
    line = _assert_one_line(rc, err, "lab.tif: no labelled voxel")
    assert "a, b" in line
    # the checks run inside Hydra's job: only its own run folder (config and log) may exist
    assert _written(out, allowed=("run",)) == []


def test_hdf5_without_image_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["label"] = np.zeros((6, 12, 12), np.uint8)
    out = tmp_path / "out"
    rc, _, err = _subprocess(["method=rf", "inputs=[plain.h5]", f"out={out}"], tmp_path)
    _assert_one_line(rc, err, "plain.h5: no 'image' dataset")
    assert _written(out, allowed=("run",)) == []


def test_precompose_leaves_hydra_options_to_hydra():
    import sparse3d.densify.command  # noqa: F401  (registers densify's typed blocks)
    from sparse3d.cli import precompose

    for argv in (
        ["-m", "rf.n_trees=abc"],
        ["--cfg", "job", "rf.n_trees=abc"],
        ["--help"],
        ["--info"],
        ["hydra.run.dir=somewhere"],
        [],
    ):
        assert precompose("densify", argv) is None, argv
    cfg = precompose("densify", ["method=rf", "rf.n_trees=7", "hydra.job.name=x"])
    assert cfg.rf.n_trees == 7 and cfg.method == "rf"


def test_precompose_train_config():
    """The training entry point's config goes through the same check (untyped keys too)."""
    from sparse3d.cli import UserError, precompose

    assert precompose("config", ["trainer.max_steps=3"]).trainer.max_steps == 3
    with pytest.raises(UserError, match=r"^nonsense=1: Key 'nonsense' is not in struct"):
        precompose("config", ["nonsense=1"])
