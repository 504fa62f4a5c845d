"""The benchmark on disk: ``sample{1,2,3}.h5`` (+ ``.png`` previews) in one folder per scale.

:func:`generate_benchmark` renders and writes samples; :func:`ensure_benchmark` returns the files
of a benchmark, checking each existing file's provenance against the current generator and
(re)generating missing or stale ones when allowed. Every file is written atomically (a temporary
name in the same folder, then ``os.replace``) with its provenance attributes.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse3d.atomic import atomic_path
from sparse3d.data.synth.params import SAMPLES, SampleParams
from sparse3d.data.synth.preview import preview_title, save_preview
from sparse3d.data.synth.provenance import (
    Provenance,
    StaleBenchmarkError,
    provenance_for,
    stale_reason,
    write_provenance,
)
from sparse3d.data.synth.render import SyntheticVolume, check_scale, render_sample
from sparse3d.data.volume import write_volume

logger = logging.getLogger(__name__)

#: Names of the frozen samples, in order.
SAMPLE_NAMES: tuple[str, ...] = tuple(s.name for s in SAMPLES)


def sample_params(name: str) -> SampleParams:
    """The frozen sample called ``name`` (``sample1`` ...); ValueError for an unknown name."""
    for sp in SAMPLES:
        if sp.name == name:
            return sp
    raise ValueError(f"unknown synthetic sample {name!r}; choose from {', '.join(SAMPLE_NAMES)}")


def regenerate_command(folder: str | os.PathLike[str], scale: float, seed: int) -> str:
    """The command line that rewrites the benchmark in ``folder`` with the current generator."""
    return (
        f"python -m sparse3d.data.synth --out {shlex.quote(str(folder))} "
        f"--scale {float(scale)!r} --seed {int(seed)} --overwrite"
    )


def write_sample(path: Path, vol: SyntheticVolume, prov: Provenance, overwrite: bool) -> Path:
    """Write ``vol`` to ``path`` with the provenance attributes, atomically: the volume writer
    writes the file under a temporary name in the same folder, the provenance is added to it,
    then it is renamed onto ``path`` (:func:`sparse3d.atomic.atomic_path`). Without
    ``overwrite`` an existing ``path`` raises FileExistsError."""
    with atomic_path(path, overwrite) as tmp:
        write_volume(tmp, vol.image, vol.label, vol.meta, vol.dense_label)
        write_provenance(tmp, prov)
    return Path(path)


def _render_and_write(
    out: Path, sp: SampleParams, scale: float, seed: int, overwrite: bool, previews: bool
) -> tuple[Path, SyntheticVolume]:
    """Render sample ``sp`` and write ``<out>/<name>.h5`` (+ ``.png`` when ``previews``)."""
    vol = render_sample(sp, scale=scale, seed=seed)
    path = write_sample(out / f"{sp.name}.h5", vol, provenance_for(sp, scale, seed), overwrite)
    if previews:
        save_preview(out / f"{sp.name}.png", vol, preview_title(vol, scale, seed))
    return path, vol


def _summary_row(path: Path, vol: SyntheticVolume, seconds: float) -> dict:
    """One line of the generation summary (name, shape, class fractions, slice counts ...)."""
    return {
        "name": vol.params.name,
        "path": str(path),
        "shape_zyx": list(vol.dense_label.shape),
        "voxel_size_zyx_um": list(vol.meta.voxel_size_zyx_um),
        "class_fractions": dict(vol.class_fractions),
        "annotated_counts_xyz": [len(vol.meta.annotated_slices[a]) for a in ("x", "y", "z")],
        "labelled_fraction": float(np.mean(vol.label != vol.meta.labels.ignore_index)),
        "seconds": seconds,
    }


def generate_benchmark(
    out_dir: str | Path,
    scale: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    samples: Sequence[SampleParams] = SAMPLES,
    previews: bool = True,
    summary: list[dict] | None = None,
) -> list[Path]:
    """Render the three samples and write ``sample{1,2,3}.h5`` (+ ``.png`` previews).

    Args:
        out_dir: output folder (created if missing).
        scale: resolution factor (see :func:`render_sample`).
        seed: random seed; same seed, same volumes.
        overwrite: replace existing files; otherwise an existing output raises FileExistsError
            before anything is rendered.
        samples: which samples (default all three).
        previews: also write a PNG overview per volume.
        summary: if given, one dict per volume is appended (name, shape_zyx, class fractions,
            annotated slice counts, labelled fraction, seconds).

    Returns:
        Paths of the written ``.h5`` files.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        for sp in samples:
            for suffix in (".h5", ".png") if previews else (".h5",):
                target = out / f"{sp.name}{suffix}"
                if target.exists():
                    raise FileExistsError(f"{target}: file exists; pass overwrite=True")
    paths = []
    for sp in tqdm(samples, desc="synthetic volumes", disable=None):
        t0 = time.perf_counter()
        path, vol = _render_and_write(out, sp, scale, seed, overwrite, previews)
        paths.append(path)
        if summary is not None:
            summary.append(_summary_row(path, vol, time.perf_counter() - t0))
    return paths


def ensure_benchmark(
    folder: str | os.PathLike[str],
    scale: float,
    seed: int,
    names: Sequence[str],
    generate_if_missing: bool,
    *,
    previews: bool = True,
) -> dict[str, Path]:
    """The benchmark files ``{name: <folder>/<name>.h5}``, each current for ``scale`` and ``seed``.

    Each existing file's provenance (generator, :data:`GENERATOR_VERSION`, seed, scale,
    parameter hash) is checked against what the current generator would write. With
    ``generate_if_missing`` a missing file is generated and a stale, provenance-less or
    unreadable one regenerated (one INFO line each says why), atomically, with its preview when
    ``previews``; only those samples are rendered. Fresh files are left untouched.

    Args:
        folder: the benchmark folder (created when something is generated).
        scale: resolution factor the files must have been rendered at.
        seed: random seed the files must have been rendered with.
        names: sample names (``sample1``, ``sample2``, ``sample3``).
        generate_if_missing: allow writing missing and stale files.
        previews: write the ``.png`` preview of each file written.

    Raises:
        ValueError: an unknown sample name or a scale outside [0.05, 1].
        FileNotFoundError: a file is missing and ``generate_if_missing`` is False.
        StaleBenchmarkError: (a ValueError) a file is stale and ``generate_if_missing`` is
            False; the one-line message names the file, why, and the command regenerating it.
    """
    folder = Path(folder)
    check_scale(scale, "ensure_benchmark")
    params = [sample_params(n) for n in dict.fromkeys(str(n) for n in names)]
    paths = {sp.name: folder / f"{sp.name}.h5" for sp in params}
    todo: list[SampleParams] = []
    for sp in params:
        path = paths[sp.name]
        if not path.exists():
            if not generate_if_missing:
                raise FileNotFoundError(
                    f"missing data file {path}: generate it with "
                    f"`{regenerate_command(folder, scale, seed)}`"
                )
            logger.info("generating %s: missing (scale %g, seed %d)", path, scale, seed)
        else:
            reason = stale_reason(path, provenance_for(sp, scale, seed))
            if reason is None:
                continue
            if not generate_if_missing:
                raise StaleBenchmarkError(
                    f"{path} is stale: {reason}; regenerate it with "
                    f"`{regenerate_command(folder, scale, seed)}`"
                )
            logger.info("regenerating %s: %s", path, reason)
        todo.append(sp)
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
    for sp in todo:
        _render_and_write(folder, sp, float(scale), int(seed), True, previews)
    return paths
