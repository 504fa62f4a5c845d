"""The next-plane suggestion (``sparse3d.densify.suggest``): where uncertainty is, away from
painted planes; even spacing; random draws; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from sparse3d.densify.suggest import (
    plane_scores,
    random_plane,
    spaced_plane,
    suggest_plane,
)


def test_the_most_uncertain_plane_wins():
    u = np.zeros((20, 30, 40), dtype=np.float32)
    u[:, 7, :] = 0.6  # an uncertain xz plane (y = 7)
    u[13, :5, :5] = 0.9  # a small hot spot on z = 13: fewer uncertain voxels
    s = suggest_plane(u, {"z": [5], "y": [20], "x": [20]})
    assert (s.axis, s.index, s.strategy) == ("y", 7, "uncertainty")
    assert s.score > 0 and s.describe().startswith("paint y = 7 next")


def test_painted_planes_and_their_neighbours_are_left_out():
    u = np.zeros((20, 30, 40), dtype=np.float32)
    u[:, 7, :] = 0.6
    u[:, 20, :] = 0.3
    # y = 7 painted: its neighbourhood is out, the next uncertain plane wins
    s = suggest_plane(u, {"y": [7]}, min_gap=3)
    assert (s.axis, s.index) == ("y", 20)
    scores = plane_scores(u, {"y": [7]}, min_gap=3)
    assert np.isneginf(scores["y"][5:10]).all() and np.isfinite(scores["y"][10:]).all()
    # painted voxels do not count: a z plane crossing the uncertain y plane is not rewarded
    # for the voxels the painting covers
    s2 = plane_scores(u, {"y": [7, 20]}, min_gap=1, halo=0)
    assert np.allclose(s2["z"], 0.0)


def test_halo_averages_neighbouring_planes():
    u = np.zeros((10, 12, 12), dtype=np.float32)
    u[4:7] = 0.5  # a slab of 3 uncertain z planes
    u[1] = 0.7  # a single, more uncertain plane
    assert suggest_plane(u, {}, halo=0).index == 1
    assert suggest_plane(u, {}, halo=1).index == 5


def test_spacing_fills_the_widest_gap_on_the_emptiest_axis():
    shape = (16, 40, 30)
    assert spaced_plane(shape, {}) == spaced_plane(shape, {"z": []})
    first = spaced_plane(shape, {})
    assert (first.axis, first.index) == ("y", 20)  # longest axis, middle
    s = spaced_plane(shape, {"z": [8], "y": [20], "x": [15]})
    assert (s.axis, s.index) == ("y", 10)  # tied counts: longest axis; gap 0..19 beats 21..39
    s = spaced_plane(shape, {"z": [8], "y": [20, 30], "x": [15]})
    assert (s.axis, s.index) == ("x", 7)  # gap 0..14 (15 wide) beats 16..29
    assert suggest_plane(np.zeros(shape), {}, strategy="spacing") == first


def test_random_draws_unpainted_planes_only():
    rng = np.random.default_rng(0)
    painted = {"z": [0, 1, 2], "y": [0, 1, 2], "x": [0, 1]}
    draws = {(p.axis, p.index) for p in (random_plane((3, 3, 3), painted, rng) for _ in range(50))}
    assert draws == {("x", 2)}
    with pytest.raises(ValueError, match="every plane"):
        random_plane((2, 2, 2), {"z": [0, 1], "y": [0, 1], "x": [0, 1]}, rng)


def test_falls_back_to_spacing_when_everything_is_near_a_painted_plane():
    u = np.ones((4, 4, 4), dtype=np.float32)
    s = suggest_plane(u, {"z": [1, 2], "y": [1, 2], "x": [1, 2]}, min_gap=5)
    assert s.strategy == "spacing"


@pytest.mark.parametrize(
    "u, planes, kw, match",
    [
        (np.zeros((3, 3)), {}, {}, "must be \\(Z, Y, X\\)"),
        (np.full((3, 3, 3), np.nan), {}, {}, "finite"),
        (np.zeros((3, 3, 3)), {"z": [3]}, {}, "outside"),
        (np.zeros((3, 3, 3)), {}, {"strategy": "best"}, "unknown strategy"),
        (np.zeros((3, 3, 3)), {}, {"halo": -1}, "halo"),
    ],
)
def test_bad_input(u, planes, kw, match):
    with pytest.raises(ValueError, match=match):
        suggest_plane(u, planes, **kw)
