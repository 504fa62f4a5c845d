"""The training system: every config composes, every experiment runs end to end (smoke)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sparse3d.cli import CONF_DIR
from sparse3d.train import train

EXPERIMENTS = ("semi_cv", "slice_sweep", "full_auto")
MODELS = ("unet3d", "unet3d_nobn", "unet2d")
PRESETS = ("cpu", "paper", "smoke")
AUGMENTS = ("paper", "none", "monai_elastic", "monai_affine")


def _compose(overrides: list[str], hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_config_composes(experiment, model, preset):
    from hydra.utils import instantiate

    cfg = _compose([f"experiment={experiment}", f"model={model}", f"preset={preset}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment.name == experiment and cfg.preset_name == preset
    net = instantiate(cfg.model.net)
    tile = cfg.data.input_tile if net.dim == 3 else cfg.data.input_tile_2d
    out = net.output_shape(tuple(tile))  # the preset's tile is legal for the model
    assert all(o > 0 for o in out)


def test_paper_preset_is_the_paper():
    cfg = _compose(["preset=paper"])
    assert cfg.trainer.max_steps == 70000 and list(cfg.data.input_tile) == [116, 132, 132]
    assert cfg.model.net.base_channels == 32 and cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.momentum == 0.99


@pytest.mark.parametrize("augment", AUGMENTS)
def test_augment_configs_build(augment):
    from sparse3d.experiment import build_transform

    cfg = _compose([f"augment={augment}"])
    t = build_transform(
        cfg.augment,
        {
            "spatial_size": (20, 24, 24),
            "label_spatial_size": (8, 8, 8),
            "voxel_size_zyx_um": (2.0, 1.7, 1.7),
            "ignore_index": 3,
        },
    )
    if augment == "none":
        assert t is None
        return
    g = torch.Generator().manual_seed(0)
    d = t(
        {
            "image": torch.rand(3, 28, 32, 32, generator=g),
            "label": torch.randint(0, 4, (28, 32, 32), generator=g),
        }
    )
    assert tuple(d["image"].shape) == (3, 20, 24, 24)
    lab = torch.as_tensor(d["label"])
    assert set(torch.unique(lab).tolist()) <= {0, 1, 2, 3}


def test_slurm_launcher_composes():
    cfg = _compose(["hydra/launcher=slurm"], hydra_cfg=True)
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_ddp_trainer_config():
    cfg = _compose(["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer._target_.endswith("Trainer")


# -- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _smoke_cfg(data_root: Path, runs: Path, extra: list[str] = ()):
    cfg = _compose(
        ["preset=smoke", "logger=none", f"data.root={data_root}", f"runs_root={runs}", *extra]
    )
    return cfg


def _run_dir(cfg, runs: Path) -> Path:
    return runs / cfg.run_name


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,model",
    [
        ("semi_cv", "unet3d"),
        ("semi_cv", "unet2d"),
        ("slice_sweep", "unet3d_nobn"),
        ("full_auto", "unet3d"),
    ],
)
def test_fast_dev_run_each_experiment(experiment, model, smoke_data, tmp_path):
    runs = tmp_path / "runs"
    cfg = _smoke_cfg(smoke_data, runs, [f"experiment={experiment}", f"model={model}"])
    run_dir = _run_dir(cfg, runs)
    metrics = train(cfg, run_dir)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["steps"] == cfg.trainer.max_steps
    held = on_disk["heldout"]
    assert set(held["iou"]) == {"inside_tubule", "tubule", "background"}
    assert 0.0 <= held["mean"] <= 1.0 and held["labelled_voxels"] > 0
    held_all = on_disk["heldout_all"]  # crossings with training slices included
    if experiment == "full_auto":  # the test volume has no training slice
        assert held_all["labelled_voxels"] == held["labelled_voxels"]
    else:  # test slices cross training slices of the same volume
        assert held_all["labelled_voxels"] > held["labelled_voxels"]
    assert "dense" not in on_disk
    assert (
        on_disk["all_voxels"] is not None
        and on_disk["all_voxels"]["labelled_voxels"] >= held_all["labelled_voxels"]
    )
    for f in ("config.yaml", "split.json", "checkpoints/last.ckpt"):
        assert (run_dir / f).exists(), f
    assert list((run_dir / "predictions").glob("*.h5")) and list(
        (run_dir / "predictions").glob("*.png")
    )
    split = json.loads((run_dir / "split.json").read_text())
    assert split["test"] and split["train"]
    saved = OmegaConf.load(run_dir / "config.yaml")  # the network as the data made it
    assert saved.model.net.in_channels == 3 and saved.model.net.num_classes == 3


@pytest.mark.slow
def test_square_root_class_weights_are_the_balanced_ones_softened(smoke_data, tmp_path):
    import numpy as np

    weights = {}
    for kind in ("balanced", "sqrt"):
        runs = tmp_path / kind
        cfg = _smoke_cfg(smoke_data, runs, [f"loss.class_weights={kind}", "trainer.max_steps=1"])
        weights[kind] = np.array(train(cfg, _run_dir(cfg, runs))["class_weights"])
    full, half = weights["balanced"], weights["sqrt"]
    assert full.max() / full.min() > half.max() / half.min() > 1.0
    np.testing.assert_allclose(half / half[-1], np.sqrt(full / full[-1]), rtol=1e-9)


@pytest.mark.slow
def test_finished_job_is_skipped_and_resume_is_exact(smoke_data, tmp_path):
    runs = tmp_path / "runs"
    common = ["trainer.max_steps=4", "checkpoint_every_n_steps=2", "data.samples_per_epoch=2"]
    cfg = _smoke_cfg(smoke_data, runs, common)
    full_dir = runs / "full"
    train(cfg, full_dir)
    stamp = (full_dir / "metrics.json").stat().st_mtime_ns
    train(cfg, full_dir)  # finished: skipped
    assert (full_dir / "metrics.json").stat().st_mtime_ns == stamp

    part = runs / "part"
    train(_smoke_cfg(smoke_data, runs, [*common[:1], "trainer.max_steps=2", *common[1:]]), part)
    ckpt = part / "checkpoints" / "last.ckpt"
    resumed = _smoke_cfg(smoke_data, runs, [*common, f"ckpt_path={ckpt}"])
    train(resumed, part)
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    # bit-exact on the CPU; on CUDA MaxPool3d's backward accumulates with atomics (no
    # deterministic kernel), so the resumed weights agree to rounding only
    exact = not torch.cuda.is_available()
    for k in a:
        if exact or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "sparse3d.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["experiment=nonsense"], "unknown experiment 'nonsense'"),
        (["fold=9"], "fold=9 is out of range"),
        (["data.input_tile=[45,44,44]"], "nearest legal sizes"),
        (["loss.class_weights=inverse"], "loss.class_weights must be balanced, sqrt"),
        (
            ["data.generate_if_missing=false", "data.root=/nonexistent"],
            "python -m sparse3d.data.synth",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, needle, smoke_data, tmp_path):
    r = _cli(
        ["preset=smoke", "logger=none", f"data.root={smoke_data}", f"runs_root={tmp_path}", *args],
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_with_offline_wandb(smoke_data, tmp_path):
    r = _cli(
        [
            "experiment=semi_cv",
            "fold=1",
            "preset=smoke",
            "val_every_n_steps=1",
            f"data.root={smoke_data}",
            f"runs_root={tmp_path}",
        ],
        cwd=tmp_path,
        env_extra={"WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = next(tmp_path.rglob("metrics.json")).parent
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    record = next(offline[0].glob("*.wandb")).read_bytes()
    # the learning curve is in the W&B run: the periodic evaluation's keys
    assert b"val/iou" in record and b"val/iou_tubule" in record and b"val/seconds" in record


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_one_model(smoke_data, tmp_path):
    r = _cli(
        [
            "preset=smoke",
            "logger=none",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"data.root={smoke_data}",
            f"runs_root={tmp_path}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert m["world_size"] == 2 and m["ranks_in_sync"] is True


def test_training_leaves_the_process_group(tmp_path):
    """After training every rank leaves the group (a rank exiting with it alive can abort and
    take the first rank down with it); with no group it does nothing."""
    import torch.distributed as dist

    from sparse3d import fitting

    fitting.leave_process_group()  # no group: no error
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    fitting.leave_process_group()
    assert not dist.is_initialized()


def test_wheel_ships_the_config_tree(tmp_path):
    """A non-editable install finds conf/ inside the package (setup.py copies it there)."""
    pytest.importorskip("setuptools")
    repo = CONF_DIR.parent
    if not (repo / "setup.py").is_file():
        pytest.skip("not running from a source checkout")
    src = tmp_path / "proj"  # the working tree's packaging files, committed or not
    for name in ("src", "conf"):
        shutil.copytree(
            repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("sparse3d-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    tree = tmp_path / "site" / "sparse3d" / "conf"
    wanted = sorted(p.relative_to(CONF_DIR) for p in CONF_DIR.rglob("*.yaml"))
    assert sorted(p.relative_to(tree) for p in tree.rglob("*.yaml")) == wanted
    code = "import sparse3d.cli as c; print(c.CONF_DIR)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.stdout.strip() == str(tree), out.stderr


# -- every volume is checked, W&B runs are closed ------------------------------------------------
def _volume_file(path: Path, voxel=(2.0, 1.0, 1.0), classes=("fg", "bg"), channels=("ch0",)):
    from sparse3d.data.volume import VolumeMeta, write_volume
    from sparse3d.labels import LabelSpec

    image = np.random.default_rng(0).random((len(channels), 8, 10, 12), dtype=np.float32)
    label = np.full((8, 10, 12), len(classes), dtype=np.uint8)
    label[4] = 0
    label[4, :5] = 1
    meta = VolumeMeta(
        voxel_size_zyx_um=voxel,
        channel_names=tuple(channels),
        labels=LabelSpec(tuple(classes), len(classes)),
        annotated_slices={"z": (4,), "y": (), "x": ()},
    )
    write_volume(path, image, label, meta)
    return path


@pytest.mark.parametrize(
    "other,needle",
    [
        ({"voxel": (2.0, 1.0, 1.5)}, "voxel size"),
        ({"classes": ("fg", "edge", "bg")}, "class names"),
        ({"channels": ("ch0", "ch1")}, "channels"),
    ],
)
def test_volumes_of_another_kind_are_refused_in_one_line(tmp_path, other, needle):
    from sparse3d.cli import UserError
    from sparse3d.experiment import read_facts

    a = _volume_file(tmp_path / "a.h5")
    b = _volume_file(tmp_path / "b.h5", **other)
    with pytest.raises(UserError, match=needle) as err:
        read_facts({"a": a, "b": b})
    assert "\n" not in str(err.value) and str(b) in str(err.value)
    near = _volume_file(tmp_path / "c.h5", voxel=(2.0, 1.0, 1.004))  # rounding: accepted
    assert read_facts({"a": a, "c": near}).voxel_size_zyx_um == (2.0, 1.0, 1.0)


def test_wandb_run_is_finished_when_a_job_fails(monkeypatch, tmp_path):
    """A failing job of a multirun sweep still closes its W&B run (else the next job's run
    inherits it)."""
    import types

    import wandb

    from sparse3d import experiment, fitting

    finished = []
    monkeypatch.setattr(wandb, "finish", lambda *a, **k: finished.append(True))
    job = types.SimpleNamespace(
        split=types.SimpleNamespace(to_dict=lambda: {}),
        net_cfg={"in_channels": 1, "num_classes": 2},
    )
    monkeypatch.setattr(experiment, "build", lambda cfg: job)
    monkeypatch.setattr("sparse3d.train._save_config", lambda cfg, job, path: None)
    monkeypatch.setattr(fitting, "make_loggers", lambda cfg, run_dir: ([], object()))
    monkeypatch.setattr(fitting, "periodic_evaluation", lambda cfg, job: None)

    def broken_trainer(cfg, run_dir, loggers, extra_callbacks=()):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fitting, "make_trainer", broken_trainer)
    cfg = _compose(["preset=smoke"])
    with pytest.raises(RuntimeError, match="out of memory"):
        train(cfg, tmp_path / "run")
    assert finished == [True]


def test_own_volumes_are_given_with_one_override(tmp_path):
    """``data=files data.paths={name: file}`` composes (an empty-dict default refused it)."""
    from sparse3d.cli import UserError
    from sparse3d.experiment import resolve_volumes

    a = _volume_file(tmp_path / "a.h5")
    cfg = _compose(["data=files", f"data.paths={{first: {a}}}"])
    assert list(cfg.data.volumes) == ["first"]
    assert resolve_volumes(cfg.data) == {"first": a}
    with pytest.raises(UserError, match="no volumes given"):
        resolve_volumes(_compose(["data=files"]).data)
