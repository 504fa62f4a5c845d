"""densify's refine method: held-out forest probabilities, pseudo-labels, tiles, slab prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse3d.data.annotation import slice_mask
from sparse3d.densify.forests import (
    RandomForestSegmenter,
    context_features,
    crossfit_probabilities,
    plane_folds,
    stacked_probabilities,
)
from sparse3d.densify.network import PlaneTiles, fit_tile, predict_same_padded, pseudo_labels
from sparse3d.models import UNet


class RecordingForest:
    """A stand-in forest: remembers the labels it was fitted on, predicts a one-hot of the
    number of its fit (so each voxel shows which fit predicted it)."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.fits: list[np.ndarray] = []

    def fit(self, features, label):
        self.fits.append(label.copy())
        return self

    def predict_proba(self, features):
        out = np.zeros((self.num_classes, *features.shape[1:]), np.float32)
        out[len(self.fits) % self.num_classes] = 1.0
        return out


def test_plane_folds_deal_planes_diagonally():
    folds = plane_folds({"z": (5,), "y": (9,), "x": (7, 3)}, 2)
    assert folds == [{"z": (5,), "x": (3,)}, {"y": (9,), "x": (7,)}]
    assert plane_folds({"z": (1,)}, 3) == [{"z": (1,)}]
    assert plane_folds({"z": (1, 4, 7, 9)}, 3) == [{"z": (1, 9)}, {"z": (4,)}, {"z": (7,)}]
    assert plane_folds({}, 3) == []


def test_plane_folds_never_hold_out_the_middle_of_every_axis_at_once():
    # 3 planes per axis, 3 folds: every fold has one plane of each axis, and no fold holds the
    # middle plane of two axes (a structure seen only there would vanish from a fold's training)
    slices = {"z": (10, 20, 30), "y": (11, 21, 31), "x": (12, 22, 32)}
    folds = plane_folds(slices, 3)
    assert len(folds) == 3
    assert all(sorted(f) == ["x", "y", "z"] and all(len(v) == 1 for v in f.values()) for f in folds)
    for ax in "zyx":
        assert sorted(f[ax][0] for f in folds) == list(slices[ax])
    middles = [sum(f[ax][0] == slices[ax][1] for ax in "zyx") for f in folds]
    assert middles == [1, 1, 1]


def test_crossfit_never_predicts_planes_with_a_forest_that_saw_them():
    shape, k, ign = (12, 14, 16), 5, 5
    slices = {"z": (3, 8), "y": (7,), "x": (4, 11)}
    truth = np.random.default_rng(0).integers(0, 2, shape).astype(np.uint8)
    label = np.where(slice_mask(shape, slices), truth, ign).astype(np.uint8)
    feats = np.zeros((2, *shape), np.float32)
    forest, fold_forest = RecordingForest(k, ign), RecordingForest(k, ign)
    full, cross = crossfit_probabilities(feats, label, slices, forest, fold_forest, n_folds=3)
    assert len(forest.fits) == 1 and np.array_equal(forest.fits[0], label)
    assert len(fold_forest.fits) == 3
    folds = plane_folds(slices, 3)
    covered = np.zeros(shape, bool)
    for i, (fold, seen) in enumerate(zip(folds, fold_forest.fits, strict=True)):
        held = slice_mask(shape, fold)
        assert not (seen[held] != ign).any(), "a fold forest saw its own planes"
        # every other labelled voxel off the held-out planes was used
        assert np.array_equal(seen != ign, (label != ign) & ~held)
        # voxels of this fold's planes not on a later fold's planes carry this fit's one-hot
        later = np.zeros(shape, bool)
        for other in folds[i + 1 :]:
            later |= slice_mask(shape, other)
        only = held & ~later
        assert (cross.argmax(0)[only] == (i + 1) % k).all()
        covered |= held
    # off the planes the held-out map is the full forest's
    assert np.array_equal(cross[:, ~covered], full[:, ~covered])
    assert (full.argmax(0) == 1).all()


def test_stacked_forests_learn_spheres_and_context_adds_channels():
    rng = np.random.default_rng(1)
    shape = (20, 24, 24)
    zz, yy, xx = np.indices(shape)
    truth = (((zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2) < 49).astype(np.uint8)
    image = (truth + 0.4 * rng.standard_normal(shape)).astype(np.float32)[None]
    slices = {"z": (10,), "y": (12,), "x": (12,)}
    label = np.where(slice_mask(shape, slices), truth, 2).astype(np.uint8)
    from sparse3d.densify.features import voxel_features

    feats = voxel_features(image, sigmas=(1.0, 2.0))
    forest = RandomForestSegmenter(2, 2, n_trees=10, n_jobs=1)
    fold = RandomForestSegmenter(2, 2, n_trees=5, n_jobs=1)
    full, cross = stacked_probabilities(feats, label, slices, forest, fold, stages=2)
    assert full.shape == cross.shape == (2, *shape)
    np.testing.assert_allclose(full.sum(0), 1.0, atol=1e-5)
    unannotated = label == 2
    pred = full.argmax(0)
    inter = ((pred == 1) & (truth == 1) & unannotated).sum()
    union = (((pred == 1) | (truth == 1)) & unannotated).sum()
    assert inter / union > 0.8
    assert context_features(full, (1.0, 3.0)).shape == (6, *shape)


def test_pseudo_labels_only_confident_and_never_on_the_annotation():
    probs = np.array([[[[0.9, 0.6, 0.2]]], [[[0.1, 0.4, 0.8]]]], np.float32)  # (2, 1, 1, 3)
    label = np.array([[[2, 2, 0]]], np.uint8)
    out = pseudo_labels(probs, label, ignore_index=2, threshold=0.8)
    assert out.tolist() == [[[0, 2, 2]]]


def test_class_balanced_pseudo_labels_keep_the_most_confident_share_of_every_class():
    """Class 1 wins four unannotated voxels, none at the 0.8 threshold: with a class fraction
    of 0.5 its two most confident become pseudo-labels; class 0 (all above 0.8) is unchanged,
    the annotated voxel stays free of pseudo-labels."""
    p1 = np.array([0.1, 0.05, 0.6, 0.7, 0.65, 0.55, 0.9], np.float32)
    probs = np.stack([1 - p1, p1])[:, None, None, :]  # (2, 1, 1, 7)
    label = np.array([[[2, 2, 2, 2, 2, 2, 1]]], np.uint8)
    plain = pseudo_labels(probs, label, ignore_index=2, threshold=0.8)
    assert plain.tolist() == [[[0, 0, 2, 2, 2, 2, 2]]]
    balanced = pseudo_labels(probs, label, ignore_index=2, threshold=0.8, class_fraction=0.5)
    assert balanced.tolist() == [[[0, 0, 2, 1, 1, 2, 2]]]
    every = pseudo_labels(probs, label, ignore_index=2, threshold=0.8, class_fraction=1.0)
    assert every.tolist() == [[[0, 0, 1, 1, 1, 1, 2]]]


def test_fit_tile_keeps_the_pooling_multiple():
    assert fit_tile((32, 64, 64), (31, 61, 57), 4) == (28, 60, 56)
    assert fit_tile((32, 64, 64), (2, 100, 100), 4) == (4, 64, 64)


def test_plane_tiles_pad_thin_volumes_with_ignore_and_show_annotation():
    shape, ign = (3, 20, 20), 3
    image = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    label = np.full(shape, ign, np.uint8)
    label[1, 5:15, 5:15] = 1
    pseudo = np.full(shape, ign, np.uint8)
    tiles = PlaneTiles(image, label, pseudo, ign, (8, 16, 16), seed=0, pseudo_fraction=0.0)
    it = iter(tiles)
    for _ in range(5):
        t = next(it)
        assert t["image"].shape == (2, 8, 16, 16) and t["label"].shape == (8, 16, 16)
        assert (t["label"] == 1).any(), "an annotated voxel is always in view"
        assert set(torch.unique(t["label"]).tolist()) <= {1, ign}
    with pytest.raises(ValueError, match="no annotated voxel"):
        PlaneTiles(image, np.full(shape, ign, np.uint8), pseudo, ign, (8, 16, 16))


def test_plane_tiles_flip_only_the_chosen_axes():
    """With ``flip_axes=("x",)`` no tile is ever flipped along z or y, some are along x; with
    ``()`` none is; an unknown axis is refused."""
    ign = 3
    shape = (8, 16, 16)
    # the image is its own coordinates: a flip along an axis reverses that coordinate channel
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    image = np.stack([zz, yy, xx])
    label = np.full(shape, ign, np.uint8)
    label[4] = 1
    pseudo = np.full(shape, ign, np.uint8)

    def flipped(tiles: PlaneTiles, n: int = 40) -> set[int]:
        seen: set[int] = set()
        it = iter(tiles)
        for _ in range(n):
            img = next(it)["image"]
            for axis in range(3):
                coord = img[axis].movedim(axis, 0)  # increasing along its own axis unless flipped
                if coord[-1].mean() < coord[0].mean():
                    seen.add(axis)
        return seen

    assert flipped(PlaneTiles(image, label, pseudo, ign, shape, flip_axes=("x",))) == {2}
    assert flipped(PlaneTiles(image, label, pseudo, ign, shape, flip_axes=())) == set()
    assert flipped(PlaneTiles(image, label, pseudo, ign, shape)) == {0, 1, 2}
    with pytest.raises(ValueError, match="flip_axes"):
        PlaneTiles(image, label, pseudo, ign, shape, flip_axes=("w",))


def test_plane_tiles_with_the_paper_deformation_keep_shapes_and_codes():
    """Deformed tiles have the tile's shape, labels only the codes they had (nearest
    neighbour, ignore outside) and differ from the plain crop."""
    from sparse3d.data.transforms import RandPaperDeformd

    shape, tile, ign = (12, 40, 40), (8, 32, 32), 3
    rng = np.random.default_rng(0)
    image = rng.random((2, *shape), dtype=np.float32)
    label = np.full(shape, ign, np.uint8)
    label[6] = rng.integers(0, 2, shape[1:])
    pseudo = np.full(shape, ign, np.uint8)
    pseudo[2] = 2
    deform = RandPaperDeformd(
        keys=("image", "label", "pseudo"), label_keys=("label", "pseudo"), spatial_size=tile,
        ignore_index=ign,
    )  # fmt: skip
    deform.set_random_state(seed=0)
    plain = iter(PlaneTiles(image, label, pseudo, ign, tile, seed=1, flip_axes=()))
    warped = iter(PlaneTiles(image, label, pseudo, ign, tile, seed=1, flip_axes=(), deform=deform))
    differ = 0
    for _ in range(6):
        a, b = next(plain), next(warped)
        assert b["image"].shape == (2, *tile) and b["label"].shape == tile == b["pseudo"].shape
        assert set(torch.unique(b["label"]).tolist()) <= {0, 1, ign}
        assert set(torch.unique(b["pseudo"]).tolist()) <= {2, ign}
        differ += int(not torch.equal(a["image"], b["image"]))
    assert differ == 6


def test_class_centre_sampling_shows_a_rare_class_as_often_as_a_common_one():
    """Four annotated voxels of class 2 among 1,024 of class 0: drawn about 0.4 % of the time
    voxel by voxel, about half the time class by class; pseudo-labels are grouped alike."""
    ign = 3
    shape = (8, 16, 16)
    image = np.zeros((1, *shape), np.float32)
    label = np.full(shape, ign, np.uint8)
    label[4] = 0
    label[4, :2, :2] = 2
    pseudo = np.full(shape, ign, np.uint8)
    pseudo[1, :1, :3] = 1
    pseudo[6] = 0

    def rare_share(sampling: str, use_pseudo: bool) -> float:
        tiles = PlaneTiles(image, label, pseudo, ign, shape, centre_sampling=sampling)
        rng = np.random.default_rng(0)
        centres = [tiles._draw(rng, use_pseudo) for _ in range(2000)]
        codes = (tiles.pseudo if use_pseudo else tiles.label).numpy()
        return float(np.mean([codes[tuple(c)] != 0 for c in centres]))

    assert rare_share("voxel", False) < 0.02
    assert 0.45 < rare_share("class", False) < 0.55
    assert 0.45 < rare_share("class", True) < 0.55
    with pytest.raises(ValueError, match="centre_sampling"):
        PlaneTiles(image, label, pseudo, ign, shape, centre_sampling="balanced")


def test_slab_prediction_equals_one_pass():
    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=2, padding="same", norm="none").eval()
    image = np.random.default_rng(0).random((2, 37, 12, 10), dtype=np.float32)
    one = predict_same_padded(net, image, multiple=2, halo=net.receptive_field, max_voxels=10**9)
    slabs = predict_same_padded(
        net, image, multiple=2, halo=net.receptive_field, max_voxels=12 * 10 * 30
    )
    assert one.shape == (3, 37, 12, 10)
    np.testing.assert_allclose(one.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(slabs, one, atol=1e-5)


def test_test_time_flips_average_the_flipped_passes():
    """Each flipped pass is flipped back before averaging: the average equals the mean of the
    passes computed by hand, and a net that is symmetric under the flips is left unchanged."""
    from sparse3d.densify.network import TTA_FLIPS

    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=2, depth=2, padding="same", norm="none").eval()
    image = np.random.default_rng(1).random((2, 8, 12, 10), dtype=np.float32)
    kw = {"multiple": 2, "halo": net.receptive_field, "max_voxels": 10**9}
    tta = predict_same_padded(net, image, flips=TTA_FLIPS, **kw)
    by_hand = np.mean(
        [
            np.flip(predict_same_padded(net, np.flip(image, a).copy(), **kw), a)
            if a
            else predict_same_padded(net, image, **kw)
            for a in TTA_FLIPS
        ],
        axis=0,
    )
    np.testing.assert_allclose(tta, by_hand, atol=1e-6)
    assert np.abs(tta - predict_same_padded(net, image, **kw)).max() > 1e-4  # flips did matter
    np.testing.assert_allclose(tta.sum(0), 1.0, atol=1e-5)


def test_refine_class_weights_from_the_annotated_voxels():
    """Balanced: inverse frequency of the annotated voxels, mean 1 over the present classes, 0
    for an absent one; sqrt: the square root, renormalised; unlabelled voxels do not count."""
    from sparse3d.densify.methods import refine_class_weights

    ign = 3
    label = np.full((4, 10, 10), ign, np.uint8)
    label[0] = 0  # 100 voxels of class 0
    label[1, :1, :] = 1  # 10 of class 1, none of class 2
    assert refine_class_weights(label, 3, None) is None
    balanced = refine_class_weights(label, 3, "balanced")
    np.testing.assert_allclose(balanced, [2 / 11, 20 / 11, 0.0])
    sqrt = np.sqrt([1 / 100, 1 / 10])
    np.testing.assert_allclose(
        refine_class_weights(label, 3, "sqrt"), [*(2 * sqrt / sqrt.sum()), 0]
    )
    with pytest.raises(ValueError, match="class_weights"):
        refine_class_weights(label, 3, "inverse")


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_refiner_trains_in_the_chosen_precision(precision, dtype):
    """``refine.precision``: the network's convolutions run in bf16 under bf16-mixed (weights
    stay fp32), in fp32 otherwise; the resolved precision is returned for densify.json."""
    from sparse3d.densify.network_fit import RefineModule, fit_refiner

    shape, ign = (8, 16, 16), 3
    rng = np.random.default_rng(0)
    image = rng.random((1, *shape), dtype=np.float32)
    label = np.full(shape, ign, np.uint8)
    label[4, 2:14, 2:14] = rng.integers(0, 3, (12, 12))
    tiles = PlaneTiles(image, label, label.copy(), ign, (8, 16, 16), seed=0)
    torch.manual_seed(0)
    net = UNet(1, 3, base_channels=2, depth=2, padding="same", norm="batch")
    seen = []
    net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    module = RefineModule(net, 3, ign, pseudo_weight=0.0, lr=1e-3, max_steps=2, time_budget_s=None)
    fit = fit_refiner(module, tiles, 1, accelerator="cpu", progress_bar=False, precision=precision)
    assert fit["precision"] == precision and fit["steps"] == 2
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_prediction_runs_in_the_precision_the_network_trained_in():
    """``precision="bf16"``: the convolutions run under bf16 autocast (the head's output is
    bf16), the softmax comes back float32 and close to, but not bit-equal to, the fp32 pass."""
    torch.manual_seed(0)
    net = UNet(2, 3, base_channels=4, depth=2, padding="same", norm="batch").eval()
    image = np.random.default_rng(2).random((2, 8, 12, 10), dtype=np.float32)
    seen = []
    net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    kw = {"multiple": 2, "halo": net.receptive_field, "max_voxels": 10**9}
    fp32 = predict_same_padded(net, image, **kw)
    bf16 = predict_same_padded(net, image, precision="bf16", **kw)
    assert seen == [torch.float32, torch.bfloat16]
    assert fp32.dtype == bf16.dtype == np.float32
    np.testing.assert_allclose(bf16.sum(0), 1.0, atol=1e-5)
    diff = np.abs(bf16 - fp32).max()
    assert 0 < diff < 0.05
