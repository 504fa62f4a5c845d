"""The one mirror-index helper: which voxel a position outside a volume mirrors to.

The overlap-tile strategy (paper Sec. 2, after the 2D u-net) fills the context a valid-
convolution network reads beyond the volume border by mirroring the image. Training tiles
(``sparse3d.data.tiles``), whole-volume prediction (``sparse3d.inference.tiling``) and the
evaluation's single pass (``sparse3d.evaluation``) all take their mirror indices from here.

Layer 0: numpy only.
"""

from __future__ import annotations

import numpy as np


def reflect_indices(start: int, size: int, length: int) -> np.ndarray:
    """Indices of the window ``start .. start + size - 1`` mirrored into ``0 .. length - 1``.

    Mirroring does not repeat the border voxel (numpy's ``np.pad`` mode ``"reflect"``:
    ..., 2, 1, 0, 1, 2, ...; index ``-1`` maps to ``1`` and ``length`` to ``length - 2``), and it
    is periodic with period ``2 * (length - 1)``, so windows reaching beyond one reflection
    (e.g. a tile larger than a small volume) stay inside the volume. A volume of length 1
    mirrors every index to 0.

    Args:
        start: first index of the window (negative: before the volume).
        size: number of indices in the window (>= 0).
        length: length of the volume along this axis (>= 1).

    Returns:
        int64 array of ``size`` indices in ``0 .. length - 1``.
    """
    start, size, length = int(start), int(size), int(length)
    if size < 0:
        raise ValueError(f"reflect_indices: size must be >= 0, got {size}")
    if length < 1:
        raise ValueError(f"reflect_indices: length must be >= 1, got {length}")
    if length == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (length - 1)
    r = np.mod(np.arange(start, start + size, dtype=np.int64), period)
    return np.where(r < length, r, period - r)
