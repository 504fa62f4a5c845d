"""Whole-volume prediction: seamless tiling, blending, test-time BN, memory model, precision,
streaming and outputs (sparse3d.inference)."""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from sparse3d.checkpoint import ModelMeta
from sparse3d.crop import center_crop
from sparse3d.data.volume import VolumeMeta, write_volume
from sparse3d.inference import Predictor, bn_mode_iou, fuse_batchnorm
from sparse3d.inference.bn import BatchStatsNorm, prepare_for_inference, recalibrate_bn
from sparse3d.inference.memory import SAFETY, NetProfile, choose_plan
from sparse3d.inference.precision import cpu_has_native_bf16, resolve_precision
from sparse3d.inference.tiling import (
    TilePlan,
    read_mirrored,
    same_axis_plan,
    valid_axis_plan,
)
from sparse3d.labels import LabelSpec
from sparse3d.models import UNet
from sparse3d.models.blocks import PaperBatchNorm


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny passes: one thread avoids OpenMP contention on a shared
    machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, PaperBatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _net_and_meta(normalization: str = "none", **net: Any) -> tuple[UNet, ModelMeta]:
    """``UNet(**net)`` and the model meta describing it (``net`` names every argument)."""
    k, c = net["num_classes"], net["in_channels"]
    norm = (
        {"kind": "none"}
        if normalization == "none"
        else {"kind": "percentile", "low": 1.0, "high": 99.5}
    )
    meta = ModelMeta(
        net=net,
        class_names=tuple(f"c{i}" for i in range(k)),
        ignore_index=k,
        channel_names=tuple(f"ch{i}" for i in range(c)),
        voxel_size_zyx_um=(2.0, 1.0, 1.0),
        normalization=norm,
    )
    return UNet(**net), meta


def _image(shape_zyx, channels=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, *shape_zyx)).astype(np.float32)


# -------------------------------------------------------------------------------------------
# mirror padding and layouts


def test_read_mirrored_reads_only_the_needed_box():
    img = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    boxes = []

    def read(box):
        boxes.append(box)
        return img[(slice(None), *box)]

    out = read_mirrored(read, (5, 6, 7), (-2, 1, 3), (8, 3, 6))
    want = np.pad(img, ((0, 0), (2, 3), (0, 0), (0, 2)), mode="reflect")[:, 0:8, 1:4, 3:9]
    np.testing.assert_array_equal(out, want)
    assert boxes == [(slice(0, 5), slice(1, 4), slice(3, 7))]


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_valid_layout_writes_every_voxel_once_on_the_pooling_grid(depth):
    net = UNet(1, 2, base_channels=2, depth=depth, norm="none")
    g = net.geometry
    align = 2 ** (depth - 1)
    legal = [n for n in range(g.smallest_input(), g.smallest_input() + 80) if g.is_legal(n)]
    for length in (1, 9, 37, 64, 244):
        for n in legal[:4]:
            if g.output_size(n) < align:
                continue
            plan = valid_axis_plan(length, n, g.output_size, align)
            count = np.zeros(length, int)
            ctx = n - g.output_size(n)
            for t in plan.tiles:
                # input start relative to the padded origin (-ctx/2) is on the pooling grid
                assert (t.in_start + ctx // 2) % align == 0
                assert g.is_legal(t.in_size) and t.in_size <= n
                assert t.out_hi - t.out_lo <= t.out_size - t.crop_lo
                count[t.out_lo : t.out_hi] += 1
            np.testing.assert_array_equal(count, 1)


def test_paper_tile_steps_by_a_multiple_of_eight():
    net = UNet(3, 3)  # paper: 116 -> 28 along z, 28 is 4 mod 8
    plan = valid_axis_plan(64, 116, net.geometry.output_size, 8)
    starts = [t.out_lo for t in plan.tiles]
    assert starts == [0, 24, 48]
    assert [t.in_start for t in plan.tiles] == [-44, -20, 4]
    assert plan.tiles[-1].in_size < 116  # the last tile shrinks to what is left (16 voxels)


def test_same_layout_covers_with_positive_weights():
    for length, n in [(37, 16), (16, 16), (10, 16), (100, 24)]:
        plan = same_axis_plan(length, n, 0.25)
        wsum = np.zeros(length)
        for t in plan.tiles:
            assert t.weight is not None and (t.weight > 0).all()
            sl = slice(t.out_lo, t.out_hi)
            wsum[sl] += t.weight[t.crop_lo : t.crop_lo + t.out_hi - t.out_lo]
        assert (wsum > 0).all()
        if plan.count > 1:
            assert plan.tiles[0].weight[0] == 1.0 and plan.tiles[-1].weight[-1] == 1.0


# -------------------------------------------------------------------------------------------
# forward passes


def _probabilities(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """Softmax ``(K, Z, Y, X)`` float32 of ``predictor`` on ``image``."""
    predictor.probabilities_dtype = "float32"
    return predictor.predict_array(image, probabilities=True)[1]


def _reference_forward(net: UNet, x: torch.Tensor) -> torch.Tensor:
    """The textbook U-Net pass: whole skips kept, cropped where they are used (paper Fig. 2)."""
    from sparse3d.crop import center_crop

    skips = []
    for i, block in enumerate(net.down):
        x = block(x)
        if i < len(net.down) - 1:
            skips.append(x)
            x = net.pool(x)
    for block, skip in zip(net.up, reversed(skips), strict=True):
        h = block.up(x)
        x = block.conv(torch.cat([center_crop(skip, h.shape[2:]), h], dim=1))
    return net.head(x)


@pytest.mark.parametrize(
    "depth,padding,norm",
    [(2, "valid", "none"), (3, "valid", "batch"), (4, "valid", "none"), (3, "same", "batch")],
)
def test_memory_lean_unet_forward_equals_the_textbook_pass(depth, padding, norm):
    torch.manual_seed(0)
    net = UNet(
        2, 3, base_channels=2, depth=depth, padding=padding, norm=norm, bn_eval_stats="running"
    )
    _randomise_bn(net)
    net.eval()
    spatial = net.input_shape_for_output((4, 8, 6)) if padding == "valid" else (8, 16, 24)
    x = torch.randn(2, 2, *spatial)
    with torch.no_grad():
        want = _reference_forward(net, x)
        got = net(x)
        cl = net.to(memory_format=torch.channels_last_3d)(
            x.contiguous(memory_format=torch.channels_last_3d)
        )
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(cl, want, atol=1e-5)
    # with autograd (training) the pass is the same and gradients flow through the cropped skips
    net.train()
    x.requires_grad_(True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_skip_shapes_are_the_up_convolution_outputs():
    net = UNet(1, 2, base_channels=2, depth=4)
    spatial = net.input_shape_for_output((4, 8, 6))
    seen = []
    hooks = [
        b.up.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:]))) for b in net.up
    ]
    with torch.no_grad():
        net(torch.zeros(1, 1, *spatial))
    for h in hooks:
        h.remove()
    assert net.skip_shapes(spatial) == seen[::-1]  # top level first


def test_fused_and_in_place_batch_norm_match_paper_batch_norm():
    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=3, norm="batch", bn_eval_stats="running")
    _randomise_bn(net)
    net.eval()
    x = torch.randn(1, 2, *net.input_shape_for_output((4, 4, 4)))
    with torch.no_grad():
        fused = fuse_batchnorm(prepare_for_inference(net, "running"))
        assert not any(isinstance(m, PaperBatchNorm) for m in fused.modules())
        assert torch.allclose(fused(x), net(x), atol=1e-5)
        net.bn_eval_stats = "batch"
        inplace = prepare_for_inference(net, "batch")
        assert any(isinstance(m, BatchStatsNorm) for m in inplace.modules())
        assert torch.allclose(inplace(x), net(x), atol=1e-5)


# -------------------------------------------------------------------------------------------
# the central property: tiled prediction = one pass over the whole mirror-padded volume


@pytest.mark.parametrize("depth,norm", [(3, "batch"), (4, "none")])
def test_tiled_prediction_equals_whole_volume_pass(depth, norm):
    torch.manual_seed(1)
    net = UNet(2, 3, base_channels=2, depth=depth, norm=norm, bn_eval_stats="running")
    _randomise_bn(net)
    # depth 3: outputs 16, 20, 16 -> 2 x 2 x 3 tiles; depth 4: legal outputs are 4 mod 8, the
    # step (8) is smaller than the output (12) -> 2 x 1 x 1 tiles
    shape, tile = ((24, 40, 36), (56, 60, 56)) if depth == 3 else ((16, 12, 12), (100, 100, 100))
    img = _image(shape)
    g = net.geometry
    kw = {"bn_mode": "running", "precision": "fp32", "progress": False}
    whole = Predictor(net, None, memory_budget_gb=64, **kw)
    tiled = Predictor(net, None, input_tile=tile, **kw)
    a = _probabilities(whole, img)
    b = _probabilities(tiled, img)
    assert whole.last_report.num_tiles == 1
    assert tiled.last_report.grid_zyx == ((2, 2, 3) if depth == 3 else (2, 1, 1))
    if depth == 4:
        assert g.output_size(tile[1]) % 8 == 4
    # reference: one pass of the network over the mirror-padded volume
    with torch.no_grad():
        inp = net.input_shape_for_output(shape)
        ctx = [(i - net.output_shape(inp)[k]) // 2 for k, i in enumerate(inp)]
        padded = np.pad(
            img,
            [(0, 0)] + [(c, i - n - c) for c, i, n in zip(ctx, inp, shape, strict=True)],
            mode="reflect",
        )
        ref = net.eval()(torch.from_numpy(padded)[None])[0, :, : shape[0], : shape[1], : shape[2]]
    assert np.abs(a - torch.softmax(ref, 0).numpy()).max() <= 1e-5
    assert np.abs(a - b).max() <= 1e-5


def test_evaluation_is_the_predictor_and_pads_like_numpy():
    """Training evaluation predicts through the one predictor (fp32): a batch-norm network
    normalised with the volume's own statistics gives what one textbook pass over the
    mirror-padded volume gives; the 2D path mirrors slices exactly as numpy's reflect does
    (repeated for pads beyond one reflection)."""
    from sparse3d.evaluation import _reflect_pad, predict_labels

    x = np.random.default_rng(3).normal(size=(1, 2, 5, 7, 3)).astype(np.float32)
    pads = [(9, 13), (2, 3), (7, 8)]  # beyond one reflection on two axes
    want = np.pad(x, [(0, 0), (0, 0), *pads], mode="reflect")
    np.testing.assert_array_equal(_reflect_pad(torch.from_numpy(x), pads).numpy(), want)

    torch.manual_seed(2)
    net = UNet(2, 3, base_channels=2, depth=3, norm="batch", bn_eval_stats="batch").eval()
    _randomise_bn(net)
    img = _image((12, 20, 22))
    labels = predict_labels(net, img)
    shape = img.shape[1:]
    inp = net.input_shape_for_output(shape)
    ctx = [(i - o) // 2 for i, o in zip(inp, net.output_shape(inp), strict=True)]
    padded = np.pad(
        img,
        [(0, 0)] + [(c, i - n - c) for c, i, n in zip(ctx, inp, shape, strict=True)],
        mode="reflect",
    )
    with torch.no_grad():
        ref = net(torch.from_numpy(padded)[None])[0, :, : shape[0], : shape[1], : shape[2]]
    assert (labels == ref.argmax(0).numpy()).mean() > 0.999
    assert labels.dtype == np.uint8 and labels.shape == shape


def test_same_padding_blending_leaves_no_gaps():
    net = UNet(2, 3, base_channels=2, depth=3, padding="same", norm="none")
    with torch.no_grad():  # constant logits whatever the input: blending must return them
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    img = _image((10, 25, 18))
    p = Predictor(net, None, input_tile=(8, 12, 12), precision="fp32", progress=False)
    probs = _probabilities(p, img)
    assert p.last_report.grid_zyx == (2, 3, 2)
    want = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), 0).numpy()
    np.testing.assert_allclose(
        probs, np.broadcast_to(want[:, None, None, None], probs.shape), atol=1e-6
    )
    labels, probs = p.predict_array(img, probabilities=True)
    assert (labels == 2).all() and probs.shape == (3, 10, 25, 18)


# -------------------------------------------------------------------------------------------
# test-time batch normalisation


def test_recalibration_pools_exact_statistics():
    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=2, norm="batch")
    net.eval()
    tiles = [torch.randn(1, 2, 20, 22, 24) + i for i in range(3)]
    first_conv = net.down[0][0]
    with torch.no_grad():
        acts = torch.cat([first_conv(t).flatten(2) for t in tiles], dim=2)  # (1, C, all voxels)
    recalibrate_bn(net, tiles)
    bn = net.down[0][1]
    assert net.bn_eval_stats == "running"
    assert torch.allclose(bn.running_mean, acts.mean(dim=(0, 2)), atol=1e-5)
    assert torch.allclose(bn.running_var, acts.var(dim=(0, 2), unbiased=False), rtol=1e-4)


def test_recalibration_on_one_tile_equals_paper_batch_statistics():
    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=3, norm="batch", bn_eval_stats="batch")
    _randomise_bn(net)
    net.eval()
    x = torch.randn(1, 2, *net.input_shape_for_output((4, 6, 8)))
    with torch.no_grad():
        paper = net(x)
    recalibrate_bn(net, [x])
    with torch.no_grad():
        fixed = net(x)
    assert torch.allclose(fixed, paper, atol=1e-4)


def test_bn_modes_in_the_predictor():
    torch.manual_seed(0)
    net, meta = _net_and_meta(in_channels=2, num_classes=3, base_channels=2, depth=3, norm="batch")
    _randomise_bn(net)
    img = _image((12, 12, 24), seed=3) * 2 + 1
    small = {"input_tile": (56, 56, 56), "precision": "fp32", "progress": False}  # 1 x 1 x 2 tiles
    # one tile: recalibration is the paper's batch statistics, no extra pass
    one = Predictor(net, meta, memory_budget_gb=64, precision="fp32", progress=False)
    lab1, _ = one.predict_array(img)
    assert one.last_report.num_tiles == 1 and one.last_report.bn_mode == "batch"
    assert one.last_report.calibration_seconds == 0.0
    # several tiles: an extra pass estimates the statistics (over the largest tiles that fit,
    # here the whole volume) and fixes them: the tiled result equals the one-tile result
    rec = Predictor(net, meta, **small)
    probs = _probabilities(rec, img)
    assert rec.last_report.num_tiles > 1 and rec.last_report.bn_mode == "recalibrate"
    np.testing.assert_allclose(probs, _probabilities(one, img), atol=1e-4)
    # the paper's per-tile statistics differ from tile to tile
    paper = _probabilities(Predictor(net, meta, bn_mode="batch", **small), img)
    assert np.abs(paper - probs).max() > 1e-3
    # a budget that allows only the prediction tiles: calibration runs over them
    tight = Predictor(net, meta, bn_mode="recalibrate", memory_budget_gb=1e-3, **small)
    tight.predict_array(img)
    assert tight.last_report.bn_mode == "recalibrate" and tight.last_report.calibration_seconds > 0
    before = [m.running_mean.clone() for m in net.modules() if isinstance(m, PaperBatchNorm)]
    Predictor(net, meta, bn_mode="running", **small).predict_array(img)
    after = [m.running_mean for m in net.modules() if isinstance(m, PaperBatchNorm)]
    assert all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )  # caller's net untouched
    # IoU of the modes against a reference labelling
    ref = lab1.copy()
    ref[::2] = meta.ignore_index
    res = bn_mode_iou(net, meta, img, ref, modes=("recalibrate", "batch"), **small)
    assert set(res) == {"recalibrate", "batch", "disagreement"}
    for mode in ("recalibrate", "batch"):
        assert 0.0 <= res[mode]["mean"] <= 1.0
        assert res[mode]["labelled_voxels"] == int((ref != meta.ignore_index).sum())
    assert 0.0 <= res["disagreement"]["recalibrate vs batch"] <= 1.0


# -------------------------------------------------------------------------------------------
# memory model and layout choice


def test_memory_and_compute_model_of_a_single_level_net():
    net = UNet(2, 3, base_channels=4, depth=1, norm="none")  # conv 2->4, conv 4->8, head 8->3
    prof = NetProfile(net)
    n = (20, 22, 24)
    s1 = tuple(v - 2 for v in n)
    s2 = tuple(v - 4 for v in n)
    vol = lambda s: int(np.prod(s))  # noqa: E731
    macs = vol(s1) * 2 * 27 * 4 + vol(s2) * 4 * 27 * 8 + vol(s2) * 8 * 3
    assert prof.macs(n) == pytest.approx(macs)
    inp, a, b, out = 2 * vol(n), 4 * vol(s1), 8 * vol(s2), 3 * vol(s2)
    device_peak = max(inp + a, inp + a + b, inp + b + out) * 4
    host = (inp + out) * 4
    assert prof.peak_bytes(n) == pytest.approx(SAFETY * (device_peak + host))
    assert prof.peak_bytes(n, bytes_per_value=2) < prof.peak_bytes(n)


def test_layout_choice_follows_the_budget():
    net = UNet(3, 3)  # the paper network
    prof = NetProfile(net)
    shape = (64, 244, 248)
    big = choose_plan(prof, net, shape, 64 * 2**30)
    assert big.plan.num_tiles == 1 and big.fits
    assert big.plan.input_tile == net.input_shape_for_output(shape)  # clipped to the volume
    small = choose_plan(prof, net, shape, 2 * 2**30)
    assert small.fits and small.peak_bytes <= 2 * 2**30 and small.plan.num_tiles > 1
    assert small.macs > big.macs
    paper = choose_plan(prof, net, shape, 1.0, input_tile=(116, 132, 132))
    assert not paper.fits and paper.plan.input_tile == (116, 132, 132)
    assert paper.plan.grid_zyx == (3, 6, 7)  # steps of 24, 40, 40 voxels
    # the estimate grows with the tile and halves (roughly) under bf16
    assert prof.peak_bytes((156, 220, 220)) > prof.peak_bytes((116, 132, 132))


def test_explicit_tile_is_validated():
    net = UNet(2, 3, base_channels=2, depth=3, norm="none")
    with pytest.raises(ValueError, match="nearest legal sizes"):
        Predictor(net, None, input_tile=(45, 48, 48), progress=False)


def test_streaming_decision_compares_like_with_like():
    from sparse3d.inference.memory import needs_streaming

    gib = 2**30
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # on a GPU the tile pass lives in device memory: 80 GiB of activations on a 141 GB card do
    # not make a 1 GiB volume stream through a host with 10 GiB to spare
    assert not needs_streaming(1 * gib, 80 * gib, 0.1 * gib, cuda, 10 * gib)
    assert needs_streaming(9.5 * gib, 80 * gib, 1 * gib, cuda, 10 * gib)  # host RAM is short
    # on the CPU the pass shares the host RAM with the volume and its results
    assert needs_streaming(1 * gib, 20 * gib, 0.1 * gib, cpu, 10 * gib)
    assert not needs_streaming(1 * gib, 5 * gib, 0.1 * gib, cpu, 10 * gib)


def test_largest_tensor_of_a_pass_is_modelled():
    """``max_elements`` (fitted from two traces) matches a trace at a third tile size."""
    from sparse3d.inference.memory import _normalise_for_profile, _trace

    net = UNet(2, 3, base_channels=4, depth=3, norm="batch")
    prof = NetProfile(net)
    tile = (60, 68, 76)
    assert all(net.geometry.is_legal(n) for n in tile)
    tracer = _trace(_normalise_for_profile(net), tile)
    largest = max(int(np.prod(e[2])) for e in tracer.events if e[0] == "a")
    assert prof.max_elements(tile) == pytest.approx(largest)
    assert largest >= 4 * 58 * 66 * 74  # the first convolution's output


def test_no_tile_exceeds_the_element_cap(monkeypatch):
    """A big volume and a huge budget (a 141 GB card): the layout still keeps every tensor
    within 2**31 - 1 elements, and an explicit tile beyond it is refused."""
    from sparse3d.inference.memory import MAX_TENSOR_ELEMENTS

    net = UNet(3, 3)  # the paper network: 32 channels at full resolution
    prof = NetProfile(net)
    shape = (400, 1200, 1200)
    huge = 10_000 * 2**30
    uncapped = choose_plan(prof, net, shape, huge, max_elements=float("inf"))
    assert prof.max_elements(uncapped.plan.input_tile) > MAX_TENSOR_ELEMENTS  # the old failure
    capped = choose_plan(prof, net, shape, huge)
    assert capped.fits and capped.plan.num_tiles > 1
    assert prof.max_elements(capped.plan.input_tile) <= MAX_TENSOR_ELEMENTS
    with pytest.raises(ValueError, match="elements"):
        choose_plan(prof, net, shape, huge, input_tile=uncapped.plan.input_tile)
    # the predictor passes fewer tiles at once when a batch would cross the cap
    small = UNet(2, 3, base_channels=2, depth=2, norm="none")
    p = Predictor(small, None, batch_size=64, progress=False, device="cpu")
    tile = (44, 44, 44)
    assert p._batch_for(tile, 64) == 64
    per_tile = p.profile.max_elements(tile)
    monkeypatch.setattr("sparse3d.inference.predictor.MAX_TENSOR_ELEMENTS", 3.5 * per_tile)
    assert p._batch_for(tile, 64) == 3 and p._batch_for(tile, 2) == 2


# -------------------------------------------------------------------------------------------
# precision


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("fp16", cpu)


def _trained_tiny_net() -> tuple[UNet, callable]:
    """A small net trained for a few steps on a smooth 3-class task (margins not near zero)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def sample(shape):
        img = rng.normal(size=(2, *shape)).astype(np.float32)
        smooth = F.avg_pool3d(torch.from_numpy(img)[None], 3, 1, 1)[0].numpy() * 3
        return img, np.digitize(smooth[0] + 0.5 * smooth[1], [-0.6, 0.6])

    net = UNet(2, 3, base_channels=4, depth=2, norm="none")
    opt = torch.optim.Adam(net.parameters(), 2e-2)
    for _ in range(30):
        img, lab = sample((26, 26, 26))
        out = net(torch.from_numpy(img)[None])
        target = center_crop(torch.from_numpy(lab)[None], out.shape[2:])
        loss = F.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), sample


def test_bf16_labels_agree_with_fp32():
    net, sample = _trained_tiny_net()
    img, truth = sample((20, 32, 32))
    p32 = Predictor(net, None, precision="fp32", progress=False)
    p16 = Predictor(net, None, precision="bf16", progress=False)
    lab32, _ = p32.predict_array(img)
    lab16, _ = p16.predict_array(img)
    assert (lab32 == truth).mean() > 0.5  # the net learnt something (chance: about 1/3)
    probs32, probs16 = _probabilities(p32, img), _probabilities(p16, img)
    assert np.abs(probs32 - probs16).max() > 0  # bf16 really was used
    assert (lab16 == lab32).mean() >= 0.999


# -------------------------------------------------------------------------------------------
# files: streaming, outputs


def _volume(tmp_path, shape=(20, 36, 40), channels=2, seed=0):
    img = _image(shape, channels, seed) * 50 + 100  # raw intensities: normalisation matters
    labels = LabelSpec(("c0", "c1", "c2"), 3)
    meta = VolumeMeta((2.0, 1.0, 1.0), tuple(f"ch{i}" for i in range(channels)), labels)
    path = tmp_path / "vol.h5"
    write_volume(path, img, np.full(shape, 3, np.uint8), meta)
    return path, img


def test_streaming_equals_in_memory(tmp_path):
    torch.manual_seed(0)
    net, meta = _net_and_meta(
        "percentile", in_channels=2, num_classes=3, base_channels=2, depth=3, norm="batch"
    )
    _randomise_bn(net)
    path, img = _volume(tmp_path, shape=(16, 24, 28))
    kw = {"input_tile": (56, 60, 52), "precision": "fp32", "progress": False, "device": "cpu"}
    # 1 x 2 x 3 tiles; on the CPU the budget is host RAM too: a budget smaller than the volume
    # and its results -> tiles are read from and written to disk
    tiny = Predictor(net, meta, memory_budget_gb=1e-4, **kw)
    mem_labels, mem_probs = tiny.predict_array(img, probabilities=True)
    assert not tiny.last_report.streamed
    report = tiny.predict_file(path, tmp_path / "seg.h5", save_probabilities=True)
    assert report.streamed and report.num_tiles > 1
    with h5py.File(tmp_path / "seg.h5") as f:
        np.testing.assert_array_equal(f["labels"][...], mem_labels)
        np.testing.assert_array_equal(f["probabilities"][...], mem_probs)
        assert f.attrs["format"] == "sparse3d-prediction"
        assert list(f.attrs["class_names"]) == ["c0", "c1", "c2"]
    inmem = Predictor(net, meta, memory_budget_gb=64, **kw)  # BN calibrated on one big tile
    rep2 = inmem.predict_file(path, tmp_path / "seg2.h5")
    assert not rep2.streamed
    with h5py.File(tmp_path / "seg2.h5") as f:
        np.testing.assert_array_equal(f["labels"][...], inmem.predict_array(img)[0])
        assert "probabilities" not in f
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "seg.h5",
        "seg2.h5",
        "vol.h5",
    ]  # no temp files left


def test_streaming_same_padded_blending(tmp_path):
    net, meta = _net_and_meta(
        "percentile", in_channels=2, num_classes=3, base_channels=2, depth=2, padding="same",
        norm="none",
    )  # fmt: skip
    path, img = _volume(tmp_path, shape=(10, 20, 24))
    kw = {"input_tile": (8, 12, 12), "precision": "fp32", "progress": False}
    want, _ = Predictor(net, meta, **kw).predict_array(img)
    Predictor(net, meta, **kw).predict_file(path, tmp_path / "s.h5", stream=True)
    with h5py.File(tmp_path / "s.h5") as f:
        np.testing.assert_array_equal(f["labels"][...], want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "vol.h5"]


def test_outputs_tiff_png_and_overwrite(tmp_path):
    net, meta = _net_and_meta(
        "percentile", in_channels=2, num_classes=3, base_channels=2, depth=2, norm="none"
    )
    path, _ = _volume(tmp_path, shape=(12, 20, 22))
    p = Predictor(net, meta, precision="fp32", progress=False)
    out, tif, png = tmp_path / "seg.h5", tmp_path / "seg.tif", tmp_path / "seg.png"
    rep = p.predict_file(path, out, tiff=tif, overview_png=png)
    assert rep.outputs == {"tiff": str(tif), "overview": str(png), "labels": str(out)}
    with h5py.File(out) as f:
        labels = f["labels"][...]
    stack = tifffile.imread(tif)
    assert stack.shape == (12, 20, 22) and stack.dtype == np.uint8
    np.testing.assert_array_equal(stack, labels)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for kwargs in ({}, {"tiff": tif}):
        target = out if not kwargs else tmp_path / "other.h5"
        with pytest.raises(FileExistsError, match="overwrite"):
            p.predict_file(path, target, **kwargs)
    p.predict_file(path, out, overwrite=True)


def test_channel_mismatch_is_one_clear_line(tmp_path):
    kw = {"in_channels": 3, "num_classes": 3, "base_channels": 2, "depth": 2, "norm": "none"}
    net = UNet(**kw)
    meta = ModelMeta(kw, ("a", "b", "c"), 3, ("lectin", "dapi", "catenin"))
    path, img = _volume(tmp_path, channels=1)
    p = Predictor(net, meta, progress=False)
    with pytest.raises(
        ValueError, match=r"model expects 3 channels \(lectin, dapi, catenin\), input has 1"
    ):
        p.predict_file(path, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="input has 1"):
        p.predict_array(img)
    assert not (tmp_path / "x.h5").exists()


def test_plan_for_the_paper_tile_has_expected_tiles():
    net = UNet(3, 3)
    p = Predictor(net, None, input_tile=(116, 132, 132), progress=False)
    plan: TilePlan = p.plan((64, 244, 248)).plan
    assert plan.grid_zyx == (3, 6, 7)
    covered = np.zeros((64, 244, 248), np.int8)
    for t in plan.tiles:
        covered[t.out_slices] += 1
    assert (covered == 1).all()


def test_plain_memory_model_is_conservative_and_plans_the_same_result():
    """The fallback memory model (no torch internals) over-estimates the traced one and its
    layout segments the same as any other layout; a failing tracer falls back to it."""
    from sparse3d.inference import memory
    from sparse3d.inference.plain_profile import PlainProfile

    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=4, depth=3, norm="none").eval()
    traced, plain = memory.NetProfile(net), PlainProfile(net)
    for n in (44, 60, 92):
        tile = (n, n, n)
        assert plain.peak_bytes(tile) >= traced.peak_bytes(tile)
        assert plain.max_elements(tile) >= traced.max_elements(tile)
        assert plain.macs(tile) >= 0.9 * traced.macs(tile)  # no valid-convolution shrink
    img = _image((20, 40, 36))
    budget = float(traced.peak_bytes((60, 60, 60))) / 2**30
    a = Predictor(net, None, precision="fp32", progress=False, memory_budget_gb=budget)
    b = Predictor(
        net, None, precision="fp32", progress=False, memory_budget_gb=budget, memory_model="plain"
    )
    la, pa = a.predict_array(img, probabilities=True)
    lb, pb = b.predict_array(img, probabilities=True)
    assert b.last_report.num_tiles >= a.last_report.num_tiles > 1
    np.testing.assert_allclose(pa.astype(np.float32), pb.astype(np.float32), atol=2e-3)
    with pytest.raises(ValueError, match="memory_model"):
        Predictor(net, None, memory_model="guess")


def test_a_broken_tracer_falls_back_to_the_plain_model(monkeypatch, caplog):
    from sparse3d.inference import memory
    from sparse3d.inference.plain_profile import PlainProfile

    def broken(net):
        raise ImportError("no dispatch hook in this torch")

    monkeypatch.setattr(memory, "NetProfile", broken)
    net = UNet(1, 2, base_channels=2, depth=2, norm="none")
    with caplog.at_level("WARNING"):
        profile = memory.net_profile(net)
    assert isinstance(profile, PlainProfile) and "memory_model=plain" in caplog.text
