"""Tests for sparse slice annotation: uniform slice positions, slice masks, sparse labels."""

from __future__ import annotations

import numpy as np
import pytest

from sparse3d import axes
from sparse3d.data import annotation, dataset, protocols, volume
from sparse3d.data.annotation import (
    count_slices,
    normalize_slices,
    slice_mask,
    sparse_label,
    uniform_positions,
)
from sparse3d.labels import XENOPUS


def test_one_axis_vocabulary() -> None:
    """AXES and SliceSet are defined once (sparse3d.axes) and imported everywhere."""
    assert axes.AXES == ("z", "y", "x")
    for module in (annotation, dataset, protocols, volume):
        assert module.AXES is axes.AXES, module.__name__
    assert protocols.SliceSet is axes.SliceSet


@pytest.mark.parametrize(
    ("length", "count", "expected"),
    [
        (10, 2, (2, 7)),
        (64, 1, (32,)),
        (5, 5, (0, 1, 2, 3, 4)),
        (10, 0, ()),
        (12, 3, (2, 6, 10)),
    ],
)
def test_uniform_positions_examples(length: int, count: int, expected: tuple[int, ...]) -> None:
    assert uniform_positions(length, count) == expected


@pytest.mark.parametrize(("length", "count"), [(64, 21), (248, 7), (244, 5), (56, 12), (59, 10)])
def test_uniform_positions_spread(length: int, count: int) -> None:
    pos = uniform_positions(length, count)
    assert len(pos) == count
    assert list(pos) == sorted(set(pos))
    gaps = np.diff(pos)
    # as uniform as possible: consecutive gaps differ by at most one voxel
    assert gaps.max() - gaps.min() <= 1
    # away from the borders: about half a gap to either border
    half = length / count / 2
    assert pos[0] >= np.floor(half) - 1
    assert length - 1 - pos[-1] >= np.floor(half) - 1


@pytest.mark.parametrize(("length", "count"), [(5, 6), (0, 0), (10, -1)])
def test_uniform_positions_rejects(length: int, count: int) -> None:
    with pytest.raises(ValueError, match="uniform_positions"):
        uniform_positions(length, count)


def test_slice_mask_is_union_of_slices() -> None:
    shape = (6, 8, 10)
    mask = slice_mask(shape, {"z": [1, 4], "y": [2], "x": [0, 9]})
    expected = np.zeros(shape, bool)
    expected[[1, 4]] = True
    expected[:, 2] = True
    expected[:, :, [0, 9]] = True
    np.testing.assert_array_equal(mask, expected)
    # voxel count by inclusion-exclusion: 1 - (1 - 2/6)(1 - 1/8)(1 - 2/10)
    assert mask.sum() == round(np.prod(shape) * (1 - (4 / 6) * (7 / 8) * (8 / 10)))
    assert not slice_mask(shape, {}).any()


def test_sparse_label_keeps_annotated_slices_only() -> None:
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 3, size=(7, 9, 11), dtype=np.uint8)
    slices = {"z": (3,), "y": (0, 8), "x": (5,)}
    sparse = sparse_label(dense, slices, XENOPUS.ignore_index)
    mask = slice_mask(dense.shape, slices)
    assert sparse.dtype == dense.dtype
    np.testing.assert_array_equal(sparse[mask], dense[mask])
    assert np.all(sparse[~mask] == XENOPUS.ignore_index)
    # applying it again to a subset of the slices keeps only those
    sub = sparse_label(sparse, {"z": (3,)}, XENOPUS.ignore_index)
    np.testing.assert_array_equal(sub[3], dense[3])
    assert np.all(sub[:3] == XENOPUS.ignore_index)


def test_sparse_label_errors() -> None:
    dense = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="outside 0..3"):
        sparse_label(dense, {"z": [4]}, 3)
    with pytest.raises(ValueError, match="unknown slice axes"):
        sparse_label(dense, {"w": [1]}, 3)
    with pytest.raises(ValueError, match="3D"):
        sparse_label(np.zeros((4, 4), np.uint8), {}, 3)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_label(dense, {}, 300)
    with pytest.raises(ValueError, match="integer"):
        sparse_label(dense.astype(np.float32), {}, 3)


def test_sparse_label_without_slices_is_all_unlabelled() -> None:
    """A volume a split gives no slices (e.g. no test slices) keeps no label at all."""
    dense = np.arange(60, dtype=np.uint16).reshape(3, 4, 5) % 3
    out = sparse_label(dense, {}, 7)
    assert out.dtype == np.uint16 and out.shape == dense.shape and np.all(out == 7)
    assert out is not dense


def test_normalize_slices_sorts_dedups_and_fills_axes() -> None:
    out = normalize_slices({"x": [5, 1, 5], "z": np.array([2])}, shape_zyx=(3, 3, 6))
    assert out == {"z": (2,), "y": (), "x": (1, 5)}
    assert count_slices({"x": [5, 1, 5], "z": [2]}) == 3
    with pytest.raises(ValueError, match="not an integer"):
        normalize_slices({"z": [1.5]})
