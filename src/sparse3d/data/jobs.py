"""One job of each of the paper's protocols (Sec. 4): the split a run trains and tests on (layer 1).

Each function takes the runtime facts of the data — ``annotated`` (``{volume: {axis: slice
indices}}`` of the annotated slices) and ``shapes`` (``{volume: (Z, Y, X)}``) — and the job's
index from the command line, and returns one :class:`~sparse3d.data.protocols.Split`. The
experiment configs name them as ``_target_`` nodes, so a new protocol is a new function and a
new YAML file, nothing else. Out-of-range indices raise ``ValueError`` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sparse3d.data import protocols
from sparse3d.data.protocols import Split

Annotated = Mapping[str, Mapping[str, Sequence[int]]]
Shapes = Mapping[str, Sequence[int]]


def _pick(splits: list[Split], index: int, what: str, experiment: str) -> Split:
    if not 1 <= int(index) <= len(splits):
        raise ValueError(
            f"{what}={index} is out of range for {experiment}: choose 1..{len(splits)}"
        )
    return splits[int(index) - 1]


def semi_cv(annotated: Annotated, shapes: Shapes, fold: int, k: int = 3, seed: int = 0) -> Split:
    """Semi-automated segmentation, fold ``fold`` (1..k) of the k-fold cross-validation over
    the annotated slices of all volumes (Table 1)."""
    splits = protocols.semi_cv_splits(
        {n: dict(a) for n, a in annotated.items()}, k=int(k), seed=int(seed)
    )
    return _pick(splits, fold, "fold", "semi_cv")


def full_auto(annotated: Annotated, shapes: Shapes, fold: int) -> Split:
    """Fully-automated segmentation: train on all volumes but one, test on that one; fold
    ``fold`` leaves out the ``fold``-th volume in name order (Table 3)."""
    splits = protocols.leave_one_volume_out_splits({n: dict(a) for n, a in annotated.items()})
    return _pick(splits, fold, "fold", "full_auto")


def slice_sweep(annotated: Annotated, shapes: Shapes, sample: int, setup: int) -> Split:
    """Effect of the number of annotated slices: setup ``setup`` (1..4) of volume ``sample``
    (1..n in name order), slices chosen from the dense ground truth (Table 2)."""
    names = sorted(shapes)
    if not 1 <= int(sample) <= len(names):
        raise ValueError(f"sample={sample} is out of range: choose 1..{len(names)}")
    name = names[int(sample) - 1]
    splits = protocols.slice_sweep_splits(tuple(shapes[name]), volume_name=name)
    return _pick(splits, setup, "setup", "slice_sweep")


def densify(annotated: Annotated, shapes: Shapes) -> Split:
    """Train on every annotated slice of every volume; nothing held out (``densify``)."""
    return Split(
        name="densify",
        train={n: dict(a) for n, a in annotated.items()},
        test={},
        meta={"protocol": "densify"},
    )
