"""The model file: network weights plus everything prediction needs to use them (layer 1).

A model file is a ``torch.save`` of a plain dictionary::

    {"format": "sparse3d-model", "version": 1,
     "meta": ModelMeta.to_dict(),          # plain lists, numbers and strings
     "state_dict": net.state_dict()}       # tensors only

:func:`load_model` also accepts a Lightning checkpoint (``.ckpt``) of the training module: its
``hyper_parameters`` hold ``"model_meta"`` (the same plain dictionary) and its ``state_dict`` the
network under the prefix ``"net."``.

Files are always read with ``torch.load(..., weights_only=True)``: a file that needs the full
unpickler (arbitrary Python objects, which can run code when loaded) is refused, never loaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse3d.atomic import atomic_path
from sparse3d.labels import LabelSpec
from sparse3d.models import UNet

logger = logging.getLogger(__name__)

FORMAT = "sparse3d-model"
VERSION = 1
#: Prefix of the network's parameters in the training module's Lightning checkpoints.
LIGHTNING_PREFIX = "net."
#: Keys of ``ModelMeta.net``: the UNet constructor arguments.
NET_KEYS = (
    "in_channels",
    "num_classes",
    "base_channels",
    "depth",
    "dim",
    "padding",
    "norm",
    "bn_eval_stats",
)


class CheckpointError(ValueError):
    """A model file is unreadable, refused or inconsistent; the message names file and problem."""


def _default_normalization() -> dict[str, Any]:
    return {"kind": "percentile", "low": 1.0, "high": 99.5}


@dataclass
class ModelMeta:
    """Everything about a trained model that is not a weight.

    Args:
        net: ``UNet`` constructor arguments (``in_channels``, ``num_classes``, ``base_channels``,
            ``depth``, ``dim``, ``padding``, ``norm``, ``bn_eval_stats``).
        class_names: names of the classes, codes ``0..K-1`` (paper Sec. 3.1: inside tubule,
            tubule, background).
        ignore_index: the code of unlabelled voxels in the training labels.
        channel_names: names of the input channels, in order (paper: lectin, DAPI, beta-catenin).
        voxel_size_zyx_um: voxel size of the training data in micrometres, or None.
        normalization: intensity normalisation applied before the network, e.g.
            ``{"kind": "percentile", "low": 1.0, "high": 99.5}`` (per channel, per volume; see
            ``sparse3d.data.normalize``) or ``{"kind": "none"}``.
    """

    net: dict[str, Any]
    class_names: tuple[str, ...]
    ignore_index: int
    channel_names: tuple[str, ...]
    voxel_size_zyx_um: tuple[float, float, float] | None = None
    normalization: dict[str, Any] = field(default_factory=_default_normalization)

    def __post_init__(self) -> None:
        self.net = dict(self.net)
        self.class_names = tuple(str(n) for n in self.class_names)
        self.channel_names = tuple(str(n) for n in self.channel_names)
        self.ignore_index = int(self.ignore_index)
        if self.voxel_size_zyx_um is not None:
            vs = tuple(float(v) for v in self.voxel_size_zyx_um)
            if len(vs) != 3:
                raise ValueError(f"voxel_size_zyx_um must have 3 values, got {vs!r}")
            self.voxel_size_zyx_um = vs  # type: ignore[assignment]
        self.normalization = dict(self.normalization)
        kind = self.normalization.get("kind")
        if kind not in ("percentile", "none"):
            raise ValueError(f"normalization kind must be 'percentile' or 'none', got {kind!r}")
        unknown = set(self.net) - set(NET_KEYS)
        if unknown:
            raise ValueError(f"net has unknown UNet arguments {sorted(unknown)}")
        for key in ("in_channels", "num_classes"):
            if key not in self.net:
                raise ValueError(f"net must give {key!r}")
        if int(self.net["in_channels"]) != len(self.channel_names):
            raise ValueError(
                f"net in_channels {self.net['in_channels']} != {len(self.channel_names)} "
                f"channel_names {self.channel_names}"
            )
        if int(self.net["num_classes"]) != len(self.class_names):
            raise ValueError(
                f"net num_classes {self.net['num_classes']} != {len(self.class_names)} "
                f"class_names {self.class_names}"
            )

    @property
    def labels(self) -> LabelSpec:
        return LabelSpec(self.class_names, self.ignore_index)

    def build_net(self) -> UNet:
        """A fresh (untrained) ``UNet`` of this architecture."""
        return UNet(**self.net)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (lists, numbers, strings) safe for ``weights_only`` loading."""
        return {
            "net": dict(self.net),
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
            "channel_names": list(self.channel_names),
            "voxel_size_zyx_um": (
                None if self.voxel_size_zyx_um is None else list(self.voxel_size_zyx_um)
            ),
            "normalization": dict(self.normalization),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        """Inverse of :meth:`to_dict`; ValueError names missing or bad keys."""
        if not isinstance(d, dict):
            raise ValueError(f"model meta must be a dict, got {type(d).__name__}")
        required = ("net", "class_names", "ignore_index", "channel_names")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"model meta lacks {missing}")
        extra = set(d) - {*required, "voxel_size_zyx_um", "normalization"}
        if extra:
            logger.warning("model meta: ignoring unknown keys %s", sorted(extra))
        return cls(
            net=dict(d["net"]),
            class_names=tuple(d["class_names"]),
            ignore_index=int(d["ignore_index"]),
            channel_names=tuple(d["channel_names"]),
            voxel_size_zyx_um=d.get("voxel_size_zyx_um"),
            normalization=dict(d.get("normalization") or _default_normalization()),
        )


def _fit_report(net: nn.Module, state: dict[str, Any]) -> str | None:
    """None if ``state`` fits ``net`` exactly, else a short description of the misfit."""
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != want[k].shape
    ]
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{name}: {', '.join(items[:3])}{more}")
    return "; ".join(parts) or None


def save_model(
    path: str | os.PathLike[str], net: UNet, meta: ModelMeta, overwrite: bool = False
) -> Path:
    """Write ``net``'s weights and ``meta`` to a model file, atomically.

    The file is written under a temporary name in the same folder and renamed. ``meta.net`` must
    describe ``net``'s architecture (checked: a mismatch raises ValueError), so the file always
    loads. Without ``overwrite`` an existing ``path`` raises FileExistsError.
    """
    target = atomic_path(path, overwrite)  # refuses an existing file or a missing folder now
    state = {
        k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()
    }  # plain CPU tensors (channels_last weights are stored contiguous)
    misfit = _fit_report(meta.build_net(), state)
    if misfit:
        raise ValueError(f"{target.path}: meta.net does not describe the network ({misfit})")
    payload = {"format": FORMAT, "version": VERSION, "meta": meta.to_dict(), "state_dict": state}
    with target as tmp:
        torch.save(payload, tmp)
    return target.path


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (legacy files: a pickle stream, first byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _torch_load(path: Path, map_location: Any) -> Any:
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (not a torch.save file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" (e.g. {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the file contains pickled Python objects{what} that are not plain "
            "weights, and sparse3d only loads checkpoints with weights_only=True"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {first})"
        ) from None


def _unpack(path: Path, obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta dict, network state_dict) from a model file or a Lightning checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: not a sparse3d model file or Lightning checkpoint "
            f"(holds a {type(obj).__name__}, expected a dict)"
        )
    if obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise CheckpointError(
                f"{path}: model file version {obj.get('version')!r} is not supported "
                f"(expected {VERSION})"
            )
        if "meta" not in obj or "state_dict" not in obj:
            raise CheckpointError(f"{path}: model file lacks 'meta' or 'state_dict'")
        return obj["meta"], obj["state_dict"]
    if "state_dict" in obj and "hyper_parameters" in obj:
        hp = obj["hyper_parameters"]
        if not isinstance(hp, dict) or "model_meta" not in hp:
            raise CheckpointError(
                f"{path}: Lightning checkpoint without hyper_parameters['model_meta']; it was "
                "not written by sparse3d's training module"
            )
        n = len(LIGHTNING_PREFIX)
        state = {k[n:]: v for k, v in obj["state_dict"].items() if k.startswith(LIGHTNING_PREFIX)}
        if not state:
            raise CheckpointError(
                f"{path}: Lightning checkpoint has no parameters under '{LIGHTNING_PREFIX}'"
            )
        return hp["model_meta"], state
    keys = sorted(str(k) for k in obj)[:8]
    raise CheckpointError(
        f"{path}: not a sparse3d model file or Lightning checkpoint (top-level keys {keys})"
    )


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[UNet, ModelMeta]:
    """Load a model file (or a training Lightning checkpoint) -> (network in eval mode, meta).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a checkpoint, needs the unsafe unpickler (refused), lacks
            the model meta, or its weights do not fit the architecture the meta describes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a model file")
    meta_dict, state = _unpack(path, _torch_load(path, map_location))
    try:
        meta = ModelMeta.from_dict(meta_dict)
        net = meta.build_net()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model meta: {err}") from None
    misfit = _fit_report(net, state)
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit the architecture {meta.net} ({misfit})")
    net.load_state_dict(state)
    net.to(map_location)
    net.eval()
    return net, meta
