"""The GPU and multi-process paths, checked on the CPU: collectives on the process group's
device, test-time BatchNorm kept under synchronised BatchNorm, SLURM/DDP configuration, rank
guards, evaluation sharding and device, data loading options."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import sparse3d.distributed as sd
from sparse3d.fitting import ranks_in_sync as _ranks_in_sync


class _RecordingStrategy:
    """Stands in for a Lightning strategy: records the device of what it is asked to gather."""

    def __init__(self, root_device: torch.device) -> None:
        self.root_device = root_device
        self.gathered_on: list[torch.device] = []

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.gathered_on.append(t.device)
        return torch.ones(2, dtype=torch.float64)


# -- 1: the rank-sync gather runs on the process group's device ----------------------------------
def test_rank_sync_gathers_on_the_strategy_device_not_the_module_device():
    """After fit, Lightning's teardown leaves the module on the CPU; NCCL needs CUDA tensors."""
    module = types.SimpleNamespace(net=nn.Linear(2, 2), device=torch.device("cpu"))
    strategy = _RecordingStrategy(torch.device("meta"))  # any device other than the module's
    assert _ranks_in_sync(types.SimpleNamespace(strategy=strategy), module) is True
    assert strategy.gathered_on == [torch.device("meta")]


@pytest.mark.parametrize(
    "backend,root,want",
    [
        ("nccl", "cuda:1", "cuda:1"),
        ("gloo", "cuda:1", "cpu"),
        ("gloo", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ],
)
def test_collective_device_follows_the_backend(monkeypatch, backend, root, want):
    monkeypatch.setattr(sd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sd.dist, "get_backend", lambda: backend)
    assert sd.collective_device(torch.device(root)) == torch.device(want)


def test_collective_device_without_a_process_group_is_the_training_device():
    assert sd.collective_device(torch.device("meta")) == torch.device("meta")


# -- 2: synchronised BatchNorm keeps the paper's test-time batch statistics ----------------------
def _compose(overrides: list[str], hydra_cfg: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sparse3d.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


class _Holder(torch.nn.Module):
    """Stands in for the LightningModule Lightning converts (the net is a child)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net


def _norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("trainer", ["ddp", "default"])
def test_sync_batchnorm_keeps_paper_batchnorm(trainer):
    """The configured model through Lightning's conversion path (``Trainer(sync_batchnorm=
    True)``: apply before fit, revert after) keeps PaperBatchNorm and its test-time statistics."""
    from hydra.utils import instantiate
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from sparse3d.fitting import trainer_extras as _trainer_extras
    from sparse3d.models.blocks import PaperBatchNorm, PaperSyncBatchNorm

    cfg = _compose(
        ["preset=smoke", "model=unet3d", f"trainer={trainer}", "++trainer.sync_batchnorm=true"]
    )
    torch.manual_seed(0)
    net = instantiate(cfg.model.net)
    assert cfg.model.net.bn_eval_stats == "batch" and _norms(net)
    x = torch.randn(1, 3, *net.input_shape_for_output((4, 4, 4)))
    with torch.no_grad():
        want = net.eval()(x)
    pl_trainer = instantiate(
        cfg.trainer,
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        **_trainer_extras(cfg.trainer),
    )
    layer_sync = pl_trainer.strategy._layer_sync
    assert isinstance(layer_sync, TorchSyncBatchNorm)
    # Lightning's own conversion path would lose the class and its eval_stats
    lost = TorchSyncBatchNorm().revert(
        TorchSyncBatchNorm().apply(_Holder(instantiate(cfg.model.net)))
    )
    assert not any(isinstance(m, PaperBatchNorm) for m in lost.modules())

    holder = layer_sync.apply(_Holder(net))  # what DDPStrategy.setup does before fit
    synced = _norms(holder)
    assert synced and all(isinstance(m, PaperSyncBatchNorm) for m in synced)
    assert all(m.eval_stats == "batch" for m in synced)
    with torch.no_grad():  # a single process evaluates with its own batch statistics
        torch.testing.assert_close(holder.net.eval()(x), want)
    back = layer_sync.revert(holder)  # what DDPStrategy.teardown does after fit
    norms = _norms(back)
    assert norms and all(type(m) is PaperBatchNorm and m.eval_stats == "batch" for m in norms)
    with torch.no_grad():
        torch.testing.assert_close(back.net.eval()(x), want)


def test_ddp_config_does_not_sync_batchnorm_by_default():
    """The paper normalises each GPU's tile by itself; synchronising is opt-in."""
    from sparse3d.fitting import trainer_extras as _trainer_extras

    cfg = _compose(["trainer=ddp", "trainer.precision=32-true"])
    assert cfg.trainer.sync_batchnorm is False and _trainer_extras(cfg.trainer) == {}


# -- 3: SLURM launcher and DDP agree; a local sweep with DDP is refused in one line --------------
@pytest.mark.parametrize(
    "extra,gpus,nodes",
    [
        ([], 1, 1),
        (["hydra.launcher.gpus_per_node=4"], 4, 1),
        (["hydra.launcher.gpus_per_node=2", "trainer.num_nodes=3"], 2, 3),
    ],
)
def test_slurm_launcher_matches_ddp(extra, gpus, nodes):
    from omegaconf import OmegaConf

    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", *extra], hydra_cfg=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert "SlurmLauncher" in launcher["_target_"]
    # Lightning under SLURM: one process per task, tasks per node = devices, nodes = num_nodes
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == gpus
    assert launcher["nodes"] == cfg.trainer.num_nodes == nodes
    assert cfg.trainer.devices == "auto"  # = the GPUs SLURM gives the job


def test_slurm_launcher_with_the_single_device_trainer():
    from omegaconf import OmegaConf

    cfg = _compose(["hydra/launcher=slurm"], hydra_cfg=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == cfg.trainer.devices == 1
    assert launcher["nodes"] == 1


@pytest.mark.parametrize(
    "launcher,devices,refused",
    [("basic", 2, True), ("basic", 1, False), ("slurm", 2, False)],
)
def test_local_sweep_with_ddp_is_refused(launcher, devices, refused):
    from sparse3d.cli import UserError
    from sparse3d.fitting import check_ddp_launch as _check_ddp_launch

    cfg = _compose(
        [f"hydra/launcher={launcher}", "trainer=ddp", f"trainer.devices={devices}"], hydra_cfg=True
    )
    target = cfg.hydra.launcher._target_
    _check_ddp_launch(cfg.trainer, "RUN", target)  # one job: Lightning's re-launch works
    if refused:
        with pytest.raises(UserError, match="hydra/launcher=slurm"):
            _check_ddp_launch(cfg.trainer, "MULTIRUN", target)
    else:
        _check_ddp_launch(cfg.trainer, "MULTIRUN", target)


@pytest.mark.slow
def test_parallel_launcher_runs_a_sweeps_jobs_side_by_side_on_a_share_of_the_cores(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import joblib

    cfg = _compose(["hydra/launcher=parallel"], hydra_cfg=True)
    assert "JoblibLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 2
    args = ["-m", "hydra/launcher=parallel", "experiment=semi_cv", "fold=1,2", "preset=smoke"]
    args += ["logger=none", f"data.root={tmp_path / 'data'}", f"runs_root={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run(
        [sys.executable, "-m", "sparse3d.train", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    found = sorted(tmp_path.glob("semi_cv/*/fold*-seed0/metrics.json"))
    assert [p.parent.name for p in found] == ["fold1-seed0", "fold2-seed0"]
    for p in found:  # joblib gives each of the two workers half the cores
        assert json.loads(p.read_text())["torch_threads"] == max(1, joblib.cpu_count() // 2)


def test_local_sweep_with_ddp_is_one_line_on_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    args = ["-m", "preset=smoke", "logger=none", "trainer=ddp", "trainer.accelerator=cpu"]
    args += ["trainer.devices=2", f"data.root={tmp_path / 'data'}", f"runs_root={tmp_path}"]
    r = subprocess.run(
        [sys.executable, "-m", "sparse3d.train", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "hydra/launcher=slurm" in err[0], r.stderr[-2000:]
    assert not (tmp_path / "data").exists()  # refused before any work


# -- 4: only rank 0 predicts and writes ----------------------------------------------------------
def test_is_global_zero_reads_the_launcher_environment(monkeypatch):
    for name in sd.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert sd.is_global_zero() and sd.global_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not sd.is_global_zero() and sd.global_rank() == 3
    monkeypatch.setenv("RANK", "0")  # torchrun's RANK comes first
    assert sd.is_global_zero()


def test_densify_predicts_and_writes_on_rank_zero_only(tmp_path, monkeypatch):
    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import sparse3d.densify.command as dz
    from sparse3d.cli import CONF_DIR
    from sparse3d.data.volume import VolumeMeta, write_volume
    from sparse3d.labels import LabelSpec

    shape = (8, 12, 12)
    label = np.full(shape, 2, np.uint8)
    label[4] = np.arange(12)[None, :] % 2
    meta = VolumeMeta((2.0, 1.0, 1.0), ("stain",), LabelSpec(("a", "b"), 2), {"z": (4,)})
    src = write_volume(tmp_path / "vol.h5", np.ones((1, *shape), np.float32), label, meta)
    out = tmp_path / "out"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "densify", overrides=["preset=smoke", "method=unet", f"out={out}", f"inputs=[{src}]"]
        )
    trained: list = []
    monkeypatch.setattr(dz, "train", lambda cfg, run_dir: trained.append(run_dir) or {})
    monkeypatch.setenv("RANK", "1")  # a second DDP process; no model.pt of its own
    summary = dz.densify(cfg)
    assert trained == [out / "run"] and summary["volumes"] == {}
    assert not (out / "densify.json").exists() and not list(out.glob("*_seg.*"))


# -- 5: trainer.deterministic=true does not crash on CUDA ----------------------------------------
@pytest.mark.parametrize("cuda,want", [(False, True), (True, "warn")])
def test_deterministic_true_becomes_warn_on_cuda(monkeypatch, cuda, want):
    from sparse3d.fitting import trainer_extras as _trainer_extras

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    fp32 = "trainer.precision=32-true"  # (auto, preset=cpu's, is resolved here too)
    cfg = _compose(["trainer.deterministic=true", fp32])
    extras = _trainer_extras(cfg.trainer)
    assert extras.get("deterministic", cfg.trainer.deterministic) == want
    assert _trainer_extras(_compose([fp32]).trainer) == {}  # the default: nothing to replace


# -- 6 and 7: evaluation counts each volume once under DDP; training loader options -------------
def _datamodule(tmp_path, n_volumes: int = 3, **kwargs):
    import numpy as np

    from sparse3d.data.volume import VolumeMeta, write_volume
    from sparse3d.datamodule import SparseDataModule
    from sparse3d.labels import LabelSpec

    shape = (10, 16, 16)
    labels = LabelSpec(("a", "b"), 2)
    paths = {}
    for i in range(n_volumes):
        rng = np.random.default_rng(i)
        dense = rng.integers(0, 2, shape).astype(np.uint8)
        meta = VolumeMeta((1.0, 1.0, 1.0), ("c",), labels)
        image = rng.random((1, *shape), dtype=np.float32)
        path = write_volume(tmp_path / f"v{i}.h5", image, dense, meta)
        paths[f"v{i}"] = str(path)
    dm = SparseDataModule(
        volume_paths=paths,
        train_slices={n: {"z": [2, 7]} for n in paths},
        test_slices={n: {"z": [5], "y": [3]} for n in paths},
        label_source="sparse",
        labels=labels,
        dim=3,
        input_tile=(8, 8, 8),
        output_tile=(4, 4, 4),
        samples_per_epoch=6,
        **kwargs,
    )
    dm.setup()
    return dm


def _fake_trainer(world: int = 1, rank: int = 0, device: str = "cpu", epoch: int = 0):
    strategy = types.SimpleNamespace(root_device=torch.device(device))
    return types.SimpleNamespace(
        world_size=world, global_rank=rank, strategy=strategy, current_epoch=epoch
    )


def test_training_loader_options(tmp_path):
    dm = _datamodule(tmp_path)
    loader = dm.train_dataloader()  # no trainer: no workers, pinned only with CUDA
    assert loader.num_workers == 0 and not loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    dm.trainer = _fake_trainer(device="cuda")
    assert dm.train_dataloader().pin_memory is True
    dm.trainer = _fake_trainer(device="cpu")
    assert dm.train_dataloader().pin_memory is False
    dm.pin_memory, dm.num_workers, dm.persistent_workers = False, 2, True
    loader = dm.train_dataloader()
    assert loader.pin_memory is False and loader.persistent_workers and loader.num_workers == 2


def test_persistent_workers_draw_each_epochs_tiles(tmp_path):
    """Workers kept from epoch to epoch never see ``set_epoch``: the epoch travels with the
    index, so epoch 1 gives epoch 1's tiles (as a fresh loader per epoch would)."""
    dm = _datamodule(tmp_path, num_workers=1, persistent_workers=True, pin_memory=False)
    dm.trainer = _fake_trainer(epoch=0)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    reference = dm.train_dataset()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # what Lightning does at the start of each epoch
        reference.set_epoch(epoch)
        got = torch.cat([b["image"] for b in loader])
        want = torch.stack([reference[i]["image"] for i in range(len(reference))])
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gpu_preset_feeds_the_gpu_and_cpu_presets_stay_in_process():
    paper = _compose(["preset=paper"])
    assert paper.data.num_workers > 0 and paper.data.persistent_workers
    assert paper.data.pin_memory is None  # = when training on CUDA
    assert paper.trainer.reload_dataloaders_every_n_epochs == 0
    for preset in ("cpu", "smoke", "laptop"):
        assert _compose([f"preset={preset}"]).data.num_workers == 0


# -- 8: the evaluation after fit runs where the model trained ------------------------------------
def test_evaluation_after_fit_runs_on_the_training_device(monkeypatch, tmp_path):
    import numpy as np

    from sparse3d import evaluation, outputs, train
    from sparse3d.labels import LabelSpec

    seen = []

    class Net:
        """Records the device it is on when evaluated (moving to "the GPU" costs nothing)."""

        device = torch.device("cpu")

        def to(self, device):
            self.device = torch.device(device)
            return self

        def cpu(self):
            return self.to("cpu")

    def fake_evaluate(net, vols, class_names, ignore_index):
        seen.append(net.device)
        return {"heldout": None, "heldout_all": None, "all_voxels": None}, {}

    monkeypatch.setattr(evaluation, "evaluate_volumes", fake_evaluate)
    monkeypatch.setattr(outputs, "write_run_outputs", lambda *a, **k: {})
    net = Net()
    labels = LabelSpec(("a", "b"), 2)
    job = types.SimpleNamespace(
        facts=types.SimpleNamespace(labels=labels),
        datamodule=types.SimpleNamespace(volumes={}),
        module=types.SimpleNamespace(net=net),
        split=types.SimpleNamespace(test={}, name="s", train={}),
        class_weights=None,
        model_meta={},
    )
    monkeypatch.setattr("sparse3d.experiment.train_voxel_fraction", lambda job: 0.5)
    logged = []
    logger = types.SimpleNamespace(
        log_metrics=lambda m, step: logged.append(step), save=lambda: None
    )
    trainer = types.SimpleNamespace(
        strategy=types.SimpleNamespace(root_device=torch.device("meta")),  # "the GPU"
        loggers=[logger],
        global_step=7,
        world_size=1,
        precision="32-true",
    )
    cfg = _compose(["preset=smoke", "logger=none"])
    metrics = train._evaluate(cfg, job, trainer, tmp_path, True, 1.0, None)
    assert seen == [torch.device("meta")]
    assert net.device == torch.device("cpu")  # back for saving
    assert metrics["steps"] == 7 and logged == [7] and (tmp_path / "metrics.json").is_file()
    assert np.isclose(metrics["train_voxel_fraction"], 0.5)
