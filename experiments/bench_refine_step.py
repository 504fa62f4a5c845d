"""densify refine's network: training time per step in fp32 and bf16-mixed, side by side.

Trains the refining network as ``method=refine`` builds it (same-padded U-Net, 8 base channels,
depth 3, tiles 32 x 64 x 64 in batches of 2, ``refine.precision``) on a random volume with a
few annotated planes, alternating fp32 and bf16 runs of ``--steps`` steps for ``--rounds``
rounds; prints each run's seconds per step and the median ratio.

    python experiments/bench_refine_step.py --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sparse3d.densify.network import PlaneTiles
from sparse3d.densify.network_fit import RefineModule, fit_refiner
from sparse3d.models import UNet


def one_run(precision: str, steps: int, tiles: PlaneTiles, channels: int) -> float:
    torch.manual_seed(0)
    net = UNet(channels, 3, base_channels=8, depth=3, padding="same", norm="batch")
    module = RefineModule(
        net, 3, 3, pseudo_weight=0.3, lr=2e-3, max_steps=steps, time_budget_s=None
    )
    t0 = time.perf_counter()
    fit = fit_refiner(module, tiles, 2, accelerator="cpu", progress_bar=False, precision=precision)
    return (time.perf_counter() - t0) / fit["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=6, help="image + forest probabilities")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shape = (64, 160, 160)
    image = rng.random((args.channels, *shape), dtype=np.float32)
    label = np.full(shape, 3, np.uint8)
    for z in (10, 30, 50):
        label[z] = rng.integers(0, 3, shape[1:])
    pseudo = rng.integers(0, 3, shape).astype(np.uint8)
    tiles = PlaneTiles(image, label, pseudo, 3, (32, 64, 64), seed=0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}"
    )
    one_run("fp32", 2, tiles, args.channels)  # warm-up
    one_run("bf16", 2, tiles, args.channels)
    ratios = []
    for r in range(args.rounds):
        fp32 = one_run("fp32", args.steps, tiles, args.channels)
        bf16 = one_run("bf16", args.steps, tiles, args.channels)
        ratios.append(fp32 / bf16)
        print(
            f"round {r + 1}: fp32 {fp32:.3f} s/step, bf16-mixed {bf16:.3f} s/step, {ratios[-1]:.2f}x"
        )
    print(f"bf16-mixed vs fp32, median of {args.rounds} rounds: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
