"""Per-channel intensity normalisation of a whole volume, applied the same way in training and
prediction.

Each channel is mapped so its ``low`` percentile becomes 0 and its ``high`` percentile 1 (values
outside are kept, not clipped). The percentiles are computed once per volume, from a strided
subsample for big volumes, and stored with the model so prediction uses the same rule.
"""

from __future__ import annotations

import numpy as np

MAX_SAMPLES = 2_000_000


def channel_percentiles(
    image, low: float = 1.0, high: float = 99.5, max_samples: int = MAX_SAMPLES
) -> np.ndarray:
    """``(C, 2)`` float64 array of the ``low``/``high`` percentiles of each channel.

    ``image`` is ``(C, Z, Y, X)``: a numpy array or an h5py dataset (read with a z stride so a
    large volume is not loaded whole).
    """
    c, z = image.shape[0], image.shape[1]
    per_slice = int(np.prod(image.shape[2:]))
    stride = max(1, int(np.ceil(z * per_slice / max_samples)))
    out = np.empty((c, 2))
    for ch in range(c):
        sample = np.asarray(image[ch, ::stride], dtype=np.float32)
        out[ch] = np.percentile(sample, [low, high])
    return out


def apply_percentiles(image: np.ndarray, pct: np.ndarray) -> np.ndarray:
    """Map each channel of ``image (C, ...)`` by its ``(low, high)`` pair to float32."""
    lo = pct[:, 0].reshape(-1, *([1] * (image.ndim - 1)))
    span = np.maximum(pct[:, 1] - pct[:, 0], 1e-6).reshape(lo.shape)
    return ((np.asarray(image, dtype=np.float32) - lo) / span).astype(np.float32)


def normalize_volume(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """``(C, Z, Y, X)`` -> float32 with each channel's percentiles mapped to 0 and 1."""
    return apply_percentiles(image, channel_percentiles(image, low, high))
