"""The one mirror-index helper (sparse3d.mirror.reflect_indices) and its users."""

from __future__ import annotations

import numpy as np
import pytest

from sparse3d.data.tiles import map_indices, read_region
from sparse3d.inference import tiling
from sparse3d.mirror import reflect_indices


@pytest.mark.parametrize("length", [2, 3, 7])
def test_reflect_indices_equal_numpy_reflect_padding(length):
    """``(start, size, length)``: the window ``start .. start + size - 1``, mirrored like
    ``np.pad(mode="reflect")``, periodically for pads beyond one reflection."""
    data = np.arange(length)
    for before, after in [(0, 0), (1, 0), (0, 2), (length - 1, length), (length, 1), (3 * length, 2 * length + 1)]:  # fmt: skip
        want = np.pad(data, (before, after), mode="reflect")
        got = reflect_indices(-before, length + before + after, length)
        assert got.dtype == np.int64 and len(got) == len(want)
        np.testing.assert_array_equal(data[got], want)


def test_reflect_indices_periodic_beyond_one_mirror():
    # length 4: period 6, ... 2 1 | 0 1 2 3 | 2 1 0 1 2 3 2 ...
    assert reflect_indices(-5, 16, 4).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert reflect_indices(9, 3, 4).tolist() == [3, 2, 1]  # window entirely past the volume
    idx = reflect_indices(-20, 50, 7)
    assert idx.min() >= 0 and idx.max() <= 6
    assert reflect_indices(-3, 5, 1).tolist() == [0] * 5
    assert reflect_indices(2, 0, 5).tolist() == []
    with pytest.raises(ValueError, match="size"):
        reflect_indices(0, -1, 5)
    with pytest.raises(ValueError, match="length"):
        reflect_indices(0, 3, 0)


def test_training_tiles_and_prediction_mirror_alike():
    """Training tiles (data.tiles) and whole-volume prediction (inference.tiling) use the one
    helper: the same window comes back the same."""
    assert tiling.reflect_indices is reflect_indices  # the import path evaluation.py uses
    np.testing.assert_array_equal(map_indices(-9, 14, 5, "reflect"), reflect_indices(-9, 23, 5))
    rng = np.random.default_rng(0)
    vol = rng.random((2, 5, 6, 7)).astype(np.float32)
    start, size = (-4, -7, 3), (13, 9, 12)
    a = read_region(vol, start, size, mode="reflect")
    b = tiling.read_mirrored(lambda sl: vol[(slice(None), *sl)], vol.shape[1:], start, size)
    np.testing.assert_array_equal(a, b)
    idx = np.ix_(
        *(reflect_indices(s, n, L) for s, n, L in zip(start, size, vol.shape[1:], strict=True))
    )
    np.testing.assert_array_equal(a, vol[(slice(None), *idx)])
