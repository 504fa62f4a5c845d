"""The learning-rate schedule group: ``scheduler=constant`` (default) and ``scheduler=onecycle``."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from sparse3d.cli import CONF_DIR


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _lrs(cfg, steps: int) -> list[float]:
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    sched = instantiate(cfg.scheduler)(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_default_schedule_is_the_optimisers_constant_rate():
    for preset in ("smoke", "paper"):
        assert _compose([f"preset={preset}"]).scheduler is None
    for preset in ("cpu", "laptop"):  # the CPU presets' recipe (experiments/results/recipe_cpu.md)
        cfg = _compose([f"preset={preset}"])
        assert cfg.scheduler.total_steps == cfg.trainer.max_steps
        assert cfg.scheduler.max_lr == cfg.optimizer.lr == 0.003


def test_onecycle_warms_up_to_the_optimisers_rate_and_decays_to_almost_nothing():
    cfg = _compose(
        [
            "preset=smoke",
            "scheduler=onecycle",
            "optimizer=adam",
            "optimizer.lr=0.002",
            "trainer.max_steps=200",
        ]
    )
    lrs = _lrs(cfg, 200)  # as many steps as the trainer takes: no error at the last one
    peak = max(range(200), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(0.002 / 25)
    assert lrs[peak] == pytest.approx(0.002, rel=1e-3)
    assert 15 <= peak <= 25  # pct_start 0.1 of 200 steps
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True))
    assert lrs[-1] < 0.002 / 1000


def test_onecycle_stretches_with_the_run_and_takes_its_own_peak():
    cfg = _compose(
        ["preset=smoke", "scheduler=onecycle", "scheduler.max_lr=0.01", "trainer.max_steps=1000"]
    )
    assert cfg.scheduler.total_steps == 1000
    lrs = _lrs(cfg, 1000)
    assert max(lrs) == pytest.approx(0.01, rel=1e-3)
    assert 95 <= max(range(1000), key=lrs.__getitem__) <= 105


@pytest.mark.slow
def test_training_follows_the_schedule(tmp_path):
    from sparse3d.train import train

    cfg = _compose(
        [
            "preset=smoke",
            "logger=none",
            f"data.root={tmp_path / 'data'}",
            f"runs_root={tmp_path}",
            "scheduler=onecycle",
            "optimizer=adam",
            "optimizer.lr=0.004",
            "trainer.max_steps=6",
            "val_every_n_steps=0",
        ]
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    with open(run_dir / "csv" / "metrics.csv") as f:
        lrs = [float(r["lr-Adam"]) for r in csv.DictReader(f) if r.get("lr-Adam")]
    assert lrs[0] == pytest.approx(0.004 / 25)
    assert max(lrs) == pytest.approx(0.004, rel=1e-3)
    assert lrs[-1] < lrs[0]


def test_onecycle_runs_for_a_handful_of_steps():
    cfg = _compose(["preset=smoke", "scheduler=onecycle", "trainer.max_steps=3"])
    lrs = _lrs(cfg, 3)
    assert lrs[1] > lrs[0]
