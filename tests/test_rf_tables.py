"""experiments/rf_tables.py: its pooling, quoting and table helpers on tiny inputs (no forest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sparse3d.report import paper_results

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rf_tables", ROOT / "experiments" / "rf_tables.py")
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)
IGN = 9
NAMES = ("a", "b")


def test_pooled_training_keeps_labelled_voxels_of_every_volume_in_order():
    f1 = np.arange(2 * 1 * 2 * 2, dtype=np.float32).reshape(2, 1, 2, 2)
    l1 = np.array([[[0, IGN], [1, IGN]]], np.uint8)
    f2 = -np.ones((2, 1, 1, 3), np.float32)
    l2 = np.array([[[IGN, 1, IGN]]], np.uint8)
    x, y = rt.pooled_training([(f1, l1), (f2, l2)], IGN)
    assert x.shape == (2, 3, 1, 1) and y.shape == (3, 1, 1)
    np.testing.assert_array_equal(x[:, :, 0, 0], [[0, 2, -1], [4, 6, -1]])
    np.testing.assert_array_equal(y.ravel(), [0, 1, 1])


def _vol(name, held, held_all=None, dense=None):
    return SimpleNamespace(name=name, eval_label=held, eval_label_all=held_all, dense_label=dense)


def test_pooled_scores_pool_confusions_over_volumes_not_iou():
    # volume 1: 2 voxels of class 0 right; volume 2: one class-1 voxel called 0, one right
    v1 = _vol("v1", np.array([[[0, 0, IGN]]]), dense=np.array([[[0, 0, 1]]]))
    v2 = _vol("v2", np.array([[[1, 1]]]), held_all=np.array([[[1, 0]]]), dense=np.array([[[1, 1]]]))
    preds = {"v1": np.array([[[0, 0, 1]]]), "v2": np.array([[[0, 1]]])}
    s = rt.pooled_scores(preds, [v1, v2], NAMES, IGN)
    # held-out pooled: class 0 tp 2, fp 1 -> 2/3; class 1 tp 1, fn 1 -> 1/2
    assert s["heldout"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # incl. crossings: v1 falls back to its held-out label; v2 gets [1, 0] vs pred [0, 1]
    assert s["heldout_all"] == pytest.approx((2 / 4 + 0 / 2) / 2)
    # all voxels: class 0 tp 2, fp 1 -> 2/3; class 1 tp 2, fn 1 -> 2/3
    assert s["all_voxels"] == pytest.approx(2 / 3)
    assert rt.pooled_scores(preds, [_vol("v1", v1.eval_label)], NAMES, IGN)["all_voxels"] is None


def test_unet_figures_are_quoted_from_the_results_files():
    res = ROOT / "experiments" / "results"
    q = rt.unet_quotes(
        (res / "tables_cpu.md").read_text(),
        paper_results()["slice_sweep"]["setups"],
    )
    assert len(q) == 3 + 12 + 3
    assert q[(1, (1,))] == (0.856, 0.853)  # Table 1, test slices 1
    assert q[(3, (3,))] == (0.739, 0.730)  # Table 3, test volume 3
    assert q[(2, (1, 3))] == (0.807, 0.797)  # (1,1,1) slices, sample 3
    assert q[(2, (4, 2))] == (0.858, 0.851)  # (5,5,3) slices, sample 2


def test_table_lines_rows_and_average():
    paper = paper_results()
    res = {(f,): ({"heldout": 0.5 + f / 10, "all_voxels": 0.4}, 10.0) for f in (1, 2, 3)}
    unet = {(3, (f,)): (0.7, 0.6) for f in (1, 2)}  # fold 3 missing: no average
    lines = rt.table_lines(3, res, unet, paper)
    assert lines[2].startswith("| test volume | RF held-out | RF all voxels | 3D with BN ours")
    assert lines[4] == "| 1 | 0.600 | 0.400 | 0.700 | 0.600 | 0.761 | 10 |"
    assert lines[6] == "| 3 | 0.800 | 0.400 | – | – | 0.554 | 10 |"
    assert lines[7] == "| **average** | 0.700 | 0.400 | – | – | 0.704 | 30 (sum) |"
    sweep = {k: ({"heldout": 0.5, "heldout_all": 0.6, "all_voxels": 0.4}, 1.0) for k in rt.JOBS[2]}
    rows = rt.table_lines(2, sweep, {}, paper)
    assert rows[4].startswith("| 1,1,1 | 1 | 0.500 | 0.600 | 0.400 | – | – | 0.331 |")
    paper_mean = np.mean([v for r in paper["slice_sweep"]["rows"].values() for v in r.values()])
    assert rows[-2].endswith(f"| {paper_mean:.3f} | 12 (sum) |")


def test_table_lines_name_the_learner():
    res = {(f,): ({"heldout": 0.5, "heldout_all": 0.6, "all_voxels": 0.4}, 2.0) for f in (1, 2, 3)}
    lines = rt.table_lines(1, res, {}, paper_results(), "refine")
    assert lines[2].startswith("| test slices | refine held-out | refine held-out incl. crossings")
    assert lines[2].endswith("| 3D with BN paper | refine s |")


def test_refine_refuses_table_3_before_any_work(capsys):
    # Table 3's test volumes carry no annotated slice for refine to learn from
    with pytest.raises(SystemExit) as exit_info:
        rt.main(["--method", "refine", "--tables", "1,3"])
    assert exit_info.value.code == 2
    assert "Tables 1 and 2 only" in capsys.readouterr().err
