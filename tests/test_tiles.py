"""Tests of tile sampling and overlap-tile extraction."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from sparse3d.data.annotation import slice_mask, uniform_positions
from sparse3d.data.tiles import (
    TileSampler,
    extract_tile,
    input_start,
    labelled_yield,
    read_region,
)

IGNORE = 3


def test_extract_interior_is_view_with_right_values():
    rng = np.random.default_rng(0)
    image = rng.random((2, 20, 30, 25), dtype=np.float32)
    label = rng.integers(0, 4, (20, 30, 25)).astype(np.uint8)
    img, lab = extract_tile(image, label, (8, 10, 10), (12, 16, 14), (4, 8, 6), ignore_index=IGNORE)
    assert img.shape == (2, 12, 16, 14) and lab.shape == (12, 16, 14)
    assert np.shares_memory(img, image)
    np.testing.assert_array_equal(img, image[:, 4:16, 6:22, 6:20])
    np.testing.assert_array_equal(lab, label[4:16, 6:22, 6:20])


def test_extract_mirrors_image_and_pads_label_with_ignore():
    rng = np.random.default_rng(1)
    image = rng.random((2, 10, 12, 9), dtype=np.float32)
    label = rng.integers(0, 3, (10, 12, 9)).astype(np.uint8)
    inp, out, margin = (14, 10, 12), (6, 4, 4), (1, 2, 0)
    output_start = (0, 9, 3)  # touches the z start and the y end
    img, lab = extract_tile(image, label, output_start, inp, out, margin, ignore_index=IGNORE)
    start = [
        s - (i - o) // 2 - m for s, i, o, m in zip(output_start, inp, out, margin, strict=True)
    ]
    size = [i + 2 * m for i, m in zip(inp, margin, strict=True)]
    pad = 40
    ref = np.pad(image, [(0, 0)] + [(pad, pad)] * 3, mode="reflect")
    sl = tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size, strict=True))
    np.testing.assert_array_equal(img, ref[(slice(None), *sl)])
    ref_lab = np.pad(label, [(pad, pad)] * 3, mode="constant", constant_values=IGNORE)
    np.testing.assert_array_equal(lab, ref_lab[sl])
    assert (lab[: -start[0]] == IGNORE).all()  # z before the volume
    # by hand: volume voxel (z=-1, y=5, x=-1) mirrors (1, 5, 1); (z=0, y=13, x=2) mirrors (0, 9, 2)
    np.testing.assert_array_equal(
        img[:, -1 - start[0], 5 - start[1], -1 - start[2]], image[:, 1, 5, 1]
    )
    np.testing.assert_array_equal(img[:, -start[0], 13 - start[1], 2 - start[2]], image[:, 0, 9, 2])


class _Recording:
    """h5py dataset wrapper that records which regions are read."""

    def __init__(self, ds):
        self.ds, self.reads = ds, []

    @property
    def shape(self):
        return self.ds.shape

    def __getitem__(self, key):
        self.reads.append(key)
        return self.ds[key]


def test_h5py_reads_only_the_needed_region(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.random((2, 16, 40, 36), dtype=np.float32)
    label = rng.integers(0, 4, (16, 40, 36)).astype(np.uint8)
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, chunks=(1, 8, 8, 8))
        f.create_dataset("label", data=label, chunks=(8, 8, 8))
    with h5py.File(path, "r") as f:
        img_ds, lab_ds = _Recording(f["image"]), _Recording(f["label"])
        args = ((2, 30, 5), (12, 14, 12), (4, 6, 4))
        img, lab = extract_tile(img_ds, lab_ds, *args, ignore_index=IGNORE)
        ref_img, ref_lab = extract_tile(image, label, *args, ignore_index=IGNORE)
        np.testing.assert_array_equal(img, ref_img)
        np.testing.assert_array_equal(lab, ref_lab)
        for reads, shape in ((img_ds.reads, image.shape[1:]), (lab_ds.reads, label.shape)):
            assert len(reads) == 1
            spatial = reads[0][-3:]
            for sl, n, want in zip(spatial, shape, (12, 14, 12), strict=True):
                assert 0 <= sl.start < sl.stop <= n
                assert sl.stop - sl.start <= want  # never more than the tile
    with pytest.raises(ValueError, match="label shape"):
        extract_tile(image, label[:5], (0, 0, 0), (4, 4, 4), (4, 4, 4))


def test_read_region_constant_far_outside():
    a = np.arange(24).reshape(2, 3, 4)
    out = read_region(a, (5, 5, 5), (2, 2, 2), mode="constant", fill=-1, channel_axis=False)
    assert (out == -1).all()
    # a one-voxel-thick box outside along z must not write the fill into the source
    out = read_region(a, (-1, 0, 0), (1, 3, 4), mode="constant", fill=-1, channel_axis=False)
    assert (out == -1).all() and a.min() == 0


def test_sampler_positions_in_range_and_crop_contains_labels():
    shape = (20, 50, 44)
    mask = slice_mask(shape, {"z": (3,), "y": (40,), "x": (7,)})
    for inp, out in (((20, 28, 24), (8, 16, 12)), ((36, 28, 24), (30, 16, 12))):
        # second: output tile taller than the volume
        s = TileSampler(shape, inp, out, mask, seed=0)
        u = TileSampler(shape, inp, out, mask, seed=0, mode="uniform")
        for _ in range(300):
            p = s.sample()
            for v, o, n in zip(p, out, shape, strict=True):
                assert min(0, n - o) <= v <= max(0, n - o)
            assert s.labelled_fraction(p) > 0
            q = u.sample()
            assert all(
                min(0, n - o) <= v <= max(0, n - o) for v, o, n in zip(q, out, shape, strict=True)
            )
    assert s.input_start((5, 5, 5)) == input_start((5, 5, 5), (36, 28, 24), (30, 16, 12))
    assert s.input_start((5, 5, 5)) == (2, -1, -1)
    with pytest.raises(ValueError, match="no labelled"):
        TileSampler(shape, (8, 8, 8), (4, 4, 4), np.zeros(shape, bool))


def test_labelled_fraction_matches_brute_force():
    rng = np.random.default_rng(3)
    mask = rng.random((12, 15, 11)) < 0.2
    s = TileSampler(mask.shape, (9, 9, 9), (5, 6, 4), mask, seed=1, mode="uniform")
    for start in ((0, 0, 0), (7, 9, 7), (3, 4, 2), (-2, 13, 9)):
        sl = tuple(
            slice(max(a, 0), min(a + o, n))
            for a, o, n in zip(start, (5, 6, 4), mask.shape, strict=True)
        )
        assert s.labelled_fraction(start) == pytest.approx(mask[sl].sum() / (5 * 6 * 4))


def test_labelled_yield_much_higher_than_uniform_for_sparse_slices():
    shape = (64, 240, 240)
    mask = slice_mask(shape, {"z": (30,), "y": (100,), "x": (150,)})
    kw = dict(shape_zyx=shape, input_tile=(40, 60, 60), output_tile=(8, 24, 24), labelled_mask=mask)
    labelled = labelled_yield(TileSampler(**kw, seed=0), 400)
    uniform = labelled_yield(TileSampler(**kw, seed=0, mode="uniform"), 400)
    assert labelled > 3 * uniform
    assert labelled > 0.05


def test_labelled_yield_paper_sample1():
    """Sample 1 of the paper: 64 x 244 x 248, (21 xy, 5 xz, 7 yz) annotated slices."""
    shape = (64, 244, 248)
    slices = {
        "z": uniform_positions(64, 21),
        "y": uniform_positions(244, 5),
        "x": uniform_positions(248, 7),
    }
    mask = slice_mask(shape, slices)
    kw = dict(
        shape_zyx=shape, input_tile=(116, 132, 132), output_tile=(28, 44, 44), labelled_mask=mask
    )
    labelled = labelled_yield(TileSampler(**kw, seed=0), 2000)
    uniform = labelled_yield(TileSampler(**kw, seed=0, mode="uniform"), 2000)
    # dense in z (21 of 64 xy slices annotated): every crop sees about a third annotated voxels
    assert 0.3 < uniform < 0.42 and 0.3 < labelled < 0.42
