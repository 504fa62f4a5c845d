"""Run MONAI's stock spatial transforms on sparse labels without inventing classes.

MONAI fills voxels pulled in from outside the volume with 0, which is a class (the paper's
"inside the tubule"). ``IgnoreOutsided`` shifts the label codes by one before the inner
transform, so the fill value 0 marks "outside", and maps it to the ignore code afterwards.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable


class IgnoreOutsided(Randomizable, MapTransform):
    """Wrap a MONAI dictionary transform ``inner``; label voxels from outside become ignore.

    The label under ``label_key`` is ``(Z, Y, X)`` or ``(1, Z, Y, X)``; the inner transform must
    resample it with nearest-neighbour interpolation and zero padding.
    """

    def __init__(self, inner: Any, label_key: str = "label", ignore_index: int = 3) -> None:
        MapTransform.__init__(self, keys=[label_key])
        self.inner = inner
        self.label_key = label_key
        self.ignore_index = ignore_index

    def set_random_state(self, seed: int | None = None, state: Any = None) -> IgnoreOutsided:
        if isinstance(self.inner, Randomizable):
            self.inner.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the inner transform draws
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lab = d[self.label_key]
        squeeze = lab.ndim == 3
        lab_t = torch.as_tensor(np.asarray(lab) if not torch.is_tensor(lab) else lab)
        shifted = lab_t.to(torch.float32) + 1.0
        d[self.label_key] = shifted[None] if squeeze else shifted
        d = dict(self.inner(d))
        out = torch.as_tensor(d[self.label_key]).round().to(torch.int64)
        out = torch.where(out == 0, torch.full_like(out, self.ignore_index + 1), out) - 1
        out = out[0] if squeeze else out
        d[self.label_key] = out.as_subclass(torch.Tensor) if hasattr(out, "as_subclass") else out
        img = d.get("image")
        if img is not None and hasattr(img, "as_tensor"):
            d["image"] = img.as_tensor()
        return d
