"""Training entry point: ``python -m sparse3d.train experiment=semi_cv fold=1`` (layer 3).

``main()`` is the Hydra wrapper; ``train(cfg, run_dir)`` does the work and is what tests call.
Only this layer reads the config: it builds plain objects (volumes, split, network, loss,
transforms) and hands them to the DataModule, the SegmentationModule and Lightning's Trainer.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import UserError, quiet_lightning, run_hydra
from sparse3d.runfolder import CONFIG, METRICS, SPLIT, read_metrics, write_json_atomic

log = logging.getLogger("sparse3d.train")

PROTOCOLS = ("semi_cv", "slice_sweep", "full_auto", "densify")


# -- data ------------------------------------------------------------------------------------
def synth_dir(root: str | Path, scale: float) -> Path:
    """Where the synthetic benchmark at ``scale`` lives (``make data`` writes scale 1 to root)."""
    root = Path(root)
    return root if float(scale) == 1.0 else root / f"scale{float(scale):g}"


def resolve_volumes(data_cfg: DictConfig) -> dict[str, Path]:
    """``{name: path}`` of the experiment's volumes; generates the benchmark when allowed."""
    if data_cfg.kind == "synth":
        folder = synth_dir(data_cfg.root, data_cfg.scale)
        paths = {n: folder / f"{n}.h5" for n in data_cfg.volumes}
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            if not data_cfg.generate_if_missing:
                raise UserError(
                    f"missing data file {missing[0]}: generate it with "
                    f"`python -m sparse3d.data.synth --out {folder} --scale {data_cfg.scale}`"
                )
            from sparse3d.data.synth import generate_benchmark

            log.info(
                "generating the synthetic benchmark (scale %s) into %s", data_cfg.scale, folder
            )
            generate_benchmark(
                folder, scale=float(data_cfg.scale), seed=int(data_cfg.generator_seed)
            )
        return paths
    paths = {str(n): Path(p) for n, p in data_cfg.paths.items()}
    if not paths:
        raise UserError("no volumes given: set data.paths={name: file.h5, ...}")
    for p in paths.values():
        if not p.is_file():
            raise UserError(
                f"missing data file {p}: convert your data with python -m sparse3d.data.convert"
            )
    return paths


def build_split(cfg: DictConfig, metas: dict[str, Any], shapes: dict[str, tuple[int, ...]]):
    """The experiment's protocol split for this job (paper Sec. 4)."""
    from sparse3d.data import protocols

    exp = cfg.experiment
    names = sorted(metas)
    annotated = {n: dict(metas[n].annotated_slices) for n in names}
    if exp.protocol == "semi_cv":
        splits = protocols.semi_cv_splits(annotated, k=int(exp.k), seed=int(exp.split_seed))
        index = int(cfg.fold)
    elif exp.protocol == "full_auto":
        splits = protocols.leave_one_volume_out_splits(annotated)
        index = int(cfg.fold)
    elif exp.protocol == "slice_sweep":
        sample = int(cfg.sample)
        if not 1 <= sample <= len(names):
            raise UserError(f"sample={sample} is out of range: choose 1..{len(names)}")
        name = names[sample - 1]
        splits = protocols.slice_sweep_splits(shapes[name], volume_name=name)
        index = int(cfg.setup)
        if not 1 <= index <= len(splits):
            raise UserError(f"setup={index} is out of range: choose 1..{len(splits)}")
        return splits[index - 1]
    elif exp.protocol == "densify":
        return protocols.Split(
            name="densify", train=annotated, test={}, meta={"protocol": "densify"}
        )
    else:
        raise UserError(f"unknown protocol {exp.protocol!r}: choose one of {PROTOCOLS}")
    if not 1 <= index <= len(splits):
        raise UserError(f"fold={index} is out of range for {exp.name}: choose 1..{len(splits)}")
    return splits[index - 1]


# -- transforms ------------------------------------------------------------------------------
def _target_params(target: str) -> set[str]:
    mod, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(mod), name)
    return set(inspect.signature(obj).parameters)


def _inject(node: Any, extras: dict[str, Any]) -> Any:
    """Set ``spatial_size`` and friends in transform configs whose target accepts them.

    ``extras`` are runtime facts of the model and the data (tile sizes, voxel size, ignore
    code): they replace whatever a config file says, so a transform never labels voxels with
    another data set's ignore code."""
    if isinstance(node, dict):
        node = {k: _inject(v, extras) for k, v in node.items()}
        if "_target_" in node:
            params = _target_params(node["_target_"])
            for k, v in extras.items():
                if k not in params:
                    continue
                old = node.get(k)
                if old is not None and _as_plain(old) != _as_plain(v):
                    log.warning(
                        "augment: %s %s=%s from the config replaced by %s from the data/model",
                        node["_target_"].rpartition(".")[2],
                        k,
                        old,
                        v,
                    )
                node[k] = v
        return node
    if isinstance(node, list):
        return [_inject(v, extras) for v in node]
    return node


def _as_plain(value: Any) -> Any:
    """Sequences as lists of floats, so ``[2, 1]`` equals ``(2.0, 1.0)`` when comparing."""
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    return float(value) if isinstance(value, (int, float)) else value


def build_transform(aug_cfg: DictConfig, extras: dict[str, Any]):
    from hydra.utils import instantiate
    from monai.transforms import Compose

    items = OmegaConf.to_container(aug_cfg.transforms, resolve=True) or []
    if not items:
        return None
    return Compose([instantiate(_inject(t, extras)) for t in items])


# -- the run ---------------------------------------------------------------------------------
def _pick_predictor(net):
    from sparse3d import evaluation

    if net.dim == 2:
        return evaluation.predict_volume_2d
    return evaluation.predict_volume_3d_single_pass


def _make_logger(cfg: DictConfig, run_dir: Path, run_name: str):
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wandb_run = None
    if cfg.logger.kind == "wandb" and cfg.logger.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        wl = WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            name=run_name,
            group=cfg.experiment.name,
            job_type=cfg.model.name,
            save_dir=str(run_dir),
            mode=cfg.logger.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit=True,
        )
        loggers.append(wl)
        wandb_run = wl
    return loggers, wandb_run


def _summary(cm: np.ndarray | None, class_names: tuple[str, ...]) -> dict[str, Any] | None:
    from sparse3d.metrics import iou_from_confusion

    if cm is None or np.asarray(cm).sum() == 0:
        return None
    iou = iou_from_confusion(cm)
    return {
        "iou": {
            n: (float(v) if np.isfinite(v) else None) for n, v in zip(class_names, iou, strict=True)
        },
        "mean": float(np.nanmean(iou)),
        "labelled_voxels": int(np.asarray(cm).sum()),
        "confusion": np.asarray(cm).astype(int).tolist(),
    }


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train one job of an experiment and evaluate it; returns what is in ``metrics.json``."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from sparse3d.callbacks import ProgressLog
    from sparse3d.data.annotation import slice_mask
    from sparse3d.data.volume import VolumeFormatError, open_volume
    from sparse3d.datamodule import SparseDataModule
    from sparse3d.labels import LabelSpec
    from sparse3d.losses import MaskedCrossEntropy, balanced_class_weights
    from sparse3d.module import SegmentationModule

    quiet_lightning()
    _check_launch(cfg)
    run_dir = Path(run_dir)
    done = read_metrics(run_dir)
    if done is not None and not cfg.force and cfg.ckpt_path is None:
        log.info(
            "%s already finished (metrics.json present): skipped; force=true re-runs it", run_dir
        )
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    paths = resolve_volumes(cfg.data)
    metas, shapes = {}, {}
    for name, p in paths.items():
        try:
            with open_volume(p) as v:
                metas[name] = v.meta
                shapes[name] = v.shape_zyx
        except VolumeFormatError as err:  # names the file; one line, before any training
            raise UserError(" ".join(str(err).split())) from None
    first = metas[sorted(metas)[0]]
    labels: LabelSpec = first.labels
    split = build_split(cfg, metas, shapes)
    write_json_atomic(run_dir / SPLIT, split.to_dict())

    net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
    net_cfg["in_channels"] = len(first.channel_names)
    net_cfg["num_classes"] = labels.num_classes
    net = instantiate(net_cfg)
    if cfg.get("init_ckpt"):
        _warm_start(net, Path(str(cfg.init_ckpt)))
    dim = net.dim
    input_tile = tuple(cfg.data.input_tile if dim == 3 else cfg.data.input_tile_2d)
    try:
        output_tile = net.output_shape(input_tile)
    except ValueError as e:
        raise UserError(str(e)) from None

    # 2D slices of all orientations share one (anisotropy-agnostic) pixel grid
    voxel = tuple(first.voxel_size_zyx_um) if dim == 3 else (1.0, 1.0)
    transform = build_transform(
        cfg.augment,
        {
            "spatial_size": input_tile,
            "label_spatial_size": output_tile,
            "voxel_size_zyx_um": voxel,
            "ignore_index": labels.ignore_index,
        },
    )
    margin = None if cfg.augment.margin is None else (int(cfg.augment.margin),) * dim
    dm = SparseDataModule(
        volume_paths={n: str(p) for n, p in paths.items()},
        train_slices=split.train,
        test_slices=split.test,
        label_source=cfg.experiment.label_source,
        labels=labels,
        dim=dim,
        input_tile=input_tile,
        output_tile=output_tile,
        batch_size=int(cfg.data.batch_size),
        samples_per_epoch=int(cfg.data.samples_per_epoch),
        num_workers=int(cfg.data.num_workers),
        pin_memory=cfg.data.get("pin_memory"),
        persistent_workers=bool(cfg.data.get("persistent_workers", True)),
        transform=transform,
        margin=margin,
        seed=int(cfg.seed),
    )
    dm.setup()
    counts = dm.train_class_counts()
    cw = cfg.loss.class_weights
    weights = (
        balanced_class_weights(counts) if cw == "balanced" else (None if cw is None else list(cw))
    )
    loss = MaskedCrossEntropy(labels.num_classes, labels.ignore_index, weights)

    model_meta = {
        "net": {k: v for k, v in net_cfg.items() if not k.startswith("_")},
        "class_names": list(labels.class_names),
        "ignore_index": labels.ignore_index,
        "channel_names": list(first.channel_names),
        "voxel_size_zyx_um": list(first.voxel_size_zyx_um),
        "normalization": {"kind": "percentile", "low": dm.pct[0], "high": dm.pct[1]},
    }
    module = SegmentationModule(
        net=net,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        class_names=labels.class_names,
        ignore_index=labels.ignore_index,
        predict_volume=_pick_predictor(net),
        model_meta=model_meta,
    )
    OmegaConf.save(cfg, run_dir / CONFIG, resolve=True)

    run_name = str(cfg.run_name)
    loggers, wandb_logger = _make_logger(cfg, run_dir, run_name)
    ckpt_cb = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=int(cfg.checkpoint_every_n_steps),
        save_last=True,
        save_top_k=-1,
    )
    callbacks = [ckpt_cb, LearningRateMonitor(logging_interval="step")]
    progress_bar = _progress_bar(cfg.trainer)
    if not progress_bar:
        callbacks.append(ProgressLog())  # log lines instead of bar redraws in a piped log
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=progress_bar,
        **_trainer_extras(cfg.trainer),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    in_sync = _ranks_in_sync(trainer, module)
    train_seconds = time.perf_counter() - t0

    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        # whole-volume evaluation on one process (paper Sec. 4: IoU on the held-out slices)
        conf = _evaluate_after_fit(trainer, module, dm)
        vox_total = sum(int(np.prod(shapes[n])) for n in split.train)
        vox_train = sum(
            int(slice_mask(shapes[n], {a: tuple(v) for a, v in split.train[n].items()}).sum())
            for n in split.train
        )
        metrics = {
            "status": "done",
            "experiment": cfg.experiment.name,
            "protocol": cfg.experiment.protocol,
            "model": cfg.model.name,
            "preset": cfg.preset_name,
            "fold": int(cfg.fold),
            "sample": int(cfg.sample),
            "setup": int(cfg.setup),
            "seed": int(cfg.seed),
            "split": split.name,
            "class_names": list(labels.class_names),
            "class_weights": list(weights) if weights is not None else None,
            "train_voxel_fraction": vox_train / max(vox_total, 1),
            "steps": int(trainer.global_step),
            "world_size": int(trainer.world_size),
            "ranks_in_sync": in_sync,
            "seconds": round(train_seconds, 1),
            # held-out slices less their crossings with training slices (the paper's test)
            "heldout": _summary(conf.get("heldout"), labels.class_names),
            # held-out slices including the crossings with training slices (earlier "heldout")
            "heldout_all": _summary(conf.get("heldout_all"), labels.class_names),
            # every voxel of the dense ground truth, annotated ones included (earlier "dense")
            "all_voxels": _summary(conf.get("all_voxels"), labels.class_names),
        }
        _write_outputs(run_dir, module, dm, labels, model_meta, wandb_logger, metrics)
        write_json_atomic(run_dir / METRICS, metrics)
        log.info(
            "%s: held-out IoU %s, IoU over all voxels %s (%s)",
            run_name,
            _fmt(metrics["heldout"]),
            _fmt(metrics["all_voxels"]),
            run_dir / METRICS,
        )
    if wandb_logger is not None:
        import wandb

        wandb.finish()
    return metrics


def _warm_start(net, path: Path) -> None:
    """Initialise ``net`` from a model file or checkpoint of the same architecture."""
    from sparse3d.checkpoint import load_model

    if not path.is_file():
        raise UserError(f"init_ckpt {path} does not exist")
    loaded, _ = load_model(path)
    try:
        net.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"init_ckpt {path} does not fit the configured model: {first}") from None
    log.info("warm start from %s", path)


def _evaluate_after_fit(trainer, module, dm) -> dict[str, np.ndarray]:
    """Whole-volume evaluation of every test volume on this process, on the device training ran
    on (Lightning's teardown leaves the module on the CPU); logs the IoU scalars and returns the
    confusion matrices. The module is back on the CPU afterwards, for saving."""
    import torch

    device = trainer.strategy.root_device
    module.to(device)
    try:
        module.reset_evaluation()
        for batch in dm.evaluation_dataloader():
            module.evaluate_volume(batch)
        for lg in trainer.loggers:
            lg.log_metrics(module.evaluation_scalars(sync=False), step=trainer.global_step)
        return module.evaluation_confusion(sync=False)
    finally:
        module.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _local_processes(trainer_cfg: DictConfig) -> int:
    """Processes per node the trainer will run (``devices``; ``auto`` counts visible GPUs)."""
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, int):
        return max(devices, 1) if devices != -1 else _local_processes({"devices": "auto"})
    text = str(devices).strip()
    if text.isdigit():
        return max(int(text), 1)
    if text not in ("auto", "-1"):  # "0,1" or a list of device indices
        return len([d for d in text.strip("[]").split(",") if d.strip()])
    if str(trainer_cfg.get("accelerator", "auto")) == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


def _check_ddp_launch(trainer_cfg: DictConfig, mode: str | None, launcher: str | None) -> None:
    """Refuse a multi-process trainer inside a local sweep (``-m`` without a SLURM launcher).

    Lightning starts the other processes of a local DDP job by re-running the command line, and
    under ``-m`` that is the whole sweep again in every process. Under the SLURM launcher each
    task is a process of its own (nothing re-runs), and a single job (no ``-m``) re-runs fine.
    """
    if str(mode).rsplit(".", 1)[-1] != "MULTIRUN" or "submitit" in str(launcher).lower():
        return
    if "spawn" in str(trainer_cfg.get("strategy", "auto")):
        return  # spawned processes do not re-run the command line
    n = _local_processes(trainer_cfg)
    if n > 1 or int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        raise UserError(
            f"a multirun sweep (-m) cannot train with {n} processes per job on this machine "
            "(Lightning's DDP re-runs the command line, sweep included, for each process): sweep "
            "with hydra/launcher=slurm, or run the jobs one at a time without -m"
        )


def _check_launch(cfg: DictConfig) -> None:
    """:func:`_check_ddp_launch` for the running Hydra job (nothing outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    _check_ddp_launch(cfg.trainer, str(hc.mode), str(hc.launcher.get("_target_", "")))


def _uses_cuda(trainer_cfg: DictConfig) -> bool:
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def _trainer_extras(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``Trainer`` arguments that replace what would break on the configured hardware.

    * ``sync_batchnorm``: sparse3d's synchronised BatchNorm, which keeps ``PaperBatchNorm``'s
      test-time statistics (Lightning's own conversion turns it into a plain BatchNorm).
    * ``deterministic: true`` on CUDA: ``"warn"`` (MaxPool3d's backward has no deterministic
      CUDA kernel, so ``true`` raises at the first step); everything else stays deterministic.
    """
    extras: dict[str, Any] = {}
    if trainer_cfg.get("sync_batchnorm"):
        from hydra.utils import instantiate

        from sparse3d.parallel import PaperSyncBatchNorm

        given = instantiate(trainer_cfg.get("plugins") or [])
        extras["plugins"] = [*given, PaperSyncBatchNorm()]
    if trainer_cfg.get("deterministic") is True and _uses_cuda(trainer_cfg):
        log.warning(
            "trainer.deterministic=true is impossible on CUDA (MaxPool3d backward): using 'warn'"
        )
        extras["deterministic"] = "warn"
    return extras


def _ranks_in_sync(trainer, module) -> bool:
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


def _progress_bar(trainer_cfg: DictConfig) -> bool:
    """Lightning's progress bar only where stdout (where it draws) is a terminal, unless the
    trainer config chooses (``trainer.enable_progress_bar``); without it, log lines."""
    chosen = trainer_cfg.get("enable_progress_bar")
    return bool(chosen) if chosen is not None else sys.stdout.isatty()


def _fmt(s: dict[str, Any] | None) -> str:
    return "n/a" if s is None else f"{s['mean']:.3f}"


def _write_outputs(run_dir, module, dm, labels, model_meta, wandb_logger, metrics) -> None:
    """Model file, predicted volumes and overview pictures; W&B tables and images."""
    import h5py

    from sparse3d.checkpoint import ModelMeta, save_model
    from sparse3d.viz import save_overview

    save_model(run_dir / "model.pt", module.net, ModelMeta.from_dict(model_meta), overwrite=True)
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(exist_ok=True)
    pictures = {}
    for name, pred in module.predictions.items():
        out = pred_dir / f"{name}.h5"
        tmp = out.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("prediction", data=pred, compression="gzip", chunks=True)
            f.attrs["class_names"] = list(labels.class_names)
        os.replace(tmp, out)
        vol = dm.volumes[name]
        pictures[name] = save_overview(
            pred_dir / f"{name}.png",
            vol.image,
            vol.eval_label,
            labels,
            title=f"{metrics['experiment']} {metrics['model']} {name}: test slices / prediction",
            prediction=pred,
            voxel_size_zyx_um=model_meta["voxel_size_zyx_um"],
            dense_label=vol.dense_label,
            channel_names=model_meta["channel_names"],
        )
    if wandb_logger is not None:
        rows = []
        for tag in ("heldout", "heldout_all", "all_voxels"):
            s = metrics.get(tag)
            if s:
                rows.append([tag, *[s["iou"][n] for n in labels.class_names], s["mean"]])
        wandb_logger.log_table("iou", columns=["voxels", *labels.class_names, "mean"], data=rows)
        if pictures:
            wandb_logger.log_image(
                "panels", [str(p) for p in pictures.values()], caption=list(pictures)
            )


# -- command line ----------------------------------------------------------------------------
def main() -> None:
    from hydra.core.hydra_config import HydraConfig

    run_hydra("config", lambda cfg: train(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
