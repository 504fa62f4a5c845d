"""Regressions found with users' own data: other class counts, corrupt files, piped logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sparse3d.cli import CONF_DIR
from sparse3d.data.annotation import slice_mask
from sparse3d.data.volume import VolumeMeta, write_volume
from sparse3d.labels import LabelSpec

SHAPE = (12, 20, 20)
# border slices on purpose: tiles around them reach outside the volume
SLICES = {"z": (0, 6, 11), "y": (0, 10), "x": (0, 19)}


def _two_class_volume(path: Path) -> Path:
    """A bright ball (class 0) in a dim background (class 1); ignore code 2."""
    z, y, x = np.indices(SHAPE)
    ball = (z - 6) ** 2 + (y - 10) ** 2 + (x - 9) ** 2 < 5**2
    noise = np.random.default_rng(0).normal(0, 5, SHAPE)
    image = (np.where(ball, 120.0, 40.0) + noise).astype(np.float32)[None]
    dense = np.where(ball, 0, 1).astype(np.uint8)
    sparse = np.full_like(dense, 2)
    mask = slice_mask(SHAPE, SLICES)
    sparse[mask] = dense[mask]
    meta = VolumeMeta((2.0, 1.0, 1.0), ("stain",), LabelSpec(("ball", "background"), 2), SLICES)
    return write_volume(path, image, sparse, meta, dense_label=dense)


def _compose(overrides: list[str], name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def _files_cfg(vol: Path, runs: Path, extra: list[str] = ()):
    return _compose(
        [
            "preset=smoke",
            "logger=none",
            "data=files",
            f"+data.paths.ball={vol}",
            f"runs_root={runs}",
            "experiment=semi_cv",
            "trainer.max_steps=4",
            *extra,
        ]
    )


# -- 1. runtime facts of the data win over the augmentation config -------------------------
@pytest.mark.parametrize("augment", ["paper", "monai_elastic", "monai_affine"])
def test_data_ignore_code_wins_over_a_configured_one(augment):
    from omegaconf import OmegaConf

    from sparse3d.experiment import build_transform

    cfg = _compose([f"augment={augment}"])
    aug = OmegaConf.to_container(cfg.augment)
    aug["transforms"][0]["ignore_index"] = 3  # a config that still restates the old code
    if augment == "paper":
        aug["transforms"][0]["spatial_size"] = [8, 8, 8]
    extras = {
        "spatial_size": (20, 24, 24),
        "label_spatial_size": (8, 8, 8),
        "voxel_size_zyx_um": (2.0, 1.0, 1.0),
        "ignore_index": 2,
    }
    t = build_transform(OmegaConf.create(aug), extras)
    first = t.transforms[0]
    assert first.ignore_index == 2
    if augment == "paper":
        assert first.spatial_size == (20, 24, 24)


def test_augment_configs_do_not_restate_data_facts():
    for f in (CONF_DIR / "augment").glob("*.yaml"):
        text = f.read_text()
        for key in ("ignore_index", "voxel_size_zyx_um", "spatial_size"):
            assert f"{key}:" not in text, f"{f.name} restates {key}"


@pytest.mark.slow
def test_train_on_a_two_class_volume(tmp_path):
    """Ignore code 2: outside voxels must become 2, never 3 (which crashed the loss)."""
    from sparse3d.train import train

    vol = _two_class_volume(tmp_path / "ball.h5")
    runs = tmp_path / "runs"
    cfg = _files_cfg(vol, runs)
    metrics = train(cfg, runs / "run")
    assert metrics["steps"] == 4
    assert set(metrics["heldout"]["iou"]) == {"ball", "background"}
    # 2. held-out voxels on training planes are not counted; the old count is kept apart
    split = json.loads((runs / "run" / "split.json").read_text())
    test = {a: tuple(v) for a, v in split["test"]["ball"].items()}
    train_ = {a: tuple(v) for a, v in split["train"]["ball"].items()}
    held = slice_mask(SHAPE, test)
    trained = slice_mask(SHAPE, train_)
    assert metrics["heldout"]["labelled_voxels"] == int((held & ~trained).sum())
    assert metrics["heldout_all"]["labelled_voxels"] == int(held.sum())
    assert metrics["heldout_all"]["labelled_voxels"] > metrics["heldout"]["labelled_voxels"]
    # 3. the IoU over every voxel of the dense ground truth says so in its name
    assert "dense" not in metrics
    assert metrics["all_voxels"]["labelled_voxels"] == int(np.prod(SHAPE))


# -- 2. held-out evaluation labels exclude the training planes ----------------------------
def test_heldout_label_excludes_training_planes(tmp_path):
    from sparse3d.datamodule import SparseDataModule

    vol = _two_class_volume(tmp_path / "ball.h5")
    dm = SparseDataModule(
        volume_paths={"ball": str(vol)},
        train_slices={"ball": {"z": [0, 11], "y": [], "x": []}},
        test_slices={"ball": {"z": [], "y": [10], "x": []}},
        label_source="sparse",
        labels=LabelSpec(("ball", "background"), 2),
        dim=3,
        input_tile=(44, 44, 44),
        output_tile=(4, 4, 4),
    )
    dm.setup()
    v = dm.volumes["ball"]
    assert (v.eval_label_all[:, 10, :] != 2).all()  # the whole held-out plane
    assert (v.eval_label[[0, 11], 10, :] == 2).all()  # its crossings with training planes
    assert (v.eval_label[1:11, 10, :] != 2).all()
    assert int((v.eval_label != 2).sum()) == 10 * SHAPE[2]
    assert int((v.eval_label_all != 2).sum()) == 12 * SHAPE[2]


# -- 5. unreadable inputs end in one line naming the file ---------------------------------
def _bad_files(folder: Path) -> dict[str, Path]:
    garbage = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    files = {
        "corrupt_tiff": (folder / "bad.tif", b"II*\0" + garbage),
        "corrupt_nifti": (folder / "bad.nii.gz", b"\x1f\x8b\x08\x00" + garbage),
        "empty_tiff": (folder / "empty.tif", b""),
    }
    for path, data in files.values():
        path.write_bytes(data)
    out = {k: p for k, (p, _) in files.items()}
    out["corrupt_nrrd"] = folder / "bad.nrrd"
    out["corrupt_nrrd"].write_bytes(b"NRRD0004\n" + garbage)
    # a valid header with its data cut short: the reader fails only when the data is read
    import nibabel as nib

    whole = folder / "whole.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), whole)
    out["truncated_nifti"] = folder / "truncated.nii.gz"
    out["truncated_nifti"].write_bytes(whole.read_bytes()[:-40])
    # a zarr array whose chunks hold garbage
    import zarr

    store = folder / "bad.zarr"
    arr = zarr.open(str(store), mode="w", shape=(4, 5, 6), chunks=(2, 5, 6), dtype="f4")
    arr[:] = 1.0
    for chunk in store.rglob("*"):
        if chunk.is_file() and not chunk.name.startswith(".") and chunk.name != "zarr.json":
            chunk.write_bytes(garbage)
    out["corrupt_zarr"] = store
    return out


def _good_labels(folder: Path) -> Path:
    codes = np.zeros((4, 5, 6), np.uint8)
    codes[1] = 1
    codes[2] = 2
    tifffile.imwrite(folder / "lab.tif", codes)
    return folder / "lab.tif"


@pytest.mark.parametrize("kind", ["corrupt_tiff", "corrupt_nifti", "empty_tiff"])
def test_densify_cli_unreadable_input_is_one_line(kind, tmp_path):
    bad = _bad_files(tmp_path)[kind]
    labels = _good_labels(tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse3d.densify",
            f"inputs=[{bad}]",
            f"labels=[{labels}]",
            f"out={tmp_path / 'out'}",
            "preset=smoke",
            "logger=none",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error:") and str(bad) in lines[0]
    run = tmp_path / "out" / "run"  # Hydra makes the folder; nothing was trained into it
    assert not (run / "split.json").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    "kind",
    [
        "corrupt_tiff",
        "corrupt_nifti",
        "empty_tiff",
        "corrupt_nrrd",
        "truncated_nifti",
        "corrupt_zarr",
    ],
)
def test_convert_unreadable_input_is_a_convert_error(kind, tmp_path):
    from sparse3d.data.convert import ConvertError, convert

    bad = _bad_files(tmp_path)[kind]
    labels = _good_labels(tmp_path)
    for image, label in ((bad, labels), (labels, bad)):
        with pytest.raises(ConvertError) as err:
            convert(
                image,
                label,
                tmp_path / "out.h5",
                label_map="0:ignore,1:0,2:1",
                class_names=["a", "b"],
                ignore_index=2,
                overwrite=True,
            )
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_train_unreadable_hdf5_is_one_line(tmp_path):
    import h5py

    from sparse3d.cli import UserError
    from sparse3d.train import train

    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["x"] = [1, 2, 3]
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(200)))
    for path in (wrong, corrupt):
        with pytest.raises(UserError) as err:
            train(_files_cfg(path, tmp_path / "runs"), tmp_path / "runs" / "run")
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "runs" / "run" / "split.json").exists()


# -- 6. a piped training log has progress lines, not progress-bar redraws ------------------
@pytest.mark.slow
def test_piped_training_logs_progress_lines(tmp_path):
    vol = _two_class_volume(tmp_path / "ball.h5")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse3d.train",
            "preset=smoke",
            "logger=none",
            "data=files",
            f"+data.paths.ball={vol}",
            f"runs_root={tmp_path / 'runs'}",
            "trainer.max_steps=6",
        ],
        cwd=tmp_path,
        capture_output=True,
        env=env,
        timeout=300,
    )
    out = (r.stdout + r.stderr).decode()  # bytes: text mode would turn "\r" into "\n"
    assert r.returncode == 0, out[-3000:]
    assert "\r" not in out
    steps = [line for line in out.splitlines() if "step " in line and "ETA" in line]
    assert len(steps) >= 2, out[-3000:]
    assert any("step 6/6" in line for line in steps)


@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec")
def test_progress_log_lines_about_fifteen_per_run(caplog):
    import logging

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from sparse3d.callbacks import ProgressLog

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=1)
    trainer = L.Trainer(
        max_steps=120,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ProgressLog()],
    )
    with caplog.at_level(logging.INFO, logger="sparse3d.progress"):
        trainer.fit(Tiny(), data)
    lines = [r.getMessage() for r in caplog.records if r.name == "sparse3d.progress"]
    assert 10 <= len(lines) <= 20
    assert lines[0].startswith("step 8/120, loss ") and "ETA" in lines[0]
    assert lines[-1].startswith("step 120/120")
