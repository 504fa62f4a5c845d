"""Learning-rate schedules for ``scheduler=`` (layer 1: plain functions of an optimiser)."""

from __future__ import annotations

import torch


def one_cycle(
    optimizer: torch.optim.Optimizer, *, max_lr: float, total_steps: int, warmup: float = 0.1
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle rate for ``total_steps`` optimiser steps: linear warm-up from ``max_lr / 25`` to
    ``max_lr`` over the first ``warmup`` share of the steps (at least two steps, so that a run of a
    handful of steps works too), then a cosine decay to ``max_lr / 25e4`` at the last step.
    Momentum is left alone (Adam's betas, SGD's momentum stay as configured)."""
    if total_steps < 1:
        raise ValueError(f"the one-cycle schedule needs trainer.max_steps >= 1, got {total_steps}")
    if not 0.0 < warmup < 1.0:
        raise ValueError(f"scheduler.warmup must lie in (0, 1), got {warmup}")
    steps = max(int(total_steps), 4)  # OneCycleLR needs two steps in each phase
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=float(max_lr),
        total_steps=steps,
        pct_start=min(max(warmup, 2.0 / steps), 0.5),
        anneal_strategy="cos",
        cycle_momentum=False,
    )
