"""The inputs of ``python -m sparse3d.densify`` (layer 3): names, checks, and the import of
non-HDF5 files with their label files into ``<out>/inputs/<name>.h5``.

By default label code 0 means unlabelled and code ``c >= 1`` is class ``c - 1``, as annotation
tools write them; ``label_map=`` and ``class_names=`` change that. ``dense_labels=[...]``
(optional, same order and codes) adds a dense ground truth to each imported input, for scoring
only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from sparse3d.cli import H5_SUFFIXES, UserError

log = logging.getLogger("sparse3d.densify")


def _input_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _inputs(cfg: DictConfig) -> dict[str, Path]:
    """``{name: path}`` of ``cfg.inputs`` (checked to exist, names unique)."""
    paths: dict[str, Path] = {}
    for p in cfg.inputs:
        p = Path(str(p))
        if not p.exists():
            raise UserError(f"input {p} does not exist")
        name = _input_name(p)
        if name in paths:
            raise UserError(f"inputs {paths[name]} and {p} have the same name {name!r}: rename one")
        if p.suffix.lower() in H5_SUFFIXES:
            _check_volume(p)
        paths[name] = p
    return paths


def _check_volume(path: Path) -> None:
    """A sparse3d HDF5 volume (image, label and their attributes), or UserError."""
    import h5py

    from sparse3d.data.volume import open_volume
    from sparse3d.data.volume_meta import VolumeFormatError

    try:
        with h5py.File(path, "r") as f:
            has_image = isinstance(f.get("image"), h5py.Dataset)
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({str(err).splitlines()[0]})") from None
    if not has_image:
        raise UserError(
            f"{path}: no 'image' dataset; densify reads sparse3d HDF5 volumes (image (C, Z, Y, X), "
            "label (Z, Y, X) and their attributes): pass other images as TIFF, NIfTI, NRRD or "
            "Zarr with their label files in labels=[...]"
        )
    try:
        with open_volume(path, scan_values=False):
            pass
    except VolumeFormatError as err:
        raise UserError(str(err).splitlines()[0]) from None


def _classes_and_map(cfg: DictConfig, label_files: list[Path]) -> tuple[list[str], Any]:
    """Class names and label map for imported inputs.

    Defaults follow what annotation tools write: code 0 is unlabelled and code ``c >= 1`` is
    class ``c - 1``; without ``class_names`` the classes are ``class1..classK`` with K the
    largest code in the label files.
    """
    names = None if cfg.get("class_names") is None else [str(n) for n in cfg.class_names]
    if cfg.get("label_map") is not None:
        if names is None:
            raise UserError("label_map= needs class_names=[...] (the names of classes 0..K-1)")
        label_map = cfg.label_map
        mapping = str(label_map) if isinstance(label_map, str) else dict(label_map)
        _require_labelled(label_files, names, mapping)
        return names, mapping
    given = names is not None
    if names is None:
        top = 0
        for f in label_files:
            codes = _label_codes(f)
            if codes.dtype.kind not in "ui" and not np.all(codes == np.round(codes)):
                raise UserError(f"{f}: label codes must be whole numbers, got dtype {codes.dtype}")
            top = max(top, int(codes.max()))
        if top < 1:
            raise UserError(f"{label_files[0]}: no labelled voxel (code 0 means unlabelled)")
        names = [f"class{c}" for c in range(1, top + 1)]
    mapping: dict[int | str, int | str] = {0: "ignore"}
    mapping.update({c: c - 1 for c in range(1, len(names) + 1)})
    if given:  # without class_names, the classes come from the codes found above
        _require_labelled(label_files, names, mapping)
    return names, mapping


def _label_codes(path: Path) -> np.ndarray:
    """The distinct codes of a label file, read lazily block by block (UserError if
    unreadable)."""
    import dask.array as da

    from sparse3d.data.convert import ConvertError
    from sparse3d.data.lazy import open_labels

    try:
        return np.asarray(da.unique(open_labels(path)).compute())
    except ConvertError as err:
        raise UserError(str(err).splitlines()[0]) from None


def _require_labelled(label_files: list[Path], names: list[str], mapping: Any) -> None:
    """Each label file gives at least one voxel one of the classes ``names`` under ``mapping``
    (the label map of the import), before anything is imported; UserError otherwise."""
    from sparse3d.data.convert import ConvertError, apply_label_map, parse_label_map
    from sparse3d.labels import LabelSpec

    try:
        spec = LabelSpec(class_names=tuple(names), ignore_index=len(names))
        table = parse_label_map(mapping, spec)
    except ValueError as err:
        raise UserError(f"class_names / label_map: {str(err).splitlines()[0]}") from None
    for f in label_files:
        try:
            classes = apply_label_map(_label_codes(f), table, f)
        except ConvertError as err:
            raise UserError(str(err).splitlines()[0]) from None
        if not np.any(classes < len(names)):
            raise UserError(
                f"{f}: no labelled voxel: no label code maps to one of the classes "
                f"{', '.join(names)} (code 0 means unlabelled; label_map= maps other codes)"
            )


def _label_files(cfg: DictConfig, images: dict[str, Path]) -> tuple[list[Path], list[Path]]:
    """``(labels, dense_labels)`` files of the non-HDF5 ``images``, checked: one each, existing."""
    labels = [Path(str(p)) for p in (cfg.get("labels") or [])]
    if len(labels) != len(images):
        listed = ", ".join(str(p) for p in images.values())
        raise UserError(
            f"{len(images)} input(s) not in HDF5 ({listed}) need one label file each, in the same "
            f"order, in labels=[...]; got {len(labels)}"
        )
    dense = [Path(str(p)) for p in (cfg.get("dense_labels") or [])]
    if dense and len(dense) != len(images):
        raise UserError(
            f"dense_labels=[...] needs one file per non-HDF5 input ({len(images)}), in the same "
            f"order as labels=[...]; got {len(dense)}"
        )
    for p in labels + dense:
        if not p.exists():
            raise UserError(f"label file {p} does not exist")
    return labels, dense


def _import(cfg: DictConfig, images: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Import the non-HDF5 ``images`` (each with its file in ``cfg.labels``) into ``folder``."""
    from sparse3d.data.convert import ConvertError
    from sparse3d.data.convert_lazy import convert_lazy

    labels, dense = _label_files(cfg, images)
    targets = {name: folder / f"{name}.h5" for name in images}
    existing = [t for t in targets.values() if t.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists: pass overwrite=true to replace it")
    names, mapping = _classes_and_map(cfg, labels)
    voxel = cfg.get("voxel_size_zyx_um")
    folder.mkdir(parents=True, exist_ok=True)
    truths = dense or [None] * len(labels)
    for (name, image), label, truth in zip(images.items(), labels, truths, strict=True):
        target = targets[name]
        try:
            convert_lazy(  # block by block: neither file is held whole in memory
                image,
                label,
                target,
                label_map=mapping,
                class_names=names,
                ignore_index=len(names),
                voxel_size_zyx_um=None if voxel is None else [float(v) for v in voxel],
                channel_axis=None if cfg.get("channel_axis") is None else int(cfg.channel_axis),
                dense_label_path=truth,
                overwrite=True,
            )
        except ConvertError as err:
            raise UserError(str(err)) from None
        log.info("imported %s + %s into %s", image, label, target)
    return targets


def configure_inputs(cfg: DictConfig, out: Path) -> None:
    """Point ``cfg.data`` at the inputs (importing non-HDF5 ones) or at the demo volumes."""
    with open_dict(cfg):
        if not cfg.inputs:
            for key in ("labels", "dense_labels"):
                if cfg.get(key):
                    raise UserError(f"{key}= given without inputs=[...]")
            cfg.data.volumes = list(cfg.demo_volumes)
            return
        given = _inputs(cfg)
        others = {n: p for n, p in given.items() if p.suffix.lower() not in H5_SUFFIXES}
        check_targets(cfg, out, list(given))
        imported = _import(cfg, others, out / "inputs") if others else {}
        paths = {n: str(imported.get(n, p)) for n, p in given.items()}
        cfg.data = OmegaConf.create(
            {
                **OmegaConf.to_container(cfg.data),
                "kind": "files",
                "paths": paths,
                "volumes": list(paths),
                "source": {"_target_": "sparse3d.data.sources.volume_files", "paths": paths},
            }
        )


def check_targets(cfg: DictConfig, out: Path, names, suffix: str = "_seg.h5") -> dict[str, Path]:
    """``{name: <out>/<name><suffix>}``; refuses existing ones unless ``overwrite=true``."""
    targets = {n: out / f"{n}{suffix}" for n in names}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists: pass overwrite=true to replace it")
    return targets
