"""Tests for the HDF5 volume format: round trip, tile reads, validation, atomic writes."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparse3d.data.volume import (
    AXES,
    Volume,
    VolumeArrays,
    VolumeFormatError,
    VolumeMeta,
    load_volume,
    open_volume,
    write_volume,
)
from sparse3d.labels import XENOPUS, LabelSpec

SHAPE_ZYX = (12, 20, 18)


def _meta(channels: int = 2) -> VolumeMeta:
    return VolumeMeta(
        voxel_size_zyx_um=(2.04, 1.76, 1.76),
        channel_names=tuple(f"ch{i}" for i in range(channels)),
        labels=XENOPUS,
        annotated_slices={"z": (3, 7), "y": (5,), "x": ()},
    )


def _arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *SHAPE_ZYX)).astype(np.float32)
    dense = rng.integers(0, 3, size=SHAPE_ZYX, dtype=np.uint8)
    label = np.full(SHAPE_ZYX, XENOPUS.ignore_index, dtype=np.uint8)
    label[[3, 7]] = dense[[3, 7]]
    label[:, 5] = dense[:, 5]
    return image, label, dense


def _raw_file(
    path: Path,
    *,
    image: np.ndarray | None = None,
    label: np.ndarray | None = None,
    dense: np.ndarray | None = None,
    attrs: dict | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Write a volume-like file with h5py directly, so that it can be made invalid."""
    img, lab, _ = _arrays()
    image = img if image is None else image
    label = lab if label is None else label
    base = {
        "voxel_size_zyx_um": np.array([2.04, 1.76, 1.76]),
        "channel_names": np.array(["ch0", "ch1"], dtype=h5py.string_dtype()),
        "class_names": np.array(XENOPUS.class_names, dtype=h5py.string_dtype()),
        "ignore_index": XENOPUS.ignore_index,
        "annotated_z": np.array([3, 7]),
        "annotated_y": np.array([5]),
        "annotated_x": np.array([], dtype=np.int64),
        "format_version": 1,
    }
    base.update(attrs or {})
    with h5py.File(path, "w") as f:
        if "image" not in drop:
            f.create_dataset("image", data=image, chunks=True)
        if "label" not in drop:
            f.create_dataset("label", data=label, chunks=True)
        if dense is not None:
            f.create_dataset("dense_label", data=dense)
        for k, v in base.items():
            if k not in drop:
                f.attrs[k] = v
    return path


def test_round_trip(tmp_path: Path) -> None:
    image, label, dense = _arrays()
    meta = _meta()
    out = write_volume(tmp_path / "v.h5", image, label, meta, dense_label=dense)
    assert out == tmp_path / "v.h5"
    loaded = load_volume(out)
    assert isinstance(loaded, VolumeArrays)
    assert loaded.image.dtype == np.float32 and loaded.label.dtype == np.uint8
    np.testing.assert_array_equal(loaded.image, image)
    np.testing.assert_array_equal(loaded.label, label)
    np.testing.assert_array_equal(loaded.dense_label, dense)
    assert loaded.meta == meta
    assert loaded.meta.annotated_slices == {"z": (3, 7), "y": (5,), "x": ()}
    assert loaded.meta.voxel_size_zyx_um == (2.04, 1.76, 1.76)
    assert loaded.meta.labels == XENOPUS
    with open_volume(out) as vol:
        assert vol.shape_zyx == SHAPE_ZYX
        assert vol.num_channels == 2
        assert vol.image.shape == (2, *SHAPE_ZYX) and vol.image.chunks is not None
        assert vol.image.compression == "gzip"
        assert vol.label.shape == SHAPE_ZYX


def test_round_trip_without_dense_and_unsorted_meta(tmp_path: Path) -> None:
    image, label, _ = _arrays()
    meta = VolumeMeta((1, 1, 1), ["a", "b"], XENOPUS, {"z": [7, 3, 3], "y": (5,)})
    assert meta.annotated_slices == {"z": (3, 7), "y": (5,), "x": ()}
    path = write_volume(tmp_path / "v.h5", image.astype(np.float64), label.astype(np.int64), meta)
    loaded = load_volume(path)
    assert loaded.dense_label is None
    assert loaded.image.dtype == np.float32
    np.testing.assert_array_equal(loaded.label, label)
    with open_volume(path) as vol:
        assert vol.dense_label is None
        with pytest.raises(ValueError, match="no dense_label"):
            vol.read_dense_label((slice(0, 1),) * 3)


def test_partial_tile_read(tmp_path: Path) -> None:
    image, label, dense = _arrays()
    path = write_volume(tmp_path / "v.h5", image, label, _meta(), dense_label=dense)
    sl = (slice(2, 9), slice(4, 15), slice(1, 17))
    with open_volume(path) as vol:
        tile = vol.read_image(sl)
        assert tile.shape == (2, 7, 11, 16) and tile.dtype == np.float32
        np.testing.assert_array_equal(tile, image[:, 2:9, 4:15, 1:17])
        np.testing.assert_array_equal(vol.read_label(sl), label[2:9, 4:15, 1:17])
        np.testing.assert_array_equal(vol.read_dense_label(sl), dense[2:9, 4:15, 1:17])
        with pytest.raises(ValueError, match="three slices"):
            vol.read_label((slice(0, 2), slice(0, 2)))  # type: ignore[arg-type]


def test_tile_read_touches_only_needed_chunks(tmp_path: Path) -> None:
    """A small tile of a larger volume reads only the chunks it intersects."""
    shape = (64, 128, 128)
    image = np.zeros((1, *shape), np.float32)
    label = np.zeros(shape, np.uint8)
    meta = VolumeMeta((1, 1, 1), ("c",), LabelSpec(("bg", "fg"), 255), {})
    path = write_volume(tmp_path / "big.h5", image, label, meta)
    with open_volume(path, scan_values=False) as vol:
        assert vol.image.chunks == (1, 32, 64, 64)
        # corrupt every image chunk except the first one on disk: a tile inside the first chunk
        # must still read, a tile in any other chunk must not
        dsid = vol.image.id
        n = dsid.get_num_chunks()
        assert n == 8
        offsets = [dsid.get_chunk_info(i) for i in range(n)]
    first = next(c for c in offsets if c.chunk_offset == (0, 0, 0, 0))
    raw = bytearray(path.read_bytes())
    for info in offsets:
        if info is not first:
            raw[info.byte_offset : info.byte_offset + info.size] = b"\xff" * info.size
    path.write_bytes(bytes(raw))
    with open_volume(path, scan_values=False) as vol:
        tile = vol.read_image((slice(0, 32), slice(0, 64), slice(0, 64)))
        assert tile.shape == (1, 32, 64, 64) and not tile.any()
        with pytest.raises(OSError):
            vol.read_image((slice(32, 40), slice(0, 8), slice(0, 8)))


def test_volume_pickles_and_reopens(tmp_path: Path) -> None:
    image, label, _ = _arrays()
    path = write_volume(tmp_path / "v.h5", image, label, _meta())
    with open_volume(path) as vol:
        clone = pickle.loads(pickle.dumps(vol))
    assert isinstance(clone, Volume)
    np.testing.assert_array_equal(
        clone.read_label((slice(3, 4), slice(None), slice(None))), label[3:4]
    )
    clone.close()
    with pytest.raises(ValueError, match="closed"):
        clone.read_label((slice(0, 1),) * 3)


def test_overwrite_refused_and_atomic(tmp_path: Path) -> None:
    image, label, _ = _arrays()
    path = write_volume(tmp_path / "v.h5", image, label, _meta())
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_volume(path, image + 1, label, _meta())
    assert path.read_bytes() == before
    write_volume(path, image + 1, label, _meta(), overwrite=True)
    np.testing.assert_array_equal(load_volume(path).image, image + 1)
    # a failing write leaves neither a partial file nor a temporary behind
    bad = image.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_volume(tmp_path / "w.h5", bad, label, _meta())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.h5"]


def test_write_interrupted_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, label, _ = _arrays()

    def boom(*args: object) -> None:
        raise RuntimeError("disk full")

    # the rename (os.link without overwrite, os.replace with it) fails after the data is written
    monkeypatch.setattr("sparse3d.atomic.os.link", boom)
    monkeypatch.setattr("sparse3d.atomic.os.replace", boom)
    for overwrite in (False, True):
        with pytest.raises(RuntimeError, match="disk full"):
            write_volume(tmp_path / "v.h5", image, label, _meta(), overwrite=overwrite)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label": np.full(SHAPE_ZYX, 9, np.uint8)}, "codes \\[9\\]"),
        ({"image": np.zeros((2, 12, 20, 17), np.float32)}, "image spatial shape"),
        ({"image": np.zeros((3, *SHAPE_ZYX), np.float32)}, "3 channels"),
        ({"label": np.zeros((12, 20), np.uint8)}, "3D"),
    ],
)
def test_write_rejects_bad_arrays(tmp_path: Path, kwargs: dict, match: str) -> None:
    image, label, _ = _arrays()
    args = {"image": image, "label": label, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_volume(tmp_path / "v.h5", args["image"], args["label"], _meta())
    assert list(tmp_path.iterdir()) == []


def test_meta_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="voxel_size"):
        VolumeMeta((1.0, -1.0, 1.0), ("a",), XENOPUS, {})
    with pytest.raises(ValueError, match="unknown axes"):
        VolumeMeta((1.0, 1.0, 1.0), ("a",), XENOPUS, {"t": (1,)})
    assert AXES == ("z", "y", "x")


# ---- reader validation: one test per bad-input case ----------------------------------------


def _expect(path: Path, match: str) -> str:
    with pytest.raises(VolumeFormatError, match=match) as info:
        open_volume(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_valid_raw_file_opens(tmp_path: Path) -> None:
    """The raw builder itself produces a valid file (so each bad case differs by one defect)."""
    with open_volume(_raw_file(tmp_path / "ok.h5")) as vol:
        assert vol.shape_zyx == SHAPE_ZYX


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.h5", "does not exist")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("this is not hdf5\n")
    _expect(path, "not a readable HDF5 file")


def test_truncated_file(tmp_path: Path) -> None:
    image, label, _ = _arrays()
    path = write_volume(tmp_path / "v.h5", image, label, _meta())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _expect(path, "truncated or corrupt")


@pytest.mark.parametrize("name", ["image", "label"])
def test_missing_dataset(tmp_path: Path, name: str) -> None:
    _expect(_raw_file(tmp_path / "v.h5", drop=(name,)), f"missing dataset '{name}'")


@pytest.mark.parametrize("attr", ["voxel_size_zyx_um", "ignore_index", "annotated_x"])
def test_missing_attribute(tmp_path: Path, attr: str) -> None:
    _expect(_raw_file(tmp_path / "v.h5", drop=(attr,)), f"missing root attribute.*{attr}")


def test_image_not_4d(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "v.h5", image=np.zeros(SHAPE_ZYX, np.float32))
    _expect(path, "image must be 4D")


def test_label_not_3d(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "v.h5", label=np.zeros((1, *SHAPE_ZYX), np.uint8))
    _expect(path, "label must be 3D")


def test_shape_mismatch(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "v.h5", label=np.zeros((12, 20, 17), np.uint8))
    _expect(path, r"image spatial shape \(12, 20, 18\) != label shape \(12, 20, 17\)")


def test_dense_label_shape_mismatch(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "v.h5", dense=np.zeros((12, 19, 18), np.uint8))
    _expect(path, "dense_label shape")


def test_label_codes_outside_classes(tmp_path: Path) -> None:
    _, label, _ = _arrays()
    label[11, 19, 17] = 7
    label[0, 0, 0] = 200
    msg = _expect(_raw_file(tmp_path / "v.h5", label=label), "label has codes")
    assert "[7, 200]" in msg


def test_dense_label_codes_outside_classes(tmp_path: Path) -> None:
    _, _, dense = _arrays()
    dense[5, 5, 5] = 4
    _expect(_raw_file(tmp_path / "v.h5", dense=dense), r"dense_label has codes \[4\]")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image(tmp_path: Path, bad: float) -> None:
    image, _, _ = _arrays()
    image[1, 11, 19, 17] = bad
    _expect(_raw_file(tmp_path / "v.h5", image=image), "NaN or Inf")


def test_non_finite_scan_can_be_skipped(tmp_path: Path) -> None:
    image, _, _ = _arrays()
    image[0, 0, 0, 0] = np.nan
    path = _raw_file(tmp_path / "v.h5", image=image)
    with open_volume(path, scan_values=False) as vol:
        assert np.isnan(vol.read_image((slice(0, 1),) * 3)[0]).all()


def test_scan_is_chunk_wise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a small block budget the scan still finds a bad code in the last slab."""
    monkeypatch.setattr("sparse3d.data.volume._SCAN_BLOCK_BYTES", 1)
    _, label, _ = _arrays()
    label[-1, -1, -1] = 9
    _expect(_raw_file(tmp_path / "v.h5", label=label), r"label has codes \[9\]")


@pytest.mark.parametrize(("axis", "index"), [("z", 12), ("y", -1), ("x", 18)])
def test_annotated_slice_out_of_range(tmp_path: Path, axis: str, index: int) -> None:
    path = _raw_file(tmp_path / "v.h5", attrs={f"annotated_{axis}": np.array([1, index])})
    _expect(path, f"annotated_{axis} indices \\[{index}\\] outside")


def test_bad_attribute_values(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "v.h5", attrs={"ignore_index": 1})
    _expect(path, "invalid attributes.*collides")
    path = _raw_file(tmp_path / "w.h5", attrs={"format_version": 99})
    _expect(path, "format_version 99")
    path = _raw_file(tmp_path / "u.h5", attrs={"channel_names": np.array(["a"], dtype="S")})
    _expect(path, "1 channels|has 2 channels")
