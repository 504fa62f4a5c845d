"""What a finished training job leaves in its run folder besides ``metrics.json`` (layer 1):
the model file, each evaluated volume's prediction and an overview picture of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.atomic import atomic_path
from sparse3d.labels import LabelSpec
from sparse3d.models import UNet

MODEL = "model.pt"
PREDICTIONS = "predictions"


def write_prediction(path: Path, prediction: np.ndarray, class_names: Sequence[str]) -> Path:
    """``prediction (Z, Y, X)`` uint8 as dataset ``prediction`` of an HDF5 file (atomic)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("prediction", data=prediction, compression="gzip", chunks=True)
        f.attrs["class_names"] = list(class_names)
    return path


def write_run_outputs(
    run_dir: Path,
    net: UNet,
    model_meta: dict[str, Any],
    labels: LabelSpec,
    predictions: Mapping[str, np.ndarray],
    volumes: Mapping[str, Any],
    title: str,
) -> dict[str, Path]:
    """Model file, ``predictions/<name>.h5`` and ``predictions/<name>.png`` (test slices beside
    the prediction); returns ``{name: picture}``.

    ``volumes``: ``{name: object with image (C, Z, Y, X), eval_label, dense_label}``."""
    from sparse3d.checkpoint import ModelMeta, save_model
    from sparse3d.viz import save_overview

    save_model(run_dir / MODEL, net, ModelMeta.from_dict(model_meta), overwrite=True)
    pred_dir = run_dir / PREDICTIONS
    pred_dir.mkdir(exist_ok=True)
    pictures = {}
    for name, pred in predictions.items():
        write_prediction(pred_dir / f"{name}.h5", pred, labels.class_names)
        vol = volumes[name]
        pictures[name] = save_overview(
            pred_dir / f"{name}.png",
            vol.image,
            vol.eval_label,
            labels,
            title=f"{title} {name}: test slices / prediction",
            prediction=pred,
            voxel_size_zyx_um=model_meta["voxel_size_zyx_um"],
            dense_label=vol.dense_label,
            channel_names=model_meta["channel_names"],
        )
    return pictures
