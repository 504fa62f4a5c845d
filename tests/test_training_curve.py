"""The learning curve: the held-out evaluation every ``val_every_n_steps`` steps during training,
logged as ``val/iou`` and ``val/iou_<class>`` (metrics CSV, W&B)."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sparse3d.callbacks import PeriodicEvaluation, heldout_values
from sparse3d.cli import CONF_DIR
from sparse3d.evaluation import evaluate_volumes
from sparse3d.models import UNet
from sparse3d.train import train

CLASSES = ("inside_tubule", "tubule", "background")


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _val_steps(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    out = {}
    for r in rows:
        if r.get("val/iou"):
            out[int(r["step"])] = {k: float(v) for k, v in r.items() if k.startswith("val/") and v}
    return out


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _smoke(data: Path, runs: Path, extra: list[str]):
    return _compose(
        ["preset=smoke", "logger=none", f"data.root={data}", f"runs_root={runs}", *extra]
    )


@pytest.mark.slow
def test_training_logs_heldout_iou_every_n_steps(smoke_data, tmp_path):
    cfg = _smoke(smoke_data, tmp_path, ["trainer.max_steps=5", "val_every_n_steps=2"])
    run_dir = tmp_path / "run"
    metrics = train(cfg, run_dir)
    val = _val_steps(_csv_rows(run_dir))
    # steps 2 and 4 from the periodic evaluation, 5 (the last) from the evaluation after training
    assert sorted(val) == [2, 4, 5]
    for step in (2, 4, 5):
        for name in CLASSES:
            assert 0.0 <= val[step][f"val/iou_{name}"] <= 1.0
        assert val[step]["val/iou"] == pytest.approx(
            np.mean([val[step][f"val/iou_{n}"] for n in CLASSES])
        )
    assert val[2]["val/seconds"] > 0 and val[4]["val/seconds"] > 0
    assert val[5]["val/iou"] == pytest.approx(metrics["heldout"]["mean"])
    assert json.loads((run_dir / "metrics.json").read_text())["heldout"] == metrics["heldout"]


@pytest.mark.slow
def test_periodic_evaluation_does_not_change_training(smoke_data, tmp_path):
    """The same weights with and without the evaluations (random state and mode restored)."""
    weights = {}
    for every in (0, 1):
        cfg = _smoke(smoke_data, tmp_path, ["trainer.max_steps=3", f"val_every_n_steps={every}"])
        run_dir = tmp_path / f"every{every}"
        train(cfg, run_dir)
        weights[every] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)[
            "state_dict"
        ]
        steps = sorted(_val_steps(_csv_rows(run_dir)))
        assert steps == ([3] if every == 0 else [1, 2, 3])
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def _volume(name: str, rng: np.random.Generator, held_out: bool) -> types.SimpleNamespace:
    shape = (20, 24, 24)
    dense = rng.integers(0, 3, shape).astype(np.uint8)
    label = np.full(shape, 3, np.uint8)
    if held_out:
        label[7] = dense[7]
        label[:, 11] = dense[:, 11]
    return types.SimpleNamespace(
        name=name,
        image=rng.standard_normal((2, *shape)).astype(np.float32),
        eval_label=label,
        eval_label_all=None,
        dense_label=dense,
    )


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_periodic_values_are_the_final_evaluations(norm):
    """One predictor, one score: the callback's value is the after-training evaluation's."""
    rng = np.random.default_rng(0)
    vols = [_volume("a", rng, True), _volume("b", rng, True), _volume("c", rng, False)]
    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=2, norm=norm)
    net.train()
    cb = PeriodicEvaluation(vols, CLASSES, 3, every_n_steps=5)
    assert [v.name for v in cb.volumes] == ["a", "b"]  # nothing held out in "c": not predicted
    before = torch.get_rng_state()
    values = cb.evaluate(net)
    assert torch.equal(torch.get_rng_state(), before) and net.training
    scores, _ = evaluate_volumes(net, vols, CLASSES, 3)
    assert values.items() >= heldout_values(scores["heldout"]).items()
    assert set(values) == {"val/iou", "val/seconds", *(f"val/iou_{c}" for c in CLASSES)}


def test_callback_fires_at_multiples_and_skips_the_last_step():
    logged = []
    lg = types.SimpleNamespace(
        log_metrics=lambda values, step: logged.append(step), save=lambda: None
    )
    rng = np.random.default_rng(1)
    cb = PeriodicEvaluation([_volume("a", rng, True)], CLASSES, 3, every_n_steps=3, skip_steps=[9])
    module = types.SimpleNamespace(net=UNet(2, 3, base_channels=2, depth=2))
    for step in range(1, 11):
        trainer = types.SimpleNamespace(global_step=step, is_global_zero=True, loggers=[lg])
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    assert logged == [3, 6] and [s for s, _ in cb.history] == [3, 6]
    with pytest.raises(ValueError, match="every_n_steps"):
        PeriodicEvaluation([], CLASSES, 3, every_n_steps=0)
