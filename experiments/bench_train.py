"""Training step speed: fp32 vs bf16-mixed vs channels-last 3D (vs torch.compile), side by side.

One training step of ``preset=cpu`` (the paper's 3D U-Net at 8 base channels, depth 3, input
tile 68 x 84 x 84 -> output 28 x 44 x 44, batches of 2 tiles, the masked weighted cross-entropy,
Adam) on random tiles, timed for each configuration in turn, round after round, in one process,
so that every ratio compares steps measured under the same machine load:

* ``fp32``: what ``trainer.precision=32-true`` does today;
* ``bf16-mixed``: bfloat16 autocast around the forward and the loss, as Lightning's
  ``bf16-mixed`` does (weights and optimiser in float32);
* ``channels-last``: the network and the input in ``torch.channels_last_3d`` memory layout, fp32;
* ``channels-last+bf16``: both;
* ``compile``, ``compile+channels-last``, ``compile+channels-last+bf16``: ``torch.compile`` of
  the network (with ``--compile``; in a child process with a time limit, which times the eager
  configurations beside them; bf16 only where the CPU computes it natively).

GFLOP/s: floating-point operations of one step (forward and backward, counted by
``torch.utils.flop_counter``) per second. The CPU's capability and bf16 flags are printed.

    python experiments/bench_train.py --threads 1 --rounds 5 --steps 3 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sparse3d.atomic import write_text_atomic
from sparse3d.inference.precision import cpu_has_native_bf16
from sparse3d.losses import MaskedCrossEntropy
from sparse3d.models import UNet

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.md"
CONFIGS = ("fp32", "bf16-mixed", "channels-last", "channels-last+bf16")
#: the same network's inference (forward only, eval mode, no gradient) beside training
INFER = ("inference fp32", "inference channels-last+bf16")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Step:
    """One configuration's training step on fixed random tiles ``(B, 3, 68, 84, 84)``."""

    def __init__(self, config: str, norm: str, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = UNet(3, 3, base_channels=8, depth=3, norm=norm)
        self.bf16 = "bf16" in config
        self.infer = config.startswith("inference")
        fmt = torch.channels_last_3d if "channels-last" in config else None
        tile = (68, 84, 84)
        out = self.net.output_shape(tile)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 3, *tile, generator=g)
        self.y = torch.randint(0, 4, (batch, *out), generator=g)  # 3 = unlabelled (1/4)
        if fmt is not None:
            self.net = self.net.to(memory_format=fmt)
            self.x = self.x.contiguous(memory_format=fmt)
        self.model = torch.compile(self.net) if config.startswith("compile") else self.net
        self.loss = MaskedCrossEntropy(3, 3, [2.4, 0.55, 0.05])
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        if self.infer:
            self.net.eval()

    def __call__(self) -> tuple[float, float]:
        """``(wall seconds, CPU seconds of this process)`` of one step."""
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        t0, c0 = time.perf_counter(), time.process_time()
        if self.infer:
            with torch.no_grad(), ctx:
                self.model(self.x)
            return time.perf_counter() - t0, time.process_time() - c0
        self.opt.zero_grad(set_to_none=True)
        with ctx:
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        if self.infer:
            with counter, torch.no_grad():
                self.net(self.x)
            return int(counter.get_total_flops())
        with counter:
            self.loss(self.net(self.x), self.y).backward()
        self.opt.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def measure(configs, args) -> dict:
    """Wall and CPU seconds per step of each configuration (``times``, ``cpu``: median of
    ``steps`` steps, per round), ``rounds`` alternating rounds."""
    steps = {c: Step(c, args.norm, args.batch) for c in configs}
    t_warm = {}
    for c, s in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            s()
        t_warm[c] = time.perf_counter() - t0
        print(f"  {c}: warm-up {t_warm[c]:.1f} s", flush=True)
    times: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c, s in steps.items():
            wall, used = zip(*(s() for _ in range(args.steps)), strict=True)
            times[c].append(statistics.median(wall))
            cpu[c].append(statistics.median(used))
        print(f"  round {r + 1}: " + ", ".join(f"{c} {times[c][-1]:.3f} s ({cpu[c][-1]:.3f} "
              "CPU s)" for c in configs), flush=True)  # fmt: skip
    flops = {c: s.flops() for c, s in steps.items()}
    return {"times": times, "cpu": cpu, "warmup": t_warm, "flops": flops}


def compile_configs() -> tuple[str, ...]:
    """Eager and compiled side by side: fp32, channels-last, and (where the CPU computes bf16
    natively) channels-last+bf16, the layout and precision ``preset=cpu`` trains in."""
    bf16 = cpu_has_native_bf16() and torch.backends.cpu.get_cpu_capability() != "AVX2"
    eager = ["fp32", "channels-last"] + (["channels-last+bf16"] if bf16 else [])
    return tuple(x for c in eager for x in (c, "compile" if c == "fp32" else f"compile+{c}"))


def compile_worker(args) -> None:
    torch.set_num_threads(args.threads)
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        # ATen restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2 on a bigger CPU): compiled kernels
        # must use AVX2's 256-bit vectors too, as they do on an AVX2-only CPU by themselves
        # (AVX-512 code beside ATen's AVX2 kernels crashes)
        import torch._inductor.config as inductor

        inductor.cpp.simdlen = 256
    out = measure(compile_configs(), args)
    print("RESULT " + json.dumps(out), flush=True)


def run_compile(args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker-compile", *sys.argv[1:]]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        print(f"  compile: no result within {args.compile_timeout:.0f} s", flush=True)
        return {"error": f"no result within {args.compile_timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
        print("  " + line, flush=True)
    err = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": err[:200]}


def _ratio_rows(res: dict, base: str) -> list[tuple]:
    """Per configuration: median wall s, its speed-up over ``base`` (median of the per-round
    ratios: each round's steps ran under the same load), median CPU s, its speed-up, GFLOP/s
    (of CPU time: the work rate of the thread(s), whatever else runs on the machine)."""
    rows = []
    for c in res["times"]:
        speed = []
        for key in ("times", "cpu"):
            ts, bs = res[key][c], res[key][base]
            ratios = [b / t for b, t in zip(bs, ts, strict=True)]
            speed.append((statistics.median(ts), statistics.median(ratios)))
        (wall, r_wall), (cpu, r_cpu) = speed
        rows.append((c, wall, r_wall, cpu, r_cpu, res["flops"][c] / cpu / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--norm", default="batch", choices=("batch", "none"))
    ap.add_argument("--compile", action="store_true", help="also torch.compile (child process)")
    ap.add_argument("--compile-timeout", type=float, default=900.0)
    ap.add_argument("--worker-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS, help="file, or folder for bench_train.md")
    args = ap.parse_args()
    if args.worker_compile:
        compile_worker(args)
        return
    torch.set_num_threads(args.threads)
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    head = (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{args.threads} thread(s); get_cpu_capability() = {cap}; bf16 flags: "
        f"{', '.join(f for f in flags if 'bf16' in f or 'amx' in f) or 'none'} "
        f"(all listed: {', '.join(flags)}); native bf16 (sparse3d.inference.precision): "
        f"{cpu_has_native_bf16()}"
    )
    print(head, flush=True)
    load0 = os.getloadavg()[0]
    res = measure(CONFIGS + INFER, args)
    comp = run_compile(args) if args.compile else None
    load1 = os.getloadavg()[0]
    lines = [
        "| configuration | wall s / step | speed vs fp32, wall | CPU s / step | speed vs fp32, "
        "CPU | GFLOP/s (CPU time) | warm-up wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, wall, r_wall, cpu, r_cpu, gf in _ratio_rows(res, "fp32"):
        lines.append(
            f"| {c} | {wall:.3f} | {r_wall:.2f}x | {cpu:.3f} | {r_cpu:.2f}x | {gf:.1f} | "
            f"{res['warmup'][c]:.1f} |"
        )
    if comp is not None and "times" in comp:
        for c, wall, r_wall, cpu, r_cpu, gf in _ratio_rows(comp, "fp32"):
            lines.append(
                f"| {c} (compile process) | {wall:.3f} | {r_wall:.2f}x | {cpu:.3f} | "
                f"{r_cpu:.2f}x | {gf:.1f} | {comp['warmup'][c]:.1f} |"
            )
    elif comp is not None:
        lines.append(f"| torch.compile | failed: {comp['error']} | | | | | |")
    cmd = "python experiments/bench_train.py " + " ".join(sys.argv[1:])
    text = f"""# Training step speed (issue 19)

{head}. Run {time.strftime("%Y-%m-%d %H:%M")}; 1-minute load average {load0:.1f} at the start,
{load1:.1f} at the end (a shared machine).

One `preset=cpu` training step: 3D U-Net (norm={args.norm}, 8 base channels, depth 3), batch of
{args.batch} tiles 68 x 84 x 84 -> 28 x 44 x 44, masked weighted cross-entropy, Adam. {args.rounds}
alternating rounds, median of {args.steps} steps per configuration and round, after
{args.warmup} warm-up steps. One step: {res["flops"]["fp32"] / 1e9:.1f} GFLOP (forward + backward).
The inference rows time the same network's forward pass of the same batch (eval mode, no
gradient; {res["flops"][INFER[0]] / 1e9:.1f} GFLOP), so training and inference GFLOP/s compare.
Speeds are medians of per-round ratios; the CPU-time columns (`time.process_time()`, this
process's threads) are the fair comparison on a busy machine, wall time is what a user waits.
The compile rows come from a child process that times the eager configurations beside them,
speeds against that process's own fp32 (their warm-up includes the compilation).

{chr(10).join(lines)}

    {cmd}
"""
    out = args.out / RESULTS.name if args.out.is_dir() else args.out
    write_text_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
