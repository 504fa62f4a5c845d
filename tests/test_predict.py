"""The prediction entry point: python -m sparse3d.predict (conf/predict.yaml)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from hydra import compose, initialize_config_dir

from sparse3d.checkpoint import ModelMeta, save_model
from sparse3d.cli import CONF_DIR, UserError
from sparse3d.data.volume import VolumeMeta, write_volume
from sparse3d.labels import LabelSpec
from sparse3d.models import UNet
from sparse3d.predict import predict

LABELS = LabelSpec(("inside_tubule", "tubule", "background"), 3)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny passes: one thread avoids OpenMP contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(path: Path, channels: tuple[str, ...]) -> Path:
    torch.manual_seed(0)
    kw = {"in_channels": len(channels), "num_classes": 3, "base_channels": 2, "depth": 2,
          "norm": "batch"}  # fmt: skip
    net = UNet(**kw)
    meta = ModelMeta(kw, LABELS.class_names, 3, channels, (2.0, 1.0, 1.0))
    return save_model(path, net, meta)


def _volume(path: Path, channels: int, shape=(10, 16, 18)) -> Path:
    img = np.random.default_rng(0).normal(size=(channels, *shape)).astype(np.float32) * 30 + 80
    meta = VolumeMeta((2.0, 1.0, 1.0), tuple(f"c{i}" for i in range(channels)), LABELS)
    return write_volume(path, img, np.full(shape, 3, np.uint8), meta)


def _cfg(**overrides):
    args = [f"{k}={v}" for k, v in overrides.items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="predict", overrides=args)


def test_predict_writes_labels_tiff_and_overview(tmp_path):
    ckpt = _model(tmp_path / "model.pt", ("lectin", "dapi"))
    vol = _volume(tmp_path / "vol.h5", 2)
    out = tmp_path / "seg.h5"
    report = predict(
        _cfg(
            ckpt=ckpt,
            input=vol,
            output=out,
            tiff=tmp_path / "seg.tif",
            overview=tmp_path / "seg.png",
            probabilities="true",
            progress="false",
            precision="fp32",
        )
    )
    assert report["num_tiles"] == 1 and report["shape_zyx"] == (10, 16, 18)
    with h5py.File(out) as f:
        labels = f["labels"][...]
        probs = f["probabilities"][...]
        assert f.attrs["model"] == str(ckpt)
    assert labels.shape == (10, 16, 18) and labels.max() < 3
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "seg.tif"), labels)
    assert (tmp_path / "seg.png").stat().st_size > 0
    # an existing output is refused without overwrite=true
    with pytest.raises(UserError, match="overwrite"):
        predict(_cfg(ckpt=ckpt, input=vol, output=out, progress="false"))
    predict(
        _cfg(
            ckpt=ckpt,
            input=vol,
            output=out,
            overwrite="true",
            progress="false",
            input_tile="[44,44,44]",
        )
    )


def test_bad_inputs_are_one_line_errors(tmp_path):
    ckpt = _model(tmp_path / "model.pt", ("lectin", "dapi", "catenin"))
    vol = _volume(tmp_path / "vol.h5", 1)
    with pytest.raises(
        UserError, match=r"model expects 3 channels \(lectin, dapi, catenin\), input has 1"
    ):
        predict(_cfg(ckpt=ckpt, input=vol, output=tmp_path / "o.h5", progress="false"))
    with pytest.raises(UserError, match="input file does not exist"):
        predict(_cfg(ckpt=ckpt, input=tmp_path / "nope.h5", output=tmp_path / "o.h5"))
    with pytest.raises(UserError, match="model file does not exist"):
        predict(_cfg(ckpt=tmp_path / "nope.pt", input=vol, output=tmp_path / "o.h5"))
    with pytest.raises(UserError, match="ckpt= is required"):
        predict(_cfg(input=vol, output=tmp_path / "o.h5"))
    with pytest.raises(UserError, match="nearest legal sizes"):
        predict(_cfg(ckpt=ckpt, input=vol, output=tmp_path / "o.h5", input_tile="[21,21,21]"))
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        predict(_cfg(ckpt=bad, input=vol, output=tmp_path / "o.h5"))
    assert not (tmp_path / "o.h5").exists()


def test_input_tile_and_its_deprecated_old_name(tmp_path, caplog):
    """input_tile=[z,y,x] sets the tile; the old key tile= still works, with one warning."""
    ckpt = _model(tmp_path / "model.pt", ("lectin",))
    vol = _volume(tmp_path / "vol.h5", 1)
    common = {"ckpt": ckpt, "input": vol, "progress": "false", "precision": "fp32"}
    with caplog.at_level(logging.WARNING, logger="sparse3d.predict"):
        new = predict(_cfg(output=tmp_path / "new.h5", input_tile="[24,24,24]", **common))
        assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
        old = predict(_cfg(output=tmp_path / "old.h5", tile="[24,24,24]", **common))
    # (10, 16, 18) voxels in output tiles of 8: 2 x 2 x 3 tiles of input 24
    assert new["input_tile"] == old["input_tile"] == (24, 24, 24)
    assert new["num_tiles"] == old["num_tiles"] == 12
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warned == ["tile= is deprecated, use input_tile=[z,y,x]"]
    with h5py.File(tmp_path / "new.h5") as f, h5py.File(tmp_path / "old.h5") as g:
        assert list(f.attrs["input_tile"]) == list(g.attrs["input_tile"]) == [24, 24, 24]
        np.testing.assert_array_equal(f["labels"][...], g["labels"][...])
    with pytest.raises(UserError, match="input_tile= only"):
        predict(
            _cfg(output=tmp_path / "x.h5", tile="[24,24,24]", input_tile="[24,24,24]", **common)
        )
    assert not (tmp_path / "x.h5").exists()


def test_tiff_input_through_the_importer(tmp_path):
    ckpt = _model(tmp_path / "model.pt", ("lectin",))
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, (np.random.default_rng(1).random((9, 14, 15)) * 200).astype(np.uint16))
    out = tmp_path / "seg.h5"
    predict(_cfg(ckpt=ckpt, input=tif, output=out, progress="false"))
    with h5py.File(out) as f:
        assert f["labels"].shape == (9, 14, 15)


def test_cli_exit_code_and_no_hydra_folders(tmp_path):
    ckpt = _model(tmp_path / "model.pt", ("lectin", "dapi", "catenin"))
    vol = _volume(tmp_path / "vol.h5", 1)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "sparse3d.predict",
        f"ckpt={ckpt}",
        f"input={vol}",
        "output=seg.h5",
    ]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert err == [f"error: model expects 3 channels (lectin, dapi, catenin), input has 1: {vol}"]
    assert "Traceback" not in res.stdout + res.stderr
    assert list(work.iterdir()) == []  # no outputs/, .hydra/ or log file, nothing written
