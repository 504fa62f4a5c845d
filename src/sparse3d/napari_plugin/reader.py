"""napari reader for what sparse3d writes (layer 3), every layer at its voxel size (``scale``
in micrometres, z, y, x):

- a sparse3d HDF5 volume (``sparse3d.data.volume``): one Image layer per channel, the sparse
  label as a Labels layer ``<name> painting`` in painting codes (0 unlabelled, class ``c`` is
  ``c + 1``: paint on it and press Densify), the dense label (when stored) as ``<name> truth``;
- a densify / predict result file (``*_seg.h5``, ``format = sparse3d-prediction``): its
  ``labels`` as a Labels layer;
- a result TIFF (``write_tiff``: an ImageJ stack of class codes whose name holds ``seg``);
- an OME-Zarr segmentation (``*.ome.zarr`` with ``image-label`` metadata, written by the
  blockwise path; :mod:`sparse3d.data.ome_zarr`): its levels as a multiscale Labels layer.

Results show class ``c`` as ``c + 1`` too, so a result's colours are the painting's and class
names sit in the layer's ``features`` (row = label value, row 0 "unlabelled").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]
Reader = Callable[[Any], list[LayerData]]


def _features(class_names: Sequence[str]) -> dict[str, list]:
    """Labels features in painting codes: row ``v`` describes label value ``v``."""
    return {
        "index": list(range(len(class_names) + 1)),
        "class_name": ["unlabelled", *[str(n) for n in class_names]],
    }


def _painting_codes(label: np.ndarray, ignore_index: int | None) -> np.ndarray:
    """Class codes ``0..K-1`` (and ``ignore_index``) -> painting codes (0 unlabelled)."""
    out = label.astype(np.uint16) + 1
    if ignore_index is not None:
        out[label == ignore_index] = 0
    return out


def _is_h5(path: Path) -> bool:
    return path.suffix.lower() in (".h5", ".hdf5", ".hdf")


def _is_seg_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff") and "seg" in path.name.lower()


def _is_ome_labels(path: Path) -> bool:
    if not path.is_dir() or not path.name.lower().endswith(".zarr"):
        return False
    import json

    for meta in ("zarr.json", ".zattrs"):
        f = path / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, ValueError):
                return False
            attrs = attrs.get("attributes", attrs)
            attrs = attrs.get("ome", attrs)
            return "image-label" in attrs and "multiscales" in attrs
    return False


def get_reader(path: str | list[str]) -> Reader | None:
    """npe2 reader hook: a reader for ``path`` when it is a file sparse3d wrote, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if _is_h5(p) and p.is_file():
        import h5py

        try:
            with h5py.File(p, "r") as f:
                if "labels" in f and f.attrs.get("format") == "sparse3d-prediction":
                    return read_result_h5
                if "image" in f and "label" in f:
                    return read_volume
        except OSError:
            return None
        return None
    if _is_seg_tiff(p) and p.is_file():
        return read_result_tiff
    if _is_ome_labels(p):
        return read_ome_zarr_labels
    return None


def read_volume(path: str) -> list[LayerData]:
    """A sparse3d HDF5 volume as layers: channels (Image), painting and truth (Labels)."""
    from sparse3d.data.volume import load_volume

    vol = load_volume(path)
    meta, name = vol.meta, Path(path).stem
    scale = tuple(float(v) for v in meta.voxel_size_zyx_um)
    names, ign = tuple(meta.labels.class_names), int(meta.labels.ignore_index)
    layers: list[LayerData] = []
    for c, channel in enumerate(meta.channel_names):
        kw = {"name": f"{name} {channel}", "scale": scale, "blending": "additive"}
        if vol.image.shape[0] > 1:
            kw["colormap"] = ("green", "magenta", "cyan", "yellow", "gray")[c % 5]
        layers.append((vol.image[c], kw, "image"))
    painting = _painting_codes(vol.label, ign)
    kw = {"name": f"{name} painting", "scale": scale, "features": _features(names)}
    layers.append((painting, kw, "labels"))
    if vol.dense_label is not None:
        truth = _painting_codes(vol.dense_label, None)
        kw = {
            "name": f"{name} truth",
            "scale": scale,
            "features": _features(names),
            "visible": False,
        }
        layers.append((truth, kw, "labels"))
    return layers


def _attr_list(value: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value)]


def read_result_h5(path: str) -> list[LayerData]:
    """A result file's ``labels (Z, Y, X)`` as a Labels layer in painting codes."""
    import h5py

    with h5py.File(path, "r") as f:
        labels = f["labels"][...]
        names = _attr_list(f.attrs["class_names"]) if "class_names" in f.attrs else []
        voxel = f.attrs.get("voxel_size_zyx_um")
    kw: dict[str, Any] = {"name": Path(path).stem}
    if voxel is not None:
        kw["scale"] = tuple(float(v) for v in voxel)
    if not names:
        names = [f"class{c}" for c in range(int(labels.max()) + 1)]
    kw["features"] = _features(names)
    return [(_painting_codes(labels, None), kw, "labels")]


def read_result_tiff(path: str) -> list[LayerData]:
    """A result TIFF (ImageJ stack of class codes, ``write_tiff``) as a Labels layer."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        labels = tif.asarray()
        ij = tif.imagej_metadata or {}
        page = tif.pages[0]
        res = page.tags.get("XResolution"), page.tags.get("YResolution")
    if labels.ndim != 3 or labels.dtype.kind not in "ui":
        return []
    kw: dict[str, Any] = {"name": Path(path).stem}
    if "spacing" in ij and all(r is not None for r in res):
        yx = [r.value[1] / r.value[0] for r in (res[1], res[0])]  # (den / num): µm per pixel
        kw["scale"] = (float(ij["spacing"]), float(yx[0]), float(yx[1]))
    names = [f"class{c}" for c in range(int(labels.max()) + 1)]
    kw["features"] = _features(names)
    return [(_painting_codes(labels, None), kw, "labels")]


def read_ome_zarr_labels(path: str) -> list[LayerData]:
    """An OME-Zarr segmentation (levels as a multiscale Labels layer, class names from its
    ``image-label`` properties) in painting codes: densify's results (label value 0 named
    ``unlabelled``, class c stored as c + 1) as they are, other label images shifted lazily."""
    import json

    from sparse3d.data.ome_zarr import read_levels

    p = Path(path)
    levels = read_levels(p)
    names: list[str] = []
    for meta in ("zarr.json", ".zattrs"):
        if (p / meta).is_file():
            attrs = json.loads((p / meta).read_text())
            attrs = attrs.get("attributes", attrs)
            props = attrs.get("ome", attrs).get("image-label", {}).get("properties", [])
            names = [str(d.get("class", d.get("label-value"))) for d in props]
            break
    if names[:1] == ["unlabelled"]:  # densify's own result: already in painting codes
        names = names[1:]
        data = [lv.data for lv in levels]
    else:  # label value v is class v: shifted so that every class shows
        data = [(lv.data.astype(np.uint16) + 1) for lv in levels]
    kw: dict[str, Any] = {
        "name": p.name.removesuffix(".zarr").removesuffix(".ome"),
        "scale": levels[0].scale_zyx_um,
        "multiscale": len(data) > 1,
    }
    if names:
        kw["features"] = _features(names)
    return [(data if len(data) > 1 else data[0], kw, "labels")]
