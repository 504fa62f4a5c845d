"""The Densify dock widget end to end, against napari's canvas-less ``ViewerModel`` (no OpenGL,
Qt offscreen): image and painting in, ``rf`` and ``refine`` (tiny budget) in the worker thread,
the result layer (shape, dtype, scale, colours, IoU against the truth), a second run replacing
it, Cancel, one-line notifications for bad input, the next-plane suggestion."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

TINY = "refine.max_steps=5 rf.n_trees=10 refine.fold_trees=5"
SHAPE = (20, 36, 36)
SCALE = (2.0, 1.0, 1.0)


@pytest.fixture(scope="session", autouse=True)
def _offscreen_qt():
    """Qt without a display, for this module's tests only (set before the QApplication)."""
    old = os.environ.get("QT_QPA_PLATFORM")
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    yield
    if old is None:
        os.environ.pop("QT_QPA_PLATFORM", None)
    else:
        os.environ["QT_QPA_PLATFORM"] = old


def synthetic(seed: int = 0):
    """``(image (2, Z, Y, X), truth (Z, Y, X) in painting codes 1 = background, 2 = blob)``:
    bright balls in noise (channel 0) and a noise channel (1)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    blob = np.zeros(SHAPE, dtype=bool)
    for _ in range(7):
        c = rng.uniform([3, 5, 5], [SHAPE[0] - 3, SHAPE[1] - 5, SHAPE[2] - 5])
        r = rng.uniform(3.0, 6.0)
        blob |= ((zz - c[0]) * SCALE[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r**2
    signal = blob * 1.0 + rng.normal(0, 0.35, SHAPE)
    image = np.stack([signal, rng.normal(0, 1, SHAPE)]).astype(np.float32)
    return image, (blob + 1).astype(np.uint8)


def paint(truth: np.ndarray, planes: dict[str, list[int]]) -> np.ndarray:
    out = np.zeros(truth.shape, dtype=np.uint8)
    for i in planes.get("z", []):
        out[i] = truth[i]
    for i in planes.get("y", []):
        out[:, i] = truth[:, i]
    for i in planes.get("x", []):
        out[:, :, i] = truth[:, :, i]
    return out


def iou(pred: np.ndarray, truth: np.ndarray, code: int) -> float:
    a, b = pred == code, truth == code
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture
def scene(qtbot):
    """A ViewerModel with a 2-channel image (one 4D layer), a painting on 1 plane per axis with
    class names in its features, and the widget."""
    from napari.components import ViewerModel

    from sparse3d.napari_plugin.widget import DensifyWidget

    image, truth = synthetic()
    viewer = ViewerModel()
    viewer.add_image(image, name="cells", scale=(1.0, *SCALE))
    painting = paint(truth, {"z": [10], "y": [18], "x": [18]})
    viewer.add_labels(
        painting,
        name="painting",
        scale=SCALE,
        features={"index": [0, 1, 2], "class_name": ["unlabelled", "background", "blob"]},
    )
    widget = DensifyWidget(viewer)
    qtbot.addWidget(widget)
    widget.options.setText(TINY)
    return viewer, widget, truth


def run_and_wait(qtbot, widget, timeout_ms: int = 60_000) -> None:
    from qtpy.QtCore import Qt

    qtbot.mouseClick(widget.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout_ms)


def notifications_since(n: int) -> list:
    from napari.utils.notifications import notification_manager

    return notification_manager.records[n:]


def test_widget_reads_the_layers(scene):
    viewer, widget, _ = scene
    assert widget.checked_image_names() == ["cells"]
    assert widget.labels.currentText() == "painting"
    assert widget.class_names.text() == "background, blob"
    assert widget.voxel.text() == "2, 1, 1"
    assert widget.method.currentText() == "refine"  # the default
    args = widget.inputs()
    assert args["image"].shape == (2, *SHAPE)
    assert args["class_names"] == ["background", "blob"]
    assert args["voxel_size_zyx_um"] == SCALE


def test_rf_run_then_second_run_replaces_the_layer(scene, qtbot):
    viewer, widget, truth = scene
    widget.method.setCurrentText("rf")
    widget.add_uncertainty.setChecked(True)
    n_layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    out = viewer.layers["cells densified"]
    assert type(out).__name__ == "Labels"
    assert out.data.shape == SHAPE and out.data.dtype == np.uint16
    assert tuple(out.scale) == SCALE
    assert set(np.unique(out.data)) <= {1, 2}
    first_iou = iou(out.data, truth, 2)
    assert first_iou > 0.7, first_iou
    assert list(out.features["class_name"]) == ["unlabelled", "background", "blob"]
    painting = viewer.layers["painting"]
    codes = np.array([1, 2])
    assert np.allclose(out.colormap.map(codes), painting.colormap.map(codes))
    unc = viewer.layers["cells uncertainty"]
    assert unc.data.shape == SHAPE and tuple(unc.scale) == SCALE
    assert len(viewer.layers) == n_layers + 2
    assert "next" in widget.next_label.text()
    first = out.data.copy()

    # paint two more planes and run again: the same layer object gets the new result
    painting.data = paint(truth, {"z": [4, 10, 15], "y": [18], "x": [18]})
    run_and_wait(qtbot, widget)
    assert viewer.layers["cells densified"] is out
    assert len(viewer.layers) == n_layers + 2
    assert not np.array_equal(out.data, first)
    assert iou(out.data, truth, 2) > 0.7


def test_refine_tiny_budget(scene, qtbot):
    viewer, widget, truth = scene
    widget.method.setCurrentText("refine")
    run_and_wait(qtbot, widget)
    out = viewer.layers["cells densified"]
    assert out.data.shape == SHAPE and out.data.dtype == np.uint16
    assert tuple(out.scale) == SCALE
    assert out.metadata["sparse3d"]["method"] == "refine"
    assert out.metadata["sparse3d"]["steps"] == 5
    assert iou(out.data, truth, 2) > 0.6


def test_cancel_stops_the_worker(scene, qtbot):
    viewer, widget, _ = scene
    widget.method.setCurrentText("refine")
    widget.options.setText("refine.max_steps=100000 refine.time_budget_s=null rf.n_trees=10")
    seen = len(notifications_since(0))
    widget.run()
    assert widget.worker is not None and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.status.text().startswith("network"), timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.status.text() == "cancelled"
    assert "cells densified" not in viewer.layers
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert any("cancelled" in n.message for n in notifications_since(seen))


@pytest.mark.parametrize(
    "spoil, expected",
    [
        ("empty", "no labelled voxel"),
        ("shape", "labels shape"),
        ("nan", "NaN"),
        ("voxel", "voxel size"),
        ("option", "bad option"),
    ],
)
def test_bad_input_gives_a_one_line_notification(scene, qtbot, spoil, expected):
    from napari.utils.notifications import NotificationSeverity

    viewer, widget, _ = scene
    widget.method.setCurrentText("rf")
    if spoil == "empty":
        viewer.layers["painting"].data = np.zeros(SHAPE, dtype=np.uint8)
    elif spoil == "shape":
        viewer.add_labels(np.ones((5, 6, 7), dtype=np.uint8), name="small")
        widget.labels.setCurrentText("small")
    elif spoil == "nan":
        data = viewer.layers["cells"].data.copy()
        data[0, 3, 4, 5] = np.nan
        viewer.layers["cells"].data = data
    elif spoil == "voxel":
        widget.voxel.setText("2, 0, 1")
    elif spoil == "option":
        widget.options.setText("rf.no_such_option=3")
    seen = len(notifications_since(0))
    run_and_wait(qtbot, widget)
    new = notifications_since(seen)
    errors = [n for n in new if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1, [n.message for n in new]
    assert expected in errors[0].message and "\n" not in errors[0].message
    assert not hasattr(errors[0], "exception")  # a message, not a traceback
    assert "cells densified" not in viewer.layers


def test_next_plane_and_go_there(scene, qtbot):
    viewer, widget, _ = scene
    widget.method.setCurrentText("rf")
    run_and_wait(qtbot, widget)
    s = widget.suggestion
    assert s is not None and s.axis in "zyx"
    assert s.index not in widget.result.annotated_slices[s.axis]
    widget.go_to_suggestion()
    lead = viewer.dims.ndim - 3
    axis = lead + s.dim
    assert viewer.dims.order[lead] == axis  # sliced along the suggested axis
    assert viewer.dims.current_step[axis] == s.index
    widget.next_strategy.setCurrentText("spacing")
    assert widget.suggestion.strategy == "spacing"
    assert widget.next_label.text() == widget.suggestion.describe()


def test_rf_run_through_the_plugin_proxy(scene, qtbot):
    """napari hands a plugin's widget the viewer behind a proxy (public attributes only, proxied
    results): the run and its result layer work through it too."""
    from napari.utils._proxies import PublicOnlyProxy

    from sparse3d.napari_plugin.widget import DensifyWidget

    viewer, _, truth = scene
    widget = DensifyWidget(PublicOnlyProxy(viewer))
    qtbot.addWidget(widget)
    widget.options.setText(TINY)
    widget.method.setCurrentText("rf")
    run_and_wait(qtbot, widget)
    out = viewer.layers["cells densified"]
    assert iou(out.data, truth, 2) > 0.7
    codes = np.array([1, 2])
    assert np.allclose(out.colormap.map(codes), viewer.layers["painting"].colormap.map(codes))
