"""Label vocabulary: class names and the one ignore code that marks unlabelled voxels.

Layer 0: depends on nothing but the standard library and numpy.

The paper's Xenopus coding (Sec. 3.1) is 0 "inside the tubule", 1 "tubule", 2 "background" and
3 "unlabeled". Classes are contiguous from 0; a data set declares its own names and ignore value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelSpec:
    """Class names (codes ``0..num_classes-1``) and the ignore code for unlabelled voxels."""

    class_names: tuple[str, ...]
    ignore_index: int

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError(f"need at least two classes, got {self.class_names!r}")
        if 0 <= self.ignore_index < len(self.class_names):
            raise ValueError(
                f"ignore_index {self.ignore_index} collides with class code "
                f"{self.ignore_index} ({self.class_names[self.ignore_index]!r})"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def allowed_codes(self) -> tuple[int, ...]:
        return (*range(self.num_classes), self.ignore_index)

    def invalid_codes(self, label: np.ndarray) -> list[int]:
        """Codes present in ``label`` that are neither a class nor the ignore value."""
        present = np.unique(np.asarray(label))
        allowed = set(self.allowed_codes())
        return [int(c) for c in present if int(c) not in allowed]

    def labelled(self, label: np.ndarray) -> np.ndarray:
        """Boolean mask of annotated voxels, same shape as ``label``."""
        return np.asarray(label) != self.ignore_index


#: The paper's Xenopus kidney coding (Sec. 3.1).
XENOPUS = LabelSpec(class_names=("inside_tubule", "tubule", "background"), ignore_index=3)
