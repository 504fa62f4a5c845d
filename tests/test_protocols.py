"""Tests for the paper's evaluation protocols (Tables 1-3) as seeded, JSON-serialisable splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sparse3d.atomic import write_json_atomic
from sparse3d.data.annotation import slice_mask, uniform_positions
from sparse3d.data.protocols import (
    PAPER_SWEEP_SETUPS,
    Split,
    annotated_fraction,
    leave_one_volume_out_splits,
    semi_cv_splits,
    slice_items,
    slice_sweep_splits,
)

#: The paper's volumes (x*y*z sizes as shape_zyx) and annotated (yz, xz, xy) counts (Sec. 3.1).
PAPER = {
    "sample1": ((64, 244, 248), (7, 5, 21)),
    "sample2": ((56, 244, 245), (6, 7, 12)),
    "sample3": ((59, 244, 246), (4, 5, 10)),
}


def _annotated() -> dict[str, dict[str, tuple[int, ...]]]:
    out = {}
    for name, ((z, y, x), (cx, cy, cz)) in PAPER.items():
        out[name] = {
            "z": uniform_positions(z, cz),
            "y": uniform_positions(y, cy),
            "x": uniform_positions(x, cx),
        }
    return out


def _items(split_part) -> set[tuple[str, str, int]]:
    return set(slice_items(split_part))


def test_semi_cv_partitions_all_77_slices() -> None:
    ann = _annotated()
    everything = _items(ann)
    assert len(everything) == 77  # Sec. 4.1: "all 77 manually annotated slices"
    splits = semi_cv_splits(ann, k=3, seed=0)
    assert len(splits) == 3
    tests = [_items(s.test) for s in splits]
    # disjoint subsets that cover everything, sizes 26/26/25
    assert set.union(*tests) == everything
    assert sum(len(t) for t in tests) == 77
    assert sorted(len(t) for t in tests) == [25, 26, 26]
    for s, t in zip(splits, tests, strict=True):
        train = _items(s.train)
        assert not train & t
        assert train | t == everything
        assert s.meta["protocol"] == "semi_cv"
    # every subset has slices of every volume and orientation, groups dealt within one
    for name, per in ann.items():
        for ax, idx in per.items():
            counts = [sum(1 for it in t if it[:2] == (name, ax)) for t in tests]
            assert max(counts) - min(counts) <= 1
            assert sum(counts) == len(idx)
            if len(idx) >= 3:
                assert min(counts) >= 1


def test_semi_cv_is_seeded() -> None:
    ann = _annotated()
    a = [s.to_dict() for s in semi_cv_splits(ann, seed=0)]
    b = [s.to_dict() for s in semi_cv_splits(ann, seed=0)]
    c = [s.to_dict() for s in semi_cv_splits(ann, seed=1)]
    assert a == b
    assert a != c
    with pytest.raises(ValueError, match="k must be"):
        semi_cv_splits(ann, k=1)
    with pytest.raises(ValueError, match="cannot fill"):
        semi_cv_splits({"v": {"z": [1]}}, k=2)


def test_split_json_round_trip(tmp_path: Path) -> None:
    splits = semi_cv_splits(_annotated(), seed=3) + leave_one_volume_out_splits(_annotated())
    for s in splits:
        again = Split.from_dict(json.loads(json.dumps(s.to_dict())))
        assert again == s
    # split.json as the run folder writes it
    path = write_json_atomic(tmp_path / "split.json", splits[0].to_dict())
    assert Split.from_dict(json.loads(path.read_text())) == splits[0]
    with pytest.raises(ValueError, match="missing key"):
        Split.from_dict({"name": "x", "train": {}})
    with pytest.raises(ValueError, match="expected a mapping"):
        Split.from_dict([])
    with pytest.raises(ValueError, match="unknown slice axes"):
        Split(name="x", train={"v": {"q": [1]}}, test={})


def test_folds_are_numbered_like_the_config() -> None:
    """``fold=1`` selects ``splits[0]``; its split.json says fold 1 (not 0)."""
    semi = semi_cv_splits(_annotated(), k=3, seed=0)
    assert [s.meta["fold"] for s in semi] == [1, 2, 3]
    assert [s.name for s in semi] == ["semi_cv_fold1", "semi_cv_fold2", "semi_cv_fold3"]
    lovo = leave_one_volume_out_splits(_annotated())
    assert [s.meta["fold"] for s in lovo] == [1, 2, 3]
    assert [s.meta["test_volume"] for s in lovo] == ["sample1", "sample2", "sample3"]


def test_slice_sweep_counts_and_unused_test_slices() -> None:
    shape = PAPER["sample1"][0]
    splits = slice_sweep_splits(shape, "sample1")
    assert len(splits) == 4
    test = splits[0].test["sample1"]
    used: dict[str, set[int]] = {"z": set(), "y": set(), "x": set()}
    for s, (cx, cy, cz) in zip(splits, PAPER_SWEEP_SETUPS, strict=True):
        tr = s.train["sample1"]
        # setup tuples are (yz, xz, xy) slices = counts along (x, y, z)
        assert (len(tr["x"]), len(tr["y"]), len(tr["z"])) == (cx, cy, cz)
        assert s.test["sample1"] == test  # one test set for all setups
        assert s.meta["setup_xyz"] == [cx, cy, cz]
        for ax in "zyx":
            used[ax] |= set(tr[ax])
    for ax in "zyx":
        assert len(test[ax]) == 3
        assert not set(test[ax]) & used[ax]  # "slices not used in any setup" (Sec. 4.1)
    # single-slice setup sits in the middle of each axis
    assert splits[0].train["sample1"] == {"z": [32], "y": [122], "x": [124]}
    # test slices lie between training slices, not at the borders
    for ax, n in zip("zyx", shape, strict=True):
        assert min(test[ax]) > 2 and max(test[ax]) < n - 3


def test_slice_sweep_gt_voxel_fractions() -> None:
    # the fraction is exact and grows with the setups
    fr = [s.meta["gt_voxel_fraction"] for s in slice_sweep_splits(PAPER["sample1"][0], "s1")]
    assert fr == sorted(fr)
    s = slice_sweep_splits(PAPER["sample1"][0], "s1")[2]
    mask = slice_mask(PAPER["sample1"][0], s.train["s1"])
    assert fr[2] == pytest.approx(mask.mean(), abs=1e-12)
    # on sample 3's shape the counts give Table 2's "GT voxels": 2.5%, 3.3%, 5.7%, 8.9%
    fr3 = [s.meta["gt_voxel_fraction"] for s in slice_sweep_splits(PAPER["sample3"][0], "s3")]
    np.testing.assert_allclose(np.round(np.asarray(fr3) * 100, 1), [2.5, 3.3, 5.7, 8.9])


def test_slice_sweep_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="needs 5 slices along z"):
        slice_sweep_splits((4, 50, 50), "v", setups=[(1, 1, 5)])
    with pytest.raises(ValueError, match="free slices"):
        slice_sweep_splits((4, 50, 50), "v", setups=[(1, 1, 3)], test_counts=(1, 1, 2))
    with pytest.raises(ValueError, match="3 counts"):
        slice_sweep_splits((4, 50, 50), "v", setups=[(1, 1)])


def test_leave_one_volume_out() -> None:
    ann = _annotated()
    splits = leave_one_volume_out_splits(ann)
    assert [s.name for s in splits] == [
        "lovo_test_sample1",
        "lovo_test_sample2",
        "lovo_test_sample3",
    ]
    for s in splits:
        (held_out,) = s.test
        assert held_out not in s.train
        assert sorted(s.train) == sorted(set(ann) - {held_out})
        assert s.num_slices("test") == sum(len(v) for v in ann[held_out].values())
        for name in s.train:
            assert s.train[name] == {ax: list(v) for ax, v in ann[name].items()}
    assert Counter(s.num_slices("train") + s.num_slices("test") for s in splits) == {77: 3}
    with pytest.raises(ValueError, match="at least 2 volumes"):
        leave_one_volume_out_splits({"only": {"z": [1]}})


def test_annotated_fraction_matches_mask() -> None:
    shape = (9, 13, 17)
    sl = {"z": [0, 4], "y": [7], "x": [1, 2, 16]}
    assert annotated_fraction(shape, sl) == pytest.approx(slice_mask(shape, sl).mean())
    assert annotated_fraction(shape, {}) == 0.0
    with pytest.raises(ValueError, match="outside"):
        annotated_fraction(shape, {"z": [9]})
