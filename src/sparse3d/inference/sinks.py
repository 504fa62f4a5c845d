"""Where the predictor's tile logits go (layer 1): result stores (numpy arrays or HDF5
datasets), the sink of valid-convolution tiles (each voxel written once) and of same-padded
tiles (weighted blending, normalised at the end), and the blending scratch file of a streamed
prediction.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from sparse3d.inference.tiling import Tile


class Stores:
    """Where results go: numpy arrays or HDF5 datasets (both take slice assignment)."""

    def __init__(self, labels, probabilities=None) -> None:
        self.labels = labels
        self.probabilities = probabilities

    def put(self, region: tuple[slice, slice, slice], logits: torch.Tensor) -> None:
        """``logits (K, z, y, x)`` float32 of ``region``."""
        if self.labels is not None:
            self.labels[region] = logits.argmax(0).to(torch.uint8).numpy()
        if self.probabilities is not None:
            p = torch.softmax(logits, 0).numpy()
            self.probabilities[(slice(None), *region)] = p.astype(self.probabilities.dtype)


class DirectSink:
    """Valid-convolution tiles: each voxel is written once."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    def add(self, tile: Tile, logits: torch.Tensor) -> None:
        self.stores.put(tile.out_slices, logits[(slice(None), *tile.crop_slices)])

    def finish(self) -> None:
        pass


class BlendSink:
    """Same-padded tiles: weighted sum of logits and of weights, normalised at the end."""

    def __init__(self, stores: Stores, acc, wsum, shape_zyx: tuple[int, int, int]) -> None:
        self.stores, self.acc, self.wsum, self.shape = stores, acc, wsum, shape_zyx

    def add(self, tile: Tile, logits: torch.Tensor) -> None:
        region = tile.out_slices
        w = tile.weight()
        part = logits[(slice(None), *tile.crop_slices)].numpy() * w[None]
        self.acc[(slice(None), *region)] = self.acc[(slice(None), *region)] + part
        self.wsum[region] = self.wsum[region] + w

    def finish(self) -> None:
        z = self.shape[0]
        step = max(1, min(z, 16))
        for z0 in range(0, z, step):
            region = (slice(z0, min(z, z0 + step)), slice(None), slice(None))
            w = np.asarray(self.wsum[region])
            if (w <= 0).any():
                raise RuntimeError("blending left voxels without any tile")
            logits = np.asarray(self.acc[(slice(None), *region)]) / w[None]
            self.stores.put(region, torch.from_numpy(logits.astype(np.float32)))


def make_sink(
    stores: Stores, padding: str, num_classes: int, shape_zyx, acc=None, wsum=None
) -> DirectSink | BlendSink:
    """The sink of a network with ``padding`` (``"valid"``: direct; else blending, into ``acc
    (K, Z, Y, X)`` and ``wsum (Z, Y, X)``, float32 arrays in memory unless given)."""
    if padding == "valid":
        return DirectSink(stores)
    if acc is None:
        acc = np.zeros((num_classes, *shape_zyx), dtype=np.float32)
        wsum = np.zeros(shape_zyx, dtype=np.float32)
    return BlendSink(stores, acc, wsum, tuple(shape_zyx))


@contextlib.contextmanager
def scratch(next_to: Path, k: int, shape, needed: bool):
    """(acc, wsum) blending accumulators in a temporary HDF5 file beside the output, or
    (None, None) when not ``needed``; the file is deleted afterwards."""
    if not needed:
        yield None, None
        return
    import h5py

    from sparse3d.atomic import temp_name

    path = temp_name(next_to)
    try:
        with h5py.File(path, "w", rdcc_nbytes=256 * 2**20) as f:
            chunks = (1, min(shape[0], 32), min(shape[1], 128), min(shape[2], 128))
            acc = f.create_dataset("acc", (k, *shape), np.float32, chunks=chunks, fillvalue=0)
            wsum = f.create_dataset("wsum", shape, np.float32, chunks=chunks[1:], fillvalue=0)
            yield acc, wsum
    finally:
        if path.exists():
            path.unlink()
