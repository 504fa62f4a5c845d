"""The report reads run folders only and lays out Tables 1-3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sparse3d.report import build_report
from sparse3d.runfolder import find_runs, write_json_atomic


def _run(
    root: Path, protocol: str, model: str, fold=1, sample=1, setup=1, iou=0.5, seed=0, legacy=False
):
    d = root / protocol / model / f"f{fold}-s{sample}-u{setup}-seed{seed}"
    summary = {"iou": {"a": iou, "b": iou}, "mean": iou, "labelled_voxels": 10, "confusion": []}
    if legacy:  # metrics.json of earlier versions: "dense", no "heldout_all"
        keys = {"heldout": summary, "dense": {**summary, "mean": iou - 0.1}}
    else:
        keys = {
            "heldout": summary,
            "heldout_all": {**summary, "mean": iou + 0.05},
            "all_voxels": {**summary, "mean": iou - 0.1},
        }
    write_json_atomic(
        d / "metrics.json",
        {
            "status": "done",
            "experiment": protocol,
            "protocol": protocol,
            "model": model,
            "preset": "cpu",
            "fold": fold,
            "sample": sample,
            "setup": setup,
            "seed": seed,
            **keys,
            "train_voxel_fraction": 0.03 * setup,
        },
    )
    return d


def test_tables_and_plot(tmp_path):
    for fold, v in ((1, 0.6), (2, 0.7), (3, 0.8)):
        _run(tmp_path, "semi_cv", "unet3d", fold=fold, iou=v)
    _run(tmp_path, "semi_cv", "unet3d", fold=1, iou=0.4, seed=1)  # second seed: averaged
    _run(tmp_path, "full_auto", "unet2d", fold=2, iou=0.25)
    for setup in (1, 2, 3, 4):
        _run(tmp_path, "slice_sweep", "unet3d", sample=2, setup=setup, iou=0.2 * setup)
    (tmp_path / "unfinished").mkdir()
    assert len(find_runs([tmp_path])) == 9
    text = build_report([tmp_path], tmp_path / "report.md")
    lines = text.splitlines()
    row1 = next(line for line in lines if line.startswith("| 1 |") and "0.855" in line)
    assert "0.500 (n=2)" in row1  # mean of 0.6 and 0.4 beside the paper's 0.855
    assert "| 0.500 (n=2) | 0.855 | 0.400 (n=2) |" in row1  # all voxels beside it
    assert "0.550" not in text  # heldout_all is not the headline
    assert "earlier version" not in text
    avg = next(line for line in lines if line.startswith("| **average**") and "0.863" in line)
    assert "0.625 (n=4)" in avg
    sweep = next(line for line in lines if line.startswith("| 5,5,3"))
    assert "0.800" in sweep and "0.849" in sweep and "12.0%" in sweep
    t3 = next(line for line in lines if line.startswith("| 2 |") and "0.698" in line)
    assert "0.250" in t3
    assert (tmp_path / "report.png").stat().st_size > 5000
    assert (tmp_path / "report.md").read_text() == text


def test_report_does_not_import_torch(tmp_path):
    _run(tmp_path, "semi_cv", "unet3d")
    code = (
        "import sys; from sparse3d.report import main; "
        f"main([{str(tmp_path)!r}, '--out', {str(tmp_path / 'r.md')!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Table 1" in (tmp_path / "r.md").read_text()


def test_no_runs_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sparse3d.report", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode != 0 and "no finished run" in r.stderr


def test_old_run_folders_with_dense_are_read(tmp_path):
    """Run folders written before "dense" became "all_voxels" still fill the tables."""
    _run(tmp_path, "semi_cv", "unet3d", fold=1, iou=0.6, legacy=True)
    _run(tmp_path, "semi_cv", "unet3d", fold=2, iou=0.7)
    text = build_report([tmp_path], tmp_path / "report.md")
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "| 0.600 | 0.855 | 0.500 |" in row1
    row2 = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert "| 0.700 | 0.871 | 0.600 |" in row2
    assert "1 run(s) come from an earlier version" in text


def test_paper_results_ship_inside_the_package(tmp_path):
    """The paper's numbers are package data (a wheel install has no ``experiments/``)."""
    from importlib import resources

    import tomllib

    from sparse3d.report import PAPER_RESULTS, paper_results

    assert resources.files("sparse3d").joinpath(PAPER_RESULTS).is_file()
    paper = paper_results()
    assert paper["semi_cv"]["rows"]["1"]["unet3d"] == 0.855
    assert paper["full_auto"]["rows"]["3"]["unet2d"] == 0.325
    assert paper["slice_sweep"]["setups"]["4"] == "5,5,3"
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert PAPER_RESULTS in pyproject["tool"]["setuptools"]["package-data"]["sparse3d"]
    assert not (Path(__file__).parents[1] / "experiments" / PAPER_RESULTS).exists()  # one copy
    # the report runs from anywhere: no path relative to a source checkout
    _run(tmp_path, "semi_cv", "unet3d")
    r = subprocess.run(
        [sys.executable, "-m", "sparse3d.report", str(tmp_path), "--out", "r.md"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "0.855" in (tmp_path / "r.md").read_text()


def test_fold_comes_from_metrics_json_not_split_json(tmp_path):
    """split.json numbers folds 1..3 now (0..2 before); the report reads the fold from
    metrics.json, which always held the command line's 1-based ``fold``, so old and new run
    folders land in the same rows."""
    old = _run(tmp_path, "semi_cv", "unet3d", fold=1, iou=0.6)
    write_json_atomic(old / "split.json", {"name": "semi_cv_fold0", "meta": {"fold": 0}})
    new = _run(tmp_path, "semi_cv", "unet3d", fold=1, iou=0.4, seed=1)
    write_json_atomic(new / "split.json", {"name": "semi_cv_fold1", "meta": {"fold": 1}})
    text = build_report([tmp_path], tmp_path / "report.md")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| 1 |") and "0.500 (n=2)" in line for line in rows)
    assert not any(line.startswith("| 0 |") for line in rows)


_RF_TABLES = """# RF beside the 3D U-Net

### Table 1 — semi-automated segmentation, 3-fold cross-validation (IoU)

| test slices | RF held-out | RF held-out incl. crossings | RF all voxels | 3D with BN paper | RF s |
|---|---|---|---|---|---|
| 1 | 0.870 | 0.871 | 0.866 | 0.855 | 76 |
| 2 | 0.840 | 0.847 | 0.849 | 0.871 | 62 |
| **average** | 0.999 | 0.856 | 0.856 | 0.863 | 201 (sum) |

### Table 2 — effect of the number of annotated slices (IoU)

| GT slices | sample | RF held-out | RF held-out incl. crossings | RF all voxels | RF s |
|---|---|---|---|---|---|
| 1,1,1 | 2 | 0.869 | 0.873 | 0.888 | 20 |
| 5,5,3 | 2 | 0.888 | 0.895 | 0.909 | 26 |
"""


def test_other_learners_tables_sit_beside_ours_job_by_job(tmp_path):
    runs = tmp_path / "runs"
    for fold, v in ((1, 0.6), (2, 0.7)):
        _run(runs, "semi_cv", "unet3d", fold=fold, iou=v)
    for setup in (1, 4):
        _run(runs, "slice_sweep", "unet3d", sample=2, setup=setup, iou=0.2 * setup)
    _run(runs, "full_auto", "unet3d", fold=1, iou=0.3)
    rf = tmp_path / "tables_rf.md"
    rf.write_text(_RF_TABLES)
    lines = build_report([runs], tmp_path / "report.md", [rf]).splitlines()
    head = next(line for line in lines if line.startswith("| test slices"))
    assert head.endswith("| RF (held-out) |")
    assert next(line for line in lines if line.startswith("| 1 | 0.600")).endswith("| 0.870 |")
    avg = next(line for line in lines if line.startswith("| **average** | 0.650"))
    assert avg.endswith("| 0.855 |")  # the mean of the RF's jobs, not its file's average row
    sweep_head = next(line for line in lines if line.startswith("| GT slices"))
    assert sweep_head.endswith("| S2 ours, all voxels | S2 RF |")
    assert next(line for line in lines if line.startswith("| 5,5,3")).endswith("| 0.888 |")
    t3_head = next(line for line in lines if line.startswith("| test volume"))
    assert "RF" not in t3_head  # the file has no Table 3


def test_a_missing_comparison_file_is_one_line(tmp_path):
    _run(tmp_path, "semi_cv", "unet3d")
    r = subprocess.run(
        [sys.executable, "-m", "sparse3d.report", str(tmp_path), "--compare", "nope.md"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and r.stderr.strip() == "error: --compare nope.md: no such file"
