"""Centre cropping, the one place where a larger tensor is cut to a smaller spatial shape.

With valid convolutions (paper Sec. 2) the network output is a centred crop of its input; skip
connections and label tiles are centre-cropped to match. Layer 0: torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def center_crop(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Crop the trailing ``len(spatial)`` axes of ``x`` to ``spatial``, centred.

    ``x`` is e.g. ``(B, C, Z, Y, X)`` or a label ``(B, Z, Y, X)``; leading axes are kept. The
    difference per axis must be even, as it always is between levels of a valid U-Net.
    """
    nd = len(spatial)
    have = tuple(x.shape[-nd:])
    if have == tuple(spatial):
        return x
    index: list[slice] = [slice(None)] * (x.ndim - nd)
    for h, w in zip(have, spatial, strict=True):
        d = h - w
        if d < 0 or d % 2:
            raise ValueError(f"cannot centre-crop spatial shape {have} to {tuple(spatial)}")
        index.append(slice(d // 2, d // 2 + w))
    return x[tuple(index)]
