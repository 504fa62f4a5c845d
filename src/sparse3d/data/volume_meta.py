"""The metadata of a volume file (layer 1): :class:`VolumeMeta` and its HDF5 root attributes,
written by :func:`write_meta` and read back, checked, by :func:`read_meta` (the layout is in
:mod:`sparse3d.data.volume`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sparse3d.axes import AXES
from sparse3d.labels import LabelSpec

FORMAT_VERSION = 1

_REQUIRED_ATTRS = (
    "voxel_size_zyx_um",
    "channel_names",
    "class_names",
    "ignore_index",
    "annotated_z",
    "annotated_y",
    "annotated_x",
    "format_version",
)


class VolumeFormatError(ValueError):
    """A volume file is missing, unreadable or inconsistent; the message names file and problem."""


@dataclass(frozen=True)
class VolumeMeta:
    """Everything about a volume that is not voxel data.

    Args:
        voxel_size_zyx_um: voxel size in micrometres, (z, y, x).
        channel_names: one name per image channel.
        labels: class names and ignore code of the label arrays.
        annotated_slices: ``{"z": (...), "y": (...), "x": (...)}`` sorted indices of annotated
            slices along each axis (see :data:`sparse3d.axes.AXES`); missing axes are stored as empty.
    """

    voxel_size_zyx_um: tuple[float, float, float]
    channel_names: tuple[str, ...]
    labels: LabelSpec
    annotated_slices: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vs = tuple(float(v) for v in self.voxel_size_zyx_um)
        if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
            raise ValueError(f"voxel_size_zyx_um must be 3 positive finite numbers, got {vs!r}")
        if isinstance(self.channel_names, str):
            raise ValueError(
                f"channel_names must be a sequence of names, got {self.channel_names!r}"
            )
        names = tuple(str(n) for n in self.channel_names)
        if not names:
            raise ValueError("channel_names must name at least one channel")
        if not isinstance(self.labels, LabelSpec):
            raise ValueError(f"labels must be a LabelSpec, got {type(self.labels).__name__}")
        unknown = set(self.annotated_slices) - set(AXES)
        if unknown:
            raise ValueError(f"annotated_slices has unknown axes {sorted(unknown)}; use {AXES}")
        annotated = {
            ax: tuple(sorted({int(i) for i in self.annotated_slices.get(ax, ())})) for ax in AXES
        }
        object.__setattr__(self, "voxel_size_zyx_um", vs)
        object.__setattr__(self, "channel_names", names)
        object.__setattr__(self, "annotated_slices", annotated)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)


def write_meta(f: h5py.File, meta: VolumeMeta) -> None:
    """Store ``meta`` (and the format version) as the root attributes of ``f``."""
    str_dt = h5py.string_dtype()
    f.attrs["voxel_size_zyx_um"] = np.asarray(meta.voxel_size_zyx_um, dtype=np.float64)
    f.attrs["channel_names"] = np.asarray(meta.channel_names, dtype=str_dt)
    f.attrs["class_names"] = np.asarray(meta.labels.class_names, dtype=str_dt)
    f.attrs["ignore_index"] = np.int64(meta.labels.ignore_index)
    for ax in AXES:
        f.attrs[f"annotated_{ax}"] = np.asarray(meta.annotated_slices[ax], dtype=np.int64)
    f.attrs["format_version"] = np.int64(FORMAT_VERSION)


def format_error(path: Path, problem: str) -> VolumeFormatError:
    """The error of a bad volume file: ``<path>: <problem>``."""
    return VolumeFormatError(f"{path}: {problem}")


def _str_tuple(value: Any) -> tuple[str, ...]:
    arr = np.atleast_1d(np.asarray(value))
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in arr.tolist())


def read_meta(path: Path, f: h5py.File) -> VolumeMeta:
    attrs = f.attrs
    missing = [a for a in _REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise format_error(path, f"missing root attribute(s) {missing}")
    try:
        version = int(np.asarray(attrs["format_version"]).item())
    except (TypeError, ValueError) as err:
        raise format_error(path, f"format_version is not an integer ({err})") from None
    if version != FORMAT_VERSION:
        raise format_error(
            path, f"format_version {version} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        voxel = tuple(float(v) for v in np.asarray(attrs["voxel_size_zyx_um"]).ravel())
        ignore = int(np.asarray(attrs["ignore_index"]).item())
        annotated: dict[str, tuple[int, ...]] = {}
        for ax in AXES:
            raw = np.asarray(attrs[f"annotated_{ax}"]).ravel()
            if raw.size and not np.issubdtype(raw.dtype, np.integer):
                raise ValueError(f"annotated_{ax} has non-integer dtype {raw.dtype}")
            annotated[ax] = tuple(int(i) for i in raw)
        labels = LabelSpec(class_names=_str_tuple(attrs["class_names"]), ignore_index=ignore)
        return VolumeMeta(
            voxel_size_zyx_um=voxel,  # type: ignore[arg-type]
            channel_names=_str_tuple(attrs["channel_names"]),
            labels=labels,
            annotated_slices=annotated,
        )
    except (TypeError, ValueError) as err:
        raise format_error(path, f"invalid attributes: {err}") from None
