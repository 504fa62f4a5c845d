"""MONAI's stock transforms on sparse labels: voxels from outside become ignore, not a class."""

from __future__ import annotations

import torch
from monai.transforms import Affined

from sparse3d.data.monai_compat import IgnoreOutsided


def test_outside_voxels_become_ignore_and_classes_survive():
    label = torch.zeros(8, 8, 8, dtype=torch.int64)  # class 0 everywhere
    label[:, :, 4:] = 1
    image = torch.rand(1, 8, 8, 8)
    shift = Affined(
        keys=["image", "label"],
        translate_params=(0, 0, 3),
        mode=["bilinear", "nearest"],
        padding_mode="zeros",
    )
    out = IgnoreOutsided(shift, label_key="label", ignore_index=3)({"image": image, "label": label})
    lab = torch.as_tensor(out["label"])
    assert lab.shape == (8, 8, 8)
    # output x reads input x + 3: the last 3 columns come from outside -> unlabelled, not class 0
    assert lab[0, 0].tolist() == [0, 1, 1, 1, 1, 3, 3, 3]
    assert torch.all(lab == lab[0, 0])
