"""Evaluation protocols of the paper as pure, seeded, JSON-serialisable train/test splits.

A *slice set* is ``{volume_name: {"z": [...], "y": [...], "x": [...]}}``: for each volume the
annotated xy slices (indexed along z), xz slices (along y) and yz slices (along x). A
:class:`Split` names the slices whose labels are used for training and those used for testing;
every voxel outside the training slices is "unlabeled" during training.

- :func:`semi_cv_splits`: Table 1, semi-automated k-fold cross validation over all annotated slices.
- :func:`slice_sweep_splits`: Table 2, one volume, 1..5 annotated slices per axis, annotated from
  the dense ground truth, tested on slices no setup uses.
- :func:`leave_one_volume_out_splits`: Table 3, fully-automated: train on two volumes, test on the
  third.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparse3d.axes import AXES, SliceSet
from sparse3d.data.annotation import normalize_slices, uniform_positions

#: Table 2 setups: annotated slices per axis in the paper's (yz, xz, xy) order, i.e. counts of
#: slices along (x, y, z).
PAPER_SWEEP_SETUPS: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 5, 3))


def _slice_set(raw: Mapping[str, Mapping[str, Sequence[int]]], where: str) -> SliceSet:
    """Validate a slice set; return it with all three axes per volume as sorted int lists."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a slice set must be a mapping volume -> axis -> indices")
    out: SliceSet = {}
    for name in sorted(raw):
        if not isinstance(name, str):
            raise ValueError(f"{where}: volume name {name!r} is not a string")
        per_axis = raw[name]
        if not isinstance(per_axis, Mapping):
            raise ValueError(f"{where}: slices of volume {name!r} must be a mapping axis -> list")
        norm = normalize_slices(per_axis, where=f"{where}[{name}]")
        out[name] = {ax: list(norm[ax]) for ax in AXES}
    return out


def slice_items(slices: Mapping[str, Mapping[str, Sequence[int]]]) -> list[tuple[str, str, int]]:
    """Flatten a slice set to sorted ``(volume, axis, index)`` triples."""
    norm = _slice_set(slices, "slice_items")
    return [(name, ax, i) for name, per in norm.items() for ax in AXES for i in per[ax]]


def _from_items(items: Sequence[tuple[str, str, int]], volumes: Sequence[str]) -> SliceSet:
    out: SliceSet = {name: {ax: [] for ax in AXES} for name in volumes}
    for name, ax, i in items:
        out[name][ax].append(int(i))
    for per in out.values():
        for ax in AXES:
            per[ax] = sorted(set(per[ax]))
    return out


@dataclass
class Split:
    """One train/test split of annotated slices.

    Attributes:
        name: e.g. ``"semi_cv_fold1"``.
        train: slice set whose labels are used for training.
        test: slice set whose labels are used for evaluation (disjoint from ``train``).
        meta: JSON-serialisable details (protocol, fold, seed, setup, ...).
    """

    name: str
    train: SliceSet
    test: SliceSet
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = _slice_set(self.train, f"split {self.name!r} train")
        self.test = _slice_set(self.test, f"split {self.name!r} test")

    def num_slices(self, which: str = "train") -> int:
        """Number of slices in ``which`` ("train" or "test")."""
        sset = {"train": self.train, "test": self.test}[which]
        return sum(len(v) for per in sset.values() for v in per.values())

    def volumes(self) -> list[str]:
        """Sorted names of all volumes the split touches."""
        return sorted(set(self.train) | set(self.test))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; inverse of :meth:`from_dict`."""
        return {
            "name": self.name,
            "train": {n: {ax: list(v[ax]) for ax in AXES} for n, v in self.train.items()},
            "test": {n: {ax: list(v[ax]) for ax in AXES} for n, v in self.test.items()},
            "meta": json.loads(json.dumps(self.meta)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Split:
        """Rebuild a split from :meth:`to_dict` output; raises ValueError on a malformed dict."""
        if not isinstance(d, Mapping):
            raise ValueError(f"Split.from_dict: expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("name", "train", "test") if k not in d]
        if missing:
            raise ValueError(f"Split.from_dict: missing key(s) {missing}")
        meta = d.get("meta", {})
        if not isinstance(meta, Mapping):
            raise ValueError("Split.from_dict: 'meta' must be a mapping")
        return cls(name=str(d["name"]), train=d["train"], test=d["test"], meta=dict(meta))


def annotated_fraction(shape_zyx: Sequence[int], slices: Mapping[str, Sequence[int]]) -> float:
    """Fraction of the voxels of a (Z, Y, X) volume that lie on at least one listed slice.

    Table 2's "GT voxels" column. Exact: ``1 - prod_axis(1 - n_axis / length_axis)``.
    """
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"annotated_fraction: shape_zyx must be 3 positive sizes, got {shape!r}")
    norm = normalize_slices(slices, shape, where="annotated_fraction")
    free = 1.0
    for ax, n in zip(AXES, shape, strict=True):
        free *= 1.0 - len(norm[ax]) / n
    return 1.0 - free


# --------------------------------------------------------------------------------------------
# Table 1: semi-automated cross validation


def semi_cv_splits(
    annotated: Mapping[str, Mapping[str, Sequence[int]]], k: int = 3, seed: int = 0
) -> list[Split]:
    """k-fold cross validation over all annotated slices of all volumes (Sec. 4.1, Table 1).

    The paper "uniformly partitioned the set of all 77 manually annotated slices from all 3 samples
    into three subsets"; the test slices of a fold are removed from training and stay unlabelled.
    Here the slices of each (volume, orientation) group are shuffled with ``seed`` and dealt
    round-robin with one counter running over all groups, so every subset gets slices of every
    volume and orientation (within one) and the subset sizes differ by at most one.

    Args:
        annotated: ``{volume: {"z": [...], "y": [...], "x": [...]}}`` annotated slices.
        k: number of folds (>= 2).
        seed: seed of the fold assignment.

    Returns:
        ``k`` splits, folds numbered ``1..k`` like the config's ``fold``: split ``i`` (fold
        ``i + 1``, named ``semi_cv_fold<i + 1>``) tests on subset ``i`` and trains on all other
        slices.
    """
    if int(k) < 2:
        raise ValueError(f"semi_cv_splits: k must be >= 2, got {k}")
    k = int(k)
    full = _slice_set(annotated, "semi_cv_splits")
    items = slice_items(full)
    if len(items) < k:
        raise ValueError(f"semi_cv_splits: {len(items)} annotated slices cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    subsets: list[list[tuple[str, str, int]]] = [[] for _ in range(k)]
    counter = int(rng.integers(k))
    for name in full:
        for ax in AXES:
            group = [(name, ax, i) for i in full[name][ax]]
            for j in rng.permutation(len(group)):
                subsets[counter % k].append(group[j])
                counter += 1
    volumes = list(full)
    splits = []
    for i in range(k):
        test = set(subsets[i])
        train = [it for it in items if it not in test]
        splits.append(
            Split(
                name=f"semi_cv_fold{i + 1}",
                train=_from_items(train, volumes),
                test=_from_items(sorted(test), volumes),
                meta={"protocol": "semi_cv", "fold": i + 1, "k": k, "seed": int(seed)},
            )
        )
    return splits


# --------------------------------------------------------------------------------------------
# Table 2: number of annotated slices


def _farthest_free(length: int, used: set[int], count: int) -> list[int]:
    """Greedily pick ``count`` indices not in ``used`` that lie farthest from ``used`` and from the
    borders (the borders act as used positions ``-1`` and ``length``); ties go to the lower
    index."""
    free = np.array([i for i in range(length) if i not in used], dtype=np.int64)
    if len(free) < count:
        raise ValueError(
            f"slice_sweep_splits: axis of length {length} has {len(free)} free slices, "
            f"{count} test slices requested"
        )
    taken = sorted(used | {-1, length})
    chosen: list[int] = []
    dist = np.min(np.abs(free[:, None] - np.asarray(taken)[None, :]), axis=1)
    for _ in range(count):
        j = int(np.argmax(dist))  # first maximum -> lowest index
        chosen.append(int(free[j]))
        dist = np.minimum(dist, np.abs(free - free[j]))
        dist[j] = -1
    return sorted(chosen)


def slice_sweep_splits(
    shape_zyx: Sequence[int],
    volume_name: str,
    setups: Sequence[Sequence[int]] = PAPER_SWEEP_SETUPS,
    test_counts: Sequence[int] = (3, 3, 3),
) -> list[Split]:
    """Splits of Table 2: one volume annotated with a growing number of orthogonal slices.

    The slices are "annotated" from the volume's dense ground truth, so any slice can be used; the
    caller builds the training label with
    ``sparse_label(dense_label, split.train[volume_name], ignore_index)``. For each setup the
    slices of each axis are placed with :func:`uniform_positions`. The test slices ("the slices not
    used in any setup", Sec. 4.1) are the same for all setups: per axis, ``test_counts`` slices
    picked greedily farthest from every training slice of every setup and from the borders.

    Args:
        shape_zyx: volume shape (Z, Y, X).
        volume_name: key of the volume in the slice sets.
        setups: slice counts per setup in the paper's (yz, xz, xy) order, i.e. counts along
            (x, y, z); default (1,1,1), (2,2,1), (3,3,2), (5,5,3).
        test_counts: test slices in the same (yz, xz, xy) = (x, y, z) order.

    Returns:
        One split per setup; ``meta`` holds ``setup_xyz`` and ``gt_voxel_fraction``.
    """
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"slice_sweep_splits: shape_zyx must be 3 positive sizes, got {shape!r}")
    length = {"z": shape[0], "y": shape[1], "x": shape[2]}
    parsed: list[dict[str, tuple[int, ...]]] = []
    for s in setups:
        if len(s) != 3:
            raise ValueError(f"slice_sweep_splits: setup {s!r} must be 3 counts (yz, xz, xy)")
        cx, cy, cz = (int(c) for c in s)
        counts = {"x": cx, "y": cy, "z": cz}
        for ax in AXES:
            if not 0 <= counts[ax] <= length[ax]:
                raise ValueError(
                    f"slice_sweep_splits: setup {tuple(s)} needs {counts[ax]} slices along {ax}, "
                    f"axis has {length[ax]}"
                )
        parsed.append({ax: uniform_positions(length[ax], counts[ax]) for ax in AXES})
    if len(test_counts) != 3:
        raise ValueError(f"slice_sweep_splits: test_counts {test_counts!r} must be 3 counts")
    tx, ty, tz = (int(c) for c in test_counts)
    tcount = {"x": tx, "y": ty, "z": tz}
    test = {}
    for ax in AXES:
        used = {i for p in parsed for i in p[ax]}
        test[ax] = _farthest_free(length[ax], used, tcount[ax])
    splits = []
    for s, pos in zip(setups, parsed, strict=True):
        tag = "_".join(str(int(c)) for c in s)
        splits.append(
            Split(
                name=f"slice_sweep_{volume_name}_{tag}",
                train={volume_name: {ax: list(pos[ax]) for ax in AXES}},
                test={volume_name: test},
                meta={
                    "protocol": "slice_sweep",
                    "volume": volume_name,
                    "setup_xyz": [int(c) for c in s],
                    "gt_voxel_fraction": annotated_fraction(shape, pos),
                    "shape_zyx": list(shape),
                },
            )
        )
    return splits


# --------------------------------------------------------------------------------------------
# Table 3: fully-automated, leave one volume out


def leave_one_volume_out_splits(
    annotated: Mapping[str, Mapping[str, Sequence[int]]],
) -> list[Split]:
    """Train on the annotated slices of all volumes but one, test on the left-out volume's
    annotated slices (Sec. 4.2, Table 3). One split per volume, in sorted name order; the
    ``fold`` in ``meta`` numbers them ``1..n`` like the config's ``fold``."""
    full = _slice_set(annotated, "leave_one_volume_out_splits")
    if len(full) < 2:
        raise ValueError(
            f"leave_one_volume_out_splits: need at least 2 volumes, got {sorted(full)}"
        )
    splits = []
    for fold, name in enumerate(full, start=1):
        splits.append(
            Split(
                name=f"lovo_test_{name}",
                train={n: v for n, v in full.items() if n != name},
                test={name: full[name]},
                meta={"protocol": "leave_one_volume_out", "test_volume": name, "fold": fold},
            )
        )
    return splits
