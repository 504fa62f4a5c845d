"""One block's filter features under the glibc malloc settings a dask worker may start with,
side by side.

densify's blockwise forests compute each block's features in a dask worker process. dask's
nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``; densify's own LocalCluster and
SLURM jobs start them with :data:`sparse3d.densify.engine.WORKER_MALLOC` instead. This runs
:func:`sparse3d.densify.features.voxel_features` on one block with its halo (default: a corner
block of the 30 M-voxel plan, 160x192x144 grown to 190x222x174; one thread, as in a worker) in a
fresh child process per setting, the settings alternating for ``--rounds`` rounds, and prints
each run's seconds and minor page faults (``resource.getrusage`` of the child), and the median
time of each setting over no variable at all (glibc's adaptive defaults). The image is smooth
random noise: the filters' cost does not depend on the content.

    python experiments/bench_worker_malloc.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from sparse3d.densify.engine import WORKER_MALLOC

SETTINGS: dict[str, dict[str, int]] = {
    "glibc defaults (no variable)": {},
    "dask's nanny default": {"MALLOC_TRIM_THRESHOLD_": 65536},
    "densify's WORKER_MALLOC": dict(WORKER_MALLOC),
}

CHILD = r"""
import json, resource, sys, time
import numpy as np
from scipy import ndimage as ndi
from sparse3d.densify.features import DEFAULT_SIGMAS, voxel_features
shape, core = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rng = np.random.default_rng(0)
image = ndi.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)[None]
halo = [(n - c) // 2 for n, c in zip(shape, core)]
crop = tuple(slice(h, h + c) for h, c in zip(halo, core))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter()
voxel_features(image, None, DEFAULT_SIGMAS, np.array([[0.0, 1.0]]), 1, crop, progress=False)
seconds = time.perf_counter() - t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"seconds": seconds, "faults": faults}))
"""


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _run(env_extra: dict[str, int], shape: list[int], core: list[int]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({k: str(v) for k, v in env_extra.items()})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(shape), json.dumps(core)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_ints, default=[190, 222, 174], help="block with its halo")
    ap.add_argument("--core", type=_ints, default=[160, 192, 144], help="its core")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, block {args.shape} (core {args.core})")
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name, extra in SETTINGS.items():
            got = _run(extra, args.shape, args.core)
            times[name].append(got["seconds"])
            print(f"round {r + 1}  {name:30s} {got['seconds']:6.2f} s  "
                  f"{got['faults'] / 1e6:5.2f} M minor faults", flush=True)  # fmt: skip
    base = statistics.median(times["glibc defaults (no variable)"])
    for name, ts in times.items():
        print(f"median {name:30s} {statistics.median(ts):6.2f} s  "
              f"{statistics.median(ts) / base:4.2f}x the defaults' time")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
