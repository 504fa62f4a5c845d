"""Device and numeric precision of prediction passes.

``precision="auto"`` picks bfloat16 autocast where the hardware computes it natively: a CUDA GPU
with bf16 support, or a CPU with AVX-512 BF16 or AMX. Elsewhere it picks float32: on a CPU without
those instructions bf16 convolutions fall back to slow reference kernels (a 3D convolution was
measured about 40x slower than float32 on an AVX2-only CPU).
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import AbstractContextManager, nullcontext

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has AVX-512 BF16 or AMX instructions."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - very old torch
        cap = ""
    if "AMX" in cap or "BF16" in cap:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def training_device(accelerator: str) -> torch.device:
    """The device a Lightning ``accelerator`` (auto, cpu, gpu, cuda) trains on."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where native (see module doc), else ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "bf16 on a CPU without AVX-512 BF16/AMX uses slow fallback kernels; "
                "precision='fp32' is much faster here"
            )
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def enable_cpu_huge_pages() -> bool:
    """Ask PyTorch to back large CPU tensors with transparent huge pages
    (``THP_MEM_ALLOC_ENABLE=1``) unless the variable is already set.

    A prediction pass allocates many fresh multi-GB activation tensors; with 4 KiB pages the first
    write to each page faults, which was measured at about 1 GB/s inside a VM, a sizeable part of a
    pass. Huge pages make that about 4x cheaper. Only affects allocations of 2 MiB and more, and
    only where the kernel allows THP (``madvise`` or ``always``). Returns whether it is enabled.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
