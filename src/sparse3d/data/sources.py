"""Where an experiment's volumes come from (layer 1): ``{name: path}`` of HDF5 volume files.

The data configs name one of these as their ``source`` (a ``_target_`` node): the built-in
synthetic benchmark (generated on first use, its provenance checked on load) or the user's own
converted files. Problems raise :class:`DataSourceError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


class DataSourceError(ValueError):
    """A volume file is missing or stale; the message says how to fix it."""


def benchmark_folder(root: str | Path, scale: float) -> Path:
    """Where the synthetic benchmark at ``scale`` lives (``make data`` writes scale 1 to root)."""
    root = Path(root)
    return root if float(scale) == 1.0 else root / f"scale{float(scale):g}"


def synthetic_benchmark(
    root: str | Path,
    scale: float,
    seed: int,
    volumes: Sequence[str],
    generate_if_missing: bool = True,
) -> dict[str, Path]:
    """The benchmark's sample files under ``root`` at ``scale``: generated when missing (or
    stale, i.e. written by another generator version or parameters) if allowed, else refused."""
    from sparse3d.data.synth import StaleBenchmarkError, ensure_benchmark

    folder = benchmark_folder(root, scale)
    try:
        return ensure_benchmark(
            folder,
            scale=float(scale),
            seed=int(seed),
            names=[str(v) for v in volumes],
            generate_if_missing=bool(generate_if_missing),
        )
    except (StaleBenchmarkError, FileNotFoundError) as err:
        raise DataSourceError(" ".join(str(err).split())) from None


def volume_files(paths: Mapping[str, str | Path] | None) -> dict[str, Path]:
    """The user's converted volume files ``{name: path}``, each checked to exist."""
    out = {str(n): Path(p) for n, p in (paths or {}).items()}
    if not out:
        raise DataSourceError("no volumes given: data=files data.paths='{name: file.h5, ...}'")
    for p in out.values():
        if not p.is_file():
            raise DataSourceError(
                f"missing data file {p}: convert your data with python -m sparse3d.data.convert"
            )
    return out
