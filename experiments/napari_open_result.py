"""Open a big densify result in napari, as a user does, and time it: the OME-Zarr segmentation
(a multiscale Labels layer through sparse3d's reader) over its OME-Zarr image.

    python experiments/napari_open_result.py SEG.ome.zarr [--image IMAGE.ome.zarr]
        [--out experiments/results/napari_big_result.png]

Prints the seconds from ``viewer.open`` to the first drawn frame and the levels of each layer,
and saves a screenshot of the window. Opens a real window (under Xvfb when there is no display:
it re-runs itself through ``xvfb-run``; see ``napari_screenshot.py`` for the Debian packages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seg", help="the segmentation, <name>_seg.ome.zarr")
    p.add_argument("--image", default=None, help="the image, an OME-Zarr multiscale")
    p.add_argument("--out", default=str(ROOT / "experiments/results/napari_big_result.png"))
    args = p.parse_args(argv)
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv]
        os.execvp(cmd[0], cmd)

    import napari
    from napari_screenshot import save_window  # this folder's screenshot helper
    from qtpy.QtWidgets import QApplication

    from sparse3d.data.ome_zarr import read_levels

    viewer = napari.Viewer(title="sparse3d result")
    viewer.window._qt_window.resize(1500, 900)
    app = QApplication.instance()
    t0 = time.perf_counter()
    if args.image:
        levels = read_levels(args.image)
        data = [lv.data for lv in levels]
        channel_axis = 0 if data[0].ndim == 4 else None
        coarse = data[-1].compute() if hasattr(data[-1], "compute") else data[-1]
        viewer.add_image(
            data if len(data) > 1 else data[0],
            contrast_limits=(float(coarse.min()), float(coarse.max())),
            multiscale=len(data) > 1,
            channel_axis=channel_axis,
            scale=levels[0].scale_zyx_um,
            name=Path(args.image).name.removesuffix(".zarr").removesuffix(".ome"),
        )
    layers = viewer.open(args.seg, plugin="sparse3d")
    for layer in layers:
        layer.opacity = 0.45
    app.processEvents()
    opened = time.perf_counter() - t0
    for layer in viewer.layers:
        shapes = [tuple(d.shape) for d in layer.data] if layer.multiscale else [layer.data.shape]
        print(f"{layer.name}: {len(shapes)} level(s), finest {shapes[0]}, coarsest {shapes[-1]}")
    out = save_window(viewer, app, Path(args.out))
    print(f"opened and drawn in {opened:.1f} s; screenshot {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
