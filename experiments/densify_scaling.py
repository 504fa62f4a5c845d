"""Wall time and peak memory of ``densify`` (default method) on a large real volume.

    python experiments/densify_scaling.py [--out bench_runs/scaling] [--k 2]

The ICBM152 T1 of the ``mni_tissue`` bench case at its full 1 mm resolution (cropped to the
brain, about 5 M voxels; ``--upsample 1.5`` resamples it to about 3.4x that), annotated on ``k``
planes per axis, then ``python -m sparse3d.densify`` on it through the benchmark's runner, which
measures the child's wall time and peak resident memory. Prints one line with the voxel count,
seconds, GiB, IoU on the unannotated voxels and the CPU capability.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from sparse3d.bench import command as bench
    from sparse3d.data import realcases
    from sparse3d.metrics import summary_mean

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_runs/scaling"))
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--upsample", type=float, default=1.0)
    ap.add_argument("overrides", nargs="*", help="densify overrides")
    args = ap.parse_args(argv)
    realcases.MNI_FACTOR = 1  # full resolution
    case = realcases.load_case("mni_tissue")
    if args.upsample != 1.0:
        from scipy import ndimage as ndi

        image = ndi.zoom(case.image[0], args.upsample, order=1)[None].astype(np.float32)
        truth = ndi.zoom(case.truth, args.upsample, order=0)
        vox = tuple(v / args.upsample for v in case.voxel_size_zyx_um)
        case = realcases.Case(
            case.name, image, truth, case.class_names, vox, case.channel_names, case.description
        )
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / f"mni_tissue_full_x{args.upsample:g}_k{args.k}.h5"
    realcases.write_case(case, args.k, src, overwrite=True)
    run = args.out / src.stem
    cmd = [
        sys.executable, "-m", "sparse3d.densify", f"inputs=[{src}]", f"out={run}",
        "overwrite=true", "logger=none", *args.overrides,
    ]  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    result = bench.run_child(cmd, run / "densify.log")
    if result["returncode"] != 0:
        print(f"densify failed (exit {result['returncode']}): see {run / 'densify.log'}")
        return 1
    summary = json.loads((run / "densify.json").read_text())
    entry = next(iter(summary["volumes"].values()))
    steps = next(iter(summary.get("steps", {}).values()), {})
    print(
        f"{case.truth.size:,} voxels {case.truth.shape}: {result['wall_s']:.0f} s, "
        f"{result['peak_rss_gib']:.2f} GiB, IoU unannotated {summary_mean(entry['unannotated']):.3f}, "
        f"{steps}, cpu {torch.backends.cpu.get_cpu_capability()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
