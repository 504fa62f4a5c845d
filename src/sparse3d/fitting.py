"""The Lightning Trainer of a training job: loggers, checkpoints, progress, hardware (layer 3).

:func:`make_trainer` turns ``cfg.trainer`` (+ ``cfg.logger``) into a ``lightning.Trainer`` for a
run folder; the helpers below keep multi-process training (DDP, SLURM) and CUDA from breaking
what works on one CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import UserError

log = logging.getLogger("sparse3d.train")


def make_loggers(cfg: DictConfig, run_dir: Path) -> tuple[list[Any], Any]:
    """``(loggers, W&B logger or None)``: a CSV log always, W&B when ``logger.kind=wandb``
    (offline unless ``WANDB_MODE`` says otherwise). The run folder, name and config are runtime
    facts passed to the logger nodes."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wandb_logger = None
    node = cfg.logger.get("wandb")
    if cfg.logger.kind == "wandb" and node is not None and node.get("mode") != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        params = OmegaConf.to_container(node, resolve=True)
        params.update(
            name=str(cfg.run_name),
            group=cfg.experiment.name,
            job_type=cfg.model.name,
            save_dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            _recursive_=False,  # the config is logged as it is, not instantiated
            _convert_="all",  # plain dicts for W&B
        )
        wandb_logger = instantiate(params)
        loggers.append(wandb_logger)
    return loggers, wandb_logger


def periodic_evaluation(cfg: DictConfig, job: Any):
    """The held-out evaluation every ``val_every_n_steps`` steps (a
    :class:`~sparse3d.callbacks.PeriodicEvaluation` of the job's test volumes), or None when
    ``val_every_n_steps`` is 0/null or the job holds nothing out. The final step is left to the
    evaluation after training, which logs the same ``val/iou`` values."""
    from sparse3d.callbacks import PeriodicEvaluation

    every = cfg.get("val_every_n_steps")
    if not every:
        return None
    if int(every) < 0:
        raise UserError(f"val_every_n_steps must be >= 0 (0: off), got {every}")
    vols = [job.datamodule.volumes[n] for n in sorted(job.split.test)]
    labels = job.facts.labels
    cb = PeriodicEvaluation(
        vols,
        labels.class_names,
        labels.ignore_index,
        every_n_steps=int(every),
        skip_steps=(int(cfg.trainer.max_steps),),
    )
    return cb if cb.volumes else None


def make_trainer(
    cfg: DictConfig, run_dir: Path, loggers: list[Any], extra_callbacks: Sequence[Any] = ()
):
    """The ``lightning.Trainer`` of ``cfg.trainer``: checkpoints every
    ``checkpoint_every_n_steps`` into ``<run>/checkpoints``, the learning rate logged, a progress
    bar on a terminal and log lines otherwise, and ``extra_callbacks`` (the periodic
    evaluation)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from sparse3d.callbacks import ProgressLog

    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(cfg.checkpoint_every_n_steps),
            save_last=True,
            save_top_k=-1,
        ),
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
    bar = progress_bar(cfg.trainer)
    if not bar:
        callbacks.append(ProgressLog())  # log lines instead of bar redraws in a piped log
    return instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=bar,
        **trainer_extras(cfg.trainer),
    )


def local_processes(trainer_cfg: DictConfig) -> int:
    """Processes per node the trainer will run (``devices``; ``auto`` counts visible GPUs)."""
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, int):
        return max(devices, 1) if devices != -1 else local_processes({"devices": "auto"})
    text = str(devices).strip()
    if text.isdigit():
        return max(int(text), 1)
    if text not in ("auto", "-1"):  # "0,1" or a list of device indices
        return len([d for d in text.strip("[]").split(",") if d.strip()])
    if str(trainer_cfg.get("accelerator", "auto")) == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


def check_ddp_launch(trainer_cfg: DictConfig, mode: str | None, launcher: str | None) -> None:
    """Refuse a multi-process trainer inside a local sweep (``-m`` without a SLURM launcher).

    Lightning starts the other processes of a local DDP job by re-running the command line, and
    under ``-m`` that is the whole sweep again in every process. Under the SLURM launcher each
    task is a process of its own (nothing re-runs), and a single job (no ``-m``) re-runs fine.
    """
    if str(mode).rsplit(".", 1)[-1] != "MULTIRUN" or "submitit" in str(launcher).lower():
        return
    if "spawn" in str(trainer_cfg.get("strategy", "auto")):
        return  # spawned processes do not re-run the command line
    n = local_processes(trainer_cfg)
    if n > 1 or int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        raise UserError(
            f"a multirun sweep (-m) cannot train with {n} processes per job on this machine "
            "(Lightning's DDP re-runs the command line, sweep included, for each process): sweep "
            "with hydra/launcher=slurm, or run the jobs one at a time without -m"
        )


def check_launch(cfg: DictConfig) -> None:
    """:func:`check_ddp_launch` for the running Hydra job (nothing outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    check_ddp_launch(cfg.trainer, str(hc.mode), str(hc.launcher.get("_target_", "")))


def check_compile(cfg: DictConfig) -> None:
    """``compile=true`` on a CPU needs a C++ compiler (torch.compile builds its kernels with one):
    say so in one line before any work instead of failing at the first step."""
    import shutil

    if not cfg.get("compile", False) or uses_cuda(cfg.trainer):
        return
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(n and shutil.which(n) for n in names):
        raise UserError(
            "compile=true needs a C++ compiler on a CPU (g++, c++ or clang++ on PATH, or $CXX): "
            "install one or train with compile=false"
        )


def uses_cuda(trainer_cfg: DictConfig) -> bool:
    from sparse3d.inference.precision import training_device

    return training_device(str(trainer_cfg.get("accelerator", "auto"))).type == "cuda"


def training_precision(trainer_cfg: DictConfig) -> str:
    """Lightning's precision for ``precision: auto``: ``"bf16-mixed"`` where the training device
    computes bfloat16 natively, ``"32-true"`` elsewhere. The decision is the predictor's
    (``sparse3d.inference.precision.resolve_precision``): a CUDA GPU with bf16, a CPU with
    AVX-512 BF16 or AMX; on other CPUs bf16 runs on slow fallback kernels."""
    import torch

    from sparse3d.inference.precision import resolve_precision

    device = torch.device("cuda" if uses_cuda(trainer_cfg) else "cpu")
    chosen = "bf16-mixed" if resolve_precision("auto", device) == "bf16" else "32-true"
    log.info("trainer.precision=auto: %s on %s", chosen, device.type)
    return chosen


def trainer_extras(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``Trainer`` arguments that replace what would break on the configured hardware.

    * ``precision: auto``: :func:`training_precision`.
    * ``sync_batchnorm``: sparse3d's synchronised BatchNorm, which keeps ``PaperBatchNorm``'s
      test-time statistics (Lightning's own conversion turns it into a plain BatchNorm).
    * ``deterministic: true`` on CUDA: ``"warn"`` (MaxPool3d's backward has no deterministic
      CUDA kernel, so ``true`` raises at the first step); everything else stays deterministic.
    """
    extras: dict[str, Any] = {}
    if str(trainer_cfg.get("precision")) == "auto":
        extras["precision"] = training_precision(trainer_cfg)
    if trainer_cfg.get("sync_batchnorm"):
        from hydra.utils import instantiate

        from sparse3d.parallel import PaperSyncBatchNorm

        given = instantiate(trainer_cfg.get("plugins") or [])
        extras["plugins"] = [*given, PaperSyncBatchNorm()]
    if trainer_cfg.get("deterministic") is True and uses_cuda(trainer_cfg):
        log.warning(
            "trainer.deterministic=true is impossible on CUDA (MaxPool3d backward): using 'warn'"
        )
        extras["deterministic"] = "warn"
    return extras


def ranks_in_sync(trainer, module) -> bool:
    """Whether every process ends with the same weights (one model trained together).

    The gather runs on the process group's device, not the module's: after ``fit`` Lightning
    has moved the module to the CPU, and NCCL only moves CUDA tensors."""
    import torch

    from sparse3d.distributed import collective_device

    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in module.net.parameters()]).sum()
    device = collective_device(trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(total.to(device))
    return bool(
        torch.allclose(gathered.reshape(-1), gathered.reshape(-1)[0].expand(gathered.numel()))
    )


def leave_process_group() -> None:
    """Every process leaves the default process group together after training (a barrier, then
    destroy). A process that exits with its group still alive can abort at interpreter shutdown
    (``terminate called without an active exception``); Lightning's launcher then kills every
    process, the first one in the middle of its evaluation. No group: nothing to do."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def progress_bar(trainer_cfg: DictConfig) -> bool:
    """Lightning's progress bar only where stdout (where it draws) is a terminal, unless the
    trainer config chooses (``trainer.enable_progress_bar``); without it, log lines."""
    chosen = trainer_cfg.get("enable_progress_bar")
    return bool(chosen) if chosen is not None else sys.stdout.isatty()


def log_scores(loggers: list[Any], scores: dict[str, Any], step: int) -> None:
    """``val/iou_<voxel set>/<class|mean>`` scalars of the evaluation for every logger, and the
    held-out ``val/iou``, ``val/iou_<class>`` of the periodic evaluation (the curve's last
    point)."""
    from sparse3d.callbacks import heldout_values

    values: dict[str, float] = heldout_values(scores.get("heldout"))
    for tag, summary in scores.items():
        if not summary:
            continue
        for name, v in summary["iou"].items():
            if v is not None:
                values[f"val/iou_{tag}/{name}"] = float(v)
        if summary["mean"] is not None:
            values[f"val/iou_{tag}/mean"] = float(summary["mean"])
    for lg in loggers:
        lg.log_metrics(values, step=step)
        lg.save()  # after fit nothing else flushes the CSV log


def log_results_to_wandb(wandb_logger, scores: dict[str, Any], class_names, pictures) -> None:
    """The IoU table and the overview pictures in the job's W&B run."""
    rows = [[tag, *[s["iou"][n] for n in class_names], s["mean"]] for tag, s in scores.items() if s]
    wandb_logger.log_table("iou", columns=["voxels", *class_names, "mean"], data=rows)
    if pictures:
        wandb_logger.log_image(
            "panels", [str(p) for p in pictures.values()], caption=list(pictures)
        )
