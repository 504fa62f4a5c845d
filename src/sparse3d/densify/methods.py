"""The per-volume methods of ``python -m sparse3d.densify`` that learn from each volume alone
(layer 3): ``method=rf`` (a random forest on filter features, ``sparse3d.densify.forests``) and
``method=refine`` (cross-fitted, stacked forests, then a small same-padded U-Net on the image
and the forests' probabilities). The paper's network (``method=unet``), trained once on every
input, lives in :mod:`sparse3d.densify`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import quiet_lightning
from sparse3d.densify.results import write_result

if TYPE_CHECKING:
    from sparse3d.data.transforms import RandPaperDeformd
    from sparse3d.data.volume import VolumeArrays
    from sparse3d.labels import LabelSpec

log = logging.getLogger("sparse3d.densify")

#: One volume through a method: (source volume, result file, picture) -> the seconds the method
#: spent on it (prediction; a shared training is added by the caller).
Segment = Callable[[Path, Path, Path], float]


class Cancelled(Exception):
    """The run was stopped by ``Hooks.should_stop`` (a viewer's Cancel)."""


@dataclass(frozen=True)
class Hooks:
    """What a caller that is not a terminal (a viewer's worker) hears of a run and how it stops
    it: ``progress(stage, fraction)`` at each stage and network step, ``should_stop()`` polled
    between stages and after each network step (the run then raises :class:`Cancelled`)."""

    progress: Callable[[str, float], None] | None = None
    should_stop: Callable[[], bool] | None = None

    def stage(self, name: str, fraction: float = 0.0) -> None:
        """Report ``name`` and raise :class:`Cancelled` if a stop was asked for."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"cancelled before {name}")
        if self.progress is not None:
            self.progress(name, float(fraction))


def _rf_probabilities(
    image: np.ndarray,
    label: np.ndarray,
    labels: LabelSpec,
    voxel_size_zyx_um: tuple[float, float, float] | None,
    rf_cfg: DictConfig,
) -> np.ndarray:
    """The random forest on one volume: image ``(C, Z, Y, X)`` and sparse ``label (Z, Y, X)``
    -> class probabilities ``(K, Z, Y, X)`` float32 (settings from the ``rf:`` block)."""
    from sparse3d.densify.forests import segment_rf

    kwargs = OmegaConf.to_container(rf_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs["sigmas"] = tuple(kwargs["sigmas"])
    return segment_rf(
        image, label, labels.num_classes, labels.ignore_index, voxel_size_zyx_um, **kwargs
    )


def per_volume(
    cfg: DictConfig, probabilities: Callable[[VolumeArrays], np.ndarray], attrs: dict[str, Any]
) -> Segment:
    """The per-volume step of a method that learns from each volume alone: refuse existing
    outputs, ``probabilities(volume) -> (K, Z, Y, X)``, write result and picture; returns the
    seconds ``probabilities`` took."""
    from sparse3d.data.volume import load_volume
    from sparse3d.inference.writers import check_output

    def segment(src: Path, seg: Path, png: Path) -> float:
        check_output(seg, bool(cfg.overwrite))
        check_output(png, bool(cfg.overwrite))
        vol = load_volume(src)
        t0 = time.perf_counter()
        probs = probabilities(vol)
        seconds = time.perf_counter() - t0
        write_result(vol, probs, seg, png, bool(cfg.save_probabilities), attrs)
        return seconds

    return segment


def random_forest(cfg: DictConfig, summary: dict[str, Any]) -> tuple[Segment, float]:
    """The per-volume step of ``method=rf`` (nothing is shared between volumes)."""
    summary["rf"] = OmegaConf.to_container(cfg.rf, resolve=True)
    attrs = {"method": "rf", "rf_n_trees": int(cfg.rf.n_trees)}
    attrs["rf_sigmas"] = [float(s) for s in cfg.rf.sigmas]

    def probabilities(vol: VolumeArrays) -> np.ndarray:
        spec, voxel = vol.meta.labels, vol.meta.voxel_size_zyx_um
        return _rf_probabilities(vol.image, vol.label, spec, voxel, cfg.rf)

    return per_volume(cfg, probabilities, attrs), 0.0


def make_forest(num_classes: int, ignore_index: int, rf_cfg: DictConfig, **override: Any):
    """The random forest the ``rf:`` config describes (its ``sigmas`` are the features', not
    the forest's); ``override`` replaces single settings (e.g. ``n_trees``)."""
    from sparse3d.densify.forests import RandomForestSegmenter

    kwargs = {k: v for k, v in OmegaConf.to_container(rf_cfg, resolve=True).items()}
    kwargs.pop("sigmas", None)
    kwargs.update(override)
    return RandomForestSegmenter(num_classes, ignore_index, **kwargs)


def stacked_forests(
    image: np.ndarray,
    label: np.ndarray,
    slices: Mapping[str, Sequence[int]],
    voxel_size_zyx_um: tuple[float, float, float] | None,
    spec: LabelSpec,
    rf_cfg: DictConfig,
    refine_cfg: DictConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """The forests of ``method=refine`` on ``image (C, Z, Y, X)`` and ``label (Z, Y, X)``,
    annotated on the planes ``slices`` (``{"z": [...], ...}``; none: nothing is held out):
    ``(full, crossfit)`` probabilities ``(K, Z, Y, X)`` of the stacked forests fitted to every
    annotated plane, and held out plane by plane (``sparse3d.densify.forests.stacked_probabilities``)."""
    from sparse3d.densify.features import voxel_features
    from sparse3d.densify.forests import stacked_probabilities

    k, ign = spec.num_classes, spec.ignore_index
    features = voxel_features(image, voxel_size_zyx_um, tuple(rf_cfg.sigmas))
    planes = dict(slices) if any(slices.values()) else {}  # labels not on planes
    forest = make_forest(k, ign, rf_cfg)
    fold_forest = make_forest(k, ign, rf_cfg, n_trees=int(refine_cfg.fold_trees))
    return stacked_probabilities(
        features,
        label,
        planes,
        forest,
        fold_forest,
        stages=int(refine_cfg.rf_stages),
        context_sigmas=tuple(refine_cfg.context_sigmas),
        n_folds=int(refine_cfg.folds),
    )


#: Choices of ``refine.class_weights`` (see :func:`refine_class_weights`).
CLASS_WEIGHTS = (None, "balanced", "sqrt")


def refine_deform(
    refine_cfg: DictConfig,
    input_tile: Sequence[int],
    ignore_index: int,
    voxel_size_zyx_um: tuple[float, float, float] | None,
) -> RandPaperDeformd | None:
    """The paper's spatial augmentation (B-spline field, rotation, scaling; Sec. 3.2) for the
    refining network's tiles when ``refine.deform`` is true, else None. Its settings are the
    paper's (``conf/augment/paper.yaml``); rotations are in micrometres."""
    if not bool(refine_cfg.get("deform", False)):
        return None
    from sparse3d.data.transforms import RandPaperDeformd

    deform = RandPaperDeformd(
        keys=("image", "label", "pseudo"),
        label_keys=("label", "pseudo"),
        spatial_size=tuple(int(t) for t in input_tile),
        voxel_size_zyx_um=voxel_size_zyx_um or (1.0, 1.0, 1.0),
        ignore_index=int(ignore_index),
    )
    deform.set_random_state(seed=int(refine_cfg.seed))
    return deform


def refine_class_weights(
    label: np.ndarray, num_classes: int, kind: str | None
) -> tuple[float, ...] | None:
    """Class weights of the refining network's loss from the annotated voxels of ``label``:
    None (all 1), ``"balanced"`` (inverse frequency, mean 1) or ``"sqrt"`` (its square root,
    mean 1: rare classes count more, a thin rare class is not blown up as much)."""
    from sparse3d.losses import balanced_class_weights

    if kind not in CLASS_WEIGHTS:
        raise ValueError(f"refine.class_weights must be null, balanced or sqrt, got {kind!r}")
    if kind is None:
        return None
    counts = np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
    return balanced_class_weights(counts, 0.5 if kind == "sqrt" else 1.0)


def refining_network(
    image: np.ndarray,
    label: np.ndarray,
    teacher: np.ndarray,
    crossfit: np.ndarray,
    spec: LabelSpec,
    refine_cfg: DictConfig,
    progress_bar: bool,
    facts: dict[str, Any],
    voxel_size_zyx_um: tuple[float, float, float] | None = None,
    hooks: Hooks | None = None,
) -> np.ndarray:
    """The small same-padded U-Net of ``method=refine``, trained on ``image (C, Z, Y, X)`` and
    the held-out forest probabilities ``crossfit (K, Z, Y, X)`` with the annotation and the
    confident pseudo-labels of ``teacher (K, Z, Y, X)`` (the forests' probabilities, or a
    previous round's average); returns its probabilities ``(K, Z, Y, X)``
    and adds its steps and seconds to ``facts``. ``voxel_size_zyx_um``: for the rotations of
    ``refine.deform`` (None: isotropic)."""
    import torch

    from sparse3d.axes import AXES
    from sparse3d.callbacks import ProgressLog
    from sparse3d.data.normalize import normalize_volume
    from sparse3d.densify.network import (
        TTA_FLIPS,
        PlaneTiles,
        fit_tile,
        predict_same_padded,
        pseudo_labels,
    )
    from sparse3d.densify.network_fit import RefineModule, ReportAndStop, fit_refiner
    from sparse3d.models import UNet

    k, ign = spec.num_classes, spec.ignore_index
    fraction = refine_cfg.get("pseudo_class_fraction")
    pseudo = pseudo_labels(
        teacher, label, ign, float(refine_cfg.pseudo_threshold),
        None if fraction is None else float(fraction),
    )  # fmt: skip
    x = np.concatenate([normalize_volume(image), crossfit]).astype(np.float32)
    torch.manual_seed(int(refine_cfg.seed))
    net = UNet(
        x.shape[0],
        k,
        base_channels=int(refine_cfg.base_channels),
        depth=int(refine_cfg.depth),
        padding="same",
        norm="batch",
        bn_eval_stats="running",
    )
    multiple = 2 ** (int(refine_cfg.depth) - 1)
    input_tile = fit_tile(tuple(refine_cfg.input_tile), label.shape, multiple)
    tiles = PlaneTiles(
        x,
        label,
        pseudo,
        ign,
        input_tile,
        seed=int(refine_cfg.seed),
        flip_axes=tuple(refine_cfg.get("flip_axes", AXES)),
        centre_sampling=str(refine_cfg.get("centre_sampling", "voxel")),
        deform=refine_deform(refine_cfg, input_tile, ign, voxel_size_zyx_um),
    )
    module = RefineModule(
        net,
        k,
        ign,
        pseudo_weight=float(refine_cfg.pseudo_weight),
        lr=float(refine_cfg.lr),
        max_steps=int(refine_cfg.max_steps),
        time_budget_s=None if refine_cfg.time_budget_s is None else float(refine_cfg.time_budget_s),
        class_weights=refine_class_weights(label, k, refine_cfg.get("class_weights")),
    )
    callbacks = [] if progress_bar else [ProgressLog()]  # log lines when piped
    if hooks is not None:
        callbacks.append(ReportAndStop(hooks.progress, hooks.should_stop))
    fit = fit_refiner(
        module,
        tiles,
        int(refine_cfg.batch_size),
        progress_bar=progress_bar,
        callbacks=callbacks,
        precision=str(refine_cfg.get("precision", "fp32")),
    )
    facts.update(
        steps=int(fit["steps"]),
        network_seconds=round(fit["seconds"], 1),
        network_precision=fit["precision"],
    )
    if hooks is not None:
        hooks.stage("prediction")
    net.eval()
    flips = TTA_FLIPS if refine_cfg.get("tta", False) else ((),)
    return predict_same_padded(
        net,
        x,
        multiple,
        halo=net.receptive_field,
        max_voxels=int(refine_cfg.max_voxels_per_pass),
        flips=flips,
        precision=str(fit["precision"]),
    )


def refine_volume(
    image: np.ndarray,
    label: np.ndarray,
    slices: Mapping[str, Sequence[int]],
    voxel_size_zyx_um: tuple[float, float, float] | None,
    spec: LabelSpec,
    rf_cfg: DictConfig,
    refine_cfg: DictConfig,
    progress_bar: bool,
    hooks: Hooks | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``method=refine`` on ``image (C, Z, Y, X)`` annotated by ``label (Z, Y, X)`` on the
    planes ``slices``: cross-fitted, stacked forests, then a small same-padded U-Net on the
    image and the forests' probabilities (annotation + confident pseudo-labels), averaged with
    the forest. Returns ``probabilities (K, Z, Y, X)`` and facts for the summary. ``hooks``:
    progress and cancellation for a caller such as a viewer."""
    hooks = hooks or Hooks()
    image = np.asarray(image, dtype=np.float32)
    facts: dict[str, Any] = {}
    t0 = time.perf_counter()
    hooks.stage("forests")
    full, crossfit = stacked_forests(
        image, label, slices, voxel_size_zyx_um, spec, rf_cfg, refine_cfg
    )
    facts["forest_seconds"] = round(time.perf_counter() - t0, 1)
    if int(refine_cfg.max_steps) <= 0:
        return full, facts
    hooks.stage("network")
    probs, _ = network_rounds(
        image, label, full, crossfit, spec, refine_cfg, progress_bar, facts, voxel_size_zyx_um,
        hooks,
    )  # fmt: skip
    return probs, facts


def network_rounds(
    image: np.ndarray,
    label: np.ndarray,
    full: np.ndarray,
    crossfit: np.ndarray,
    spec: LabelSpec,
    refine_cfg: DictConfig,
    progress_bar: bool,
    facts: dict[str, Any],
    voxel_size_zyx_um: tuple[float, float, float] | None = None,
    hooks: Hooks | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``refine.rounds`` trainings of the refining network (:func:`refining_network`), each
    averaged with the forests' ``full (K, Z, Y, X)`` (``refine.forest_weight``). The first round
    takes its pseudo-labels from the forests, every later one (self-training) from the previous
    round's average, with a fresh network (seed + round). Returns the last ``(average, network
    softmax)``, both ``(K, Z, Y, X)``; ``facts`` gets each round's steps and seconds."""
    w = float(refine_cfg.forest_weight)
    rounds = int(refine_cfg.get("rounds", 1))
    teacher = full
    for r in range(rounds):
        cfg_r = refine_cfg if r == 0 else OmegaConf.merge(refine_cfg, {"seed": refine_cfg.seed + r})
        round_facts: dict[str, Any] = {}
        net = refining_network(
            image, label, teacher, crossfit, spec, cfg_r, progress_bar, round_facts,
            voxel_size_zyx_um, hooks,
        )  # fmt: skip
        teacher = (1.0 - w) * net + w * full
        if r == 0:
            facts.update(round_facts)
        else:
            facts[f"round{r + 1}"] = round_facts
    return teacher, net


def refine_probabilities(
    vol: VolumeArrays, rf_cfg: DictConfig, refine_cfg: DictConfig, progress_bar: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`refine_volume` on a loaded volume (its label, annotated planes, voxel size)."""
    return refine_volume(
        np.asarray(vol.image, dtype=np.float32),
        np.asarray(vol.label),
        vol.meta.annotated_slices,
        vol.meta.voxel_size_zyx_um,
        vol.meta.labels,
        rf_cfg,
        refine_cfg,
        progress_bar,
    )


def refine(cfg: DictConfig, summary: dict[str, Any]) -> tuple[Segment, float]:
    """The per-volume step of ``method=refine`` (each volume learns from its own planes)."""
    import sys

    quiet_lightning()
    summary["refine"] = OmegaConf.to_container(cfg.refine, resolve=True)
    summary["rf"] = OmegaConf.to_container(cfg.rf, resolve=True)
    summary["steps"] = {}

    def probabilities(vol: VolumeArrays) -> np.ndarray:
        probs, facts = refine_probabilities(vol, cfg.rf, cfg.refine, sys.stderr.isatty())
        summary["steps"][vol.path.stem] = facts
        log.info("%s: %s", vol.path.name, facts)
        return probs

    return per_volume(cfg, probabilities, {"method": "refine"}), 0.0
