"""Wall time and peak memory of ``densify`` against volume size, block by block and in memory.

    python experiments/densify_scaling.py --voxels 4e6,30e6 --methods rf,refine \\
        [--paths blockwise,in_memory] [--budget 8GB] [--workers 2] [--k 2] [--out DIR]

Each volume is the ICBM152 T1 of the ``mni_tissue`` bench case at its full 1 mm grid (cropped
to the brain, 4.5 M voxels) with its dense tissue truth, resampled by the cube root of the
size asked for (``--voxels``), annotated on ``k`` evenly spaced planes per axis and written as a
chunked sparse3d HDF5 volume. ``python -m sparse3d.densify`` then runs on it in a child process
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


def make_volume(voxels: float, k: int, out: Path) -> Path:
    """The mni_tissue T1 resampled to about ``voxels`` voxels, as a sparse3d volume file."""
    from scipy import ndimage as ndi

    from sparse3d.data import realcases

    path = out / f"mni_{voxels / 1e6:.0f}M_k{k}.h5"
    if path.exists():
        return path
    realcases.MNI_FACTOR = 1  # full resolution
    case = realcases.load_case("mni_tissue")
    f = (voxels / case.truth.size) ** (1 / 3)
    if abs(f - 1) > 0.02:
        image = ndi.zoom(case.image[0], f, order=1)[None].astype(np.float32)
        truth = ndi.zoom(case.truth, f, order=0)
        vox = tuple(v / f for v in case.voxel_size_zyx_um)
        case = realcases.Case(
            case.name, image, truth, case.class_names, vox, case.channel_names, case.description
        )
    realcases.write_case(case, k, path, overwrite=True)
    return path


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", default="4e6")
    ap.add_argument("--methods", default="rf,refine")
    ap.add_argument("--paths", default="blockwise,in_memory")
    ap.add_argument("--budget", default="8GB")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_runs/scaling"))
    ap.add_argument("overrides", nargs="*", help="more densify overrides")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = torch.backends.cpu.get_cpu_capability()
    results = args.out / "results.jsonl"
    for voxels in (float(v) for v in args.voxels.split(",")):
        src = make_volume(voxels, args.k, args.out)
        for method in args.methods.split(","):
            for path in args.paths.split(","):
                run = args.out / f"{src.stem}_{method}_{path}"
                cmd = [
                    sys.executable, "-m", "sparse3d.densify", f"inputs=[{src}]", f"out={run}",
                    f"method={method}", "overwrite=true", "logger=none",
                    f"memory_budget={args.budget}", f"in_memory={path == 'in_memory'}",
                    *([f"cluster.n_workers={args.workers}"] if args.workers else []),
                    *args.overrides,
                ]  # fmt: skip
                run.mkdir(parents=True, exist_ok=True)
                res = run_measured(cmd, run / "densify.log")
                row = {"volume": src.name, "method": method, "path": path, "cpu": cpu, **res,
                       "load1": os.getloadavg()[0], "overrides": args.overrides}  # fmt: skip
                if res["returncode"] == 0:
                    summary = json.loads((run / "densify.json").read_text())
                    entry = next(iter(summary["volumes"].values()))
                    from sparse3d.metrics import summary_mean

                    with __import__("h5py").File(src, "r") as f:
                        n = int(np.prod(f["label"].shape))
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
