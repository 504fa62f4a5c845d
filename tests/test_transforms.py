"""Tests of the paper's augmentation transforms (Sec. 3.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from scipy.ndimage import gaussian_filter
from scipy.sparse.linalg import spsolve

from sparse3d.data import resample_fast
from sparse3d.data.deform import source_box
from sparse3d.data.resample import RESAMPLERS, resample
from sparse3d.data.tiles import extract_tile
from sparse3d.data.transforms import (
    RandGrayValued,
    RandPaperDeformd,
    control_points,
    deformation_field,
    rotation_matrix,
    spline_matrix,
    voxel_affine,
)

IGNORE = 3
SHAPE = (24, 40, 36)


def blob_label(shape, seed=0, ignore_fraction=0.0):
    """Label with large smooth regions of classes 0..2 (and optionally ignore regions)."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal(shape), 4.0)
    label = np.digitize(field, np.quantile(field, [0.33, 0.66])).astype(np.uint8)
    if ignore_fraction:
        other = gaussian_filter(rng.standard_normal(shape), 4.0)
        label[other < np.quantile(other, ignore_fraction)] = IGNORE
    return label


def smooth_image(shape, channels=2, seed=1):
    rng = np.random.default_rng(seed)
    img = np.stack([gaussian_filter(rng.standard_normal(shape), 2.0) for _ in range(channels)])
    return img.astype(np.float32)


def deform(**kw):
    defaults = dict(
        spatial_size=SHAPE,
        sigma_voxels=4.0,
        grid_spacing=16,
        rotate_range_deg=(180.0, 15.0, 15.0),
        scale_range=(0.9, 1.1),
        voxel_size_zyx_um=(2.04, 1.76, 1.76),
        ignore_index=IGNORE,
    )
    defaults.update(kw)
    return RandPaperDeformd(**defaults)


# ---- geometry ---------------------------------------------------------------------------------


def test_rotation_and_affine_are_physical_rotations():
    rng = np.random.default_rng(0)
    for _ in range(5):
        angles = rng.uniform(-np.pi, np.pi, 3)
        r = rotation_matrix(angles)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
        # voxel-space map preserves physical lengths up to the scale factor
        v = np.array([2.04, 1.76, 1.76])
        a = voxel_affine(angles, 1.25, v)
        d = rng.standard_normal(3)
        assert np.linalg.norm(v * (a @ d)) == pytest.approx(np.linalg.norm(v * d) / 1.25)
    # rotation about z leaves z alone
    r = rotation_matrix([0.7, 0.0, 0.0])
    np.testing.assert_allclose(r[0], [1.0, 0.0, 0.0], atol=1e-12)


def test_spline_matrix_interpolates_and_reproduces_linear():
    length, spacing = 50, 16.0
    nodes = control_points(length, spacing)
    assert nodes[0] < 0 and nodes[-1] > length - 1
    m = spline_matrix(length, spacing)
    assert m.shape == (length, nodes.size)
    # a cubic spline through linear node values is that line (partition of unity + linearity)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(m @ (3.0 * nodes - 2.0), 3.0 * np.arange(length) - 2.0, atol=1e-9)


def test_field_fast_path_matches_exact_reference():
    """Fast factorised float32 coordinates vs an independent float64 evaluation."""
    t = deform()
    t.set_random_state(3)
    t.randomize(SHAPE)
    fast = t.sampling_coordinates(SHAPE)
    nodes = [control_points(s, t.grid_spacing) for s in SHAPE]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    field = np.stack(
        [
            RegularGridInterpolator(nodes, t.node_values[c], method="cubic", solver=spsolve)(grid)
            for c in range(3)
        ]
    )
    np.testing.assert_allclose(field, deformation_field(t.node_values, SHAPE, 16), atol=1e-9)
    centre = (np.asarray(SHAPE) - 1) / 2
    offset = np.moveaxis(grid - centre, -1, 0).reshape(3, -1)
    exact = (t.affine() @ offset).reshape(3, *SHAPE) + centre[:, None, None, None] + field
    err = np.abs(fast - exact).max()
    assert err < 1e-3, err  # stated tolerance: float32 round-off, 1e-3 voxels
    assert np.abs(field).max() > 1.0  # the field is really there


def test_required_margin_covers_draws():
    t = deform()
    margin = np.asarray(t.required_margin_zyx())
    for seed in range(5):
        t.set_random_state(seed)
        t.randomize(SHAPE)
        q = t.sampling_coordinates(SHAPE).reshape(3, -1)
        assert np.all(q.min(axis=1) >= -margin)
        assert np.all(q.max(axis=1) <= np.asarray(SHAPE) - 1 + margin)


# ---- resampling -------------------------------------------------------------------------------


def test_identity_is_exact_crop():
    image = smooth_image((30, 44, 40))
    label = blob_label((30, 44, 40), ignore_fraction=0.3)
    t = deform(sigma_voxels=0.0, rotate_range_deg=(0, 0, 0), scale_range=(1, 1))
    out = t({"image": image, "label": label})
    off = [(a - b) // 2 for a, b in zip(image.shape[1:], SHAPE, strict=True)]
    sl = tuple(slice(o, o + s) for o, s in zip(off, SHAPE, strict=True))
    np.testing.assert_array_equal(out["image"], image[(slice(None), *sl)])
    np.testing.assert_array_equal(out["label"], label[sl])
    # torch in, torch out, same values; label sub-box
    t2 = deform(
        sigma_voxels=0.0,
        rotate_range_deg=(0, 0, 0),
        scale_range=(1, 1),
        label_spatial_size=(8, 10, 12),
    )
    out2 = t2({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
    assert isinstance(out2["image"], torch.Tensor)
    np.testing.assert_array_equal(out2["image"].numpy(), out["image"])
    np.testing.assert_array_equal(out2["label"].numpy(), out["label"][8:16, 15:25, 12:24])


def test_identity_with_start_matches_extract_tile():
    image = smooth_image((20, 30, 28))
    label = blob_label((20, 30, 28))
    t = deform(sigma_voxels=0.0, rotate_range_deg=(0, 0, 0), scale_range=(1, 1))
    start = (-7, 20, -3)  # overhangs the volume: mirror image, ignore label
    out = t({"image": image, "label": label, "tile_start_zyx": start})
    output_start = tuple(s + (i - o) // 2 for s, i, o in zip(start, SHAPE, SHAPE, strict=True))
    img, lab = extract_tile(image, label, output_start, SHAPE, SHAPE, ignore_index=IGNORE)
    np.testing.assert_array_equal(out["image"], img)
    np.testing.assert_array_equal(out["label"], lab)
    assert (out["label"][:7] == IGNORE).all()


def test_label_moves_with_image():
    """Image channel == label (as float): nearest label == image wherever the image is an
    exact class value (all 8 neighbours agree), including ignore regions."""
    label = blob_label((32, 48, 44), ignore_fraction=0.25)
    image = label[None].astype(np.float32)
    for seed in range(3):
        t = deform()
        t.set_random_state(seed)
        out = t({"image": image, "label": label})
        img, lab = out["image"][0], out["label"]
        q = np.round(t.sampling_coordinates(label.shape))
        inside = np.all((q >= 0) & (q <= np.asarray(label.shape)[:, None, None, None] - 1), 0)
        pure = (np.abs(img - np.round(img)) < 1e-4) & inside  # outside: image mirrored
        assert pure.mean() > 0.5
        agree = lab[pure] == np.round(img[pure])
        assert agree.mean() > 0.999, agree.mean()
        assert (lab[~inside] == IGNORE).all()
        assert set(np.unique(lab)) <= {0, 1, 2, IGNORE}
        assert (lab == IGNORE).any() and (lab != IGNORE).any()


def test_label_crop_matches_full_label():
    label = blob_label((32, 48, 44))
    image = smooth_image((32, 48, 44))
    full = deform()
    crop = deform(label_spatial_size=(8, 12, 10))
    full.set_random_state(5)
    crop.set_random_state(5)
    a = full({"image": image, "label": label})
    b = crop({"image": image, "label": label})
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
    inner = a["label"][8:16, 14:26, 13:23]
    assert (inner == b["label"]).mean() > 0.999


def test_outside_becomes_ignore_not_class():
    label = np.zeros(SHAPE, dtype=np.uint8)  # every voxel class 0
    image = np.ones((1, *SHAPE), dtype=np.float32)
    t = deform(scale_range=(0.6, 0.6), rotate_range_deg=(30, 10, 10), sigma_voxels=2.0)
    t.set_random_state(0)
    out = t({"image": image, "label": label})
    q = np.round(t.sampling_coordinates(SHAPE))
    inside = np.all((q >= 0) & (q <= np.asarray(SHAPE)[:, None, None, None] - 1), axis=0)
    assert 0.05 < (~inside).mean() < 0.95
    expected = np.where(inside, 0, IGNORE)
    assert (out["label"] == expected).mean() > 0.999
    assert set(np.unique(out["label"])) == {0, IGNORE}
    np.testing.assert_allclose(out["image"], 1.0, atol=1e-5)  # mirrored image stays 1


def test_ignore_stays_ignore():
    label = np.full(SHAPE, IGNORE, dtype=np.uint8)
    t = deform()
    t.set_random_state(2)
    out = t({"image": np.zeros((1, *SHAPE), np.float32), "label": label})
    assert (out["label"] == IGNORE).all()


def test_determinism_and_randomness():
    image = smooth_image(SHAPE)
    label = blob_label(SHAPE)
    a, b, c = deform(), deform(), deform()
    a.set_random_state(11)
    b.set_random_state(11)
    c.set_random_state(12)
    oa = a({"image": image, "label": label})
    ob = b({"image": image, "label": label})
    oc = c({"image": image, "label": label})
    np.testing.assert_array_equal(oa["image"], ob["image"])
    np.testing.assert_array_equal(oa["label"], ob["label"])
    assert not np.allclose(oa["image"], oc["image"])


def test_shapes_and_types():
    image = smooth_image((30, 44, 40), channels=3)
    label = blob_label((30, 44, 40))
    t = deform(label_spatial_size=(10, 12, 14))
    out = t({"image": image, "label": label[None]})
    assert out["image"].shape == (3, *SHAPE) and out["image"].dtype == np.float32
    assert out["label"].shape == (1, 10, 12, 14) and out["label"].dtype == np.uint8
    out = t({"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64))})
    assert isinstance(out["label"], torch.Tensor) and out["label"].dtype == torch.int64
    assert out["label"].shape == (10, 12, 14)
    # spatial_size None: output = input shape
    t = RandPaperDeformd(keys=("image",), grid_spacing=16, ignore_index=IGNORE)
    assert t({"image": image})["image"].shape == image.shape
    with pytest.raises(ValueError, match="shape"):
        deform()({"image": image, "label": label[:5]})


def test_2d_transform():
    image = smooth_image((40, 44))  # (C, H, W)
    label = blob_label((40, 44))
    t = RandPaperDeformd(
        spatial_size=(32, 36), label_spatial_size=(16, 20), grid_spacing=16,
        rotate_range_deg=(180.0,), voxel_size_zyx_um=(1.0, 1.0), ignore_index=IGNORE,
    )  # fmt: skip
    t.set_random_state(0)
    out = t({"image": label[None].astype(np.float32), "label": label})
    assert out["image"].shape == (1, 32, 36) and out["label"].shape == (16, 20)
    img = out["image"][0, 8:24, 8:28]
    pure = np.abs(img - np.round(img)) < 1e-4
    assert (out["label"][pure] == np.round(img[pure])).mean() > 0.999
    assert t({"image": image, "label": label})["image"].shape == (2, 32, 36)


def test_row_sampler_matches_3d_grid_sample():
    """The fast backend's CPU row-flattened trilinear sampler vs PyTorch's 3D grid_sample."""
    image = torch.from_numpy(smooth_image((30, 44, 40), channels=2))
    label = torch.from_numpy(blob_label((30, 44, 40)))
    t = deform()
    t.set_random_state(4)
    t.randomize(SHAPE)
    plan = t.plan(((30 - 24) // 2, 2, 2), (0, 0, 0), SHAPE)
    fast = resample_fast.linear(image, plan, "reflection")
    padded = plan.reaches_outside(image.shape[1:])
    a, b = source_box(plan, image.shape[1:], padded)
    src = image[:, a[0] : b[0], a[1] : b[1], a[2] : b[2]]
    ref = resample_fast._generic(src, plan, a, "bilinear", "reflection")
    assert (fast - ref).abs().max() < 5e-3 * image.abs().max()
    lab_fast = resample_fast.nearest(label, plan, IGNORE)
    old = resample_fast.MAX_ROWS
    try:
        resample_fast.MAX_ROWS = 0  # force the 3D path
        lab_ref = resample_fast.nearest(label, plan, IGNORE)
    finally:
        resample_fast.MAX_ROWS = old
    assert (lab_fast == lab_ref).float().mean() > 0.999


# ---- resampling backends: "fast" vs "plain" ---------------------------------------------------


def half_voxel_ties(q, eps=1e-3):
    """``(*box)`` mask: a coordinate ``q (D, *box)`` within ``eps`` of a half-voxel position on
    some axis, where nearest-neighbour may round either way."""
    return (np.abs(q - np.floor(q) - 0.5) < eps).any(axis=0)


BACKEND_CASES = {
    "3d": dict(),
    "3d_border": dict(image_padding="border"),
    "3d_label_box": dict(label_spatial_size=(8, 12, 10)),
    "3d_strong": dict(scale_range=(0.6, 0.7), rotate_range_deg=(180.0, 40.0, 40.0)),
    "2d": dict(
        spatial_size=(32, 36),
        label_spatial_size=(16, 20),
        rotate_range_deg=(180.0,),
        voxel_size_zyx_um=(1.0, 1.0),
        scale_range=(0.7, 0.8),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_plain_and_fast_backends_agree(case):
    """Same draw through both backends: images equal to float32 round-off, labels equal away
    from half-voxel ties, and label voxels from outside the volume are ignore in both."""
    kw = BACKEND_CASES[case]
    vol = (40, 56, 52) if "spatial_size" not in kw else (40, 44)
    image = smooth_image(vol, channels=2)
    label = blob_label(vol, ignore_fraction=0.2)
    start = (-6, 20, 3) if len(vol) == 3 else (-6, 15)  # overhangs the volume on axis 0
    fast, plain = deform(**kw), deform(**kw, resampler="plain")
    assert (fast.resampler, plain.resampler) == ("fast", "plain")
    outside_seen = 0
    for seed in range(3):
        data = {"image": image, "label": label, "tile_start_zyx": start}
        fast.set_random_state(seed)
        plain.set_random_state(seed)
        a, b = fast(data), plain(data)
        assert a["image"].dtype == b["image"].dtype == np.float32
        assert a["label"].dtype == b["label"].dtype == np.uint8
        diff = np.abs(a["image"] - b["image"]).max()
        assert diff < 1e-4 * np.abs(image).max(), diff
        q = fast.sampling_coordinates(vol, start, label=True)
        ties = half_voxel_ties(q)
        assert ties.mean() < 0.05
        np.testing.assert_array_equal(a["label"][~ties], b["label"][~ties])
        r = np.round(q)
        outside = ~np.all((r >= 0) & (r <= np.asarray(vol).reshape(-1, *[1] * len(vol)) - 1), 0)
        outside &= ~ties
        assert (a["label"][outside] == IGNORE).all() and (b["label"][outside] == IGNORE).all()
        outside_seen += outside.sum()
    assert outside_seen > 0  # the start overhang really pulls voxels from outside


def test_plain_and_fast_agree_on_int_images_and_torch_tensors():
    image = (smooth_image((30, 44, 40)) * 1000).astype(np.int16)
    label = torch.from_numpy(blob_label((30, 44, 40)).astype(np.int64))
    outs = []
    for backend in RESAMPLERS:
        t = deform(resampler=backend)
        t.set_random_state(1)
        outs.append(t({"image": torch.from_numpy(image), "label": label}))
    (a, b) = outs
    assert a["image"].dtype == b["image"].dtype == torch.float32
    assert a["label"].dtype == b["label"].dtype == torch.int64
    assert (a["image"] - b["image"]).abs().max() < 1e-4 * np.abs(image).max()
    assert (a["label"] == b["label"]).float().mean() > 0.999


def test_resample_function_backends_and_errors():
    image = torch.from_numpy(smooth_image((30, 44, 40)))
    label = torch.from_numpy(blob_label((30, 44, 40)))
    t = deform()
    t.set_random_state(0)
    t.randomize(SHAPE)
    plan = t.plan((3, 2, 2), (0, 0, 0), SHAPE)
    fast = resample(image, plan, "linear", "fast")
    plain = resample(image, plan, "linear", "plain")
    assert fast.shape == plain.shape == (2, *SHAPE)
    assert (fast - plain).abs().max() < 1e-4 * image.abs().max()
    lab = [resample(label, plan, "nearest", b, ignore_index=IGNORE) for b in RESAMPLERS]
    assert lab[0].shape == lab[1].shape == SHAPE and lab[0].dtype == torch.uint8
    assert (lab[0] == lab[1]).float().mean() > 0.999
    with pytest.raises(ValueError, match="unknown resampler 'slow'.*fast.*plain"):
        resample(image, plan, "linear", "slow")
    with pytest.raises(ValueError, match="mode"):
        resample(image, plan, "cubic", "plain")
    with pytest.raises(ValueError, match="ignore_index"):
        resample(label, plan, "nearest", "plain")
    with pytest.raises(ValueError, match="padding"):
        resample(image, plan, "linear", "plain", padding="zeros")


def test_unknown_resampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown resampler 'fastest'.*'fast', 'plain'"):
        deform(resampler="fastest")


def test_config_resampler_reaches_the_transform():
    """``resampler`` in conf/augment/paper.yaml (and its command-line override) is the
    constructor argument of the transform Hydra builds."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sparse3d.cli import CONF_DIR

    facts = {"spatial_size": (20, 24, 24), "ignore_index": IGNORE}  # filled in by training
    for overrides, expected in (([], "fast"), (["augment.transforms.0.resampler=plain"], "plain")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["augment=paper", *overrides])
        node = OmegaConf.to_container(cfg.augment.transforms[0], resolve=True)
        assert node["resampler"] == expected
        t = instantiate({**node, **facts})
        assert isinstance(t, RandPaperDeformd) and t.resampler == expected
    GlobalHydra.instance().clear()


def test_start_key_on_volume_equals_tile_with_margin():
    """Cutting + deforming straight from the volume == deforming an extracted tile + margin."""
    vol_shape = (30, 50, 46)
    image = smooth_image(vol_shape)
    label = blob_label(vol_shape, ignore_fraction=0.2)
    kw = dict(label_spatial_size=(8, 12, 10), rotate_range_deg=(30.0, 5.0, 5.0))
    direct, tiled = deform(**kw), deform(**kw)
    margin = tiled.required_margin_zyx()
    output_start = (10, 30, 5)  # near borders: mirrored context
    for seed in range(2):
        direct.set_random_state(seed)
        tiled.set_random_state(seed)
        start = (output_start[0] - 8, output_start[1] - 14, output_start[2] - 13)
        a = direct({"image": image, "label": label, "tile_start_zyx": start})
        img, lab = extract_tile(image, label, output_start, SHAPE, (8, 12, 10), margin, IGNORE)
        b = tiled({"image": img, "label": lab})
        np.testing.assert_allclose(a["image"], b["image"], atol=5e-3)
        assert (a["label"] == b["label"]).mean() > 0.999


def test_float_and_int_images_and_non_contiguous_input():
    image = smooth_image((30, 44, 40))
    t = RandPaperDeformd(keys=("image",), spatial_size=SHAPE, grid_spacing=16)
    t.set_random_state(0)
    a = t({"image": image})["image"]
    t.set_random_state(0)
    b = t({"image": np.ascontiguousarray(image[:, :, :, ::-1])[:, :, :, ::-1]})["image"]
    np.testing.assert_array_equal(a, b)
    t.set_random_state(0)
    c = t({"image": torch.from_numpy(image).transpose(2, 3).contiguous().transpose(2, 3)})
    np.testing.assert_allclose(c["image"].numpy(), a, atol=5e-3)
    t.set_random_state(0)
    d = t({"image": (image * 10).astype(np.int16)})["image"]
    assert d.dtype == np.float32 and d.shape == (2, *SHAPE)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", RESAMPLERS)
def test_gpu_tensors_stay_on_gpu(backend):
    image = torch.from_numpy(smooth_image(SHAPE)).cuda()
    label = torch.from_numpy(blob_label(SHAPE)).cuda()
    t = deform(resampler=backend)
    t.set_random_state(0)
    out = t({"image": image, "label": label})
    assert out["image"].is_cuda and out["label"].is_cuda
    t.set_random_state(0)
    cpu = t({"image": image.cpu(), "label": label.cpu()})
    np.testing.assert_allclose(out["image"].cpu().numpy(), cpu["image"].numpy(), atol=5e-3)


# ---- gray values ------------------------------------------------------------------------------


def test_gray_value_monotone_and_range():
    rng = np.random.default_rng(0)
    image = (rng.random((3, 8, 10, 12)) * 50 + 10).astype(np.float32)
    g = RandGrayValued(strength=1.0)
    g.set_random_state(0)
    out = g({"image": image})["image"]
    for c in range(3):
        order = np.argsort(image[c], axis=None)
        assert np.all(np.diff(out[c].reshape(-1)[order]) >= -1e-4)
        assert out[c].min() == pytest.approx(image[c].min(), abs=1e-3)
        assert out[c].max() == pytest.approx(image[c].max(), abs=1e-3)
    assert not np.allclose(out, image, atol=0.1)
    t = np.linspace(0, 1, 201)
    for c in range(3):
        assert np.all(np.diff(g.curve(t, c)) >= 0)


def test_gray_value_identity_and_determinism():
    image = torch.rand(2, 6, 7, 8)
    g = RandGrayValued(strength=0.0)
    out = g({"image": image})["image"]
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), image.numpy(), atol=1e-5)
    a, b = RandGrayValued(), RandGrayValued()
    a.set_random_state(7)
    b.set_random_state(7)
    np.testing.assert_array_equal(a({"image": image})["image"], b({"image": image})["image"])
