"""Wall time and peak memory of ``densify`` against volume size, block by block and in memory.

    python experiments/densify_scaling.py --voxels 4e6,30e6 --methods rf,refine \\
        [--paths blockwise,in_memory] [--budget 8GB] [--workers 2] [--k 2] [--out DIR]
        [--channels 3] [--format h5|ome-zarr] [densify overrides ...]

Each volume is the ICBM152 T1 of the ``mni_tissue`` bench case at its full 1 mm grid (cropped
to the brain, 4.5 M voxels) with its dense tissue truth, resampled by the cube root of the
size asked for (``--voxels``), annotated on ``k`` evenly spaced planes per axis and written as a
chunked sparse3d HDF5 volume (``--format ome-zarr``: an OME-Zarr image with TIFF labels and truth,
imported by densify as a user's stack is; ``--channels``: more channels made from the T1; see
:func:`make_volume`). ``python -m sparse3d.densify`` then runs on it in a child process
for each method and path (``blockwise``: the default; ``in_memory``: ``in_memory=true``), while
this script samples the resident memory of the child and all its descendants (dask's worker
processes included) every 0.2 s, summed. One JSON line per run goes to ``<out>/results.jsonl``
and the table to ``<out>/densify_scaling.md``: voxels, wall, peak, Mvoxel/s, IoU on the
unannotated voxels, the plan line and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall seconds, exit code and the peak summed RSS of its process tree."""
    peak = [0]
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                done.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        code = proc.wait()
        done.set()
        th.join()
    return {"returncode": code, "wall_s": time.perf_counter() - t0, "peak_gb": peak[0] / 1e9}


def make_volume(voxels: float, k: int, out: Path, channels: int = 1, fmt: str = "h5") -> dict:
    """The mni_tissue T1 resampled to about ``voxels`` voxels, annotated on ``k`` planes per axis.

    ``channels > 1`` adds channels made from the T1 (its square and its negative, each with its
    own Gaussian noise of 5 % of the range), so that every channel carries the anatomy
    differently. ``fmt="h5"``: one sparse3d HDF5 volume; ``"ome-zarr"``: the image as an uint16
    OME-Zarr, the planes' labels and the dense truth as TIFFs (code 0 = unlabelled, class c =
    c + 1), as a microscope user brings them. Returns the densify arguments for it.
    """
    from scipy import ndimage as ndi

    from sparse3d.data import realcases

    stem = f"mni_{voxels / 1e6:.0f}M_k{k}" + (f"_c{channels}" if channels > 1 else "")
    h5 = out / f"{stem}.h5"
    zarr_path, lab, dense = (out / f"{stem}{x}" for x in (".ome.zarr", "_labels.tif", "_truth.tif"))
    args = {"name": stem, "inputs": [str(h5)]}
    if fmt == "ome-zarr":
        args = {
            "name": stem,
            "inputs": [str(zarr_path)],
            "labels": [str(lab)],
            "dense_labels": [str(dense)],
        }
    if (fmt == "h5" and h5.exists()) or (fmt == "ome-zarr" and dense.exists()):
        return args
    realcases.MNI_FACTOR = 1  # full resolution
    case = realcases.load_case("mni_tissue")
    f = (voxels / case.truth.size) ** (1 / 3)
    image, truth, vox = case.image[0], case.truth, case.voxel_size_zyx_um
    if abs(f - 1) > 0.02:
        image = ndi.zoom(image, f, order=1).astype(np.float32)
        truth = ndi.zoom(truth, f, order=0)
        vox = tuple(v / f for v in vox)
    image = image[None].astype(np.float32)
    names = case.channel_names
    if channels > 1:
        rng = np.random.default_rng(0)
        t1 = image[0]
        span = float(t1.max() - t1.min())
        extra = [t1 * t1 / max(span, 1e-6), -t1][: channels - 1]
        image = np.stack(
            [t1, *(e + rng.normal(0, 0.05 * span, t1.shape).astype(np.float32) for e in extra)]
        )
        names = tuple(f"{case.channel_names[0]}_{i}" for i in range(channels))
    case = realcases.Case(case.name, image, truth, case.class_names, vox, names, case.description)
    if fmt == "h5":
        realcases.write_case(case, k, h5, overwrite=True)
        return args
    import tifffile

    from sparse3d.data.ome_zarr import write_image

    lo, hi = image.min(axis=(1, 2, 3), keepdims=True), image.max(axis=(1, 2, 3), keepdims=True)
    u16 = ((image - lo) / np.maximum(hi - lo, 1e-6) * 65535).astype(np.uint16)
    write_image(zarr_path, u16, vox, names, overwrite=True)
    planes = realcases.plane_positions(case.shape_zyx, k)
    ignore = len(case.class_names)
    sparse = realcases.sparse_label(truth, planes, ignore)
    codes = np.where(sparse == ignore, 0, sparse.astype(np.int64) + 1).astype(np.uint8)
    tifffile.imwrite(lab, codes)
    tifffile.imwrite(dense, (truth.astype(np.int64) + 1).astype(np.uint8))
    return args


def _voxels(src: dict) -> int:
    """Voxels of the volume ``src`` names (its sparse label's size)."""
    path = src["inputs"][0]
    if path.endswith(".h5"):
        with __import__("h5py").File(path, "r") as f:
            return int(np.prod(f["label"].shape))
    import tifffile

    with tifffile.TiffFile(src["labels"][0]) as t:
        return int(np.prod(t.series[0].shape))


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", default="4e6")
    ap.add_argument("--methods", default="rf,refine")
    ap.add_argument("--paths", default="blockwise,in_memory")
    ap.add_argument("--budget", default="8GB")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--format", choices=("h5", "ome-zarr"), default="h5")
    ap.add_argument("--out", type=Path, default=Path("bench_runs/scaling"))
    ap.add_argument("overrides", nargs="*", help="more densify overrides")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = torch.backends.cpu.get_cpu_capability()
    results = args.out / "results.jsonl"
    for voxels in (float(v) for v in args.voxels.split(",")):
        src = make_volume(voxels, args.k, args.out, args.channels, args.format)
        inputs = [f"{key}=[{','.join(src[key])}]" for key in ("inputs", "labels", "dense_labels")
                  if key in src]  # fmt: skip
        for method in args.methods.split(","):
            for path in args.paths.split(","):
                run = args.out / f"{src['name']}_{method}_{path}"
                cmd = [
                    sys.executable, "-m", "sparse3d.densify", *inputs, f"out={run}",
                    f"method={method}", "overwrite=true", "logger=none",
                    f"memory_budget={args.budget}", f"in_memory={path == 'in_memory'}",
                    *([f"cluster.n_workers={args.workers}"] if args.workers else []),
                    *args.overrides,
                ]  # fmt: skip
                run.mkdir(parents=True, exist_ok=True)
                res = run_measured(cmd, run / "densify.log")
                row = {"volume": src["name"], "format": args.format, "method": method, "path": path, "cpu": cpu, **res,
                       "load1": os.getloadavg()[0], "overrides": args.overrides}  # fmt: skip
                if res["returncode"] == 0:
                    summary = json.loads((run / "densify.json").read_text())
                    entry = next(iter(summary["volumes"].values()))
                    from sparse3d.metrics import summary_mean

                    n = int(np.prod(entry["shape"])) if "shape" in entry else _voxels(src)
                    row.update(
                        voxels=n,
                        mvox_s=n / 1e6 / res["wall_s"],
                        iou=summary_mean(entry["unannotated"]),
                        plan=entry.get("plan", "in memory"),
                        steps=next(iter(summary.get("steps", {}).values()), {}),
                    )
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
