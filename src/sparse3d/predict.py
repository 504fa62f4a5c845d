"""Segment one volume with a trained model (layer 3 entry point).

    python -m sparse3d.predict ckpt=model.pt input=vol.h5 output=seg.h5 [tiff=seg.tif]
        [overview=seg.png] [probabilities=true] [precision=bf16] [input_tile=[z,y,x]]
        [bn_mode=recalibrate|batch|running] [memory_gb=8] [overwrite=true]

Configuration: ``conf/predict.yaml``. Hydra runs in the current directory and writes no
``outputs/`` folder. Bad input (missing file, a checkpoint that needs unsafe unpickling, a
channel count the model does not expect, an illegal tile, an existing output) ends with one line
on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sparse3d.cli import H5_SUFFIXES, UserError, run_hydra

log = logging.getLogger("sparse3d.predict")


def _require(cfg: DictConfig, key: str) -> str:
    value = cfg.get(key)
    if value in (None, ""):
        raise UserError(
            f"{key}= is required (python -m sparse3d.predict ckpt=... input=... output=...)"
        )
    return str(value)


def _input_tile(cfg: DictConfig) -> tuple[int, ...] | None:
    """The ``input_tile=[z,y,x]`` of the command line, or None (chosen from the memory budget).

    The old key ``tile=`` is still accepted, with a deprecation warning.
    """
    value = cfg.get("input_tile")
    old = cfg.get("tile")  # deprecated alias of input_tile (before the rename); kept working
    if old is not None:
        log.warning("tile= is deprecated, use input_tile=[z,y,x]")
        if value is not None:
            raise UserError("give input_tile= only (tile= is its deprecated old name)")
        value = old
    return None if value is None else tuple(int(n) for n in value)


def _as_volume(path: Path, channel_axis: int | None, meta, tmp_dir: Path) -> Path:
    """A non-HDF5 image as a temporary sparse3d volume (through ``sparse3d.data.convert``)."""
    try:
        from sparse3d.data import convert
    except ImportError:  # pragma: no cover - importer not installed
        raise UserError(f"{path}: only .h5 volumes are supported") from None
    import numpy as np

    from sparse3d.data.volume import VolumeMeta, write_volume
    from sparse3d.labels import LabelSpec

    try:
        data, spacing = convert.read_zyx(path, channel_axis)
    except convert.ConvertError as err:
        raise UserError(str(err)) from None
    image = data[None] if data.ndim == 3 else data
    spacing = tuple(1.0 if s is None else float(s) for s in spacing)
    names = (
        meta.channel_names
        if len(meta.channel_names) == image.shape[0]
        else tuple(f"channel{i}" for i in range(image.shape[0]))
    )
    labels = LabelSpec(meta.class_names, meta.ignore_index)
    vmeta = VolumeMeta(spacing, names, labels)
    out = tmp_dir / f"{path.name}.h5"
    label = np.full(image.shape[1:], labels.ignore_index, dtype=np.uint8)
    write_volume(out, image.astype(np.float32, copy=False), label, vmeta)
    return out


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run one prediction as configured; returns the prediction report as a dict."""
    from sparse3d.checkpoint import CheckpointError, load_model
    from sparse3d.inference import PredictionInputError, Predictor

    ckpt = Path(_require(cfg, "ckpt"))
    inp = Path(_require(cfg, "input"))
    out = Path(_require(cfg, "output"))
    if not inp.exists():
        raise UserError(f"{inp}: input file does not exist")
    try:
        net, meta = load_model(ckpt)
    except (FileNotFoundError, CheckpointError) as err:
        raise UserError(str(err)) from None
    input_tile = _input_tile(cfg)
    try:
        predictor = Predictor(
            net,
            meta,
            input_tile=input_tile,
            memory_budget_gb=cfg.get("memory_gb"),
            precision=str(cfg.precision),
            bn_mode=str(cfg.bn_mode),
            device=str(cfg.device),
            batch_size=int(cfg.batch_size),
            probabilities_dtype=str(cfg.probabilities_dtype),
            progress=bool(cfg.progress),
            memory_model=str(cfg.get("memory_model", "traced")),
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    with tempfile.TemporaryDirectory(prefix="sparse3d-predict-") as tmp:
        volume = inp
        if inp.suffix.lower() not in H5_SUFFIXES:
            ch = cfg.get("channel_axis")
            volume = _as_volume(inp, None if ch is None else int(ch), meta, Path(tmp))
        try:
            report = predictor.predict_file(
                volume,
                out,
                save_probabilities=bool(cfg.probabilities),
                tiff=cfg.get("tiff"),
                overview_png=cfg.get("overview"),
                overwrite=bool(cfg.overwrite),
                stream=cfg.get("stream"),
                attrs={"model": str(ckpt), "input": str(inp)},
            )
        except (PredictionInputError, FileExistsError, FileNotFoundError, IsADirectoryError) as err:
            raise UserError(str(err)) from None
    summary = report.to_dict()
    log.info(
        "wrote %s: %s voxels, %d tile(s) of %s, bn %s, %s, %.1f s",
        out,
        "x".join(map(str, report.shape_zyx)),
        report.num_tiles,
        "x".join(map(str, report.input_tile)),
        report.bn_mode,
        report.precision,
        report.seconds,
    )
    return summary


def main() -> None:
    run_hydra("predict", predict)


if __name__ == "__main__":
    main()
