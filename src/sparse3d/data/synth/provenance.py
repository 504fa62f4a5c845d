"""Provenance of generated files: which generator, version, seed, scale and parameters made them.

Every volume written by :mod:`sparse3d.data.synth` carries these HDF5 root attributes:

    generator                str      ``"sparse3d.data.synth"``
    generator_version        int      :data:`GENERATOR_VERSION`
    generator_seed           int      the random seed
    generator_scale          float    the resolution factor
    generator_params_sha256  str      sha256 of :func:`canonical_json` of :func:`generation_params`
    generator_params         str      that canonical JSON itself (to see what changed)

A file is current when all of them match what the generator would write now; anything else
(missing attributes included) makes it stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import h5py
import numpy as np

from sparse3d.data.synth.params import (
    CHANNEL_NAMES,
    EXCITATION_NM,
    IMMERSION_INDEX,
    NUMERICAL_APERTURE,
    RECORDED_VOXEL_ZYX_UM,
    SampleParams,
)
from sparse3d.labels import XENOPUS

#: Bump by hand whenever the generated volumes change (code or parameters), so that files made
#: by an older generator are found stale. The parameter hash alone does not see code changes.
GENERATOR_VERSION = 1
GENERATOR = "sparse3d.data.synth"

ATTR_GENERATOR = "generator"
ATTR_VERSION = "generator_version"
ATTR_SEED = "generator_seed"
ATTR_SCALE = "generator_scale"
ATTR_PARAMS_SHA256 = "generator_params_sha256"
ATTR_PARAMS = "generator_params"
#: Every provenance attribute; a file lacking any of them has no (complete) provenance.
PROVENANCE_ATTRS = (
    ATTR_GENERATOR,
    ATTR_VERSION,
    ATTR_SEED,
    ATTR_SCALE,
    ATTR_PARAMS_SHA256,
    ATTR_PARAMS,
)


class StaleBenchmarkError(ValueError):
    """A generated file does not match the current generator (version, seed, scale, parameters)
    or has no provenance, and may not be regenerated; the message names the file and the
    command that regenerates it."""


@dataclass(frozen=True)
class Provenance:
    """What made (or would make) one generated volume."""

    generator: str
    version: int
    seed: int
    scale: float
    params_sha256: str
    params_json: str

    def attrs(self) -> dict[str, Any]:
        """The HDF5 root attributes of this provenance."""
        return {
            ATTR_GENERATOR: self.generator,
            ATTR_VERSION: np.int64(self.version),
            ATTR_SEED: np.int64(self.seed),
            ATTR_SCALE: np.float64(self.scale),
            ATTR_PARAMS_SHA256: self.params_sha256,
            ATTR_PARAMS: self.params_json,
        }


def generation_params(p: SampleParams) -> dict[str, Any]:
    """Everything besides seed and scale that the output of a sample depends on: its
    parameters, the optics and channel constants and the label coding."""
    return {
        "sample": asdict(p),
        "channel_names": list(CHANNEL_NAMES),
        "excitation_nm": list(EXCITATION_NM),
        "numerical_aperture": NUMERICAL_APERTURE,
        "immersion_index": IMMERSION_INDEX,
        "recorded_voxel_zyx_um": list(RECORDED_VOXEL_ZYX_UM),
        "class_names": list(XENOPUS.class_names),
        "ignore_index": XENOPUS.ignore_index,
    }


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, tuples as lists, shortest float repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def provenance_for(p: SampleParams, scale: float, seed: int) -> Provenance:
    """The provenance the current generator writes for sample ``p`` at ``scale`` and ``seed``."""
    text = canonical_json(generation_params(p))
    return Provenance(
        generator=GENERATOR,
        version=GENERATOR_VERSION,
        seed=int(seed),
        scale=float(scale),
        params_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        params_json=text,
    )


def write_provenance(path: str | os.PathLike[str], prov: Provenance) -> None:
    """Add the provenance attributes to the HDF5 file ``path`` (in place: use on a temporary
    file before it is renamed into place)."""
    with h5py.File(path, "r+") as f:
        for key, value in prov.attrs().items():
            f.attrs[key] = value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_provenance(path: str | os.PathLike[str]) -> Provenance | None:
    """The provenance recorded in ``path``, or None when any attribute is missing.

    Raises:
        OSError: the file cannot be opened as HDF5.
        ValueError: an attribute has the wrong type.
    """
    with h5py.File(path, "r") as f:
        attrs = f.attrs
        if any(a not in attrs for a in PROVENANCE_ATTRS):
            return None
        return Provenance(
            generator=_text(attrs[ATTR_GENERATOR]),
            version=int(np.asarray(attrs[ATTR_VERSION]).item()),
            seed=int(np.asarray(attrs[ATTR_SEED]).item()),
            scale=float(np.asarray(attrs[ATTR_SCALE]).item()),
            params_sha256=_text(attrs[ATTR_PARAMS_SHA256]),
            params_json=_text(attrs[ATTR_PARAMS]),
        )


def _changed_params(old_json: str, new_json: str) -> str:
    """Names of the (sample) parameters that differ between two :func:`canonical_json` texts."""
    try:
        old, new = json.loads(old_json), json.loads(new_json)
    except ValueError:
        return ""
    flat_old = {**old.pop("sample", {}), **old} if isinstance(old, dict) else {}
    flat_new = {**new.pop("sample", {}), **new}
    keys = sorted(
        k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
    )
    if not keys:
        return ""
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f" ({', '.join(keys[:5])}{more} changed)"


def stale_reason(path: str | os.PathLike[str], expected: Provenance) -> str | None:
    """Why the existing file ``path`` does not match ``expected`` (one line), or None if it
    does. An unreadable file or one without provenance is stale."""
    try:
        found = read_provenance(path)
    except (OSError, ValueError, TypeError) as err:
        return f"unreadable provenance ({' '.join(str(err).split())})"
    if found is None:
        return "no generator provenance (written before files recorded it, or not generated)"
    checks = (
        ("generator", found.generator, expected.generator),
        ("generator_version", found.version, expected.version),
        ("seed", found.seed, expected.seed),
        ("scale", found.scale, expected.scale),
    )
    for name, have, want in checks:
        if have != want:
            return f"{name} {have!r} != current {want!r}"
    if found.params_sha256 != expected.params_sha256:
        changed = _changed_params(found.params_json, expected.params_json)
        return (
            f"generation parameters differ{changed}: hash {found.params_sha256[:12]} != current "
            f"{expected.params_sha256[:12]}"
        )
    return None
