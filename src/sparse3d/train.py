"""Training entry point: ``python -m sparse3d.train experiment=semi_cv fold=1`` (layer 3).

``main()`` is the Hydra wrapper; ``train(cfg, run_dir)`` does the work and is what tests call:
build the job from the config (``sparse3d.experiment``), fit it with Lightning
(``sparse3d.fitting``), evaluate it with the one predictor (``sparse3d.evaluation``) and write
the run folder (``sparse3d.outputs``, then ``metrics.json`` last, atomically).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import quiet_lightning, run_hydra
from sparse3d.experiment import resolve_volumes as resolve_volumes
from sparse3d.runfolder import CONFIG, METRICS, SPLIT, read_metrics, write_json_atomic

log = logging.getLogger("sparse3d.train")


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train one job of an experiment and evaluate it; returns what is in ``metrics.json``
    (empty on DDP processes other than the first)."""
    import lightning as L

    from sparse3d import experiment, fitting

    quiet_lightning()
    fitting.check_launch(cfg)
    fitting.check_compile(cfg)
    run_dir = Path(run_dir)
    done = read_metrics(run_dir)
    if done is not None and not cfg.force and cfg.ckpt_path is None:
        log.info("%s already finished (metrics.json present): skipped; force=true re-runs", run_dir)
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    job = experiment.build(cfg)
    write_json_atomic(run_dir / SPLIT, job.split.to_dict())
    _save_config(cfg, job, run_dir / CONFIG)
    loggers, wandb_logger = fitting.make_loggers(cfg, run_dir)
    try:
        periodic = fitting.periodic_evaluation(cfg, job)
        trainer = fitting.make_trainer(cfg, run_dir, loggers, [periodic] if periodic else [])
        trainer.fit(
            job.module, datamodule=job.datamodule, ckpt_path=cfg.ckpt_path, weights_only=True
        )
        in_sync = fitting.ranks_in_sync(trainer, job.module)
        fitting.leave_process_group()  # the other ranks exit now; the first evaluates alone
        seconds = time.perf_counter() - t0
        if not trainer.is_global_zero:
            return {}
        metrics = _evaluate(cfg, job, trainer, run_dir, in_sync, seconds, wandb_logger)
    finally:
        if wandb_logger is not None:
            import wandb

            wandb.finish()  # one W&B run per job, also when the job fails (multirun)
    return metrics


def _save_config(cfg: DictConfig, job, path: Path) -> None:
    """The resolved config, with the network's channels and classes as the data set them."""
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    saved.model.net.in_channels = job.net_cfg["in_channels"]
    saved.model.net.num_classes = job.net_cfg["num_classes"]
    OmegaConf.save(saved, path)


def _evaluate(cfg, job, trainer, run_dir, in_sync, seconds, wandb_logger) -> dict[str, Any]:
    """Whole-volume evaluation on this process (paper Sec. 4: IoU on the held-out slices), on
    the device training ran on; writes the outputs and ``metrics.json``."""
    import torch

    from sparse3d import evaluation, experiment, fitting
    from sparse3d.outputs import write_run_outputs

    labels, dm, net = job.facts.labels, job.datamodule, job.module.net
    net.to(trainer.strategy.root_device)
    try:
        vols = [dm.volumes[n] for n in sorted(job.split.test)]
        scores, predictions = evaluation.evaluate_volumes(
            net, vols, labels.class_names, labels.ignore_index
        )
    finally:
        net.cpu()
    fitting.log_scores(trainer.loggers, scores, trainer.global_step)
    metrics: dict[str, Any] = {
        "status": "done",
        "experiment": cfg.experiment.name,
        "protocol": cfg.experiment.protocol,
        "model": cfg.model.name,
        "preset": cfg.preset_name,
        "fold": int(cfg.fold),
        "sample": int(cfg.sample),
        "setup": int(cfg.setup),
        "seed": int(cfg.seed),
        "split": job.split.name,
        "class_names": list(labels.class_names),
        "class_weights": job.class_weights,
        "train_voxel_fraction": experiment.train_voxel_fraction(job),
        "steps": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        "ranks_in_sync": in_sync,
        "seconds": round(seconds, 1),
        # what the time was measured on: a sweep's jobs side by side each get cores / n_jobs
        "precision": str(trainer.precision),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **scores,  # heldout, heldout_all, all_voxels (see sparse3d.evaluation)
    }
    title = f"{metrics['experiment']} {metrics['model']}"
    pictures = write_run_outputs(
        run_dir, net, job.model_meta, labels, predictions, dm.volumes, title
    )
    if wandb_logger is not None:
        fitting.log_results_to_wandb(
            wandb_logger, scores, labels.class_names, pictures if cfg.logger.log_images else {}
        )
    write_json_atomic(run_dir / METRICS, metrics)
    log.info(
        "%s: held-out IoU %s, IoU over all voxels %s (%s)",
        cfg.run_name,
        _fmt(metrics["heldout"]),
        _fmt(metrics["all_voxels"]),
        run_dir / METRICS,
    )
    return metrics


def _fmt(s: dict[str, Any] | None) -> str:
    return "n/a" if s is None or s.get("mean") is None else f"{s['mean']:.3f}"


def main() -> None:
    from hydra.core.hydra_config import HydraConfig

    run_hydra("config", lambda cfg: train(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
