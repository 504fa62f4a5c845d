"""The napari reader (``sparse3d.napari_plugin.reader``) on files sparse3d writes: a volume of
the synthetic benchmark (small scale), a densify result file (HDF5), a result TIFF, and what it
leaves alone. Layers are built by napari (``Layer.create``) and added to a ``ViewerModel``."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from sparse3d.napari_plugin.reader import get_reader  # noqa: E402


@pytest.fixture(scope="module")
def synth_volume(tmp_path_factory):
    from sparse3d.data.synth import SAMPLE1, generate_benchmark

    out = tmp_path_factory.mktemp("synth")
    return generate_benchmark(out, scale=0.1, samples=[SAMPLE1], previews=False)[0]


def add_all(layer_data):
    from napari.components import ViewerModel
    from napari.layers import Layer

    viewer = ViewerModel()
    for data, kwargs, kind in layer_data:
        viewer.add_layer(Layer.create(data, kwargs, kind))
    return viewer


def test_reads_a_synthetic_benchmark_volume(synth_volume):
    from sparse3d.data.volume import load_volume

    vol = load_volume(synth_volume)
    reader = get_reader(str(synth_volume))
    assert reader is not None
    viewer = add_all(reader(str(synth_volume)))
    stem, voxel = synth_volume.stem, tuple(vol.meta.voxel_size_zyx_um)
    channels = [f"{stem} {c}" for c in vol.meta.channel_names]
    assert [ly.name for ly in viewer.layers] == [*channels, f"{stem} painting", f"{stem} truth"]
    for c, name in enumerate(channels):
        assert np.array_equal(viewer.layers[name].data, vol.image[c])
    for layer in viewer.layers:
        assert np.allclose(layer.scale, voxel)
    painting = viewer.layers[f"{stem} painting"].data
    ign = vol.meta.labels.ignore_index
    # painting codes: unlabelled -> 0, class c -> c + 1
    assert np.array_equal(painting == 0, vol.label == ign)
    assert np.array_equal(painting[vol.label != ign], vol.label[vol.label != ign] + 1)
    truth = viewer.layers[f"{stem} truth"]
    assert np.array_equal(truth.data, vol.dense_label + 1) and not truth.visible
    names = list(viewer.layers[f"{stem} painting"].features["class_name"])
    assert names == ["unlabelled", *vol.meta.labels.class_names]


def test_the_reader_gives_the_widget_what_it_needs(synth_volume):
    """The painting read from a volume feeds the widget's class names as they are."""
    from sparse3d.napari_plugin.layers import class_names_of, voxel_size_of

    viewer = add_all(get_reader(str(synth_volume))(str(synth_volume)))
    painting = viewer.layers[f"{synth_volume.stem} painting"]
    assert class_names_of(painting) == ["inside_tubule", "tubule", "background"]
    assert voxel_size_of(painting) == tuple(float(v) for v in painting.scale)


def test_reads_result_files(tmp_path, synth_volume):
    from sparse3d.data.volume import load_volume
    from sparse3d.densify.results import write_result
    from sparse3d.inference.writers import write_tiff

    vol = load_volume(synth_volume)
    k = vol.meta.labels.num_classes
    rng = np.random.default_rng(0)
    probs = rng.random((k, *vol.label.shape)).astype(np.float32)
    seg = tmp_path / "sample1_seg.h5"
    write_result(vol, probs, seg, tmp_path / "sample1_seg.png", False, {"method": "rf"})
    viewer = add_all(get_reader(str(seg))(str(seg)))
    layer = viewer.layers["sample1_seg"]
    assert type(layer).__name__ == "Labels"
    assert np.array_equal(layer.data, probs.argmax(0) + 1)
    assert np.allclose(layer.scale, vol.meta.voxel_size_zyx_um)
    assert list(layer.features["class_name"])[1:] == list(vol.meta.labels.class_names)

    tif = write_tiff(
        tmp_path / "sample1_seg.tif", probs.argmax(0).astype(np.uint8), (2.0, 0.5, 0.25)
    )
    viewer = add_all(get_reader(str(tif))(str(tif)))
    layer = viewer.layers["sample1_seg"]
    assert np.array_equal(layer.data, probs.argmax(0) + 1)
    assert np.allclose(layer.scale, (2.0, 0.5, 0.25), rtol=1e-5)


def test_leaves_other_files_to_other_readers(tmp_path):
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.zeros((2, 2))
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path / "stack.tif")) is None  # not a result's name
    assert get_reader(str(tmp_path / "missing_seg.h5")) is None
    assert get_reader([str(other), str(other)]) is None


def test_reads_an_ome_zarr_segmentation(tmp_path):
    """The blockwise path's OME-Zarr labels (``sparse3d.data.ome_zarr``) as a multiscale Labels
    layer in painting codes, with the class names and the voxel size."""
    ome_zarr = pytest.importorskip("sparse3d.data.ome_zarr")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(8, 64, 64)).astype(np.uint8)
    path = tmp_path / "vol_seg.ome.zarr"
    writer = ome_zarr.OmeZarrLabelsWriter(
        path, labels.shape, (2.0, 0.5, 0.5), ("bg", "cell", "edge"), chunks_zyx=(4, 16, 16)
    )
    writer.write((slice(None),) * 3, labels)
    writer.finish()
    reader = get_reader(str(path))
    assert reader is not None
    viewer = add_all(reader(str(path)))
    layer = viewer.layers["vol_seg"]
    data = layer.data[0] if layer.multiscale else layer.data
    assert np.array_equal(np.asarray(data), labels + 1)
    assert np.allclose(layer.scale, (2.0, 0.5, 0.5))
    assert list(layer.features["class_name"]) == ["unlabelled", "bg", "cell", "edge"]


def test_reads_densify_ome_zarr_result_without_shifting_it_twice(tmp_path):
    """densify writes class c as c + 1 with label value 0 named ``unlabelled``; the reader must
    show those values as they are (background is 1, not 2) with one name per value."""
    ome_zarr = pytest.importorskip("sparse3d.data.ome_zarr")
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, size=(8, 64, 64)).astype(np.uint8)
    path = tmp_path / "vol_seg.ome.zarr"
    writer = ome_zarr.OmeZarrLabelsWriter(
        path, classes.shape, (2.0, 0.5, 0.5), ("unlabelled", "bg", "cell", "edge"),
        chunks_zyx=(4, 16, 16),
    )  # fmt: skip
    writer.write((slice(None),) * 3, classes + 1)
    writer.finish()
    viewer = add_all(get_reader(str(path))(str(path)))
    layer = viewer.layers["vol_seg"]
    data = layer.data[0] if layer.multiscale else layer.data
    assert np.array_equal(np.asarray(data), classes + 1)
    assert list(layer.features["class_name"]) == ["unlabelled", "bg", "cell", "edge"]
