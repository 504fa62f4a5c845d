"""The densify development benchmark: python -m sparse3d.bench (sparse3d.bench)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparse3d.bench import command as bench
from sparse3d.data import realcases
from sparse3d.data.annotation import slice_mask


def _tiny(workdir: Path | None = None) -> realcases.Case:
    """A bright ball (class 1) in a dim, noisy background (class 0): (1, 24, 40, 40)."""
    del workdir
    z, y, x = np.indices((24, 40, 40))
    truth = ((z - 12) ** 2 + (y - 20) ** 2 + (x - 18) ** 2 < 81).astype(np.uint8)
    noise = np.random.default_rng(0).normal(0, 5, truth.shape)
    image = (np.where(truth == 1, 120.0, 40.0) + noise).astype(np.float32)[None]
    return realcases.Case(
        "tiny", image, truth, ("outside", "ball"), (2.0, 1.0, 1.0), ("stain",), "test ball"
    )


@pytest.fixture()
def tiny_case(monkeypatch):
    monkeypatch.setitem(realcases.CASES, "tiny", (_tiny, None))
    return "tiny"


def _cheap_method() -> str:
    """densify's random forest with 5 trees."""
    return "cheap:method=rf rf.n_trees=5 rf.n_jobs=1"


def _record(case, k, label, mean, status="ok", overrides="", **extra):
    return {
        "case": case,
        "k": k,
        "label": label,
        "overrides": overrides,
        "status": status,
        "error": None if status == "ok" else "ValueError: boom",
        "unannotated": {"iou/a": mean, "iou/b": mean, "iou/mean": mean},
        "all_voxels": {"iou/a": mean, "iou/b": mean, "iou/mean": mean + 0.01},
        "class_names": ["a", "b"],
        "annotated_fraction": 0.1,
        "wall_s": 12.0,
        "peak_rss_gib": 0.5,
        **extra,
    }


ENV = {"cpu_capability": "AVX2", "nproc": 2, "commit": "abc1234", "date": "2030-01-01"}


def test_parse_method_splits_label_and_overrides():
    assert bench.parse_method("rf:method=rf") == ("rf", "method=rf")
    assert bench.parse_method("unet:") == ("unet", "")
    label, ovr = bench.parse_method("w:loss.class_weights=null  data.tile=[1,2]")
    assert label == "w" and ovr == "loss.class_weights=null 'data.tile=[1,2]'"
    assert bench.parse_method(f"w:{ovr}") == (label, ovr)  # canonical form is stable
    for bad in ("noseparator", ":x=1", "a b:x=1", "x:out=elsewhere", "x:inputs=[a.h5]"):
        with pytest.raises(bench.BenchError):
            bench.parse_method(bad)


def test_error_line_finds_the_message():
    hydra = "$ python -m x\nCould not override 'k'.\nKey 'k' is not in struct\n\n"
    hydra += "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    assert bench.error_line(hydra) == "Could not override 'k'."
    trace = "Traceback (most recent call last):\n  File 'x'\nValueError: boom\n"
    assert bench.error_line(trace) == "ValueError: boom"
    assert bench.error_line("noise\nerror: input x does not exist\n") == (
        "error: input x does not exist"
    )
    assert bench.error_line("") == "no output"


def test_run_child_measures_wall_time_and_peak_memory(tmp_path):
    log = tmp_path / "child.log"
    cmd = [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"]
    res = bench.run_child(cmd, log)
    assert res["returncode"] == 0 and res["wall_s"] > 0
    assert 0.29 < res["peak_rss_gib"] < 2.0
    failed = bench.run_child([sys.executable, "-c", "raise SystemExit(3)"], log)
    assert failed["returncode"] == 3
    assert log.read_text().startswith("$ ")
    assert not list(tmp_path.glob(".*rusage*"))


def test_run_child_peak_memory_excludes_the_benchmarks_own(tmp_path):
    """A forked child inherits its parent's high-water mark: the benchmark's memory must not
    show up as the command's."""
    ballast = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident in this process
    res = bench.run_child([sys.executable, "-c", "pass"], tmp_path / "child.log")
    assert ballast.sum() > 0
    assert res["returncode"] == 0 and res["peak_rss_gib"] < 0.2


def test_score_run_counts_iou_itself_where_densify_json_lacks_it(tmp_path):
    case = _tiny()
    h5, planes = realcases.write_case(case, 1, tmp_path / "tiny_k1.h5")
    run = tmp_path / "run"
    run.mkdir()
    pred = case.truth.copy()
    pred[0] = 1  # a wrong slab off the planes
    with h5py.File(run / "tiny_k1_seg.h5", "w") as f:
        f["labels"] = pred
    from sparse3d.metrics import confusion_matrix, iou_summary

    off = ~slice_mask(case.shape_zyx, planes)
    expected_un = iou_summary(confusion_matrix(pred[off], case.truth[off], 2, 2), case.class_names)
    expected_all = iou_summary(confusion_matrix(pred, case.truth, 2, 2), case.class_names)
    (run / "densify.json").write_text(
        json.dumps({"volumes": {"tiny_k1": {"unannotated": expected_un}}})
    )
    s = bench.score_run(run, h5)
    assert s["unannotated_source"] == "densify.json" and s["all_voxels_source"] == "bench"
    assert s["unannotated"]["mean"] == pytest.approx(expected_un["mean"])
    assert s["all_voxels"]["mean"] == pytest.approx(expected_all["mean"])
    assert s["all_voxels"]["mean"] < 1.0
    assert s["crosscheck_max_abs_diff"] == pytest.approx(0.0)
    assert s["class_names"] == ["outside", "ball"]
    assert s["annotated_fraction"] == pytest.approx(1 - off.mean())


def test_table_has_every_run_a_pivot_and_the_margin_over_rf(tmp_path):
    records = [
        _record("c1", 1, "rf", 0.5, overrides="method=rf"),
        _record("c1", 1, "unet", 0.3),
        _record("c1", 1, "unet", 0.7),  # a later record of the same run wins
        _record("c1", 2, "rf", 0.6, overrides="method=rf"),
        _record("c1", 2, "unet", 0.0, status="failed"),
    ]
    text = bench.render_table(tmp_path, records, ENV)
    assert "`AVX2`, nproc 2, 2030-01-01, commit `abc1234`" in text
    assert "| c1 | 1 | unet | 10.0% | 0.700 | a 0.700, b 0.700 | 0.710 | 12 | 0.50 |" in text
    assert "| c1 | 2 | unet | | failed: ValueError: boom |" in text
    pivot = text.split("## Mean IoU on unannotated voxels")[1]
    assert "| case | k | rf | unet |" in pivot
    assert "| c1 | 1 | 0.500 | 0.700 |" in pivot and "| c1 | 2 | 0.600 | – |" in pivot
    margin = text.split("## Margin over rf")[1]
    assert "| c1 | 1 | +0.200 |" in margin and "| **mean** | | +0.200 |" in margin
    assert "| rf | `method=rf` |" in text and "| unet | (defaults) |" in text
    no_rf = bench.render_table(tmp_path, [_record("c1", 1, "unet", 0.7)], ENV)
    assert "Margin over rf" not in no_rf


def test_read_results_ignores_a_torn_last_line(tmp_path):
    bench.append_result(tmp_path, _record("c1", 1, "rf", 0.5))
    with (tmp_path / bench.RESULTS).open("a") as f:
        f.write('{"case": "c1", "k"')
    assert [r["label"] for r in bench.read_results(tmp_path)] == ["rf"]


def test_benchmark_skips_finished_runs_and_retries_failed_ones(tiny_case, tmp_path, monkeypatch):
    calls = []

    def fake_bench_one(out, case, k, case_h5, label, overrides, env):
        calls.append((case, k, label))
        assert case_h5.is_file() and case_h5.name == f"{case}_k{k}.h5"
        ok = label != "flaky" or len(calls) > 4
        return _record(case, k, label, 0.5, status="ok" if ok else "failed", overrides=overrides)

    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    methods = [("rf", "method=rf"), ("flaky", "")]
    out = tmp_path / "b"
    bench.run_benchmark(out, [tiny_case], [1, 2], methods)
    assert len(calls) == 4 and len(bench.read_results(out)) == 4
    info = json.loads((out / "cases" / "tiny_k2.json").read_text())
    assert info["planes"]["z"] == [6, 18] and info["class_names"] == ["outside", "ball"]
    bench.run_benchmark(out, [tiny_case], [1, 2], methods)  # only the failed runs again
    assert calls[4:] == [("tiny", 1, "flaky"), ("tiny", 2, "flaky")]
    bench.run_benchmark(out, [tiny_case], [1, 2], methods)
    assert len(calls) == 6
    bench.run_benchmark(out, [tiny_case], [1], methods, force=True)
    assert len(calls) == 8


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert bench.main(["densify", "--cases", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown case(s) ['nope']" in capsys.readouterr().err
    args = ["densify", "--cases", "synth1", "--method", "a:", "--method", "a:x=1"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 2
    assert "unique" in capsys.readouterr().err
    assert bench.main(["densify", "--k", "0", "--out", str(tmp_path)]) == 2
    assert bench.main(["table", "--out", str(tmp_path / "none")]) == 2
    assert "run the benchmark first" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_end_to_end_on_a_tiny_case(tiny_case, tmp_path, capsys):
    out, table = tmp_path / "bench", tmp_path / "table.md"
    method = _cheap_method()
    args = ["densify", "--cases", tiny_case, "--k", "1", "--out", str(out), "--table", str(table)]
    assert bench.main([*args, "--method", method, "--method", "bad:no_such_key=1"]) == 0
    printed = capsys.readouterr().out
    assert (
        "[1/2] start  tiny k=1 cheap" in printed and "[2/2] done   tiny k=1 bad: FAILED" in printed
    )
    records = bench.read_results(out)
    assert [(r["label"], r["status"]) for r in records] == [("cheap", "ok"), ("bad", "failed")]
    ok, bad = records
    assert ok["unannotated"]["mean"] > 0.5 and ok["all_voxels"]["mean"] > 0.5
    assert ok["crosscheck_max_abs_diff"] == pytest.approx(0.0, abs=1e-6)
    assert ok["wall_s"] > 0 and 0.05 < ok["peak_rss_gib"] < 8
    assert (out / "runs" / "tiny" / "k1" / "cheap" / "tiny_k1_seg.h5").is_file()
    assert "no_such_key" in bad["error"]
    text = table.read_text()
    assert "| tiny | 1 | cheap |" in text and "| tiny | 1 | bad | | failed:" in text
    assert "| tiny | 24×40×40 | 38,400 | 2, 1, 1 |" in text
    # resumed: the finished run is skipped, the table is redone from results.jsonl
    assert bench.main([*args, "--method", method]) == 0
    assert "1 already done, 0 to run" in capsys.readouterr().out
    table.unlink()
    assert bench.main(["table", "--out", str(out), "--table", str(table)]) == 0
    assert "| tiny | 1 | cheap |" in table.read_text()
