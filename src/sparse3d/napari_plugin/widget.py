"""The "Densify" dock widget (layer 3): paint a few planes on a Labels layer, press Run, see
the dense result as ``<image> densified``, paint more, run again.

It calls :func:`sparse3d.densify.api.densify_painting` (the command line's methods and
options) in napari's ``thread_worker``; progress arrives through a Qt signal (queued to the
GUI thread), Cancel sets a flag densify polls. Bad input is the command line's one-line error,
shown as a napari notification. After each run the widget points to the plane to paint next
(:mod:`sparse3d.densify.suggest`) and can move the viewer there.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from sparse3d.cli import UserError
from sparse3d.napari_plugin.layers import (
    ProgressClock,
    channels_of,
    class_names_of,
    format_seconds,
    format_voxel,
    parse_class_names,
    parse_options,
    parse_voxel,
    voxel_size_of,
)

#: Methods offered, the default first (``rf``: a preview in seconds).
METHODS = ("refine", "rf")
#: Next-plane strategies offered, the default first (the order follows the study in
#: ``experiments/results/suggest_planes.md``).
NEXT_PLANE = ("uncertainty", "spacing")
RESULT_SUFFIX = " densified"
UNCERTAINTY_SUFFIX = " uncertainty"


def _copied(colormap: Any) -> Any:
    """A copy of a layer's colormap (napari's evented models copy themselves; a plugin sees
    them through a proxy, which ``copy.deepcopy`` refuses)."""
    try:
        return colormap.copy(deep=True)
    except Exception:  # no copy method of that signature: share it
        return colormap


class _Relay(QObject):
    """Carries densify's progress from the worker thread to the GUI thread."""

    progress = Signal(str, float)


class DensifyWidget(QWidget):
    """Dock widget: image layer(s), painting, class names, method, voxel size, options; Run and
    Cancel; a progress bar with stage and ETA; the suggested next plane and a button to go there.

    Works with a ``napari.Viewer`` and with a canvas-less ``napari.components.ViewerModel``.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.result = None
        self.suggestion = None
        self._stop = threading.Event()
        self._clock: ProgressClock | None = None
        self._last = ("", 0.0)
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._timer = QTimer(self)
        self._timer.setInterval(500)
        self._timer.timeout.connect(lambda: self._on_progress(*self._last))
        self._build()
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ---------------------------------------------------------------------------------- ui

    def _build(self) -> None:
        self.images = QListWidget()
        self.images.setMaximumHeight(90)
        self.images.setToolTip(
            "image layers to learn from, in order (each checked layer adds its channels)"
        )
        self.images.itemChanged.connect(self._image_changed)
        self.labels = QComboBox()
        self.labels.setToolTip("the painting: 0 unlabelled, 1, 2, ... one code per class")
        self.labels.currentTextChanged.connect(self._labels_changed)
        self.class_names = QLineEdit()
        self.class_names.setPlaceholderText("class names, comma-separated (from features)")
        self.method = QComboBox()
        self.method.addItems(METHODS)
        self.method.setToolTip(
            "refine: forests + a small network (minutes); rf: forest only (seconds)"
        )
        self.voxel = QLineEdit()
        self.voxel.setToolTip("voxel size z, y, x (from the image layer's scale)")
        self.options = QLineEdit()
        self.options.setPlaceholderText("options, e.g. refine.max_steps=100 rf.n_trees=50")
        self.add_uncertainty = QCheckBox("uncertainty layer")
        form = QFormLayout()
        form.addRow("image", self.images)
        form.addRow("labels", self.labels)
        form.addRow("classes", self.class_names)
        form.addRow("method", self.method)
        form.addRow("voxel z, y, x", self.voxel)
        form.addRow("options", self.options)
        form.addRow("", self.add_uncertainty)
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.status = QLabel("paint a few planes, then Run")
        self.status.setWordWrap(True)
        self.next_strategy = QComboBox()
        self.next_strategy.addItems(NEXT_PLANE)
        self.next_strategy.currentTextChanged.connect(lambda _: self._update_suggestion())
        self.next_label = QLabel("next plane: after a run")
        self.next_label.setWordWrap(True)
        self.go_button = QPushButton("Go to plane")
        self.go_button.setEnabled(False)
        self.go_button.clicked.connect(self.go_to_suggestion)
        nxt = QFormLayout()
        nxt.addRow("next plane by", self.next_strategy)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(nxt)
        layout.addWidget(self.next_label)
        layout.addWidget(self.go_button)
        layout.addStretch(1)

    def _refresh_layers(self, event: Any = None) -> None:
        """List the viewer's Image and Labels layers, keeping the current choices."""
        checked = set(self.checked_image_names())
        images = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)]
        images = [n for n in images if not n.endswith(UNCERTAINTY_SUFFIX)]
        self.images.blockSignals(True)
        self.images.clear()
        for i, name in enumerate(images):
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = name in checked or (not checked and i == 0)
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.images.addItem(item)
        self.images.blockSignals(False)
        current = self.labels.currentText()
        names = [ly.name for ly in self.viewer.layers if isinstance(ly, Labels)]
        painted = [n for n in names if not n.endswith(RESULT_SUFFIX)]
        self.labels.blockSignals(True)
        self.labels.clear()
        self.labels.addItems(painted + [n for n in names if n not in painted])
        if current in names:
            self.labels.setCurrentText(current)
        self.labels.blockSignals(False)
        if current not in names:
            self._labels_changed(self.labels.currentText())
        self._image_changed()

    def checked_image_names(self) -> list[str]:
        items = (self.images.item(i) for i in range(self.images.count()))
        return [it.text() for it in items if it.checkState() == Qt.CheckState.Checked]

    def _image_changed(self, item: Any = None) -> None:
        names = self.checked_image_names()
        if names and names[0] in self.viewer.layers:
            self.voxel.setText(format_voxel(voxel_size_of(self.viewer.layers[names[0]])))

    def _labels_changed(self, name: str) -> None:
        if name in self.viewer.layers:
            found = class_names_of(self.viewer.layers[name])
            if found:
                self.class_names.setText(", ".join(found))

    # --------------------------------------------------------------------------------- run

    def inputs(self) -> dict[str, Any]:
        """Everything a run needs, read from the layers and fields (GUI thread); a UserError
        on bad input."""
        names = self.checked_image_names()
        if not names:
            raise UserError("choose an image layer")
        label_name = self.labels.currentText()
        if label_name not in self.viewer.layers:
            raise UserError("choose a Labels layer with a few painted planes")
        painting_layer = self.viewer.layers[label_name]
        return {
            "image": channels_of([self.viewer.layers[n] for n in names]),
            "painting": np.asarray(painting_layer.data).copy(),
            "method": self.method.currentText(),
            "class_names": parse_class_names(self.class_names.text()),
            "voxel_size_zyx_um": parse_voxel(self.voxel.text()),
            "overrides": parse_options(self.options.text()),
            "image_name": names[0],
            "painting_layer": painting_layer,
        }

    def run(self) -> None:
        """Start densify on the chosen layers in a worker thread (a notification on bad input)."""
        if self.worker is not None:
            show_info("densify is already running: Cancel it first")
            return
        try:
            args = self.inputs()
        except UserError as err:
            self._fail(str(err))
            return
        from sparse3d.densify.api import Hooks, densify_painting

        self._stop.clear()
        hooks = Hooks(progress=self._relay.progress.emit, should_stop=self._stop.is_set)
        context = {k: args.pop(k) for k in ("image_name", "painting_layer")}
        # errors arrive in _on_error as one line (never re-raised into a traceback dialog)
        worker = create_worker(
            densify_painting, **args, hooks=hooks, _start_thread=False, _ignore_errors=True
        )
        worker.returned.connect(lambda result: self._on_result(result, context))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._clock = ProgressClock()
        self._last = ("starting", 0.0)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self.status.setText(f"{args['method']}: starting")
        self._timer.start()
        worker.start()

    def cancel(self) -> None:
        """Ask the running densify to stop at its next check (between stages, network steps)."""
        if self.worker is not None:
            self._stop.set()
            self.status.setText("cancelling …")

    def _on_progress(self, stage: str, fraction: float) -> None:
        if self._clock is None:
            return
        self._last = (stage, fraction)
        percent, line = self._clock.update(stage, fraction)
        if percent < 0:
            self.progress.setRange(0, 0)  # busy
        else:
            self.progress.setRange(0, 100)
            self.progress.setValue(percent)
        self.status.setText(line)

    def _on_error(self, err: BaseException) -> None:
        from sparse3d.densify.api import Cancelled

        if isinstance(err, Cancelled):
            self.status.setText("cancelled")
            show_info("densify cancelled")
        elif isinstance(err, UserError):
            self._fail(str(err))
        else:  # one line, never a traceback dialog
            first = (str(err).splitlines() or [""])[0]
            self._fail(f"densify failed: {type(err).__name__}: {first}")

    def _fail(self, message: str) -> None:
        self.status.setText(message)
        show_error(message)

    def _on_finished(self) -> None:
        self._timer.stop()
        self.worker = None
        self._clock = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 100)

    def _on_result(self, result: Any, context: dict[str, Any]) -> None:
        try:
            self._show_result(result, context)
        except Exception as err:  # an exception escaping a Qt slot aborts napari: one line
            self._fail(f"could not show the result: {type(err).__name__}: {err}")

    def _show_result(self, result: Any, context: dict[str, Any]) -> None:
        self.result = result
        painting = context["painting_layer"]
        name = context["image_name"] + RESULT_SUFFIX
        where = {"scale": painting.scale[-3:], "translate": painting.translate[-3:]}
        features = {
            "index": list(range(len(result.class_names) + 1)),
            "class_name": ["unlabelled", *result.class_names],
        }
        info = {"method": result.method, "seconds": result.seconds, **result.facts}
        layer = self._put(
            Labels, name, result.labels, where,
            colormap=_copied(painting.colormap), features=features, opacity=0.5,
        )  # fmt: skip
        layer.metadata["sparse3d"] = info
        if self.add_uncertainty.isChecked():
            self._put(
                Image, context["image_name"] + UNCERTAINTY_SUFFIX, result.uncertainty, where,
                colormap="magma", contrast_limits=(0.0, 1.0), blending="additive", visible=False,
            )  # fmt: skip
        self.progress.setValue(100)
        self.status.setText(
            f"{result.method}: {name} in {format_seconds(result.seconds)}"
            f"; mean uncertainty {float(result.uncertainty.mean()):.3f}"
        )
        self._update_suggestion()

    def _put(self, kind: type, name: str, data: np.ndarray, where: dict, **style: Any) -> Any:
        """Replace the data of layer ``name`` in place (same kind), else add a new layer."""
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            layer = self.viewer.layers[name]
            layer.data = data
            layer.scale, layer.translate = where["scale"], where["translate"]
            for key in ("colormap", "features"):
                if key in style:
                    setattr(layer, key, style[key])
            return layer
        add = self.viewer.add_labels if kind is Labels else self.viewer.add_image
        return add(data, name=name, **where, **style)

    # --------------------------------------------------------------------------- next plane

    def _update_suggestion(self) -> None:
        from sparse3d.densify.suggest import suggest_plane

        if self.result is None:
            return
        strategy = self.next_strategy.currentText()
        self.suggestion = suggest_plane(
            self.result.uncertainty, self.result.annotated_slices, strategy=strategy
        )
        self.next_label.setText(self.suggestion.describe())
        self.go_button.setEnabled(True)

    def go_to_suggestion(self) -> None:
        """Show the suggested plane: slice along its axis (2D view) at its index."""
        s = self.suggestion
        if s is None:
            return
        dims = self.viewer.dims
        lead = dims.ndim - 3
        axis = lead + s.dim
        layer_name = self.labels.currentText()
        scale, shift = 1.0, 0.0
        if layer_name in self.viewer.layers:
            layer = self.viewer.layers[layer_name]
            scale, shift = float(layer.scale[-3:][s.dim]), float(layer.translate[-3:][s.dim])
        if dims.ndisplay == 2:
            others = [lead + d for d in range(3) if d != s.dim]
            dims.order = (*range(lead), axis, *others)
        dims.set_point(axis, shift + s.index * scale)
