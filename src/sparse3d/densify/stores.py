"""densify's scratch stores (layer 1): chunked zarr arrays that blockwise tasks, in this
process or on a cluster's workers, write their blocks into by path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ZarrSink:
    """Writes regions of a chunked zarr array opened by path (picklable: a path, no handle)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def __call__(self, box: Sequence[slice], values: np.ndarray, lead: bool = True) -> None:
        import zarr

        arr = zarr.open_array(self.path, mode="r+")
        arr[(slice(None), *box) if lead else tuple(box)] = values

    def read(self, box: Sequence[slice]) -> np.ndarray:
        import zarr

        return zarr.open_array(self.path, mode="r")[(slice(None), *box)]


@dataclass
class Stores:
    """Scratch stores of one stage: ``full`` and ``crossfit`` probabilities ``(K, Z, Y, X)``."""

    full: ZarrSink
    crossfit: ZarrSink


def create_store(path: Path, shape: Sequence[int], chunks: Sequence[int], dtype: str) -> ZarrSink:
    """A new chunked zarr array at ``path`` (replacing a previous scratch one)."""
    import shutil

    import zarr

    if path.exists():
        shutil.rmtree(path)
    zarr.create_array(
        store=str(path), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0
    )
    return ZarrSink(path)
