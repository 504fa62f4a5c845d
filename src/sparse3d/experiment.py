"""Build one training job from its config: plain objects only (layer 3).

:func:`build` is the only place where the training config becomes objects: the volume files
(``data.source``), the facts the data states about itself (classes, ignore code, channels, voxel
size, annotated slices), the job's split (``experiment.split``), the network (``model.net``, its
channels and classes taken from the data), the augmentation (``augment.transforms``), the
DataModule, the loss and the LightningModule. Runtime facts of the data are passed to
``instantiate`` as keyword arguments, so they win over anything a config file says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sparse3d.cli import UserError

log = logging.getLogger("sparse3d.train")


@dataclass
class DataFacts:
    """What the volumes say about themselves; every volume of a job must agree."""

    paths: dict[str, Path]
    metas: dict[str, Any]  # name -> VolumeMeta
    shapes: dict[str, tuple[int, int, int]]

    @property
    def first(self) -> Any:
        return self.metas[sorted(self.metas)[0]]

    @property
    def labels(self) -> Any:  # LabelSpec
        return self.first.labels

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(self.first.channel_names)

    @property
    def voxel_size_zyx_um(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.first.voxel_size_zyx_um)

    def annotated(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {n: dict(m.annotated_slices) for n, m in self.metas.items()}


@dataclass
class Job:
    """Everything a training run needs, built from the config."""

    facts: DataFacts
    split: Any  # protocols.Split
    net_cfg: dict[str, Any]  # the network's constructor arguments, data facts included
    datamodule: Any  # SparseDataModule
    module: Any  # SegmentationModule
    class_weights: list[float] | None
    model_meta: dict[str, Any]


#: Volumes of one job may differ this much (relative, per axis) in voxel size; the first
#: volume's (name order) is used. The benchmark's samples differ by < 1 %.
VOXEL_SIZE_TOLERANCE = 0.1


def _mix(what: str, a_path, a, b_path, b) -> str:
    return (
        f"volumes disagree on {what}: {a_path} has {a}, {b_path} has {b}; use volumes of one kind"
    )


# -- data ------------------------------------------------------------------------------------
def resolve_volumes(data_cfg: DictConfig) -> dict[str, Path]:
    """``{name: path}`` of the job's volume files, from ``data.source``."""
    from sparse3d.data.sources import DataSourceError

    return dict(_instantiate(data_cfg.source, (DataSourceError,)))


def read_facts(paths: dict[str, Path]) -> DataFacts:
    """Metadata of every volume; refuses volumes that disagree on classes, ignore code,
    channels or voxel size (one line naming the two files), and unreadable files."""
    from sparse3d.data.volume import VolumeFormatError, open_volume

    metas, shapes = {}, {}
    for name, p in paths.items():
        try:
            with open_volume(p) as v:
                metas[name] = v.meta
                shapes[name] = tuple(v.shape_zyx)
        except VolumeFormatError as err:  # names the file; one line, before any training
            raise UserError(" ".join(str(err).split())) from None
    names = sorted(metas)
    ref = metas[names[0]]
    for name in names[1:]:
        m = metas[name]
        for what, a, b in (
            ("class names", tuple(ref.labels.class_names), tuple(m.labels.class_names)),
            ("ignore code", ref.labels.ignore_index, m.labels.ignore_index),
            ("channels", tuple(ref.channel_names), tuple(m.channel_names)),
        ):
            if a != b:
                raise UserError(_mix(what, paths[names[0]], a, paths[name], b))
        va = np.asarray(ref.voxel_size_zyx_um, dtype=float)
        vb = np.asarray(m.voxel_size_zyx_um, dtype=float)
        if np.any(np.abs(vb / va - 1.0) > VOXEL_SIZE_TOLERANCE):
            raise UserError(
                _mix("voxel size (z, y, x um)", paths[names[0]], tuple(va), paths[name], tuple(vb))
            )
    return DataFacts(paths=dict(paths), metas=metas, shapes=shapes)


def build_split(cfg: DictConfig, facts: DataFacts):
    """The job's split: ``experiment.split`` with the data's annotated slices and shapes."""
    return _instantiate(
        cfg.experiment.split, (ValueError,), annotated=facts.annotated(), shapes=facts.shapes
    )


def _instantiate(node: Any, user_errors: tuple[type[Exception], ...], **facts: Any) -> Any:
    """``instantiate(node, **facts)``; an error of the kinds in ``user_errors`` raised by the
    target (Hydra wraps it) becomes a one-line :class:`UserError`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **facts)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, user_errors):
            raise UserError(" ".join(str(cause).split())) from None
        raise


# -- transforms ------------------------------------------------------------------------------
def build_transform(aug_cfg: DictConfig, facts: dict[str, Any]):
    """The augmentation pipeline; ``facts`` (tile sizes, voxel size, ignore code) go into every
    transform node (nested ones too) whose constructor takes them, replacing what the config
    says, so a transform never labels voxels with another data set's ignore code."""
    from hydra.utils import instantiate
    from monai.transforms import Compose

    items = OmegaConf.to_container(aug_cfg.transforms, resolve=True) or []
    return Compose([instantiate(_with_facts(t, facts)) for t in items]) if items else None


def _with_facts(node: Any, facts: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_with_facts(v, facts) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _with_facts(v, facts) for k, v in node.items()}
    if "_target_" in node:
        import inspect

        from hydra.utils import get_object

        params = inspect.signature(get_object(node["_target_"])).parameters
        for k, v in facts.items():
            if k not in params:
                continue
            if node.get(k) is not None and _as_plain(node[k]) != _as_plain(v):
                log.warning(
                    "augment: %s %s=%s from the config replaced by %s from the data/model",
                    node["_target_"].rpartition(".")[2],
                    k,
                    node[k],
                    v,
                )
            node[k] = v
    return node


def _as_plain(value: Any) -> Any:
    """Sequences as lists of floats, so ``[2, 1]`` equals ``(2.0, 1.0)`` when comparing."""
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    return float(value) if isinstance(value, (int, float)) else value


# -- the job ---------------------------------------------------------------------------------
def build_network(cfg: DictConfig, facts: DataFacts):
    """``(net, constructor arguments)``: ``model.net`` with the data's channels and classes."""
    from hydra.utils import instantiate

    net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
    net = instantiate(
        net_cfg,
        in_channels=len(facts.channel_names),
        num_classes=facts.labels.num_classes,
    )
    net_cfg.update(in_channels=len(facts.channel_names), num_classes=facts.labels.num_classes)
    if cfg.get("init_ckpt"):
        _warm_start(net, Path(str(cfg.init_ckpt)))
    return net, net_cfg


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


def build(cfg: DictConfig) -> Job:
    """Every object of one training job (data read, nothing trained)."""
    from hydra.utils import instantiate

    from sparse3d.datamodule import SparseDataModule
    from sparse3d.losses import MaskedCrossEntropy, balanced_class_weights
    from sparse3d.module import SegmentationModule

    facts = read_facts(resolve_volumes(cfg.data))
    labels = facts.labels
    split = build_split(cfg, facts)
    net, net_cfg = build_network(cfg, facts)
    input_tile = tuple(cfg.data.input_tile if net.dim == 3 else cfg.data.input_tile_2d)
    try:
        output_tile = net.output_shape(input_tile)
    except ValueError as e:
        raise UserError(str(e)) from None
    # 2D slices of all orientations share one (anisotropy-agnostic) pixel grid
    voxel = facts.voxel_size_zyx_um if net.dim == 3 else (1.0, 1.0)
    transform = build_transform(
        cfg.augment,
        {
            "spatial_size": input_tile,
            "label_spatial_size": output_tile,
            "voxel_size_zyx_um": voxel,
            "ignore_index": labels.ignore_index,
        },
    )
    margin = None if cfg.augment.margin is None else (int(cfg.augment.margin),) * net.dim
    dm = SparseDataModule(
        volume_paths={n: str(p) for n, p in facts.paths.items()},
        train_slices=split.train,
        test_slices=split.test,
        label_source=cfg.experiment.label_source,
        labels=labels,
        dim=net.dim,
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
    cw = cfg.loss.class_weights
    if cw in ("balanced", "sqrt"):
        power = 1.0 if cw == "balanced" else 0.5
        weights = balanced_class_weights(dm.train_class_counts(), power)
    elif isinstance(cw, str):
        raise UserError(f"loss.class_weights must be balanced, sqrt, null or a list, got {cw!r}")
    else:
        weights = None if cw is None else [float(w) for w in cw]
    model_meta = {
        # the architecture; how its weights were initialised does not belong to the model file
        "net": {k: v for k, v in net_cfg.items() if not k.startswith("_") and k != "init"},
        "class_names": list(labels.class_names),
        "ignore_index": labels.ignore_index,
        "channel_names": list(facts.channel_names),
        "voxel_size_zyx_um": list(facts.voxel_size_zyx_um),
        "normalization": {"kind": "percentile", "low": dm.pct[0], "high": dm.pct[1]},
    }
    module = SegmentationModule(
        net=net,
        loss=MaskedCrossEntropy(labels.num_classes, labels.ignore_index, weights),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        ignore_index=labels.ignore_index,
        model_meta=model_meta,
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
    )
    return Job(facts, split, net_cfg, dm, module, weights, model_meta)


def train_voxel_fraction(job: Job) -> float:
    """Share of the trained volumes' voxels that lie on training slices."""
    from sparse3d.data.annotation import slice_mask

    shapes = job.facts.shapes
    total = sum(int(np.prod(shapes[n])) for n in job.split.train)
    on = sum(
        int(slice_mask(shapes[n], {a: tuple(v) for a, v in job.split.train[n].items()}).sum())
        for n in job.split.train
    )
    return on / max(total, 1)
