"""densify on arrays in memory, for callers that are not the command line: a viewer's widget, a
notebook (layer 3: densify's options, as typed in :mod:`sparse3d.densify.options`).

    result = densify_painting(image, painting, method="rf")
    result.labels          # (Z, Y, X) in the painting's codes (0 never: every voxel a class)
    result.uncertainty     # (Z, Y, X) float32, 1 - the top class probability

The painting follows what annotation tools (napari, ilastik) write: code 0 is unlabelled and
code ``c >= 1`` is class ``c - 1``, as ``labels=[...]`` of the command line. The methods are the
command line's own (:mod:`sparse3d.densify.methods`), with the same options (``overrides`` are
its dotted keys, e.g. ``("refine.max_steps=50", "rf.n_trees=30")``) and the same one-line errors
(:class:`sparse3d.cli.UserError`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import UserError
from sparse3d.densify.methods import Cancelled, Hooks

__all__ = ["Cancelled", "DensifyResult", "Hooks", "densify_painting", "method_options"]

#: Methods that learn from one volume alone (``method=unet`` trains a run folder: CLI only).
ARRAY_METHODS = ("refine", "rf")


@dataclass
class DensifyResult:
    """A dense segmentation of one painted volume.

    ``labels (Z, Y, X)`` uint16 in the painting's codes (class ``c`` is ``c + 1``);
    ``probabilities (K, Z, Y, X)`` float32; ``uncertainty (Z, Y, X)`` float32, one minus the top
    probability (0: sure, up to ``1 - 1/K``: undecided); ``annotated_slices``: the planes found
    in the painting, ``{"z": (...), "y": (...), "x": (...)}``.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray
    class_names: tuple[str, ...]
    annotated_slices: dict[str, tuple[int, ...]]
    method: str
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)


def method_options(overrides: Sequence[str] = ()) -> tuple[DictConfig, DictConfig]:
    """``(rf, refine)`` option blocks: the defaults of :mod:`sparse3d.densify.options` with
    ``overrides`` (``"rf.n_trees=30"``, ``"refine.max_steps=0"``) applied and checked; a bad key
    or value is a one-line UserError."""
    from sparse3d.densify.options import RefineOptions, RfOptions

    opts = OmegaConf.create(
        {"rf": OmegaConf.structured(RfOptions), "refine": OmegaConf.structured(RefineOptions)}
    )
    try:
        opts = OmegaConf.merge(opts, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.to_object(opts.rf), OmegaConf.to_object(opts.refine)  # ranges
    except Exception as err:  # omegaconf's errors name the key on their first line
        first = str(err).splitlines()[0]
        raise UserError(f"bad option in {' '.join(overrides)}: {first}") from None
    return opts.rf, opts.refine


def _check_inputs(
    image: np.ndarray, painting: np.ndarray, class_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(image (C, Z, Y, X) float32, painting codes (Z, Y, X) int64, class names)``, or a
    one-line UserError."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise UserError(f"the image must be (Z, Y, X) or (C, Z, Y, X), got shape {image.shape}")
    painting = np.asarray(painting)
    if painting.ndim != 3:
        raise UserError(f"the labels must be (Z, Y, X), got shape {painting.shape}")
    if painting.shape != image.shape[1:]:
        raise UserError(
            f"labels shape (z,y,x) {painting.shape} != image shape {image.shape[1:]}: "
            "paint on a layer of the image's size"
        )
    if painting.dtype.kind not in "uib":
        raise UserError(f"label codes must be whole numbers, got dtype {painting.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise UserError("the image holds NaN or infinite values: fill or crop them first")
    painting = painting.astype(np.int64, copy=False)
    if painting.min() < 0:
        raise UserError("label codes must be >= 0 (0 = unlabelled)")
    top = int(painting.max())
    if top < 1:
        raise UserError("no labelled voxel: paint at least two classes on a few planes")
    if class_names is None:
        names = tuple(f"class{c}" for c in range(1, max(top, 2) + 1))
    else:
        names = tuple(str(n) for n in class_names)
        if top > len(names):
            raise UserError(f"label code {top} has no class name (classes: {', '.join(names)})")
    present = np.unique(painting[painting > 0])
    if present.size < 2:
        raise UserError(
            f"only class {names[int(present[0]) - 1]!r} is painted: paint at least two classes"
        )
    return image, painting, names


def densify_painting(
    image: np.ndarray,
    painting: np.ndarray,
    *,
    method: str = "refine",
    class_names: Sequence[str] | None = None,
    voxel_size_zyx_um: Sequence[float] | None = None,
    overrides: Sequence[str] = (),
    hooks: Hooks | None = None,
) -> DensifyResult:
    """Learn from the painted voxels of ``painting (Z, Y, X)`` (0 = unlabelled, ``c`` = class
    ``c - 1``) on ``image (C, Z, Y, X)`` or ``(Z, Y, X)`` and segment every voxel.

    ``method``: ``refine`` (forests, then the refining network) or ``rf`` (forests alone, a
    preview in seconds). ``voxel_size_zyx_um``: makes the filters isotropic in micrometres.
    ``hooks``: progress and cancellation (raises :class:`Cancelled`). Bad input raises a
    one-line :class:`sparse3d.cli.UserError` before any work.
    """
    from sparse3d.data.label_map import derive_annotated_slices
    from sparse3d.densify.methods import _rf_probabilities, refine_volume
    from sparse3d.labels import LabelSpec

    if method not in ARRAY_METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(ARRAY_METHODS)}")
    rf_cfg, refine_cfg = method_options(overrides)
    image, painting, names = _check_inputs(image, painting, class_names)
    voxel = None if voxel_size_zyx_um is None else tuple(float(v) for v in voxel_size_zyx_um)
    if voxel is not None and (len(voxel) != 3 or min(voxel) <= 0):
        raise UserError(f"the voxel size must be three positive numbers (z, y, x), got {voxel}")
    spec = LabelSpec(names, len(names))
    label = np.where(painting > 0, painting - 1, spec.ignore_index).astype(np.uint8)
    slices = derive_annotated_slices(label, spec.ignore_index)
    hooks = hooks or Hooks()
    t0 = time.perf_counter()
    if method == "rf":
        hooks.stage("forest")
        probs = _rf_probabilities(image, label, spec, voxel, rf_cfg)
        facts: dict[str, Any] = {}
    else:
        from sparse3d.cli import quiet_lightning

        quiet_lightning()
        probs, facts = refine_volume(
            image, label, slices, voxel, spec, rf_cfg, refine_cfg, False, hooks
        )
    hooks.stage("done", 1.0)
    top = probs.max(0)
    return DensifyResult(
        labels=(probs.argmax(0) + 1).astype(np.uint16),
        probabilities=probs,
        uncertainty=(1.0 - top).astype(np.float32),
        class_names=names,
        annotated_slices={k: tuple(int(i) for i in v) for k, v in slices.items()},
        method=method,
        seconds=time.perf_counter() - t0,
        facts=facts,
    )
