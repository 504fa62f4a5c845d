"""From densify's config to plain objects (layer 3): the typed options, the memory budget and
the dask engine, each checked before any work with a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import UserError
from sparse3d.densify.engine import Engine, available_memory, cpu_count, open_client
from sparse3d.densify.options import ClusterOptions, RefineOptions, RfOptions, parse_bytes
from sparse3d.densify.plan import DEFAULT_BUDGET_CAP, DEFAULT_BUDGET_FRACTION, Plan

log = logging.getLogger("sparse3d.densify")


def register_configs() -> None:
    """The schemas of ``rf:``, ``refine:`` and ``cluster:`` in Hydra's ConfigStore (the
    defaults list of ``conf/densify.yaml`` and ``conf/cluster/*.yaml`` names them)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="densify/rf", name="schema", node=RfOptions)
    cs.store(group="densify/refine", name="schema", node=RefineOptions)
    cs.store(group="cluster", name="base_cluster", node=ClusterOptions)


@dataclass(frozen=True)
class Options:
    """The typed options of one densify run."""

    method: str
    rf: RfOptions
    refine: RefineOptions
    cluster: ClusterOptions
    budget_bytes: int
    output_format: str
    block: tuple[int, int, int] | None = None


def read_options(cfg: DictConfig) -> Options:
    """``cfg``'s option blocks as dataclasses, ranges checked (UserError, one line)."""
    try:
        rf = OmegaConf.to_object(cfg.rf)
        refine = OmegaConf.to_object(cfg.refine)
        cluster = OmegaConf.to_object(cfg.cluster)
        budget = parse_bytes(cfg.get("memory_budget"))
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    fmt = str(cfg.get("output_format", "h5"))
    if fmt not in ("h5", "ome-zarr"):
        raise UserError(f"output_format must be h5 or ome-zarr, got {fmt!r}")
    block = cfg.get("block")
    if block is not None:
        block = list(block)
        if len(block) != 3 or any(not isinstance(b, int) or b < 16 for b in block):
            raise UserError(f"block must be null or three sizes >= 16 [z, y, x], got {block}")
        block = tuple(block)
    if budget is None:
        budget = int(min(DEFAULT_BUDGET_CAP, DEFAULT_BUDGET_FRACTION * available_memory()))
    assert isinstance(rf, RfOptions) and isinstance(refine, RefineOptions)
    assert isinstance(cluster, ClusterOptions)
    return Options(str(cfg.method), rf, refine, cluster, budget, fmt, block)


def workers_of(cluster: ClusterOptions) -> int:
    """Tasks that run at once: ``cluster.n_workers``, or one per core of this machine."""
    return int(cluster.n_workers or cpu_count())


def open_engine(
    cluster: ClusterOptions, workers: int, budget_bytes: int, plan: Plan, progress: bool
) -> tuple[Engine, Callable[[], None]]:
    """The engine of a run and the function that closes it.

    A single block runs in this process with every core (starting worker processes would only
    cost time), and so do blocks whose features the plan keeps in memory (threads); otherwise
    ``cluster.address`` attaches to a running scheduler, ``kind=slurm`` starts dask-jobqueue's
    cluster, ``kind=local`` a LocalCluster of ``workers`` processes sharing ``budget_bytes``,
    and ``kind=threads`` uses threads of this process.
    """
    from sparse3d.densify.plan import MAIN_BYTES

    local = cluster.address is None and cluster.kind != "slurm"
    if local and plan.n_blocks == 1:
        return Engine(None, 1, cpu_count(), progress), lambda: None
    if local and (plan.keep_features or cluster.kind == "threads"):
        return Engine(None, workers, max(1, cpu_count() // workers), progress), lambda: None
    kind = "address" if cluster.address else cluster.kind
    per_worker = max(256 * 2**20, (budget_bytes - MAIN_BYTES) // max(1, workers))
    try:
        client, close = open_client(kind, workers, per_worker, cluster.address, cluster.slurm)
    except (OSError, TimeoutError, ValueError) as err:
        raise UserError(f"cannot start the dask cluster ({kind}): {err}") from None
    link = getattr(client, "dashboard_link", None)
    if link:
        log.info("dask dashboard: %s", link)
    n = len(client.scheduler_info().get("workers", {})) or workers
    own = close if kind == "local" else None  # this machine's: in_this_process may close it
    return Engine(client, n, 1, progress, close_local=own), close


def summary_of(options: Options) -> dict[str, Any]:
    """The options as densify.json records them."""
    from dataclasses import asdict

    out: dict[str, Any] = {"rf": asdict(options.rf), "memory_budget_bytes": options.budget_bytes}
    if options.method == "refine":
        out["refine"] = asdict(options.refine)
    out["cluster"] = asdict(options.cluster)
    return out
