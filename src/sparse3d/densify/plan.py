"""How much memory a blockwise densify run needs, and the block size that fits a budget
(layer 1: arithmetic only).

The model counts what each process holds at its peak:

* every worker: the interpreter with numpy, SciPy and scikit-learn loaded
  (:data:`WORKER_BYTES`), one forest (:func:`forest_bytes`) and one block's working set: the
  block grown by its halo times the bytes the filters hold per voxel (the image and about 18
  float32 temporaries of one channel at one scale), plus its core times the features and the
  forest's buffers;
* the main process: the interpreter with torch (:data:`MAIN_BYTES`), the labelled voxels'
  indices and the training rows.

``experiments/densify_scaling.py`` checks it against the measured peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sparse3d.densify.blocks import block_for_budget

#: resident bytes of an idle worker process with densify's modules imported
WORKER_BYTES = 350 * 2**20
#: resident bytes of the main process before the volume's data (torch, Lightning, Hydra loaded)
MAIN_BYTES = 900 * 2**20
#: float32 temporaries per voxel of the grown block while one channel is filtered at one scale
#: (measured: a 176^3 core with its 30-voxel halo peaks at 17 per grown voxel over its features;
#: each scale filters only what it reads and cuts every axis after its pass)
FILTER_TEMPORARIES = 18
#: bytes per input voxel of one forward pass of refine's network (8 base channels, depth 3,
#: same-padded; measured 390-550 over 96^3-128^3 inputs, with the test-time flips' sum)
NET_BYTES_PER_VOXEL = 600
#: default budget: this fraction of the available memory, at most DEFAULT_BUDGET_CAP
DEFAULT_BUDGET_FRACTION = 0.5
DEFAULT_BUDGET_CAP = 8 * 10**9


def forest_bytes(n_trees: int, num_classes: int, samples_per_class: int) -> int:
    """Estimated size of a fully grown forest: about one node per two training voxels, each
    node 64 bytes plus a float64 value per class."""
    n_train = num_classes * samples_per_class
    return int(n_trees * (n_train / 2) * (64 + 8 * num_classes))


def block_bytes_per_voxel(channels: int, features: int, classes: int) -> tuple[float, float]:
    """``(per grown voxel, per core voxel)`` bytes of one block's working set: the image and the
    filters' temporaries over the grown block; the features and the class probabilities over
    its core (the forest reads the features in chunks of a quarter million voxels)."""
    grown = 4.0 * (channels + FILTER_TEMPORARIES)
    core = 4.0 * (features + 4 * classes)
    return grown, core


@dataclass(frozen=True)
class Plan:
    """A run's block size and what it will take: ``peak_bytes`` over all processes."""

    block: tuple[int, int, int]
    n_blocks: int
    workers: int
    peak_bytes: int
    budget_bytes: int
    #: the blocks run as threads of the main process, which keeps every block's filter
    #: features between passes (the whole volume's fit half the budget)
    keep_features: bool = False

    def line(self) -> str:
        """``~3.1 GB peak, 48 blocks of 128x128x128, 2 workers (budget 8.0 GB)``."""
        b = "x".join(str(n) for n in self.block)
        w = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        if self.keep_features:
            w = f"{self.workers} thread{'s' if self.workers != 1 else ''}, features kept"
        return (
            f"~{self.peak_bytes / 1e9:.1f} GB peak, {self.n_blocks} block"
            f"{'s' if self.n_blocks != 1 else ''} of {b}, {w} "
            f"(budget {self.budget_bytes / 1e9:.1f} GB)"
        )


def plan_blocks(
    shape: Sequence[int],
    channels: int,
    features: int,
    classes: int,
    halo: Sequence[int],
    workers: int,
    budget_bytes: int,
    forest: int,
    main_extra: int = 0,
    largest: int = 256,
    block: Sequence[int] | None = None,
    in_process: bool = False,
) -> Plan:
    """The largest block (sides multiples of 16, at most ``largest``) for which ``workers``
    workers, each holding a forest of ``forest`` bytes and one block, plus the main process
    (with ``main_extra`` bytes of its own data) stay within ``budget_bytes``.

    ``block``: the user's own block size instead (checked against the budget alike).
    ``in_process``: the workers are threads of the main process (one interpreter, one forest);
    ``main_extra`` then includes the kept features.

    Raises ValueError (one line, saying what budget would do) when none fits.
    """
    grown, core = block_bytes_per_voxel(channels, features, classes)
    per_process = 0 if in_process else WORKER_BYTES + forest
    fixed = workers * per_process + MAIN_BYTES + main_extra + (forest if in_process else 0)
    per_worker = (budget_bytes - fixed) / workers

    def cost(side: Sequence[int]) -> float:
        sides = [min(int(s), int(n)) for s, n in zip(side, shape, strict=True)]
        big = math.prod(min(s + 2 * h, n) for s, h, n in zip(sides, halo, shape, strict=True))
        return big * grown + math.prod(sides) * core

    smallest = cost((16, 16, 16))
    if per_worker < smallest:
        need = fixed + workers * smallest
        raise ValueError(
            f"memory_budget={budget_bytes / 1e9:.1f}GB is too small for {workers} worker(s): "
            f"this volume needs at least {math.ceil(need / 1e8) / 10:.1f}GB; raise "
            f"memory_budget or use fewer workers (cluster.n_workers=1)"
        )
    if block is None:
        block = block_for_budget(
            shape, cost, per_worker, multiple=16, largest=largest, halo=halo, workers=workers
        )
    else:
        block = tuple(min(int(b), int(n)) for b, n in zip(block, shape, strict=True))
        if cost(block) > per_worker:
            raise ValueError(
                f"block={list(block)} needs {cost(block) / 1e9:.1f}GB per worker, more than "
                f"memory_budget leaves each ({per_worker / 1e9:.1f}GB): use smaller blocks"
            )
    n_blocks = math.prod(math.ceil(n / b) for n, b in zip(shape, block, strict=True))
    used = min(workers, n_blocks)
    peak = fixed - (workers - used) * per_process + used * cost(block)
    return Plan(block, n_blocks, used, int(peak), int(budget_bytes), in_process)


def network_pass_voxels(plan: Plan, cap: int) -> int:
    """Voxels one worker may give refine's network in one forward pass (at most ``cap``): a
    block larger than that is predicted in overlapping slabs (same result), so the network's
    activations stay within the worker's share of the budget."""
    share = (plan.budget_bytes - MAIN_BYTES) / max(1, plan.workers)
    if not plan.keep_features:
        share -= WORKER_BYTES
    return int(max(1 << 18, min(int(cap), share // NET_BYTES_PER_VOXEL)))
