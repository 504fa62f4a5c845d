"""The semi-automated workflow: python -m sparse3d.densify (conf/densify.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from hydra import compose, initialize_config_dir

from sparse3d.cli import CONF_DIR, UserError
from sparse3d.data.volume import VolumeMeta, load_volume, write_volume
from sparse3d.densify.command import densify
from sparse3d.labels import LabelSpec

SHAPE = (24, 40, 40)
SLICES = {"z": (6, 17), "y": (20,), "x": (11, 30)}


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A bright ball (class 0) in a dim background (class 1): image (1, Z, Y, X), dense labels."""
    z, y, x = np.indices(SHAPE)
    ball = (z - 12) ** 2 + (y - 20) ** 2 + (x - 18) ** 2 < 9**2
    noise = np.random.default_rng(0).normal(0, 5, SHAPE)
    image = (np.where(ball, 120.0, 40.0) + noise).astype(np.float32)[None]
    return image, np.where(ball, 0, 1).astype(np.uint8)


def _sparse(dense: np.ndarray, ignore: int) -> np.ndarray:
    sparse = np.full_like(dense, ignore)
    for axis, idx in zip((0, 1, 2), SLICES.values(), strict=True):
        for i in idx:
            sl = [slice(None)] * 3
            sl[axis] = i
            sparse[tuple(sl)] = dense[tuple(sl)]
    return sparse


def _cfg(out: Path, **overrides) -> object:
    """densify's config; the paper network (``method=unet``) unless ``method`` is given, or
    ``method=None`` for the default method."""
    overrides.setdefault("method", "unet")
    if overrides["method"] is None:
        del overrides["method"]
    args = ["preset=smoke", "logger=none", f"out={out}", "trainer.max_steps=2"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="densify", overrides=args)


@pytest.fixture()
def h5_input(tmp_path) -> Path:
    image, dense = _scene()
    labels = LabelSpec(("ball", "background"), 2)
    meta = VolumeMeta((2.0, 1.0, 1.0), ("stain",), labels, dict(SLICES))
    return write_volume(tmp_path / "ball.h5", image, _sparse(dense, 2), meta, dense_label=dense)


def test_densify_hdf5_writes_segmentation_picture_and_unannotated_iou(h5_input, tmp_path):
    out = tmp_path / "out"
    summary = densify(_cfg(out, inputs=f"[{h5_input}]"))
    entry = summary["volumes"]["ball"]
    seg = Path(entry["segmentation"])
    assert seg == out / "ball_seg.h5" and Path(entry["picture"]).stat().st_size > 0
    with h5py.File(seg, "r") as f:
        pred = f["labels"][...]
    assert pred.shape == SHAPE and set(np.unique(pred).tolist()) <= {0, 1}
    # the IoU is scored on the voxels nobody annotated, and only there
    _, dense = _scene()
    unannotated = _sparse(dense, 2) == 2
    assert entry["annotated_fraction"] == pytest.approx(1 - unannotated.mean())
    from sparse3d.metrics import confusion_matrix, iou_summary

    expected = iou_summary(
        confusion_matrix(pred[unannotated], dense[unannotated], 2, 2), ("ball", "background")
    )
    assert entry["unannotated"]["mean"] == pytest.approx(expected["mean"])
    every = iou_summary(confusion_matrix(pred, dense, 2, 2), ("ball", "background"))
    assert entry["all_voxels"]["iou"] == pytest.approx(every["iou"])
    assert entry["all_voxels"]["confusion"] == every["confusion"]
    assert entry["all_voxels"]["labelled_voxels"] == dense.size
    on_disk = json.loads((out / "densify.json").read_text())
    assert on_disk["volumes"]["ball"]["segmentation"] == str(seg)
    assert on_disk["method"] == "unet" and on_disk["volumes"]["ball"]["seconds"] > 0


def test_densify_refuses_to_overwrite_without_the_flag(h5_input, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    seg = out / "ball_seg.h5"
    seg.write_bytes(b"keep me")
    with pytest.raises(UserError, match="overwrite=true"):
        densify(_cfg(out, inputs=f"[{h5_input}]"))
    assert seg.read_bytes() == b"keep me"
    assert not (out / "run").exists()  # refused before any training


def test_densify_imports_tiff_image_and_labels(tmp_path):
    image, dense = _scene()
    # what an annotation tool writes: 0 unlabelled, 1 = ball, 2 = background
    codes = _sparse(dense + 1, 0)
    tifffile.imwrite(tmp_path / "stack.tif", image[0])
    tifffile.imwrite(tmp_path / "stack_labels.tif", codes)
    out = tmp_path / "out"
    summary = densify(
        _cfg(
            out,
            inputs=f"[{tmp_path / 'stack.tif'}]",
            labels=f"[{tmp_path / 'stack_labels.tif'}]",
            voxel_size_zyx_um="[2.0,1.0,1.0]",
        )
    )
    imported = load_volume(out / "inputs" / "stack.h5")
    assert imported.meta.labels.class_names == ("class1", "class2")
    assert imported.meta.labels.ignore_index == 2
    label = np.asarray(imported.label)
    np.testing.assert_array_equal(label, np.where(codes == 0, 2, codes - 1))
    assert imported.meta.annotated_slices == {k: tuple(v) for k, v in SLICES.items()}
    with h5py.File(summary["volumes"]["stack"]["segmentation"], "r") as f:
        assert f["labels"].shape == SHAPE


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"inputs": "[{tif}]"}, "need one label file each"),
        ({"inputs": "[{tif}]", "labels": "[{tif}]", "label_map": "'0:ignore,*:0'"}, "class_names"),
        ({"inputs": "[{missing}]"}, "does not exist"),
        ({"labels": "[{tif}]"}, "without inputs"),
    ],
)
def test_densify_bad_input_is_one_line(overrides, needle, tmp_path):
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, np.zeros(SHAPE, np.uint8))
    fill = {"tif": tif, "missing": tmp_path / "nope.tif"}
    args = {k: v.format(**fill) for k, v in overrides.items()}
    with pytest.raises(UserError, match=needle) as err:
        densify(_cfg(tmp_path / "out", **args))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "run").exists()


# --------------------------------------------------------------------------------------------
# method=rf: the random forest instead of the network

RF = {"method": "rf", "rf.n_trees": 8, "rf.sigmas": "[1.0,2.0]", "rf.n_jobs": 1}


def _tiff_inputs(folder: Path, image: np.ndarray, dense: np.ndarray) -> dict[str, str]:
    """Image, sparse label codes (0 = unlabelled, c + 1 = class c) and dense truth as TIFFs;
    the densify overrides that read them."""
    tifffile.imwrite(folder / "stack.tif", image)
    tifffile.imwrite(folder / "stack_labels.tif", _sparse(dense + 1, 0))
    tifffile.imwrite(folder / "stack_truth.tif", (dense + 1).astype(np.uint8))
    return {
        "inputs": f"[{folder / 'stack.tif'}]",
        "labels": f"[{folder / 'stack_labels.tif'}]",
        "dense_labels": f"[{folder / 'stack_truth.tif'}]",
        "voxel_size_zyx_um": "[2.0,1.0,1.0]",
    }


def test_densify_rf_tiff_writes_result_picture_and_both_scores(tmp_path):
    image, dense = _scene()
    out = tmp_path / "out"
    cfg = _cfg(out, **RF, **_tiff_inputs(tmp_path, image[0], dense), save_probabilities="true")
    summary = densify(cfg)
    assert summary["method"] == "rf" and summary["rf"]["n_trees"] == 8
    assert not (out / "run").exists()  # no network was trained
    entry = summary["volumes"]["stack"]
    seg = out / "stack_seg.h5"
    assert entry["segmentation"] == str(seg) and (out / "stack_seg.png").stat().st_size > 0
    with h5py.File(seg, "r") as f:
        pred = f["labels"][...]
        probs = f["probabilities"][...]
        assert f.attrs["format"] == "sparse3d-prediction" and f.attrs["method"] == "rf"
        assert list(f.attrs["class_names"]) == ["class1", "class2"]
    assert pred.shape == SHAPE and pred.dtype == np.uint8
    assert probs.shape == (2, *SHAPE) and probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    np.testing.assert_array_equal(probs.argmax(0), pred)
    # both scores, each by its one definition
    from sparse3d.metrics import confusion_matrix, iou_summary

    names = ("class1", "class2")
    unannotated = _sparse(dense, 2) == 2
    want_u = iou_summary(confusion_matrix(pred[unannotated], dense[unannotated], 2, 2), names)
    want_all = iou_summary(confusion_matrix(pred, dense, 2, 2), names)
    on_disk = json.loads((out / "densify.json").read_text())
    assert on_disk["method"] == "rf"
    got = on_disk["volumes"]["stack"]
    for key, want in (("unannotated", want_u), ("all_voxels", want_all)):
        assert got[key]["iou"] == pytest.approx(want["iou"])
        assert got[key]["confusion"] == want["confusion"]
    assert got["unannotated"]["mean"] > 0.9 and got["seconds"] > 0


def test_densify_rf_on_hdf5_refuses_to_overwrite_without_the_flag(h5_input, tmp_path):
    out = tmp_path / "out"
    first = densify(_cfg(out, inputs=f"[{h5_input}]", **RF))
    assert first["volumes"]["ball"]["unannotated"]["mean"] > 0.9
    seg = out / "ball_seg.h5"
    before = seg.read_bytes()
    with pytest.raises(UserError, match="overwrite=true"):
        densify(_cfg(out, inputs=f"[{h5_input}]", **RF))
    assert seg.read_bytes() == before
    again = densify(_cfg(out, inputs=f"[{h5_input}]", overwrite="true", **RF))
    assert again["volumes"]["ball"]["unannotated"] == first["volumes"]["ball"]["unannotated"]
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("num_classes", [2, 5])
def test_densify_rf_finishes_with_any_number_of_classes(num_classes, tmp_path):
    """Classes are bands along x of increasing brightness; code 0 = unlabelled."""
    _, _, x = np.indices(SHAPE)
    dense = (x * num_classes // SHAPE[2]).astype(np.uint8)
    noise = np.random.default_rng(num_classes).normal(0, 3, SHAPE)
    image = (40.0 * dense + noise).astype(np.float32)
    out = tmp_path / "out"
    summary = densify(_cfg(out, **RF, **_tiff_inputs(tmp_path, image, dense)))
    entry = summary["volumes"]["stack"]
    with h5py.File(entry["segmentation"], "r") as f:
        pred = f["labels"][...]
    assert set(np.unique(pred).tolist()) <= set(range(num_classes))
    assert len(entry["all_voxels"]["iou"]) == num_classes  # every class scored
    assert entry["all_voxels"]["mean"] > 0.8


def test_densify_rejects_an_unknown_method():
    from sparse3d.cli import precheck_groups

    with pytest.raises(UserError, match="unknown method 'svm': choose one of refine, rf, unet"):
        precheck_groups(["method=svm"])


# --------------------------------------------------------------------------------------------
# method=refine (the default): forests, then a small network on image + forest probabilities

REFINE = {
    "method": None,
    "rf.n_trees": 8,
    "rf.sigmas": "[1.0,2.0]",
    "rf.n_jobs": 1,
    "refine.fold_trees": 4,
    "refine.max_steps": 4,
    "refine.time_budget_s": "null",
    "refine.input_tile": "[8,16,16]",
}


def test_densify_default_refine_tiff_writes_result_picture_and_scores(tmp_path):
    image, dense = _scene()
    out = tmp_path / "out"
    summary = densify(_cfg(out, **REFINE, **_tiff_inputs(tmp_path, image[0], dense)))
    assert summary["method"] == "refine"
    assert summary["steps"]["stack"]["steps"] == 4
    entry = summary["volumes"]["stack"]
    with h5py.File(entry["segmentation"], "r") as f:
        pred = f["labels"][...]
        assert f.attrs["method"] == "refine"
    assert pred.shape == SHAPE and (out / "stack_seg.png").stat().st_size > 0
    # forest and network averaged: the easy ball is found on the voxels nobody annotated
    assert entry["unannotated"]["mean"] > 0.85
    assert json.loads((out / "densify.json").read_text())["method"] == "refine"


def test_densify_refine_forests_only_matches_its_own_network_free_run(h5_input, tmp_path):
    a = densify(_cfg(tmp_path / "a", inputs=f"[{h5_input}]", **{**REFINE, "refine.max_steps": 0}))
    assert "network_seconds" not in a["steps"]["ball"]
    assert a["volumes"]["ball"]["unannotated"]["mean"] > 0.85


@pytest.mark.parametrize("num_classes", [2, 5])
def test_densify_refine_finishes_with_any_number_of_classes(num_classes, tmp_path):
    _, _, x = np.indices(SHAPE)
    dense = (x * num_classes // SHAPE[2]).astype(np.uint8)
    noise = np.random.default_rng(num_classes).normal(0, 3, SHAPE)
    image = (40.0 * dense + noise).astype(np.float32)
    summary = densify(_cfg(tmp_path / "out", **REFINE, **_tiff_inputs(tmp_path, image, dense)))
    entry = summary["volumes"]["stack"]
    with h5py.File(entry["segmentation"], "r") as f:
        pred = f["labels"][...]
    assert set(np.unique(pred).tolist()) <= set(range(num_classes))
    assert entry["all_voxels"]["mean"] > 0.7


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ({"refine.class_weights": "inverse"}, "refine.class_weights"),
        ({"refine.centre_sampling": "balanced"}, "refine.centre_sampling"),
        ({"refine.flip_axes": "[w]"}, "refine.flip_axes"),
        ({"refine.rounds": 0}, "refine.rounds"),
        ({"refine.pseudo_class_fraction": 1.5}, "refine.pseudo_class_fraction"),
    ],
)
def test_densify_refine_bad_option_is_one_line_before_any_work(option, needle, h5_input, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=needle) as err:
        densify(_cfg(out, inputs=f"[{h5_input}]", **{**REFINE, **option}))
    assert "\n" not in str(err.value)
    assert not (out / "densify.json").exists() and not list(out.glob("*_seg.h5"))


def test_densify_refine_non_default_options_run_end_to_end(h5_input, tmp_path):
    """The non-default refine options run end to end and still find the ball."""
    options = {
        "refine.class_weights": "sqrt",
        "refine.centre_sampling": "class",
        "refine.flip_axes": "[x]",
        "refine.deform": "true",
        "refine.rounds": 2,
        "refine.pseudo_class_fraction": 0.5,
    }
    summary = densify(_cfg(tmp_path / "out", inputs=f"[{h5_input}]", **{**REFINE, **options}))
    assert summary["refine"]["centre_sampling"] == "class"
    assert summary["steps"]["ball"]["steps"] == 4
    assert summary["steps"]["ball"]["round2"]["steps"] == 4
    assert summary["volumes"]["ball"]["unannotated"]["mean"] > 0.85
