"""The CUDA paths (``pytest -m gpu``; skipped without a GPU, run by experiments/gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from sparse3d.models import UNet
from sparse3d.models.blocks import PaperBatchNorm

pytestmark = pytest.mark.gpu


def _bn_net(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(2, 3, base_channels=4, depth=3, norm="batch", bn_eval_stats="running")
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, PaperBatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def test_predictor_on_cuda_matches_the_cpu():
    from sparse3d.inference import Predictor

    net = _bn_net()
    image = np.random.default_rng(0).normal(size=(2, 20, 44, 40)).astype(np.float32)
    kw = {
        "precision": "fp32",
        "bn_mode": "running",
        "progress": False,
        "input_tile": (52, 60, 52),
        "probabilities_dtype": "float32",
    }
    _, cpu = Predictor(net, None, device="cpu", **kw).predict_array(image, probabilities=True)
    gpu = Predictor(net, None, device="cuda", **kw)
    _, probs = gpu.predict_array(image, probabilities=True)
    assert gpu.last_report.device.startswith("cuda") and gpu.last_report.num_tiles > 1
    np.testing.assert_allclose(probs, cpu, atol=1e-4, rtol=1e-4)
    bf16 = Predictor(net, None, device="cuda", precision="bf16", bn_mode="running", progress=False)
    labels, _ = bf16.predict_array(image)
    assert (labels == cpu.argmax(0)).mean() > 0.95  # an untrained net: small margins


def test_available_memory_counts_the_allocator_cache():
    from sparse3d.inference.memory import available_memory_bytes

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    before = available_memory_bytes(dev)
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    del x  # cached by PyTorch, not free for the driver
    cached = available_memory_bytes(dev)
    assert cached >= before - 64 * 2**20
    torch.cuda.empty_cache()


def test_sync_batchnorm_on_cuda_keeps_the_paper_behaviour():
    from sparse3d.parallel import PaperSyncBatchNorm

    net = _bn_net().cuda()
    net.bn_eval_stats = "batch"
    x = torch.randn(1, 2, *net.input_shape_for_output((4, 4, 4)), device="cuda")
    with torch.no_grad():
        want = net(x)
    plugin = PaperSyncBatchNorm()
    synced = plugin.apply(net)
    synced.train()
    synced(x).sum().backward()  # one process, no group: local statistics
    synced.eval()
    with torch.no_grad():
        torch.testing.assert_close(synced(x), want)
    back = plugin.revert(synced)
    assert any(type(m) is PaperBatchNorm for m in back.modules())


def test_evaluation_predicts_on_the_gpu():
    """The one predictor runs where the network is, and scores the held-out voxels."""
    import numpy as np

    from sparse3d.evaluation import evaluate_volumes

    shape = (12, 16, 16)
    rng = np.random.default_rng(0)
    vol = types.SimpleNamespace(
        name="v",
        image=rng.random((1, *shape), dtype=np.float32),
        eval_label=rng.integers(0, 3, shape),
        eval_label_all=None,
        dense_label=None,
    )
    net = UNet(1, 2, base_channels=2, depth=2, norm="batch").cuda()
    scores, preds = evaluate_volumes(net, [vol], ("a", "b"), 2)
    assert scores["heldout"]["labelled_voxels"] == int((vol.eval_label != 2).sum())
    assert scores["all_voxels"] is None and preds["v"].shape == shape
    assert next(net.parameters()).device.type == "cuda"


@pytest.mark.slow
def test_ddp_on_one_gpu_deterministic_run_writes_metrics(tmp_path):
    """NCCL: the rank-sync gather after fit (module on the CPU by then) and
    ``deterministic=true`` (MaxPool3d's backward) must not crash."""
    args = [
        sys.executable,
        "-m",
        "sparse3d.train",
        "preset=smoke",
        "logger=none",
        "trainer=ddp",
        "trainer.devices=1",
        "trainer.deterministic=true",
        f"data.root={tmp_path / 'data'}",
        f"runs_root={tmp_path / 'runs'}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert m["world_size"] == 1 and m["ranks_in_sync"] is True


def test_training_batches_are_pinned_for_the_gpu(tmp_path):
    from sparse3d.data.volume import VolumeMeta, write_volume
    from sparse3d.datamodule import SparseDataModule
    from sparse3d.labels import LabelSpec

    shape = (10, 16, 16)
    labels = LabelSpec(("a", "b"), 2)
    rng = np.random.default_rng(0)
    path = write_volume(
        tmp_path / "v.h5",
        rng.random((1, *shape), dtype=np.float32),
        rng.integers(0, 2, shape).astype(np.uint8),
        VolumeMeta((1.0, 1.0, 1.0), ("c",), labels),
    )
    dm = SparseDataModule(
        {"v": str(path)}, {"v": {"z": [3]}}, {"v": {"z": [6]}}, "sparse", labels, 3,
        (8, 8, 8), (4, 4, 4), samples_per_epoch=2, num_workers=1,
    )  # fmt: skip
    dm.setup()
    dm.trainer = types.SimpleNamespace(
        world_size=1,
        global_rank=0,
        current_epoch=0,
        strategy=types.SimpleNamespace(root_device=torch.device("cuda", 0)),
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].is_pinned()
