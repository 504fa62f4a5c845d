"""Which process this is, and where collectives run, for multi-process training (layer 1).

Plain ``torch.distributed`` queries, no Lightning: entry points use them after a DDP ``fit``
(when Lightning's objects no longer describe the process group's device) and in code that runs
on every rank but should write outputs once.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

#: Environment variables launchers set to the global rank (torchrun, SLURM, LSF).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """Rank of this process in the default process group, or from the launcher's environment
    before one exists; 0 for a single process."""
    if _initialised():
        return int(dist.get_rank())
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def is_global_zero() -> bool:
    """Whether this is the process that writes outputs (rank 0, or the only process)."""
    return global_rank() == 0


def collective_device(default: torch.device) -> torch.device:
    """Device of the tensors the default process group's collectives take.

    NCCL only moves CUDA tensors (the current CUDA device of the process), gloo and MPI CPU
    tensors; a group with both backends (``"cpu:gloo,cuda:nccl"``) and a single process take
    ``default`` (the training device).
    """
    if not _initialised():
        return default
    backend = str(dist.get_backend()).lower()
    if "," in backend or ":" in backend:  # one backend per device type
        return default
    if backend == "nccl":
        if default.type == "cuda":
            return default
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["RANK_VARIABLES", "collective_device", "global_rank", "is_global_zero"]
