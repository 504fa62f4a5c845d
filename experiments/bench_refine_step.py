"""densify refine's network: training time per step and prediction speed in fp32 and bf16,
side by side.

Trains the refining network as ``method=refine`` builds it (same-padded U-Net, 8 base channels,
depth 3, tiles 32 x 64 x 64 in batches of 2, ``refine.precision``) on a random volume with a
few annotated planes, alternating fp32 and bf16 runs of ``--steps`` steps for ``--rounds``
rounds; prints each run's seconds per step and the median ratio. Then predicts a block of
``--block`` voxels as the blockwise pass does (one pass, channels-last, softmax in float32),
fp32 and bf16 autocast alternating, and prints voxels per second and the median ratio.

    python experiments/bench_refine_step.py --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sparse3d.densify.network import PlaneTiles, predict_same_padded
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


def one_prediction(net: torch.nn.Module, block: np.ndarray, precision: str) -> float:
    """Seconds to predict ``block (C, Z, Y, X)`` in one pass."""
    t0 = time.perf_counter()
    predict_same_padded(net, block, 4, halo=0, max_voxels=1 << 62, precision=precision)
    return time.perf_counter() - t0


def prediction_rounds(channels: int, block_zyx: list[int], rounds: int) -> None:
    torch.manual_seed(0)
    net = UNet(channels, 3, base_channels=8, depth=3, padding="same", norm="batch")
    net.eval().to(memory_format=torch.channels_last_3d)
    block = np.random.default_rng(1).random((channels, *block_zyx), dtype=np.float32)
    voxels = float(np.prod(block_zyx))
    one_prediction(net, block[:, :16], "fp32")  # warm-up
    one_prediction(net, block[:, :16], "bf16")
    ratios = []
    for r in range(rounds):
        fp32 = one_prediction(net, block, "fp32")
        bf16 = one_prediction(net, block, "bf16")
        ratios.append(fp32 / bf16)
        print(
            f"prediction round {r + 1}: fp32 {voxels / fp32 / 1e6:.3f} Mvoxel/s, "
            f"bf16 {voxels / bf16 / 1e6:.3f} Mvoxel/s, {ratios[-1]:.2f}x"
        )
    print(
        f"prediction of {'x'.join(map(str, block_zyx))} voxels, bf16 vs fp32, median of "
        f"{rounds} rounds: {statistics.median(ratios):.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=6, help="image + forest probabilities")
    ap.add_argument(
        "--block", type=int, nargs=3, default=[96, 176, 256], help="predicted block (z y x)"
    )
    ap.add_argument("--skip-training", action="store_true", help="only the prediction rounds")
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
    if not args.skip_training:
        training_rounds(args, tiles)
    prediction_rounds(args.channels, args.block, args.rounds)


def training_rounds(args: argparse.Namespace, tiles: PlaneTiles) -> None:
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
