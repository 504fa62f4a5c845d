"""What a user with a GPU hits first, measured in one run of at most about five minutes.

    python experiments/gpu_check.py                 # on a machine with a CUDA GPU
    python experiments/gpu_check.py --dry           # the same code paths on the CPU, tiny sizes

Sections, each independent (one that fails is reported and the others still run):

1. device and versions (GPU, memory, torch, CUDA, cuDNN, Lightning);
2. training tiles/s through ``python -m sparse3d.train`` with ``preset=paper`` (the paper's
   116 x 132 x 132 tiles and network, full-size synthetic data, a few dozen steps), as shipped
   (``32-true``) and with the fast settings (``bf16-mixed``, ``cudnn.benchmark``);
3. GPU-only step time of the paper network on a resident tile (forward, loss, backward, SGD
   step), fp32, bf16 autocast, and bf16 with channels-last memory layout;
4. a ``trainer=ddp trainer.devices=1`` run through the command line to ``metrics.json`` (the
   NCCL path after ``fit``);
5. the predictor on the test volume with the network trained in 2: fp32 as one tile, bf16, and
   the paper's tiles with recalibrated and with per-tile (paper) BN statistics: agreement of the
   labels with fp32, seconds, peak GPU memory;
6. the CUDA tests (``pytest -m gpu``).

``--dry`` runs every section on the CPU with the smoke preset and a small network, so that the
script keeps working between GPU runs (a test runs it). A missing dependency is named in one
line before anything runs. The report goes to ``experiments/results/gpu_check_<device>.md``
(``--out`` elsewhere) and to stdout.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
#: import name -> what to install
DEPENDENCIES = {
    "torch": "torch",
    "lightning": "lightning",
    "torchmetrics": "torchmetrics",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "monai": "monai",
    "h5py": "h5py",
    "numpy": "numpy",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "pytest": "pytest",
    "sparse3d": "sparse3d (pip install -e . in the repository)",
}


def missing_dependencies() -> list[str]:
    missing = []
    for module, package in DEPENDENCIES.items():
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or a broken install that fails on import
            missing.append(package)
    return missing


class Sizes:
    """What differs between a GPU run and a dry run."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.scale = 0.25 if dry else 1.0
        self.preset = "smoke" if dry else "paper"
        self.steps = 3 if dry else 30
        self.accelerator = ["trainer.accelerator=cpu"] if dry else []
        # the network of the GPU-only step: the paper's, or a small one on the CPU
        self.net = {"base_channels": 4, "depth": 3} if dry else {"base_channels": 32, "depth": 4}
        self.step_output_tile = (4, 4, 4) if dry else (28, 44, 44)  # output tile of one step
        # output tile of the predictor's paper-style tiles
        self.predict_output_tile = (16, 32, 32) if dry else (28, 44, 44)
        self.timed_steps = 2 if dry else 10
        self.timeout = 300 if dry else 240


# -- helpers ---------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}


def _run(args: list[str], timeout: int, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd or REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> str:
    import torch

    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def device_slug(dry: bool) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    return "cpu-dry" if dry else slug


# -- 1 ---------------------------------------------------------------------------------------
def section_versions(sizes: Sizes, work: Path) -> str:
    import lightning
    import torch

    rows = [
        ("device", device_name()),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("lightning", lightning.__version__),
        ("CUDA (torch build)", str(torch.version.cuda)),
        ("cuDNN", str(torch.backends.cudnn.version())),
        ("CPU cores", str(os.cpu_count())),
    ]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows += [
            ("GPU memory", f"{p.total_memory / 2**30:.1f} GiB"),
            ("compute capability", f"{p.major}.{p.minor}"),
            ("bf16 supported", str(torch.cuda.is_bf16_supported())),
            ("GPUs", str(torch.cuda.device_count())),
        ]
    return _table(["", "value"], rows)


def _table(header: list[str], rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# -- 2 ---------------------------------------------------------------------------------------
def _train_cli(sizes: Sizes, work: Path, name: str, extra: list[str]) -> dict:
    """One training run through the command line; tiles/s from its CSV log."""
    runs = work / "runs" / name
    args = [
        sys.executable,
        "-m",
        "sparse3d.train",
        "experiment=full_auto",
        "fold=1",
        f"preset={sizes.preset}",
        "logger=none",
        f"data.root={work / 'data'}",
        f"data.scale={sizes.scale}",
        f"runs_root={runs}",
        f"trainer.max_steps={sizes.steps}",
        "trainer.log_every_n_steps=1",
        f"data.samples_per_epoch={max(sizes.steps, 4)}",
        "checkpoint_every_n_steps=100000",
        *sizes.accelerator,
        *extra,
    ]
    t0 = time.perf_counter()
    r = _run(args, sizes.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {_tail(r.stderr)}")
    metrics_file = next(runs.rglob("metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    rates = []
    log = metrics_file.parent / "csv" / "metrics.csv"
    if log.is_file():
        with open(log) as f:
            for row in csv.DictReader(f):
                v = row.get("train/tiles_per_s")
                if v:
                    rates.append((int(row.get("step") or 0), float(v)))
    warm = [v for s, v in rates if s >= min(5, sizes.steps - 1)] or [v for _, v in rates]
    return {
        "run": metrics_file.parent,
        "tiles_per_s": statistics.median(warm) if warm else float("nan"),
        "wall": wall,
        "metrics": metrics,
    }


def section_training(sizes: Sizes, work: Path, state: dict) -> str:
    from sparse3d.data.synth import generate_benchmark

    t0 = time.perf_counter()
    folder = work / "data" if sizes.scale == 1.0 else work / "data" / f"scale{sizes.scale:g}"
    generate_benchmark(folder, scale=sizes.scale, seed=0, previews=False)
    gen = time.perf_counter() - t0
    settings = {
        "as shipped (32-true)": [],
        "fast (bf16-mixed, cudnn.benchmark)": [
            "trainer.precision=bf16-mixed",
            "++trainer.benchmark=true",
        ],
    }
    rows = []
    for label, extra in settings.items():
        res = _train_cli(sizes, work, re.sub(r"\W+", "_", label), extra)
        state.setdefault("trained", res["run"])
        held = (res["metrics"].get("heldout") or {}).get("mean")
        rows.append(
            (
                label,
                f"{res['tiles_per_s']:.2f}",
                f"{res['wall']:.0f}",
                "n/a" if held is None else f"{held:.3f}",
            )
        )
    head = (
        f"`python -m sparse3d.train experiment=full_auto fold=1 preset={sizes.preset}`, "
        f"{sizes.steps} steps, synthetic data at scale {sizes.scale:g} (generated in {gen:.0f} s); "
        "tiles/s is the median of the logged per-step rate after warm-up; wall seconds include "
        "start-up, the evaluation after training and writing the run folder. Channels-last is "
        "not a training option yet (section 3 measures it)."
    )
    return head + "\n\n" + _table(["setting", "tiles/s", "wall s", "held-out IoU"], rows)


# -- 3 ---------------------------------------------------------------------------------------
def _train_step(net, opt, loss_fn, x, y, bf16: bool) -> None:
    """One training step: forward (bf16 autocast or not), loss, backward, optimiser step."""
    import torch

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def section_step_time(sizes: Sizes, work: Path) -> str:
    import torch

    from sparse3d.losses import MaskedCrossEntropy
    from sparse3d.models import UNet

    device = _device()
    torch.backends.cudnn.benchmark = True
    rows = []
    for label, bf16, channels_last in (
        ("fp32", False, False),
        ("bf16 autocast", True, False),
        ("bf16 + channels-last", True, True),
    ):
        torch.manual_seed(0)
        net = UNet(3, 3, **sizes.net).to(device)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        input_tile = net.input_shape_for_output(sizes.step_output_tile)
        x = torch.randn(1, 3, *input_tile, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 4, (1, *sizes.step_output_tile), device=device)
        loss_fn = MaskedCrossEntropy(3, 3)
        opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99)
        _reset_peak(device)
        for _ in range(2):
            _train_step(net, opt, loss_fn, x, y, bf16)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(sizes.timed_steps):
            _train_step(net, opt, loss_fn, x, y, bf16)
        _sync(device)
        ms = 1000 * (time.perf_counter() - t0) / sizes.timed_steps
        rows.append((label, "x".join(map(str, input_tile)), f"{ms:.1f}", _peak_gib(device)))
        del net, opt, x, y
    torch.backends.cudnn.benchmark = False
    return (
        f"UNet(3, 3, {sizes.net}) on {device.type}, batch 1, cudnn.benchmark on, "
        f"{sizes.timed_steps} timed steps after 2 warm-up steps.\n\n"
        + _table(["precision", "input tile", "ms/step", "peak GiB"], rows)
    )


# -- 4 ---------------------------------------------------------------------------------------
def section_ddp(sizes: Sizes, work: Path) -> str:
    runs = work / "runs" / "ddp"
    args = [
        sys.executable,
        "-m",
        "sparse3d.train",
        "preset=smoke",
        "logger=none",
        "trainer=ddp",
        "trainer.devices=1",
        f"data.root={work / 'data'}",
        f"runs_root={runs}",
        *sizes.accelerator,
    ]
    t0 = time.perf_counter()
    r = _run(args, sizes.timeout)
    wall = time.perf_counter() - t0
    found = list(runs.rglob("metrics.json"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"exit {r.returncode}, no metrics.json: {_tail(r.stderr)}")
    m = json.loads(found[0].read_text())
    return (
        "`python -m sparse3d.train preset=smoke logger=none trainer=ddp trainer.devices=1`: "
        f"metrics.json written in {wall:.0f} s; world_size {m.get('world_size')}, "
        f"ranks_in_sync {m.get('ranks_in_sync')}, steps {m.get('steps')}."
    )


# -- 5 ---------------------------------------------------------------------------------------
def section_predictor(sizes: Sizes, work: Path, state: dict) -> str:
    import numpy as np

    from sparse3d.checkpoint import load_model
    from sparse3d.data.volume import load_volume
    from sparse3d.inference import Predictor

    run = state.get("trained")
    if run is None:
        raise RuntimeError("no trained network (section 2 failed)")
    net, meta = load_model(Path(run) / "model.pt")
    split = json.loads((Path(run) / "split.json").read_text())
    name = sorted(split["test"])[0]
    folder = work / "data" if sizes.scale == 1.0 else work / "data" / f"scale{sizes.scale:g}"
    image = load_volume(folder / f"{name}.h5").image
    device = _device()
    input_tile = net.input_shape_for_output(sizes.predict_output_tile)
    configs = [
        ("fp32, tile from the budget", {"precision": "fp32"}),
        ("bf16, tile from the budget", {"precision": "bf16"}),
        (
            f"fp32, tiles {'x'.join(map(str, input_tile))}, recalibrated BN",
            {"input_tile": input_tile},
        ),
        (
            f"fp32, tiles {'x'.join(map(str, input_tile))}, per-tile BN (paper)",
            {"input_tile": input_tile},
        ),
    ]
    rows, reference = [], None
    for i, (label, kw) in enumerate(configs):
        kw = {"precision": "fp32", "progress": False, "device": device.type, **kw}
        if i == 3:
            kw["bn_mode"] = "batch"
        p = Predictor(net, meta, **kw)
        _reset_peak(device)
        t0 = time.perf_counter()
        labels, _ = p.predict_array(image)
        _sync(device)
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = labels
        agree = float(np.mean(labels == reference))
        rep = p.last_report
        rows.append(
            (
                label,
                f"{rep.num_tiles} ({'x'.join(map(str, rep.grid_zyx))})",
                rep.bn_mode,
                f"{agree:.5f}",
                f"{seconds:.2f}",
                _peak_gib(device),
            )
        )
    return (
        f"The network of section 2 ({meta.net.get('base_channels')} base channels) on test volume "
        f"{name} {tuple(image.shape)}; agreement = fraction of voxels labelled as by the first "
        "row.\n\n"
        + _table(["configuration", "tiles", "BN", "agreement", "seconds", "peak GiB"], rows)
    )


# -- 6 ---------------------------------------------------------------------------------------
def section_cuda_tests(sizes: Sizes, work: Path) -> str:
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    r = _run(args, sizes.timeout)
    last = _tail(r.stdout, 1)
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    text = f"`pytest -m gpu`: {last} (exit {r.returncode})"
    if failed:
        text += "\n\n" + "\n".join(f"- {line}" for line in failed)
    return text


# -- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes (keeps the script alive)")
    ap.add_argument("--out", type=Path, default=None, help="report file (markdown)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    args = ap.parse_args(argv)

    missing = missing_dependencies()
    if missing:
        print(f"gpu_check: missing dependencies: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); use --dry")
        return 2
    sizes = Sizes(args.dry)
    out = args.out or RESULTS / f"gpu_check_{device_slug(args.dry)}.md"
    state: dict = {}
    sections: list[tuple[str, Callable[[], str]]] = [
        ("1. Device and versions", lambda: section_versions(sizes, work)),
        ("2. Training throughput", lambda: section_training(sizes, work, state)),
        ("3. GPU-only step time", lambda: section_step_time(sizes, work)),
        ("4. DDP on one device", lambda: section_ddp(sizes, work)),
        ("5. Predictor", lambda: section_predictor(sizes, work, state)),
        ("6. CUDA tests", lambda: section_cuda_tests(sizes, work)),
    ]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        parts = [
            f"# GPU check: {device_name()}{' (dry run on the CPU)' if args.dry else ''}",
            f"`python experiments/gpu_check.py{' --dry' if args.dry else ''}`, "
            f"{time.strftime('%Y-%m-%d')}.",
        ]
        failures = 0
        for title, run in sections:
            t0 = time.perf_counter()
            try:
                body = run()
            except Exception as err:  # report and go on: the other sections still tell something
                failures += 1
                body = f"**failed**: {type(err).__name__}: {str(err).strip()[:2000]}"
            parts += [f"## {title}", body, f"_{time.perf_counter() - t0:.0f} s_"]
            print(f"[gpu_check] {title}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        parts.append(f"Total {time.perf_counter() - t_start:.0f} s, {failures} section(s) failed.")
    report = "\n\n".join(parts) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"[gpu_check] report: {out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
