"""The random-forest voxel classifier (sparse3d.densify.forests, sparse3d.densify.features): features, sampling, fit and prediction."""

from __future__ import annotations

import numpy as np
import pytest

from sparse3d.densify import features
from sparse3d.densify.features import feature_names, symmetric_eigvals3, voxel_features
from sparse3d.densify.forests import RandomForestSegmenter, segment_rf
from sparse3d.metrics import confusion_matrix, iou_summary

SIGMAS = (1.0, 2.0)
IGNORE = 7


def _spheres(shape=(32, 40, 40), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Bright balls (class 0) in noise (class 1): image (1, Z, Y, X) and the dense truth."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    inside = np.zeros(shape, bool)
    for cz, cy, cx, r in [(10, 12, 12, 6), (20, 28, 14, 7), (16, 14, 29, 5), (24, 30, 30, 4)]:
        inside |= (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    image = np.where(inside, 2.0, 1.0) + rng.normal(0, 0.35, shape)
    return image[None].astype(np.float32), np.where(inside, 0, 1).astype(np.uint8)


def _planes(dense: np.ndarray, ignore: int, zyx=((10, 20), (14, 28), (12, 29))) -> np.ndarray:
    """The annotation of a few orthogonal planes; every other voxel is ``ignore``."""
    sparse = np.full_like(dense, ignore)
    for axis, idx in enumerate(zyx):
        for i in idx:
            sl = [slice(None)] * 3
            sl[axis] = i
            sparse[tuple(sl)] = dense[tuple(sl)]
    return sparse


def test_features_shape_dtype_and_finite():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (2, 10, 14, 12))
    feats = voxel_features(image, (2.0, 1.0, 1.0), sigmas=(0.7, 1.6, 5.0))
    names = feature_names(2, (0.7, 1.6, 5.0))
    # per channel: raw + 9 per sigma + a difference of Gaussians per consecutive pair
    assert len(names) == len(set(names)) == 2 * (1 + 9 * 3 + 2)
    assert feats.shape == (len(names), 10, 14, 12)
    assert feats.dtype == np.float32
    assert np.all(np.isfinite(feats))
    # the raw feature is the percentile-normalised intensity; a constant volume stays finite
    assert np.all(np.isfinite(voxel_features(np.ones((1, 6, 6, 6)), sigmas=(1.0,))))


def test_feature_values_follow_their_definitions():
    rng = np.random.default_rng(1)
    image = rng.normal(0, 1, (1, 12, 12, 12))
    feats = voxel_features(image, sigmas=(1.0, 2.0))
    names = feature_names(1, (1.0, 2.0))
    f = dict(zip(names, feats, strict=True))
    np.testing.assert_allclose(f["ch0/dog@2"], f["ch0/gauss@2"] - f["ch0/gauss@1"], atol=1e-6)
    for kind in ("st", "hess"):
        e0, e1, e2 = (f[f"ch0/{kind}_eig{i}@1"] for i in range(3))
        assert np.all(e0 >= e1 - 1e-5) and np.all(e1 >= e2 - 1e-5)  # sorted, decreasing
    # the Laplacian is the trace of the Hessian
    trace = sum(f[f"ch0/hess_eig{i}@2"] for i in range(3))
    np.testing.assert_allclose(f["ch0/log@2"], trace, atol=1e-4)
    assert np.all(f["ch0/st_eig2@1"] >= -1e-6)  # structure tensor: positive semi-definite


@pytest.mark.parametrize("voxel_size", [None, (2.0, 1.0, 1.0)])
def test_cropped_features_equal_the_whole_pass_bit_for_bit(voxel_size):
    """A crop filters only what each sigma reads (cut after each separable pass): the kept
    voxels must be those of the whole-volume pass exactly, at the volume's edge and inside."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    image = ndi.gaussian_filter(rng.normal(size=(1, 70, 64, 58)), (0, 1.5, 1.5, 1.5))
    image = image.astype(np.float32)
    whole = voxel_features(image, voxel_size, threads=2, progress=False)
    for crop in [
        (slice(30, 40), slice(25, 39), slice(20, 37)),  # inside: every sigma is cut
        (slice(0, 9), slice(50, 64), slice(0, 58)),  # at the edges: reflection in place
        (slice(35, 36), slice(0, 64), slice(0, 58)),  # one plane, as the training rows use
    ]:
        part = voxel_features(image, voxel_size, threads=1, crop=crop, progress=False)
        np.testing.assert_array_equal(part, whole[(slice(None), *crop)])


def test_symmetric_eigvals_match_numpy():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(500, 3, 3))
    m = m + m.transpose(0, 2, 1)
    m[:5] = np.eye(3)  # repeated eigenvalues
    m[5:10] = np.diag([3.0, 1.0, 1.0])
    got = symmetric_eigvals3(m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2])
    expected = np.linalg.eigvalsh(m)[:, ::-1].T
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("limit", [1 << 18, 30, 4])  # whole slabs, part of a plane, part of a row
def test_symmetric_eigvals_of_strided_views_in_pieces(monkeypatch, limit):
    """Views cut from bigger arrays (as a block's core is) are read piece by piece without a
    flat copy: every voxel is computed once, as numpy's solver and the contiguous copy say."""
    monkeypatch.setattr(features, "_EIG_BLOCK", limit)
    rng = np.random.default_rng(3)
    m = rng.normal(size=(6, 5, 7, 9))  # a11, a22, a33, a12, a13, a23 of a matrix per voxel
    views = [a.astype(np.float32)[1:4, ::2, 2:8] for a in m]
    assert not views[0].flags.c_contiguous
    out = np.full((3, 3, 4, 6), np.nan, dtype=np.float32)
    got = symmetric_eigvals3(*views, out=out)
    np.testing.assert_array_equal(got, symmetric_eigvals3(*[v.copy() for v in views]))
    d = np.stack([views[i] for i in (0, 3, 4, 3, 1, 5, 4, 5, 2)], axis=-1).reshape(3, 4, 6, 3, 3)
    np.testing.assert_allclose(got, np.moveaxis(np.linalg.eigvalsh(d)[..., ::-1], -1, 0), atol=1e-5)


def _blob(step_z: float) -> np.ndarray:
    """An isotropic Gaussian blob (width 3 um) sampled at (step_z, 1, 1) um: (1, Z, Y, X)."""
    n_z = int(round(24 / step_z)) + 1
    z = (np.arange(n_z) - n_z // 2) * step_z
    y = np.arange(25) - 12.0
    zz, yy, xx = np.meshgrid(z, y, y, indexing="ij")
    return np.exp(-(zz**2 + yy**2 + xx**2) / (2 * 3.0**2))[None]


def test_anisotropic_voxels_give_isotropic_filters():
    """A round blob imaged with 2 um z steps: with the voxel size, the Hessian at its centre has
    three equal eigenvalues as for cubic voxels; without it, the blob looks flat."""
    names = feature_names(1, (2.0,))
    hess = [names.index(f"ch0/hess_eig{i}@2") for i in range(3)]

    def centre_eigs(image, voxel):
        feats = voxel_features(image, voxel, sigmas=(2.0,))
        c = tuple(s // 2 for s in image.shape[1:])
        return feats[(hess, *c)]

    cubic = centre_eigs(_blob(1.0), None)
    aware = centre_eigs(_blob(2.0), (2.0, 1.0, 1.0))
    naive = centre_eigs(_blob(2.0), None)
    assert np.ptp(cubic) < 0.02 * abs(cubic.mean())
    assert np.ptp(aware) < 0.05 * abs(aware.mean())
    assert np.ptp(naive) > 0.5 * abs(naive.mean())
    # only the ratio of the voxel sizes matters
    np.testing.assert_allclose(
        voxel_features(_blob(2.0), (4.0, 2.0, 2.0), sigmas=(2.0,)),
        voxel_features(_blob(2.0), (2.0, 1.0, 1.0), sigmas=(2.0,)),
    )


def test_features_reject_bad_arguments():
    with pytest.raises(ValueError, match="C, Z, Y, X"):
        voxel_features(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="sigmas"):
        voxel_features(np.zeros((1, 4, 4, 4)), sigmas=(1.0, -1.0))
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_features(np.zeros((1, 4, 4, 4)), (1.0, 0.0, 1.0))


def test_forest_recovers_spheres_from_three_orthogonal_plane_pairs():
    image, dense = _spheres()
    sparse = _planes(dense, IGNORE)
    probs = segment_rf(
        image, sparse, 2, IGNORE, (1.0, 1.0, 1.0), sigmas=SIGMAS, n_trees=20, n_jobs=1
    )
    pred = probs.argmax(0)
    unannotated = np.where(sparse == IGNORE, dense, IGNORE)
    iou = iou_summary(confusion_matrix(pred, unannotated, 2, IGNORE), ("ball", "background"))
    assert iou["labelled_voxels"] == int((sparse == IGNORE).sum())
    assert iou["iou"]["ball"] > 0.9 and iou["mean"] > 0.9


def test_probabilities_sum_to_one_and_unseen_classes_get_zero():
    image, dense = _spheres(shape=(16, 20, 20))
    # classes 0 and 2 of four are annotated; 1 and 3 never appear
    sparse = _planes(np.where(dense == 0, 0, 2).astype(np.uint8), IGNORE, ((8,), (10,), (10,)))
    feats = voxel_features(image, sigmas=SIGMAS)
    rf = RandomForestSegmenter(4, IGNORE, n_trees=5, seed=3, n_jobs=1).fit(feats, sparse)
    probs = rf.predict_proba(feats)
    assert probs.shape == (4, 16, 20, 20) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert not probs[1].any() and not probs[3].any()
    assert rf.classes_.tolist() == [0, 2]
    # chunking does not change the result
    np.testing.assert_array_equal(rf.predict_proba(feats, chunk_voxels=999), probs)


def test_training_voxels_are_class_balanced_and_seeded():
    label = np.full((10, 10, 10), IGNORE, np.uint8)
    label[0] = 0  # 100 voxels
    label[1, :2] = 1  # 20 voxels
    rf = RandomForestSegmenter(2, IGNORE, samples_per_class=30, seed=1)
    idx = rf.sample(label)
    assert rf.samples_ == {0: 30, 1: 20}
    assert np.all(label.reshape(-1)[idx] != IGNORE) and np.all(np.diff(idx) > 0)
    again = RandomForestSegmenter(2, IGNORE, samples_per_class=30, seed=1).sample(label)
    other = RandomForestSegmenter(2, IGNORE, samples_per_class=30, seed=2).sample(label)
    np.testing.assert_array_equal(idx, again)
    assert not np.array_equal(idx, other)


def test_forest_rejects_bad_labels():
    feats = np.zeros((3, 4, 4, 4), np.float32)
    rf = RandomForestSegmenter(2, IGNORE, n_trees=2)
    with pytest.raises(ValueError, match="no labelled voxel"):
        rf.fit(feats, np.full((4, 4, 4), IGNORE))
    with pytest.raises(ValueError, match=r"codes \[5\]"):
        rf.fit(feats, np.full((4, 4, 4), 5))
    with pytest.raises(ValueError, match="same grid"):
        rf.fit(feats, np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(RuntimeError, match="fit"):
        rf.predict_proba(feats)
    with pytest.raises(ValueError, match="collides"):
        RandomForestSegmenter(3, 1)
