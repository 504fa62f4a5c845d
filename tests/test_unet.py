"""The paper's exact architecture and geometry (Sec. 2)."""

from __future__ import annotations

import pytest
import torch

from sparse3d.models import UNet, UNetGeometry
from sparse3d.models.blocks import PaperBatchNorm


def test_paper_parameter_count():
    assert UNet(3, 3, norm="none").num_parameters() == 19_069_955


def test_paper_tile_geometry():
    net = UNet(3, 3)
    # paper: 132 x 132 x 116 (x, y, z) in, 44 x 44 x 28 out
    assert net.output_shape((116, 132, 132)) == (28, 44, 44)


def test_paper_tile_forward_shape_small_width():
    net = UNet(3, 3, base_channels=2)
    with torch.no_grad():
        y = net(torch.randn(1, 3, 116, 132, 132))
    assert y.shape == (1, 3, 28, 44, 44)


def test_2d_original_unet_geometry():
    net = UNet(1, 2, base_channels=2, depth=5, dim=2)
    assert net.output_shape((572, 572)) == (388, 388)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_channel_plan_matches_paper():
    net = UNet(3, 3, norm="none")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    plan = [(c.in_channels, c.out_channels) for c in convs]
    assert plan[:8] == [
        (3, 32),
        (32, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 512),
    ]
    assert plan[8:] == [
        (768, 256),
        (256, 256),
        (384, 128),
        (128, 128),
        (192, 64),
        (64, 64),
        (64, 3),
    ]
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert [(u.in_channels, u.out_channels, u.bias) for u in ups] == [
        (512, 512, None),
        (256, 256, None),
        (128, 128, None),
    ]


def test_geometry_queries():
    g = UNetGeometry(depth=4, padding="valid")
    assert g.smallest_input() == 92 and g.output_size(92) == 4
    assert g.input_for_output(44) == 132 and g.input_for_output(28) == 116
    assert g.input_for_output(45) == 140
    assert g.receptive_field() == 89  # 88 voxels of context: 155 um at 1.76 um (Sec. 2)
    # legal valid sizes are 8 b + 60
    assert [n for n in range(90, 150) if g.is_legal(n)] == [92, 100, 108, 116, 124, 132, 140, 148]
    net = UNet(3, 3, base_channels=2)
    assert net.input_shape_for_output((28, 44, 44)) == (116, 132, 132)
    assert net.smallest_input_shape() == (92, 92, 92)


def test_same_padding_geometry():
    net = UNet(1, 2, base_channels=2, padding="same")
    assert net.output_shape((32, 48, 64)) == (32, 48, 64)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 24, 32)).shape == (1, 2, 16, 24, 32)
    with pytest.raises(ValueError, match="nearest legal sizes: 32 or 40"):
        net.output_shape((36, 48, 64))


def test_illegal_tile_names_nearest_legal_sizes():
    net = UNet(3, 3, base_channels=2)
    with pytest.raises(ValueError, match="nearest legal sizes: 124 or 132"):
        net.output_shape((116, 130, 132))
    with pytest.raises(ValueError, match="illegal tile size"):
        net(torch.zeros(1, 3, 116, 130, 132))


def test_bn_eval_modes():
    torch.manual_seed(0)
    net = UNet(1, 2, base_channels=2, depth=2)
    assert net.bn_eval_stats == "batch" and net.has_batchnorm
    x = torch.randn(1, 1, 20, 20, 20) * 3 + 5
    net.eval()
    with torch.no_grad():
        batch_stats = net(x)
        net.bn_eval_stats = "running"
        running_stats = net(x)
        net.bn_eval_stats = "batch"
        net.train()
        train_mode = net(x)
    # paper default: current batch statistics at test time equal the training-mode forward
    assert torch.allclose(batch_stats, train_mode, atol=1e-5)
    assert not torch.allclose(batch_stats, running_stats, atol=1e-3)
    with pytest.raises(ValueError):
        net.bn_eval_stats = "bogus"


def test_batch_stats_eval_does_not_touch_running_stats():
    net = UNet(1, 2, base_channels=2, depth=2).eval()
    bn = next(m for m in net.modules() if isinstance(m, PaperBatchNorm))
    before = bn.running_mean.clone()
    with torch.no_grad():
        net(torch.randn(1, 1, 20, 20, 20) + 10)
    assert torch.equal(before, bn.running_mean)


def test_norm_variants_and_bad_arguments():
    assert not UNet(1, 2, base_channels=2, norm="none").has_batchnorm
    assert not UNet(1, 2, base_channels=2, norm="instance").has_batchnorm
    with pytest.raises(ValueError):
        UNet(1, 2, norm="group")
    with pytest.raises(ValueError):
        UNet(1, 2, padding="reflect")


@pytest.mark.parametrize("inplace", [False, True])
def test_the_one_batch_statistics_norm_and_its_plain_fallback_agree(inplace):
    """Test-time BN with the batch's statistics (paper Sec. 2) has one implementation, used by
    PaperBatchNorm and by the predictor's in-place layer; its plain fallback agrees."""
    import torch.nn.functional as F

    from sparse3d.models.blocks import batch_stats_norm, plain_batch_stats_norm

    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 6, 3) * 3 + 1
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    want = F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    for fn in (batch_stats_norm, plain_batch_stats_norm):
        xin = x.clone()
        y, mean, var = fn(xin, w, b, 1e-5, inplace=inplace)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3, 4)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            var, x.var(dim=(0, 2, 3, 4), unbiased=False), atol=1e-4, rtol=1e-4
        )
        assert (y.data_ptr() == xin.data_ptr()) == inplace


# -- initialisation ---------------------------------------------------------------------------
def _convs(net):
    kinds = (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    return [m for m in net.modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("init", ["he", "torch"])
def test_init_std_of_every_convolution(init):
    """He: std sqrt(2 / fan_in), zero biases; PyTorch's default: std 1 / sqrt(3 fan_in) with
    PyTorch's own fan-in."""
    from sparse3d.models.unet import fan_in

    torch.manual_seed(0)
    net = UNet(3, 3, norm="none", init=init)  # the paper's network
    assert net.num_parameters() == 19_069_955
    convs = _convs(net)
    assert len(convs) == 2 * 4 + 3 * 3 + 1  # double convs, up-convs + their double convs, head
    checked = 0
    for m in convs:
        w = m.weight.detach().double()
        if w.numel() < 20_000:  # too few weights for a tight estimate (first conv, head)
            continue
        if init == "he":
            want = (2.0 / fan_in(m)) ** 0.5
        else:  # PyTorch's fan-in: weight.size(1) x kernel (out channels for an up-convolution)
            want = (3.0 * torch.nn.init._calculate_fan_in_and_fan_out(m.weight)[0]) ** -0.5
        assert float(w.std()) == pytest.approx(want, rel=0.03), m
        assert abs(float(w.mean())) < 0.03 * want
        if init == "he" and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
        checked += 1
    assert checked >= 15


def test_fan_in_counts_incoming_connections():
    from sparse3d.models.unet import fan_in

    assert fan_in(torch.nn.Conv3d(64, 128, 3)) == 64 * 27
    assert fan_in(torch.nn.Conv2d(8, 4, 3)) == 8 * 9
    # kernel 2, stride 2: one tap per input channel reaches each output voxel
    assert fan_in(torch.nn.ConvTranspose3d(256, 256, 2, stride=2)) == 256
    assert fan_in(torch.nn.ConvTranspose3d(16, 16, 4, stride=2)) == 16 * 8


def test_he_init_keeps_the_signal_of_a_network_without_bn():
    """The reason for He: without normalisation PyTorch's default shrinks the logits' scale
    by orders of magnitude over the layers; He keeps it near the input's."""
    x = torch.randn(1, 3, 44, 44, 44)
    scale = {}
    for init in ("torch", "he"):
        torch.manual_seed(0)
        net = UNet(3, 3, base_channels=8, depth=3, norm="none", init=init)
        with torch.no_grad():
            scale[init] = float(net(x).std())
    assert scale["he"] > 0.1 and scale["torch"] < 0.1 * scale["he"]


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        UNet(1, 2, base_channels=2, init="xavier")
