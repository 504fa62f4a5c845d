"""Screenshot of napari with sparse3d's Densify widget after an ``rf`` run, for the README.

Opens a real napari window (under Xvfb when there is no display: it re-runs itself through
``xvfb-run``), adds a synthetic sample (the benchmark's sample 1, small scale, three channels) and
its truth painted on 1 plane per axis, opens the widget from the Plugins menu's entry
(``sparse3d`` / ``Densify``, as a user would), runs ``method=rf``, moves to the suggested next
plane and saves the window with the widget.

    python experiments/napari_screenshot.py [--out experiments/results/napari_widget.png]

Needs napari with a Qt binding (``pip install -e ".[dev]"``) and, without a display, Debian's
``xvfb libgl1-mesa-dri libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-cursor0``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def save_window(viewer, app, out: Path) -> Path:
    """Let the window draw for a second, then save it (with its docks) to ``out``, written
    under a temporary name first."""
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    viewer.screenshot(str(tmp), canvas_only=False)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "napari_widget.png"))
    p.add_argument("--scale", type=float, default=0.35, help="synthetic sample scale")
    args = p.parse_args(argv)
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv]
        os.execvp(cmd[0], cmd)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from sparse3d.data.annotation import sparse_label
    from sparse3d.data.realcases import plane_positions
    from sparse3d.data.synth import SAMPLE1, render_sample

    vol = render_sample(SAMPLE1, scale=args.scale, seed=0)
    meta = vol.meta
    names = tuple(meta.labels.class_names)
    planes = plane_positions(vol.dense_label.shape, 1)
    painting = sparse_label(vol.dense_label.astype(np.uint8) + 1, planes, 0)

    viewer = napari.Viewer(title="sparse3d densify")
    viewer.window._qt_window.resize(1500, 900)
    scale = tuple(meta.voxel_size_zyx_um)
    viewer.add_image(
        vol.image,
        channel_axis=0,
        name=list(meta.channel_names),
        colormap=["green", "blue", "magenta"],
        scale=scale,
        blending="additive",
    )
    viewer.add_labels(
        painting,
        name="painting",
        scale=scale,
        features={"index": list(range(len(names) + 1)), "class_name": ["unlabelled", *names]},
    )
    _, widget = viewer.window.add_plugin_dock_widget("sparse3d", "Densify")
    for i in range(widget.images.count()):  # the three channel layers
        widget.images.item(i).setCheckState(widget.images.item(0).checkState().Checked)
    widget.method.setCurrentText("rf")
    widget.run()
    app = QApplication.instance()
    t0 = time.monotonic()
    while widget.worker is not None and time.monotonic() - t0 < 600:
        app.processEvents()
        time.sleep(0.05)
    if widget.result is None:
        print(f"no result: {widget.status.text()}", file=sys.stderr)
        return 1
    widget.go_to_suggestion()
    viewer.layers.selection.active = viewer.layers["painting"]
    out = save_window(viewer, app, Path(args.out))
    print(f"{out}: rf in {widget.result.seconds:.1f} s; {widget.next_label.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
