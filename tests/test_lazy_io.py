"""Lazy readers (sparse3d.data.lazy) and the OME-Zarr writers (sparse3d.data.ome_zarr): every
format read lazily equals the importer's eager array, graphs pickle small and compute on worker
processes, and the labels store round-trips with its pyramid and NGFF 0.4 metadata."""

from __future__ import annotations

import json
import pickle

import dask
import dask.array as da
import h5py
import nibabel
import nrrd
import numpy as np
import pytest
import tifffile
import zarr

from sparse3d.data import lazy_sources
from sparse3d.data.formats import ConvertError, read_zyx
from sparse3d.data.lazy import (
    auto_chunks,
    close_handles,
    lazy_volume,
    open_image,
    open_image_source,
    open_labels,
)
from sparse3d.data.ome_zarr import (
    OmeZarrLabelsWriter,
    overview_level,
    pyramid_factors,
    read_levels,
    write_image,
)
from sparse3d.data.volume import VolumeMeta, load_volume, write_volume
from sparse3d.labels import LabelSpec

SYNC = {"scheduler": "synchronous"}


def _volume(tmp_path, rng, dense=True):
    image = rng.normal(size=(2, 20, 70, 90)).astype(np.float32)
    label = np.full((20, 70, 90), 3, np.uint8)
    label[5] = rng.integers(0, 3, (70, 90))
    meta = VolumeMeta(
        voxel_size_zyx_um=(2.0, 0.5, 0.5),
        channel_names=("a", "b"),
        labels=LabelSpec(class_names=("x", "y", "z"), ignore_index=3),
        annotated_slices={"z": (5,)},
    )
    truth = rng.integers(0, 3, (20, 70, 90)).astype(np.uint8) if dense else None
    return write_volume(tmp_path / "vol.h5", image, label, meta, dense_label=truth)


def _small(arr: da.Array, limit: int = 20_000) -> bool:
    """The graph pickles in under ``limit`` bytes (the data itself is larger)."""
    return arr.nbytes > 4 * limit and len(pickle.dumps(arr)) < limit


# --------------------------------------------------------------------------------------------
# readers


def test_sparse3d_volume(tmp_path, rng):
    path = _volume(tmp_path, rng)
    eager = load_volume(path)
    vol = lazy_volume(path)
    assert vol.meta == eager.meta and vol.shape_zyx == (20, 70, 90)
    assert vol.image.shape == (2, 20, 70, 90) and vol.image.dtype == np.float32
    with dask.config.set(**SYNC):
        np.testing.assert_array_equal(vol.image.compute(), eager.image)
        np.testing.assert_array_equal(vol.label.compute(), eager.label)
        np.testing.assert_array_equal(vol.dense_label.compute(), eager.dense_label)
        np.testing.assert_array_equal(open_image(path).compute(), eager.image)
        np.testing.assert_array_equal(open_labels(path).compute(), eager.label)
    assert _small(vol.image)
    assert open_image_source(path).spacing_zyx_um == (2.0, 0.5, 0.5)


def test_volume_without_dense_label(tmp_path, rng):
    assert lazy_volume(_volume(tmp_path, rng, dense=False)).dense_label is None


def test_hdf5_without_image_names_its_datasets(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["label"] = np.zeros((4, 5, 6), np.uint8)
        f["group/stuff"] = np.zeros((2, 3))
    with pytest.raises(ValueError) as err:
        open_image(path)
    msg = str(err.value)
    assert "\n" not in msg and "no image dataset" in msg
    assert "label (4, 5, 6)" in msg and "group/stuff (2, 3)" in msg
    assert open_labels(path).shape == (4, 5, 6)  # the labels are found
    assert open_image(f"{path}/label").shape == (1, 4, 5, 6)  # a named dataset is read


def test_generic_hdf5_raw(tmp_path, rng):
    data = rng.integers(0, 9, (12, 30, 40)).astype(np.uint16)
    with h5py.File(tmp_path / "raw.h5", "w") as f:
        f.create_dataset("volumes/raw", data=data, chunks=(4, 10, 10))
    arr = open_image(tmp_path / "raw.h5")
    np.testing.assert_array_equal(arr.compute(**SYNC)[0], data)
    assert arr.dtype == np.uint16


def test_close_handles_lets_a_writer_open_the_file(tmp_path, rng):
    path = _volume(tmp_path, rng)
    open_labels(path).sum().compute(**SYNC)  # leaves a cached read handle in this thread
    with pytest.raises(OSError):
        h5py.File(path, "r+")
    close_handles()
    with h5py.File(path, "r+") as f:
        f.attrs["touched"] = 1
    assert open_labels(path).shape == (20, 70, 90)


def test_zarr_plain_array_and_group(tmp_path, rng):
    data = rng.integers(0, 255, (16, 40, 50)).astype(np.uint8)
    z = zarr.create(
        shape=data.shape, chunks=(8, 20, 20), dtype=data.dtype, store=str(tmp_path / "a.zarr")
    )
    z[...] = data
    arr = open_image(tmp_path / "a.zarr")
    np.testing.assert_array_equal(arr.compute(**SYNC), read_zyx(tmp_path / "a.zarr")[0][None])
    assert arr.chunksize[1:] == (16, 40, 50)  # grown from the store's chunks up to the volume
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    only = zarr.create(
        shape=data.shape, chunks=(4, 8, 8), dtype=data.dtype, store=str(tmp_path / "g.zarr/only")
    )
    only[...] = data
    np.testing.assert_array_equal(open_labels(tmp_path / "g.zarr").compute(**SYNC), data)
    np.testing.assert_array_equal(open_labels(tmp_path / "g.zarr" / "only").compute(**SYNC), data)


def test_ome_zarr_image_round_trip(tmp_path, rng):
    image = rng.random((2, 24, 150, 130)).astype(np.float32)
    path = write_image(
        tmp_path / "big.ome.zarr", da.from_array(image, chunks=(1, 7, 33, 50)), (1.0, 0.5, 0.5)
    )
    src = open_image_source(path)
    assert src.spacing_zyx_um == (1.0, 0.5, 0.5)
    np.testing.assert_array_equal(src.data.compute(**SYNC), image)
    np.testing.assert_array_equal(src.data.compute(**SYNC), read_zyx(path, channel_axis=0)[0])
    levels = read_levels(path)
    assert [lv.data.shape for lv in levels] == [(2, 24, 150, 130), (2, 24, 75, 65)]  # z 1 um stays
    np.testing.assert_array_equal(levels[1].data.compute(**SYNC), image[:, :, ::2, ::2])
    attrs = json.loads((path / ".zattrs").read_text())
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["channel_0", "channel_1"]


def test_tiff_multipage_and_multichannel(tmp_path, rng):
    stack = rng.integers(0, 4000, (30, 70, 90)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    arr = open_image(tmp_path / "stack.tif", chunks=8)
    assert arr.chunksize == (1, 8, 8, 8)
    np.testing.assert_array_equal(arr.compute(**SYNC), read_zyx(tmp_path / "stack.tif")[0][None])
    assert _small(open_image(tmp_path / "stack.tif"))

    multi = rng.integers(0, 4000, (12, 3, 40, 50)).astype(np.uint16)  # ImageJ hyperstack ZCYX
    meta = {"axes": "ZCYX", "spacing": 2.0, "unit": "um"}
    tifffile.imwrite(
        tmp_path / "multi.tif", multi, imagej=True, resolution=(2.0, 2.0), metadata=meta
    )
    eager, spacing = read_zyx(tmp_path / "multi.tif", channel_axis=1)
    src = open_image_source(tmp_path / "multi.tif")  # the C axis is found from the series axes
    np.testing.assert_array_equal(src.data.compute(**SYNC), eager)
    assert src.spacing_zyx_um == pytest.approx(spacing) and spacing[0] == pytest.approx(2.0)
    np.testing.assert_array_equal(
        open_image(tmp_path / "multi.tif", channel_axis=1).compute(**SYNC), eager
    )


def test_tiff_block_reads_only_its_chunk(tmp_path, rng, monkeypatch):
    """A compressed, tiled TIFF goes through tifffile's zarr store: a block read decodes only
    its tiles, never the whole stack."""
    stack = rng.integers(0, 4000, (64, 64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, compression="zlib", tile=(16, 16))
    arr = open_image(tmp_path / "s.tif", chunks=16)
    seen: list[int] = []
    real = lazy_sources._OPENERS["tiff"]

    def spy(src):
        read, close = real(src)
        return (lambda index: seen.append(read(index).size) or read(index)), close

    monkeypatch.setitem(lazy_sources._OPENERS, "tiff", spy)
    lazy_sources._local.cache = None  # no cached handle from earlier reads
    block = arr[0, 16:32, 0:16, 48:64].compute(**SYNC)
    np.testing.assert_array_equal(block, stack[16:32, 0:16, 48:64])
    assert seen == [16**3]


def _write_every_format(folder, data):
    """``data`` (Z, Y, X) as HDF5, Zarr, TIFF, NIfTI and raw NRRD files; returns the paths."""
    with h5py.File(folder / "d.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(16, 64, 64))
    z = zarr.create(
        shape=data.shape, chunks=(16, 64, 64), dtype=data.dtype, store=str(folder / "d.zarr")
    )
    z[...] = data
    tifffile.imwrite(folder / "d.tif", data)
    nibabel.save(nibabel.Nifti1Image(data.T, np.eye(4)), folder / "d.nii")
    nrrd.write(str(folder / "d.nrrd"), data.T, {"encoding": "raw"}, index_order="F")
    return [folder / n for n in ("d.h5", "d.zarr", "d.tif", "d.nii", "d.nrrd")]


def test_one_block_never_reads_the_volume(tmp_path, rng):
    """Reading one block allocates a fraction of the volume, whatever the format."""
    import tracemalloc

    data = rng.integers(0, 4000, (64, 256, 256)).astype(np.uint16)  # 8 MiB
    for path in _write_every_format(tmp_path, data):
        arr = open_image(path, chunks=16)
        arr[0, :16, :16, :16].compute(**SYNC)  # imports done before measuring
        lazy_sources._local.cache = None  # open the file afresh inside the measurement
        tracemalloc.start()
        block = arr[0, 16:32, 32:48, 64:80].compute(**SYNC)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(block, data[16:32, 32:48, 64:80])
        # TIFF reads whole strips of 16 pages; without zarr 3, whole pages (a quarter, copied)
        whole_pages = path.suffix == ".tif" and int(zarr.__version__.split(".")[0]) < 3
        assert peak < data.nbytes / (1.8 if whole_pages else 4), (path.name, peak)


def test_nifti(tmp_path, rng):
    data = rng.random((40, 30, 20)).astype(np.float32)  # (x, y, z)
    img = nibabel.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_xyzt_units("micron")
    for name in ("v.nii", "v.nii.gz"):
        nibabel.save(img, tmp_path / name)
        src = open_image_source(tmp_path / name, chunks=(8, 16, 16))
        eager, spacing = read_zyx(tmp_path / name)
        assert src.data.shape == (1, 20, 30, 40) and spacing == (2.0, 0.5, 0.5)
        np.testing.assert_array_equal(src.data.compute(**SYNC)[0], eager)
        assert src.spacing_zyx_um == spacing
    five = rng.random((10, 8, 6, 1, 2)).astype(np.float32)  # (x, y, z, t=1, c)
    nibabel.save(nibabel.Nifti1Image(five, np.eye(4)), tmp_path / "c.nii")
    eager, _ = read_zyx(tmp_path / "c.nii", channel_axis=3)
    np.testing.assert_array_equal(open_image(tmp_path / "c.nii").compute(**SYNC), eager)


def test_nrrd_raw_is_lazy_and_gzip_loads(tmp_path, rng):
    data = rng.random((30, 20, 10)).astype(np.float32)
    nrrd.write(str(tmp_path / "r.nrrd"), data, {"encoding": "raw"}, index_order="F")
    nrrd.write(str(tmp_path / "g.nrrd"), data, {"encoding": "gzip"}, index_order="F")
    raw = open_image(tmp_path / "r.nrrd")
    np.testing.assert_array_equal(raw.compute(**SYNC)[0], read_zyx(tmp_path / "r.nrrd")[0])
    assert _small(raw, limit=5_000)
    np.testing.assert_array_equal(
        open_image(tmp_path / "g.nrrd").compute(**SYNC)[0], data.transpose(2, 1, 0)
    )


def test_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    for path, words in [
        (tmp_path / "x.png", "unknown format"),
        (tmp_path / "no.tif", "does not exist"),
    ]:
        with pytest.raises(ConvertError, match=words):
            open_image(path)
    four = np.zeros((3, 4, 5, 6), np.uint8)
    tifffile.imwrite(tmp_path / "four.tif", four, photometric="minisblack")
    with pytest.raises(ConvertError, match="pass channel_axis"):
        open_image(tmp_path / "four.tif")


def test_auto_chunks_follow_the_store():
    assert auto_chunks((1000, 2048, 2048)) == (128, 128, 128)  # no store chunks: a cube
    assert auto_chunks((1000, 2048, 2048), (32, 64, 64)) == (128, 128, 128)
    assert auto_chunks((1000, 2048, 2048), (1, 2048, 2048)) == (1, 2048, 2048)  # never split
    assert auto_chunks((1000, 2048, 2048), (1, 16, 2048)) == (32, 32, 2048)
    assert auto_chunks((7, 9, 11), (2, 3, 3)) == (7, 9, 11)


# --------------------------------------------------------------------------------------------
# labels writer


def test_labels_writer_round_trip(tmp_path, rng):
    labels = rng.integers(0, 3, (20, 100, 90)).astype(np.uint8)
    out = tmp_path / "seg.ome.zarr"
    writer = OmeZarrLabelsWriter(
        out, labels.shape, (1.0, 0.5, 0.5), ("inside", "membrane", "background"), (8, 32, 32)
    )
    for z0 in range(0, 20, 8):  # block by block, chunk-aligned
        writer.write((slice(z0, z0 + 8), slice(0, 100), slice(0, 90)), labels[z0 : z0 + 8])
    with pytest.raises(ValueError, match="not aligned"):
        writer.write((slice(3, 8), slice(0, 32), slice(0, 32)), labels[3:8, :32, :32])
    assert writer.tmp.is_dir() and not out.exists()  # temporary name until finished
    assert writer.finish(min_edge=20) == out
    assert not writer.tmp.exists()

    levels = read_levels(out)
    np.testing.assert_array_equal(levels[0].data.compute(**SYNC), labels)
    np.testing.assert_array_equal(levels[1].data.compute(**SYNC), labels[:, ::2, ::2])
    np.testing.assert_array_equal(open_labels(out).compute(**SYNC), labels)
    attrs = json.loads((out / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [
        (a, "space", "micrometer") for a in "zyx"
    ]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales[:3] == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert [d["path"] for d in ms["datasets"]] == [str(i) for i in range(len(levels))]
    assert len(levels) >= 3 and max(levels[-1].data.shape) <= 20
    for lv in levels[1:]:  # every level is a stride subsample of level 0
        f = tuple(int(k) for k in lv.factor_zyx)
        np.testing.assert_array_equal(lv.data.compute(**SYNC), labels[:: f[0], :: f[1], :: f[2]])
    il = attrs["image-label"]
    assert [p["class"] for p in il["properties"]] == ["inside", "membrane", "background"]
    assert [c["label-value"] for c in il["colors"]] == [0, 1, 2]
    assert all(len(c["rgba"]) == 4 for c in il["colors"])
    zarray = json.loads((out / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["zarr_format"] == 2

    with pytest.raises(FileExistsError, match="overwrite=True"):
        OmeZarrLabelsWriter(out, labels.shape, (1.0, 0.5, 0.5), ("a", "b", "c"))
    again = OmeZarrLabelsWriter(out, labels.shape, (1.0, 0.5, 0.5), ("a", "b", "c"), overwrite=True)
    again.store(np.zeros_like(labels))
    again.finish()
    assert open_labels(out).max().compute(**SYNC) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.ome.zarr"]  # nothing left over


def test_labels_writer_abort_leaves_nothing(tmp_path):
    out = tmp_path / "seg.ome.zarr"
    with pytest.raises(RuntimeError):
        with OmeZarrLabelsWriter(out, (4, 8, 8), (1, 1, 1), ("a", "b")):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_pyramid_keeps_anisotropic_z_until_xy_catch_up():
    assert pyramid_factors((100, 2048, 2048), (4.0, 0.5, 0.5), min_edge=128) == [
        (1, 2, 2),
        (1, 2, 2),
        (1, 2, 2),
        (2, 2, 2),
    ]
    assert pyramid_factors((512, 512, 512), (1, 1, 1), min_edge=128) == [(2, 2, 2)] * 2
    assert pyramid_factors((10, 64, 64), (1, 1, 1), min_edge=128) == []


def test_overview_level(tmp_path, rng):
    image = rng.random((1, 32, 256, 256)).astype(np.float32)
    path = write_image(tmp_path / "i.ome.zarr", image, (1.0, 1.0, 1.0), min_edge=32)
    assert overview_level(path, 32 * 256 * 256).index == 0
    level = overview_level(path, 200_000)
    assert level.index == 2 and np.prod(level.data.shape[-3:]) <= 200_000
    assert overview_level(path, 10).index == len(read_levels(path)) - 1


# --------------------------------------------------------------------------------------------
# worker processes


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_reads_and_writes_on_worker_processes(tmp_path, rng, cluster_client):
    """Graphs of every reader pickle to worker processes and compute there; level 0 of a labels
    store is written by the workers and the pyramid built on them."""
    vol = _volume(tmp_path, rng)
    stack = rng.integers(0, 4000, (20, 40, 50)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    nibabel.save(nibabel.Nifti1Image(stack.T.astype(np.float32), np.eye(4)), tmp_path / "s.nii")
    z = zarr.create(
        shape=stack.shape, chunks=(5, 20, 20), dtype=stack.dtype, store=str(tmp_path / "s.zarr")
    )
    z[...] = stack
    arrays = {
        "h5": open_image(vol, chunks=8)[0],
        "tif": open_image(tmp_path / "s.tif", chunks=8)[0],
        "nii": open_image(tmp_path / "s.nii", chunks=8)[0],
        "zarr": open_image(tmp_path / "s.zarr", chunks=8)[0],
    }
    sums = dict(
        zip(
            arrays,
            cluster_client.compute([a.sum() for a in arrays.values()], sync=True),
            strict=True,
        )
    )
    assert sums["h5"] == pytest.approx(
        float(load_volume(vol).image[0].sum(dtype=np.float64)), rel=1e-5
    )
    for k in ("tif", "nii", "zarr"):
        assert sums[k] == pytest.approx(float(stack.sum())), k

    labels = (da.from_array(stack, chunks=(4, 16, 16)) % 3).astype(np.uint8)
    out = tmp_path / "seg.ome.zarr"
    writer = OmeZarrLabelsWriter(
        out, stack.shape, (1, 1, 1), ("a", "b", "c"), chunks_zyx=(4, 16, 16)
    )
    writer.store(labels)  # runs on the workers (the client is the default scheduler)
    writer.finish(min_edge=10)
    levels = read_levels(out)
    np.testing.assert_array_equal(levels[0].data.compute(**SYNC), stack % 3)
    np.testing.assert_array_equal(levels[1].data.compute(**SYNC), (stack % 3)[::2, ::2, ::2])
    workers = cluster_client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2


def test_lazy_import_equals_the_importer(tmp_path):
    """densify's block-by-block import writes what the in-memory importer writes: image, mapped
    labels and the annotated slices (fully labelled planes and a scribble's cover)."""
    import tifffile

    from sparse3d.data.convert import convert
    from sparse3d.data.convert_lazy import convert_lazy
    from sparse3d.data.volume import load_volume

    rng = np.random.default_rng(0)
    img = rng.integers(0, 1000, (2, 30, 70, 90)).astype(np.uint16)
    lab = np.zeros((30, 70, 90), np.uint8)
    lab[5] = rng.integers(1, 4, (70, 90))
    lab[:, 33] = 2
    lab[:, :, 60] = 1
    lab[12:14, 10:20, 5:9] = 3  # a scribble off the planes
    tifffile.imwrite(tmp_path / "img.tif", img, metadata={"axes": "CZYX"})
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    kw = dict(label_map="0:ignore,1:0,2:1,3:2", class_names=["a", "b", "c"], ignore_index=3,
              channel_axis=0, voxel_size_zyx_um=(2.0, 1.0, 1.0))  # fmt: skip
    a = load_volume(convert(tmp_path / "img.tif", tmp_path / "lab.tif", tmp_path / "a.h5", **kw))
    b = load_volume(
        convert_lazy(
            tmp_path / "img.tif",
            tmp_path / "lab.tif",
            tmp_path / "b.h5",
            block_zyx=(8, 32, 32),
            **kw,
        )  # fmt: skip
    )
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.meta == b.meta
    assert b.meta.annotated_slices == {"z": (5, 12, 13), "y": (33,), "x": (60,)}
