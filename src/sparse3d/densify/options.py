"""The options of ``python -m sparse3d.densify``, typed (layer 0: dataclasses only).

Each block of ``conf/densify.yaml`` (``rf:``, ``refine:``, ``cluster:``) has its schema here,
registered in Hydra's ConfigStore by the entry point, so a wrong type or an unknown key fails
when the command line is parsed; ranges are checked in ``__post_init__`` when the entry point
turns the block into its dataclass (``OmegaConf.to_object``), before any work. The defaults
live here and only here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

AXES = ("z", "y", "x")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not math.isfinite(value) or not ok:
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {need}, got {value!r}")


def _fraction(name: str, value: float, low_open: bool = False) -> None:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


@dataclass
class RfOptions:
    """``rf:`` — the random forest on filter features (ilastik-style)."""

    #: scales of the filter features, in voxels of the finest axis (isotropic in micrometres)
    sigmas: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.6, 3.5, 5.0])
    n_trees: int = 100
    #: null: trees grow until their leaves are pure
    max_depth: int | None = None
    #: training voxels drawn at random per class (all when fewer are annotated)
    samples_per_class: int = 20000
    seed: int = 0
    #: parallel jobs of the forest (-1: all cores)
    n_jobs: int = -1

    def __post_init__(self) -> None:
        if not self.sigmas:
            raise ValueError("rf.sigmas must list at least one scale")
        for s in self.sigmas:
            _positive("rf.sigmas", s)
        if self.n_trees < 1:
            raise ValueError(f"rf.n_trees must be >= 1, got {self.n_trees}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"rf.max_depth must be null or >= 1, got {self.max_depth}")
        if self.samples_per_class < 1:
            raise ValueError(f"rf.samples_per_class must be >= 1, got {self.samples_per_class}")
        if self.n_jobs == 0 or self.n_jobs < -1:
            raise ValueError(f"rf.n_jobs must be -1 or >= 1, got {self.n_jobs}")

    def forest_kwargs(self) -> dict:
        """The keyword arguments of :class:`sparse3d.densify.forests.RandomForestSegmenter`."""
        return {
            "n_trees": self.n_trees,
            "max_depth": self.max_depth,
            "samples_per_class": self.samples_per_class,
            "seed": self.seed,
            "n_jobs": self.n_jobs,
        }


@dataclass
class RefineOptions:
    """``refine:`` — forests first (cross-fitted, auto-context), then a small 3D U-Net."""

    #: forest stages; each after the first also sees the smoothed probabilities of the last
    rf_stages: int = 2
    context_sigmas: list[float] = field(default_factory=lambda: [1.0, 3.0, 6.0])
    #: plane folds for the held-out probabilities on the annotated planes, and their forests' size
    folds: int = 3
    fold_trees: int = 30
    #: training steps of the network (0: stop after the forests); the run is step-bound, so the
    #: same inputs give the same result on a given machine
    max_steps: int = 400
    #: optional cap on the network's training, in wall seconds (null: max_steps only)
    time_budget_s: float | None = None
    base_channels: int = 8
    depth: int = 3
    #: input tile [z, y, x] of the (same-padded) refining network; shrunk to thin volumes
    input_tile: list[int] = field(default_factory=lambda: [32, 64, 64])
    batch_size: int = 2
    lr: float = 0.002
    #: forest probability a voxel needs to become a pseudo-label, and that term's weight
    pseudo_threshold: float = 0.8
    pseudo_weight: float = 0.3
    #: class-balanced pseudo-labels: each class also keeps at least this fraction of the voxels
    #: the forest gives it, its most confident ones, below the threshold (null: threshold only)
    pseudo_class_fraction: float | None = None
    #: weight of the forest in the final average with the network's softmax
    forest_weight: float = 0.5
    #: trainings of the network: each after the first learns from pseudo-labels of the previous
    #: round's average (self-training), a fresh network each time
    rounds: int = 1
    #: loss weights per class from the annotated voxels: null (all 1), balanced or sqrt
    class_weights: str | None = None
    #: training tile centres: voxel (any annotated voxel) or class (a class first, uniformly)
    centre_sampling: str = "voxel"
    #: axes along which training tiles are flipped at random ([] for none)
    flip_axes: list[str] = field(default_factory=lambda: ["z", "y", "x"])
    #: the paper's spatial augmentation of the training tiles (B-spline field, rotation, scaling)
    deform: bool = False
    #: test-time flips: average the network's softmax over the identity and a flip of each axis
    tta: bool = False
    #: voxels predicted in one pass (larger volumes go in overlapping z slabs)
    max_voxels_per_pass: int = 8000000
    #: the network's arithmetic, in training and prediction: fp32, bf16 (mixed: bf16
    #: convolutions, fp32 weights) or auto (bf16 where the CPU or GPU computes it natively:
    #: AVX-512 BF16, AMX, a CUDA GPU with bf16; fp32 elsewhere)
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rf_stages", "folds", "fold_trees", "base_channels", "depth", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"refine.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"refine.max_steps must be >= 0, got {self.max_steps}")
        if self.rounds < 1:
            raise ValueError(f"refine.rounds must be a whole number >= 1, got {self.rounds}")
        if self.time_budget_s is not None:
            _positive("refine.time_budget_s", self.time_budget_s)
        for s in self.context_sigmas:
            _positive("refine.context_sigmas", s)
        if len(self.input_tile) != 3 or min(self.input_tile) < 1:
            raise ValueError(
                f"refine.input_tile must be three positive sizes [z, y, x], got {self.input_tile}"
            )
        _positive("refine.lr", self.lr)
        _fraction("refine.pseudo_threshold", self.pseudo_threshold)
        _positive("refine.pseudo_weight", self.pseudo_weight, allow_zero=True)
        if self.pseudo_class_fraction is not None:
            _fraction("refine.pseudo_class_fraction", self.pseudo_class_fraction, low_open=True)
        _fraction("refine.forest_weight", self.forest_weight)
        if self.class_weights not in (None, "balanced", "sqrt"):
            raise ValueError(
                f"refine.class_weights must be null, balanced or sqrt, got {self.class_weights!r}"
            )
        if self.centre_sampling not in ("voxel", "class"):
            raise ValueError(
                f"refine.centre_sampling must be voxel or class, got {self.centre_sampling!r}"
            )
        if not set(self.flip_axes) <= set(AXES):
            raise ValueError(
                f"refine.flip_axes must be a list of z, y, x (or []), got {self.flip_axes}"
            )
        if self.max_voxels_per_pass < 1:
            raise ValueError("refine.max_voxels_per_pass must be >= 1")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"refine.precision must be fp32, bf16 or auto, got {self.precision!r}")


@dataclass
class ClusterOptions:
    """``cluster:`` — where the blockwise passes run (dask)."""

    #: local: a LocalCluster of worker processes on this machine; threads: this process only;
    #: slurm: dask-jobqueue's SLURMCluster (cluster=slurm); an address below overrides all three
    kind: str = "local"
    #: worker processes (local), threads (threads) or SLURM jobs (slurm); null: one per core
    n_workers: int | None = None
    #: tcp://host:8786 of a running dask scheduler to attach to
    address: str | None = None
    #: kind=local: null chooses (threads of this process keeping each block's features where the
    #: whole volume's fit half the budget, else worker processes); true: always worker processes
    processes: bool | None = None
    #: keyword arguments of dask_jobqueue.SLURMCluster (cluster=slurm)
    slurm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("local", "threads", "slurm"):
            raise ValueError(f"cluster.kind must be local, threads or slurm, got {self.kind!r}")
        if self.n_workers is not None and self.n_workers < 1:
            raise ValueError(f"cluster.n_workers must be null or >= 1, got {self.n_workers}")
        if self.address is not None and not re.match(r"^[a-z]+://", self.address):
            raise ValueError(
                f"cluster.address must look like tcp://host:8786, got {self.address!r}"
            )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"2GB"``, ``"1.5GiB"``, ``"500MB"`` or a number of bytes -> bytes (None stays None)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"memory_budget must look like 2GB, 1.5GiB or 500MB, got {text!r}")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory_budget must be positive, got {text!r}")
    return int(value)
