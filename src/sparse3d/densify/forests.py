"""The forests of densify (layer 1: numpy, scipy, scikit-learn): a random forest on voxel
features learnt from the labelled voxels of a sparse annotation (ilastik's pixel
classification), and the cross-fitted, stacked forests of ``method=refine``.

:class:`RandomForestSegmenter` fits scikit-learn's ``RandomForestClassifier`` to a class-balanced
random subsample of the labelled voxels and predicts class probabilities ``(K, Z, Y, X)`` chunk
by chunk; features come from :mod:`sparse3d.densify.features`.

Stacking leak: on its own training planes a forest is nearly always right, so a model that sees
those probabilities as input learns to copy them. :func:`crossfit_probabilities` therefore
predicts each fold of annotated planes with a forest that did not see it (the planes are dealt
diagonally into folds, :func:`plane_folds`); :func:`stacked_probabilities` adds auto-context
stages that learn from the previous stage's smoothed, cross-fitted probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from sparse3d.axes import AXES
from sparse3d.data.annotation import slice_mask
from sparse3d.densify.features import DEFAULT_SIGMAS, PROGRESS_MIN_VOXELS, voxel_features


def _spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, step):
        yield s, min(n, s + step)


class RandomForestSegmenter:
    """Random forest on voxel features, trained on the labelled voxels of a sparse annotation.

    Args:
        num_classes: K; class codes are ``0..K-1``.
        ignore_index: code of unlabelled voxels.
        n_trees: trees in the forest.
        max_depth: tree depth limit (None: grown until pure).
        samples_per_class: labelled voxels drawn at random per class for training (all when
            fewer), so a class painted over many voxels does not drown a rare one.
        seed: seeds the voxel subsample and the forest.
        n_jobs: parallel jobs of the forest (-1: all cores).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        n_trees: int = 100,
        max_depth: int | None = None,
        samples_per_class: int = 20000,
        seed: int = 0,
        n_jobs: int = -1,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"need at least two classes, got num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class code")
        if n_trees < 1 or samples_per_class < 1:
            raise ValueError("n_trees and samples_per_class must be at least 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.n_trees = int(n_trees)
        self.max_depth = None if max_depth is None else int(max_depth)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self.n_jobs = int(n_jobs)
        self.forest = None
        #: class codes present in the training voxels (columns of the forest's output)
        self.classes_: np.ndarray | None = None
        #: training voxels drawn per class
        self.samples_: dict[int, int] = {}

    def sample(self, label: np.ndarray) -> np.ndarray:
        """Flat indices of the training voxels of ``label (Z, Y, X)``: up to
        ``samples_per_class`` labelled voxels of each class, drawn at random (seeded), sorted."""
        flat = np.asarray(label).reshape(-1)
        self.check_codes(np.unique(flat))
        return self.sample_indices([np.flatnonzero(flat == c) for c in range(self.num_classes)])

    def check_codes(self, codes: np.ndarray) -> None:
        """ValueError for label codes that are neither a class nor the ignore value."""
        bad = [int(v) for v in codes if v != self.ignore_index and not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(
                f"label holds codes {bad[:10]} outside classes 0..{self.num_classes - 1} "
                f"and ignore value {self.ignore_index}"
            )

    def sample_indices(self, per_class: Sequence[np.ndarray]) -> np.ndarray:
        """The training voxels from every labelled voxel's flat index, ``per_class[c]`` sorted
        (as a whole-volume or a blockwise scan finds them alike): up to ``samples_per_class``
        of each class at random (seeded), returned sorted."""
        rng = np.random.default_rng(self.seed)
        picked = []
        self.samples_ = {}
        for cls in range(self.num_classes):
            idx = np.asarray(per_class[cls], dtype=np.int64) if cls < len(per_class) else []
            if len(idx) > self.samples_per_class:
                idx = rng.choice(idx, self.samples_per_class, replace=False)
            if len(idx):
                self.samples_[cls] = int(len(idx))
                picked.append(idx)
        if not picked:
            raise ValueError("no labelled voxel to train on: every voxel is ignore_index")
        return np.sort(np.concatenate(picked))

    def fit(self, features: np.ndarray, label: np.ndarray) -> RandomForestSegmenter:
        """Train on ``features (F, Z, Y, X)`` at the labelled voxels of ``label (Z, Y, X)``
        (``ignore_index`` = unlabelled)."""
        features = np.asarray(features)
        label = np.asarray(label)
        if features.ndim != 4 or features.shape[1:] != label.shape:
            raise ValueError(
                f"features must be (F, Z, Y, X) and label (Z, Y, X) of the same grid, got "
                f"{features.shape} and {label.shape}"
            )
        idx = self.sample(label)
        x = features.reshape(features.shape[0], -1)[:, idx].T
        return self.fit_rows(x, label.reshape(-1)[idx])

    def fit_rows(self, x: np.ndarray, y: np.ndarray) -> RandomForestSegmenter:
        """Train on the feature rows ``x (N, F)`` of the training voxels and their classes
        ``y (N,)``, in the order :meth:`sample` gives them."""
        from sklearn.ensemble import RandomForestClassifier

        self.forest = RandomForestClassifier(
            n_estimators=self.n_trees,
            max_depth=self.max_depth,
            n_jobs=self.n_jobs,
            random_state=self.seed,
        )
        self.forest.fit(np.ascontiguousarray(x, np.float32), np.asarray(y).astype(np.int64))
        self.classes_ = np.asarray(self.forest.classes_, dtype=np.int64)
        return self

    def predict_proba(
        self, features: np.ndarray, chunk_voxels: int = 1_000_000, progress: bool = True
    ) -> np.ndarray:
        """Class probabilities ``(K, Z, Y, X)`` float32 of every voxel of ``features
        (F, Z, Y, X)``; classes absent from the training voxels get probability 0. Voxels are
        classified ``chunk_voxels`` at a time to bound memory."""
        if self.forest is None or self.classes_ is None:
            raise RuntimeError("call fit() before predict_proba()")
        features = np.asarray(features)
        n_feat = features.shape[0]
        if features.ndim != 4 or n_feat != self.forest.n_features_in_:
            raise ValueError(
                f"features must be (F, Z, Y, X) with F = {self.forest.n_features_in_} as in "
                f"training, got shape {features.shape}"
            )
        shape = features.shape[1:]
        flat = features.reshape(n_feat, -1)
        n = flat.shape[1]
        out = np.zeros((self.num_classes, n), dtype=np.float32)
        spans = list(_spans(n, max(1, int(chunk_voxels))))
        bar = tqdm(
            spans,
            desc="random forest",
            unit="chunk",
            leave=False,
            disable=not progress or n < PROGRESS_MIN_VOXELS,
        )
        for s, e in bar:
            x = np.ascontiguousarray(flat[:, s:e].T)
            out[self.classes_, s:e] = self.forest.predict_proba(x).T
        return out.reshape(self.num_classes, *shape)


def segment_rf(
    image: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    ignore_index: int,
    voxel_size_zyx_um: Sequence[float] | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    **rf_kwargs,
) -> np.ndarray:
    """Dense class probabilities ``(K, Z, Y, X)`` float32 of ``image (C, Z, Y, X)`` from the
    sparse annotation ``label (Z, Y, X)``: features (:func:`voxel_features` at ``sigmas``), a
    forest fitted to the labelled voxels (:class:`RandomForestSegmenter`, ``rf_kwargs``), and
    its prediction for every voxel."""
    features = voxel_features(image, voxel_size_zyx_um, sigmas)
    rf = RandomForestSegmenter(num_classes, ignore_index, **rf_kwargs).fit(features, label)
    return rf.predict_proba(features)


def plane_folds(
    slices: Mapping[str, Sequence[int]], n_folds: int
) -> list[dict[str, tuple[int, ...]]]:
    """Deal the annotated planes into at most ``n_folds`` non-empty folds, diagonally.

    The ``r``-th plane (in position order) of the ``a``-th axis (z, y, x) goes to fold
    ``(r + a) % n``, so a fold mixes orientations *and* positions: with 3 planes per axis and
    3 folds each fold holds one plane of every axis, and the three middle planes lie in three
    different folds. (Dealing axis by axis, round robin, put the ``r``-th plane of every axis in
    fold ``r``: holding out the middle fold removed every plane through the middle of the
    volume, so a structure found only there was never in the fold forest's training.)
    E.g. ``{"z": (5,), "y": (9,), "x": (3, 7)}`` with 2 folds gives
    ``[{"z": (5,), "x": (3,)}, {"y": (9,), "x": (7,)}]`` (axes without planes omitted).
    """
    planes = [
        (a, ax, r, int(i))
        for a, ax in enumerate(AXES)
        for r, i in enumerate(sorted(slices.get(ax, ())))
    ]
    n = max(1, min(int(n_folds), len(planes)))
    folds: list[dict[str, list[int]]] = [{} for _ in range(n)]
    for a, ax, r, i in planes:
        folds[(r + a) % n].setdefault(ax, []).append(i)
    return [{ax: tuple(v) for ax, v in f.items()} for f in folds if f]


def crossfit_probabilities(
    features: np.ndarray,
    label: np.ndarray,
    slices: Mapping[str, Sequence[int]],
    forest: RandomForestSegmenter,
    fold_forest: RandomForestSegmenter,
    n_folds: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Forest probabilities with and without the stacking leak.

    Args:
        features: ``(F, Z, Y, X)`` voxel features.
        label: ``(Z, Y, X)`` sparse label (``forest.ignore_index`` where unlabelled).
        slices: the annotated planes ``{"z": ..., "y": ..., "x": ...}``.
        forest: fitted on every labelled voxel and predicts the whole volume.
        fold_forest: refitted once per fold on the other folds' voxels; predicts only the
            voxels of its fold's planes (so it may be smaller than ``forest``).
        n_folds: number of plane folds.

    Returns:
        ``(full, crossfit)``, both ``(K, Z, Y, X)`` float32: ``full`` from ``forest``
        everywhere; ``crossfit`` equal to ``full`` off the planes and, on each fold's planes,
        the prediction of the forest that did not see them (a voxel on two folds' planes keeps
        the later fold's). With a single fold there is nothing to hold out: both are ``full``.
    """
    ign = forest.ignore_index
    forest.fit(features, label)
    full = forest.predict_proba(features)
    crossfit = full.copy()
    folds = plane_folds(slices, n_folds)
    if len(folds) < 2:
        return full, crossfit
    shape = label.shape
    for fold in folds:
        held = slice_mask(shape, fold)
        train = np.where(held, ign, label).astype(label.dtype)
        if not bool((train != ign).any()):
            continue
        fold_forest.fit(features, train)
        idx = np.flatnonzero(held.ravel())
        sub = features.reshape(features.shape[0], -1)[:, idx][:, :, None, None]  # (F, N, 1, 1)
        probs = fold_forest.predict_proba(sub)[:, :, 0, 0]  # (K, N)
        crossfit.reshape(crossfit.shape[0], -1)[:, idx] = probs
    return full, crossfit


def context_features(
    probabilities: np.ndarray,
    sigmas: Sequence[float],
    crop: Sequence[slice] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Auto-context: ``probabilities (K, Z, Y, X)`` and their Gaussian smoothings at each sigma
    (voxels) -> ``(K * (1 + len(sigmas)), Z, Y, X)`` float32, what a next stage learns from.

    ``crop``: filter all of ``probabilities`` (a block with its halo) but return only these
    voxels; ``out``: write there (float32, the returned shape) instead of a new array."""
    from scipy import ndimage as ndi

    probabilities = np.asarray(probabilities, dtype=np.float32)
    box = (slice(None),) * 3 if crop is None else tuple(crop)
    k = probabilities.shape[0]
    kept = probabilities[(slice(None), *box)].shape[1:]
    if out is None:
        out = np.empty((k * (1 + len(sigmas)), *kept), dtype=np.float32)
    out[:k] = probabilities[(slice(None), *box)]
    for i, s in enumerate(sigmas, 1):
        for c, p in enumerate(probabilities):
            out[i * k + c] = ndi.gaussian_filter(p, float(s))[box]
    return out


def stacked_probabilities(
    features: np.ndarray,
    label: np.ndarray,
    slices: Mapping[str, Sequence[int]],
    forest: RandomForestSegmenter,
    fold_forest: RandomForestSegmenter,
    stages: int = 2,
    context_sigmas: Sequence[float] = (1.0, 3.0, 6.0),
    n_folds: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """``stages`` cross-fitted forests, each after the first also seeing the smoothed
    probabilities of the one before (auto-context); returns the last stage's ``(full,
    crossfit)`` as :func:`crossfit_probabilities` does.

    A stage learns from the previous stage's *cross-fitted* probabilities (honest on the
    annotated planes), so it learns how far to trust them, not to copy them.
    """
    full, crossfit = crossfit_probabilities(features, label, slices, forest, fold_forest, n_folds)
    for _ in range(1, int(stages)):
        stage_features = np.concatenate([features, context_features(crossfit, context_sigmas)])
        full, crossfit = crossfit_probabilities(
            stage_features, label, slices, forest, fold_forest, n_folds
        )
        del stage_features
    return full, crossfit
