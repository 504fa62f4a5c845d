"""What the Densify widget reads from napari layers, without Qt (layer 3): the image's channels
``(C, Z, Y, X)``, the class names of a Labels layer's ``features``, the voxel size from a
layer's ``scale``, the options line, and the progress line with its ETA.

Layers are read duck-typed (``.data``, ``.rgb``, ``.scale``, ``.features``), so these helpers
work on napari layers and on plain stand-ins alike. Bad input raises the command line's one-line
:class:`sparse3d.cli.UserError`.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse3d.cli import UserError

#: Columns of a Labels layer's ``features`` that may hold class names, in order of preference.
NAME_COLUMNS = ("class_name", "class", "name", "label")


def channels_of(layers: Sequence[Any]) -> np.ndarray:
    """The image ``(C, Z, Y, X)`` from one or more napari Image layers, in order: a ``(Z, Y, X)``
    layer is one channel, a ``(C, Z, Y, X)`` layer (channels on the first axis, as napari holds
    a multi-channel stack without ``channel_axis``) gives ``C``, an RGB(A) ``(Z, Y, X, 3|4)``
    layer gives 3 or 4 (napari's ``channel_axis=`` splits a stack into one layer per channel:
    pick them all)."""
    if not layers:
        raise UserError("choose an image layer")
    parts = []
    for layer in layers:
        data = np.asarray(layer.data)
        if getattr(layer, "rgb", False):
            data = np.moveaxis(data, -1, 0)
        elif data.ndim == 3:
            data = data[None]
        if data.ndim != 4:
            raise UserError(
                f"image layer {layer.name!r} has shape {data.shape}: need (Z, Y, X) or (C, Z, Y, X)"
            )
        parts.append(data)
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise UserError(f"the image layers differ in shape (z, y, x): {sorted(shapes)}")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def class_names_of(layer: Any) -> list[str]:
    """Class names from a Labels layer's ``features`` (one row per label value: an ``index``
    column gives the value, else the row number does, as napari's own convention; row/value 0
    is "unlabelled" and skipped), in the order of the codes 1, 2, ...; empty when the layer has
    no name column. A code without a row gets ``class<code>``."""
    features = getattr(layer, "features", None)
    if features is None or len(features) == 0:
        return []
    column = next((c for c in NAME_COLUMNS if c in features.columns), None)
    if column is None:
        return []
    names = [str(v) for v in features[column]]
    if "index" in features.columns:
        codes = [int(v) for v in features["index"]]
    else:
        codes = list(range(len(names)))
    by_code = {c: n for c, n in zip(codes, names, strict=True) if c >= 1}
    if not by_code:
        return []
    return [by_code.get(c, f"class{c}") for c in range(1, max(by_code) + 1)]


def parse_class_names(text: str) -> list[str] | None:
    """``"a, b, c"`` -> ``["a", "b", "c"]``; None when empty (densify then names them)."""
    names = [n.strip() for n in text.split(",")]
    names = [n for n in names if n]
    return names or None


def voxel_size_of(layer: Any) -> tuple[float, float, float]:
    """The layer's ``scale`` on its last three axes, as ``(z, y, x)``."""
    scale = tuple(float(s) for s in np.asarray(layer.scale)[-3:])
    if len(scale) != 3:
        raise UserError(f"layer {layer.name!r} has fewer than three axes")
    return scale  # type: ignore[return-value]


def format_voxel(voxel: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in voxel)


def parse_voxel(text: str) -> tuple[float, float, float]:
    """``"2, 1, 1"`` -> ``(2.0, 1.0, 1.0)``; three positive numbers or a UserError."""
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        raise UserError(f"voxel size {text!r}: give three numbers z, y, x") from None
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise UserError(f"voxel size {text!r}: give three positive numbers z, y, x")
    return values  # type: ignore[return-value]


def parse_options(text: str) -> tuple[str, ...]:
    """The options line, densify's dotted keys (``refine.max_steps=50 rf.n_trees=30``)."""
    try:
        items = tuple(shlex.split(text))
    except ValueError as err:
        raise UserError(f"options {text!r}: {err}") from None
    bad = [o for o in items if "=" not in o]
    if bad:
        raise UserError(f"options must be key=value, got {' '.join(bad)}")
    return items


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    m, s = divmod(seconds, 60)
    return f"{m}:{s:02d}" if m else f"{s} s"


class ProgressClock:
    """The progress line of a run: ``stage``, percent and the stage's ETA, from the fractions
    densify reports (an ETA once a stage has moved; stages without fractions show the time
    spent)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self.start = clock()
        self.stage = ""
        self.stage_start = self.start

    def update(self, stage: str, fraction: float) -> tuple[int, str]:
        """``(percent 0-100 or -1 when unknown, line)`` after ``progress(stage, fraction)``."""
        now = self._clock()
        if stage != self.stage:
            self.stage, self.stage_start = stage, now
        spent = now - self.stage_start
        total = format_seconds(now - self.start)
        if 0.0 < fraction < 1.0:
            eta = spent * (1.0 - fraction) / fraction
            return int(100 * fraction), (
                f"{stage} {100 * fraction:.0f}% · ETA {format_seconds(eta)} · {total} so far"
            )
        if fraction >= 1.0:
            return 100, f"{stage} · {total}"
        return -1, f"{stage} … · {total} so far"
