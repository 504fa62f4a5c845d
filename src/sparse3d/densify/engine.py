"""Where densify's blockwise passes run: dask, in this process or on a cluster (layer 1).

A pass is a list of ``dask.delayed`` tasks, one per block; each reads its grown region from the
volume's dask arrays (lazy readers of HDF5, Zarr, TIFF, NIfTI), writes its core into a chunked
store itself and returns a small summary (indices, feature rows of a few voxels, a confusion
matrix), as Cellpose's distributed segmentation does. Nothing returned to this process grows
with the volume.

:class:`Engine` runs a pass on a ``distributed`` client (a ``LocalCluster`` of worker processes,
a scheduler at an address, or a SLURM cluster through dask-jobqueue; see :func:`open_client`)
or, without one, on dask's threaded scheduler in this process. Either way a progress bar counts
the blocks and the result is the same (tested).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("sparse3d.densify")


@dataclass
class Engine:
    """Runs passes of ``dask.delayed`` tasks.

    Args:
        client: a ``distributed.Client`` (None: dask's threaded scheduler in this process).
        workers: tasks run at once (threads without a client; the cluster's workers with one).
        threads_per_task: threads each task may use for its filters and forest.
        progress: draw a progress bar per pass.
        on_progress: ``(pass name, fraction done)`` after each block (a viewer's progress bar).
        should_stop: polled after each block; True cancels the rest of the pass.
        close_local: closes ``client``'s cluster where it is a LocalCluster of this machine
            (None for any other engine); see :meth:`in_this_process`.
    """

    client: Any = None
    workers: int = 1
    threads_per_task: int = 1
    progress: bool = True
    on_progress: Callable[[str, float], None] | None = None
    should_stop: Callable[[], bool] | None = None
    close_local: Callable[[], None] | None = None

    def in_this_process(self) -> Engine:
        """The engine for passes that share the machine with work in this process (refine's
        network trains here): a LocalCluster of this machine is closed and its tasks run as
        as many threads of this process; any other engine is returned as it is.

        An idle LocalCluster is not free: its scheduler's event loop runs in this process and
        its worker processes keep waking, and on a 2-core machine that slowed each training
        step by 15-20 % and the network's prediction by ~1.6x (4 M voxels, 150 steps, 8 blocks:
        58.5-61.0 s against 50.8 s; ``experiments/results/densify_scaling.md``).
        """
        if self.client is None or self.close_local is None:
            return self
        self.close_local()
        log.info("the local cluster is closed: the next passes run as threads of this process")
        workers = max(1, self.workers)
        return replace(
            self, client=None, threads_per_task=max(1, cpu_count() // workers),
            close_local=None,
        )  # fmt: skip

    def share(self, obj: Any) -> Any:
        """``obj`` (a fitted forest, a network) as an argument of many tasks of a pass: sent
        to every worker once ahead of the pass on a cluster (not inside the task graph), one
        ``dask.delayed`` value otherwise."""
        if self.client is not None:
            return self.client.scatter(obj, broadcast=True, hash=False)
        import dask

        return dask.delayed(obj, pure=True)

    def fitting(self) -> Any:
        """Context in which a forest's ``fit`` runs: its trees spread over the cluster's workers
        (joblib's dask backend) when there is a cluster, so the fit does not stay the one step
        that a bigger cluster leaves as slow; this process's threads otherwise. The trees and
        their seeds are the same either way."""
        import contextlib

        if self.client is None:
            return contextlib.nullcontext()
        import joblib

        return joblib.parallel_backend("dask", wait_for_workers_timeout=60)

    def run(self, tasks: Sequence[Any], desc: str) -> list[Any]:
        """Compute ``tasks`` (``dask.delayed``), in order of the list; raises the first
        task's error, or ``InterruptedError`` when ``should_stop`` asked to stop."""
        if not tasks:
            return []
        t0 = time.perf_counter()
        if self.client is not None:
            out = self._run_client(tasks, desc)
        else:
            out = self._run_threads(tasks, desc)
        log.info("%s: %d block%s in %.1f s", desc, len(tasks), "s" * (len(tasks) > 1),
                 time.perf_counter() - t0)  # fmt: skip
        return out

    def _tick(self, bar: tqdm, desc: str, done: int, total: int) -> None:
        bar.update(1)
        if self.on_progress is not None:
            self.on_progress(desc, done / total)
        if self.should_stop is not None and self.should_stop():
            raise InterruptedError(f"stopped during {desc}")

    def _run_client(self, tasks: Sequence[Any], desc: str) -> list[Any]:
        from distributed import as_completed

        futures = self.client.compute(list(tasks))
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(futures)
        with tqdm(total=len(futures), desc=desc, unit="block", disable=not self.progress) as bar:
            try:
                for done, fut in enumerate(as_completed(futures), 1):
                    out[index[fut.key]] = fut.result()
                    self._tick(bar, desc, done, len(futures))
            except BaseException:
                self.client.cancel(futures)
                raise
        return out

    def _run_threads(self, tasks: Sequence[Any], desc: str) -> list[Any]:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        import dask

        # each task is computed on its own (its reads included), at most ``workers`` at once
        out: list[Any] = [None] * len(tasks)
        with (
            tqdm(total=len(tasks), desc=desc, unit="block", disable=not self.progress) as bar,
            ThreadPoolExecutor(max(1, self.workers)) as pool,
        ):
            pending = {}
            queue = list(enumerate(tasks))[::-1]
            done = 0
            while queue or pending:
                while queue and len(pending) < max(1, self.workers):
                    i, task = queue.pop()
                    fut = pool.submit(dask.compute, task, scheduler="sync")
                    pending[fut] = i
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    out[i] = fut.result()[0]
                    done += 1
                    try:
                        self._tick(bar, desc, done, len(tasks))
                    except InterruptedError:
                        for f in pending:
                            f.cancel()
                        raise
        return out


#: glibc malloc settings of densify's worker processes, in their environment before they start.
#: dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` by default, and any such setting turns off
#: glibc's adaptive mmap threshold: every array over 128 KiB became a fresh mapping that the
#: kernel zeroes page by page. A block's ~185 filter passes then page-faulted 3 M times, and a
#: 4.4 M-voxel block's features took 15 s against 9-11 s. Here arrays up to 32 MiB come from
#: the heap and up to 64 MiB of freed heap is kept: the forests run 1.1-1.4x faster for 0.4-0.6 GB
#: more per worker, within the plan (``experiments/bench_worker_malloc.py``,
#: ``experiments/results/densify_scaling.md``).
WORKER_MALLOC: dict[str, int] = {
    "MALLOC_MMAP_THRESHOLD_": 32 * 2**20,
    "MALLOC_TRIM_THRESHOLD_": 64 * 2**20,
}


def slurm_arguments(slurm: dict[str, Any] | None) -> dict[str, Any]:
    """dask-jobqueue's ``SLURMCluster`` keyword arguments: the user's ``slurm``, with the job
    script exporting :data:`WORKER_MALLOC` before the user's own prologue (a variable set in the
    job's environment takes precedence over the nanny's default). The user's prologue is their
    ``job_script_prologue``, else the one of their jobqueue config, else their ``env_extra``
    (its older name)."""
    import dask

    out = dict(slurm or {})
    older = out.pop("env_extra", None)
    own = out.get("job_script_prologue")
    if own is None:
        own = dask.config.get("jobqueue.slurm.job-script-prologue", None)
    if not own:
        own = older or dask.config.get("jobqueue.slurm.env-extra", None)
    exports = [f"export {k}={v}" for k, v in WORKER_MALLOC.items()]
    out["job_script_prologue"] = exports + list(own or [])
    return out


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def available_memory() -> int:
    """Bytes of memory available now (psutil's ``available``; total RAM without psutil)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - distributed depends on psutil
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@contextlib.contextmanager
def _own_environment() -> Iterator[None]:
    """Give this process back the environment variables that a nanny sets before it spawns a
    worker (``distributed.nanny.pre-spawn-environ``: ``OMP_NUM_THREADS=1`` and the like). The
    nanny sets them in the process that starts the cluster, this one, and leaves them: a library
    that reads them later (torch when first imported after the cluster starts, any child
    process) would run on one thread."""
    import dask

    keys = list(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_client(
    kind: str,
    n_workers: int,
    memory_per_worker: int,
    address: str | None = None,
    slurm: dict[str, Any] | None = None,
    dashboard: bool = True,
) -> tuple[Any, Callable[[], None]]:
    """A ``distributed.Client`` and the function that closes what was opened.

    ``kind``: ``"local"`` (a ``LocalCluster`` of ``n_workers`` single-threaded worker processes,
    each limited to ``memory_per_worker`` bytes), ``"address"`` (attach to the scheduler at
    ``address``; nothing is started or closed but the client) or ``"slurm"`` (dask-jobqueue's
    ``SLURMCluster`` with the keyword arguments ``slurm``, scaled to ``n_workers`` jobs).
    """
    from distributed import Client, LocalCluster

    if kind == "address":
        if not address:
            raise ValueError("cluster.address is empty")
        client = Client(address, timeout="20s")
        return client, client.close
    if kind == "slurm":
        import shutil

        if shutil.which("sbatch") is None:
            raise ValueError("cluster=slurm needs SLURM's sbatch on this machine (none found)")
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ValueError(
                "cluster=slurm needs dask-jobqueue: pip install 'sparse3d[cluster]'"
            ) from None
        cluster = SLURMCluster(**slurm_arguments(slurm))
        cluster.scale(jobs=n_workers)
    elif kind == "local":
        import dask

        # A block's arrays live inside its task, where dask counts them as "unmanaged" memory:
        # spilling has nothing to move, its warning ("may indicate a memory leak") only alarms,
        # and a paused worker would wait for memory that the block still holds. The plan
        # sizes blocks to the share; the nanny's terminate threshold stays as the last guard.
        # The workers also start with WORKER_MALLOC beside dask's other pre-spawn variables.
        settings: dict[str, Any] = {
            f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause")
        }
        environ = dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}
        settings["distributed.nanny.pre-spawn-environ"] = {**environ, **WORKER_MALLOC}
        with dask.config.set(settings), _own_environment():
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                memory_limit=int(memory_per_worker),
                dashboard_address=":0" if dashboard else None,
            )
    else:
        raise ValueError(f"unknown cluster kind {kind!r}")
    client = Client(cluster)
    closed = []

    def close() -> None:  # once, whoever calls it first; its workers' farewells not logged
        if not closed:
            closed.append(True)
            quiet = logging.getLogger("distributed")
            level = quiet.level
            quiet.setLevel(logging.WARNING)
            try:
                client.close()
                cluster.close()
            finally:
                quiet.setLevel(level)

    return client, close
