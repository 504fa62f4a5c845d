"""``trainer.precision=auto``: bf16-mixed where the device computes bf16 natively, fp32 elsewhere
(the predictor's one decision, ``sparse3d.inference.precision``)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sparse3d import fitting
from sparse3d.cli import CONF_DIR
from sparse3d.inference import precision as prec


def _trainer_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["preset=smoke", *overrides]).trainer


@pytest.mark.parametrize(
    "native,cuda,cuda_bf16,accelerator,want",
    [
        (True, False, False, "auto", "bf16-mixed"),  # AVX-512 BF16 / AMX CPU
        (False, False, False, "auto", "32-true"),  # AVX2-only CPU: bf16 would be slow
        (False, True, True, "auto", "bf16-mixed"),  # a GPU with bf16
        (True, True, False, "auto", "32-true"),  # a GPU without bf16 trains, not the CPU
        (False, True, True, "cpu", "32-true"),  # accelerator=cpu: the CPU decides
        (True, True, False, "cpu", "bf16-mixed"),
    ],
)
def test_auto_precision_follows_the_training_device(
    monkeypatch, native, cuda, cuda_bf16, accelerator, want
):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    cfg = _trainer_cfg(["trainer.precision=auto", f"trainer.accelerator={accelerator}"])
    assert fitting.training_precision(cfg) == want
    assert fitting.trainer_extras(cfg)["precision"] == want


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    for given in ("32-true", "bf16-mixed"):
        cfg = _trainer_cfg([f"trainer.precision={given}"])
        assert "precision" not in fitting.trainer_extras(cfg)


@pytest.mark.parametrize("native,plugin", [(True, "bf16-mixed"), (False, "32-true")])
def test_trainer_is_built_with_the_chosen_precision(monkeypatch, tmp_path, native, plugin):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["preset=smoke", "trainer.precision=auto"])
    trainer = fitting.make_trainer(cfg, tmp_path, [])
    assert trainer.precision == plugin


# -- channels-last training ---------------------------------------------------------------------
def _module(channels_last: bool = False, compile_net: bool = False, depth: int = 2):
    from sparse3d.losses import MaskedCrossEntropy
    from sparse3d.models import UNet
    from sparse3d.module import SegmentationModule

    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=depth)
    return SegmentationModule(
        net=net,
        loss=MaskedCrossEntropy(3, 3),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        scheduler=None,
        ignore_index=3,
        model_meta={},
        channels_last=channels_last,
        compile=compile_net,
    )


def test_channels_last_training_step_is_the_same_arithmetic(monkeypatch):
    monkeypatch.setattr("lightning.pytorch.core.module.LightningModule.log", lambda *a, **k: None)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(2, 2, 20, 20, 20, generator=g)}
    out = _module(False).net.output_shape((20, 20, 20))
    batch["label"] = torch.randint(0, 4, (2, *out), generator=g)
    losses, grads = {}, {}
    for cl in (False, True):
        m = _module(cl)
        m.on_fit_start()
        conv = m.net.down[0][0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last_3d) == cl
        assert conv.is_contiguous() != cl
        loss = m.training_step(batch, 0)
        loss.backward()
        losses[cl], grads[cl] = loss.detach(), conv.grad.detach().contiguous()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)


# -- torch.compile ------------------------------------------------------------------------------
@pytest.mark.skipif(
    not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on a CPU needs a C++ compiler",
)
def test_compiled_training_step_matches_eager_and_keeps_plain_keys(monkeypatch):
    monkeypatch.setattr("lightning.pytorch.core.module.LightningModule.log", lambda *a, **k: None)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(1, 2, 12, 12, 12, generator=g)}
    out = _module(depth=1).net.output_shape((12, 12, 12))
    batch["label"] = torch.randint(0, 4, (1, *out), generator=g)
    from torch._dynamo.utils import counters

    losses, grads, compiled, graphs = {}, {}, {}, {}
    for c in (False, True):
        m = _module(compile_net=c, depth=1)
        m.on_fit_start()
        counters.clear()
        loss = m.training_step(batch, 0)
        graphs[c] = counters["stats"]["unique_graphs"]  # graphs captured by this step
        loss.backward()
        losses[c], grads[c] = loss.detach(), m.net.head.weight.grad.detach()
        compiled[c] = m.__dict__["_train_net"] is not m.net
        assert not any("_orig_mod" in k for k in m.state_dict())  # the checkpoint's keys
    assert compiled == {False: False, True: True}
    assert graphs[False] == 0 and graphs[True] >= 1  # the step ran through the compiled network
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-3, atol=1e-5)


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch):
    from sparse3d.cli import UserError

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["preset=smoke", "compile=true"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="compile=true needs a C"):
        fitting.check_compile(cfg)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/g++")
    fitting.check_compile(cfg)  # a compiler: no complaint


def _bf16_and_fp32_grads(net: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """Parameter gradients of ``sum(logits^2)``: under CPU bf16 autocast, and in float32 on the
    same bf16-rounded weights and input (the reference the bf16 kernels approximate)."""
    grads = {}
    for precision in ("bf16", "fp32"):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = net(x if precision == "bf16" else x.bfloat16().float())
        y.float().square().sum().backward()
        grads[precision] = {n: p.grad.clone() for n, p in net.named_parameters()}
    return grads["bf16"], grads["fp32"]


def _max_rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return err if err == err else float("inf")  # NaN counts as wrong


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_bf16_conv3d_weight_gradient_is_right_at_every_depth(depth):
    """A bf16 3x3x3 convolution on an input 2 voxels deep gave garbage weight gradients on an
    AVX-512-bf16 CPU (torch 2.13, oneDNN); the model's 3D convolution computes that case in
    float32."""
    from sparse3d.models.blocks import conv_cls

    torch.manual_seed(0)
    conv = conv_cls(3)(16, 32, 3, padding=1).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.bfloat16().float())
        conv.bias.copy_(conv.bias.bfloat16().float())
    x = torch.randn(2, 16, depth, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    runs = [_bf16_and_fp32_grads(conv, x) for _ in range(3)]
    for bf16, fp32 in runs:
        assert _max_rel_error(bf16["weight"], fp32["weight"]) < 0.02
    assert all(torch.equal(bf16["weight"], runs[0][0]["weight"]) for bf16, _ in runs)


def test_bf16_conv3d_guard_touches_only_thin_inputs_under_bf16_training():
    """The float32 detour is taken for a 2-deep input under bf16 autocast with gradients, and
    nowhere else: deeper inputs stay bf16, inference and float32 are plain ``nn.Conv3d``."""
    from sparse3d.models.blocks import conv_cls

    torch.manual_seed(0)
    conv = conv_cls(3)(4, 8, 3, padding=1)
    plain = torch.nn.Conv3d(4, 8, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    thin, deep = torch.randn(1, 4, 2, 6, 6), torch.randn(1, 4, 5, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(thin).dtype == torch.float32
        assert conv(deep).dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(conv(thin), plain(thin))
    assert torch.equal(conv(thin), plain(thin))


def test_bf16_training_of_a_thin_tile_gives_the_float32_gradients():
    """densify's refining network (same padding, depth 3) on an 8-deep tile: its deepest level
    is 2 deep. Every parameter's bf16 gradient is close to the float32 one and repeatable (the
    training that gave a different network on every run). bf16 alone differs by up to ~0.2 here
    (a batch of 2 through batch norm); the broken kernel gave 0.8 to inf."""
    from sparse3d.models import UNet

    torch.manual_seed(0)
    net = UNet(3, 2, base_channels=8, depth=3, padding="same", norm="batch")
    net = net.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.bfloat16().float())
    x = torch.randn(2, 3, 8, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    first = None
    for _ in range(3):
        bf16, fp32 = _bf16_and_fp32_grads(net, x)
        worst = {n: _max_rel_error(bf16[n], fp32[n]) for n in bf16}
        assert max(worst.values()) < 0.5, {n: e for n, e in worst.items() if e >= 0.5}
        first = first or bf16
        assert all(torch.equal(first[n], bf16[n]) for n in bf16)
