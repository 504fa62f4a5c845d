"""Prediction of a volume file (layer 1), the body of :meth:`Predictor.predict_file`: checks the
input against the model, predicts it in memory or, when the volume and its results do not fit,
streamed (tiles read from the HDF5 file, results written into the chunked result file as they
come), and writes the result file with its optional TIFF stack and overview picture
(``sparse3d.inference.writers``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparse3d.inference.memory import needs_streaming
from sparse3d.inference.predictor import PredictionInputError, PredictionReport
from sparse3d.inference.sinks import Stores, scratch

if TYPE_CHECKING:
    from sparse3d.data.volume import Volume
    from sparse3d.inference.predictor import Predictor
    from sparse3d.inference.writers import ResultFile
    from sparse3d.labels import LabelSpec

logger = logging.getLogger(__name__)


def predict_file(
    predictor: Predictor,
    input_path: str | Path,
    output_path: str | Path,
    save_probabilities: bool = False,
    tiff: str | Path | None = None,
    overview_png: str | Path | None = None,
    overwrite: bool = False,
    stream: bool | None = None,
    attrs: dict[str, Any] | None = None,
) -> PredictionReport:
    """Segment a volume file with ``predictor``; see :meth:`Predictor.predict_file`."""
    from sparse3d.data.volume import VolumeFormatError, open_volume
    from sparse3d.inference.writers import ResultFile, check_output

    out = check_output(output_path, overwrite)
    tiff_path = check_output(tiff, overwrite)
    png_path = check_output(overview_png, overwrite)
    try:
        vol = open_volume(input_path, scan_values=False)
    except VolumeFormatError as err:
        raise PredictionInputError(str(err)) from None
    with vol:
        where = str(vol.path)
        _check_input(predictor, vol, where)
        shape = vol.shape_zyx
        k = predictor.net.num_classes
        prob_dtype = predictor.probabilities_dtype if save_probabilities else None
        if stream is None:
            stream = _needs_streaming(predictor, vol.num_channels, shape, save_probabilities)
        pct = predictor._percentiles(vol.image)
        labels_spec = label_spec(predictor.meta, k)
        meta_attrs = {
            "class_names": list(labels_spec.class_names),
            "channel_names": list(vol.meta.channel_names),
            "voxel_size_zyx_um": list(vol.meta.voxel_size_zyx_um),
            "source": where,
            "bn_mode": predictor.bn_mode,
            "precision": predictor.precision,
            **(attrs or {}),
        }
        result = ResultFile(out, shape, k, prob_dtype, meta_attrs)
        try:
            if stream:
                labels_src, image_src = _predict_streamed(predictor, vol, result, out, pct)
            else:
                labels_src, image_src = _predict_in_memory(predictor, vol, result, prob_dtype, pct)
            report = predictor.last_report
            assert report is not None
            result._file.attrs["input_tile"] = list(report.input_tile)
            result._file.attrs["bn_mode"] = report.bn_mode
            _write_extras(
                report, vol, labels_src, image_src, labels_spec, tiff_path, png_path, overwrite
            )
            result.commit()
        except BaseException:
            result.abort()
            raise
    report.outputs["labels"] = str(out)
    return report


def _check_input(predictor: Predictor, vol: Volume, where: str) -> None:
    """Refuse a volume whose channel count differs from the model's; warn about differing
    channel names or voxel size."""
    predictor._check_channels(vol.num_channels, where)
    meta = predictor.meta
    if meta is not None and tuple(vol.meta.channel_names) != tuple(meta.channel_names):
        logger.warning(
            "%s: channel names %s differ from the model's %s (order is what counts)",
            where,
            vol.meta.channel_names,
            meta.channel_names,
        )
    _warn_voxel_size(predictor, vol.meta.voxel_size_zyx_um, where)


def _predict_streamed(
    predictor: Predictor, vol: Volume, result: ResultFile, out: Path, pct
) -> tuple[Any, Any]:
    """Tiles read from the file, results written into the datasets of ``result`` (blending
    accumulators, if any, in a scratch file beside ``out``); returns the label and image
    datasets for the extra outputs."""
    shape = vol.shape_zyx
    k = predictor.net.num_classes
    stores = Stores(result.labels, result.probabilities)
    with scratch(out, k, shape, predictor.net.geometry.padding != "valid") as acc:
        sink = predictor._sink(stores, shape, *acc)
        predictor._run(vol.read_image, shape, sink, pct, str(vol.path), streamed=True)
    return result.labels, vol.image


def _predict_in_memory(
    predictor: Predictor, vol: Volume, result: ResultFile, prob_dtype: str | None, pct
) -> tuple[np.ndarray, np.ndarray]:
    """The whole image read, predicted into arrays, copied into ``result``; returns the labels
    ``(Z, Y, X)`` and the image ``(C, Z, Y, X)`` for the extra outputs."""
    shape = vol.shape_zyx
    k = predictor.net.num_classes
    image = vol.read_image((slice(None),) * 3)
    labels = np.zeros(shape, dtype=np.uint8)
    probs = np.zeros((k, *shape), dtype=prob_dtype) if prob_dtype else None
    sink = predictor._sink(Stores(labels, probs), shape)
    reader = predictor._array_reader(image)
    predictor._run(reader, shape, sink, pct, str(vol.path), streamed=False)
    result.labels[...] = labels
    if probs is not None:
        result.probabilities[...] = probs
    return labels, image


def _write_extras(
    report: PredictionReport,
    vol: Volume,
    labels_src,
    image_src,
    labels_spec: LabelSpec,
    tiff_path: Path | None,
    png_path: Path | None,
    overwrite: bool,
) -> None:
    """The optional TIFF stack of the labels and overview picture, recorded in ``report``."""
    from sparse3d.inference.writers import write_overview, write_tiff

    if tiff_path is not None:
        write_tiff(tiff_path, labels_src, vol.meta.voxel_size_zyx_um, overwrite)
        report.outputs["tiff"] = str(tiff_path)
    if png_path is not None:
        write_overview(
            png_path,
            image_src,
            labels_src,
            labels_spec,
            title=f"{Path(str(vol.path)).name}: prediction",
            voxel_size_zyx_um=vol.meta.voxel_size_zyx_um,
            channel_names=tuple(vol.meta.channel_names),
            overwrite=overwrite,
        )
        report.outputs["overview"] = str(png_path)


def _needs_streaming(predictor: Predictor, channels: int, shape, probabilities: bool) -> bool:
    """Whether the volume and its results do not fit the host's memory beside the tile pass
    (``memory.needs_streaming``)."""
    n = math.prod(shape)
    k = predictor.net.num_classes
    held = n * (4 * channels + 1)  # image float32 + labels uint8
    if probabilities:
        held += n * k * np.dtype(predictor.probabilities_dtype).itemsize
    if predictor.net.geometry.padding != "valid":
        held += n * 4 * (k + 1)  # blending accumulators
    input_tile = predictor.plan(shape).plan.input_tile
    return needs_streaming(
        held,
        float(predictor.profile.peak_bytes(input_tile, predictor.bytes_per_value)),
        float(predictor.profile.host_bytes(input_tile)) * predictor.batch_size,
        predictor.device,
        predictor.host_budget_bytes(),
    )


def _warn_voxel_size(predictor: Predictor, voxel_size, where: str) -> None:
    want = None if predictor.meta is None else predictor.meta.voxel_size_zyx_um
    if want is None:
        return
    ratio = [a / b for a, b in zip(voxel_size, want, strict=True)]
    if any(abs(r - 1) > 0.1 for r in ratio):
        logger.warning(
            "%s: voxel size %s um differs from the training data's %s um; consider resampling",
            where,
            tuple(voxel_size),
            tuple(want),
        )


def label_spec(meta, num_classes: int) -> LabelSpec:
    """The classes of the model's ``meta``, or ``class0..class{K-1}`` without one."""
    from sparse3d.labels import LabelSpec

    if meta is not None:
        return meta.labels
    return LabelSpec(tuple(f"class{i}" for i in range(num_classes)), num_classes)
