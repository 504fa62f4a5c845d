"""Development cases with a dense truth (sparse3d.data.realcases) and their sparse annotation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from sparse3d.data import realcases
from sparse3d.data.annotation import slice_mask
from sparse3d.data.volume import load_volume

#: (Z, Y, X) of every case as the benchmark uses it.
EXPECTED_SHAPES = {
    "mni_tissue": (81, 98, 79),
    "mni_aparc": (81, 97, 78),
    "stardist_nuclei": (31, 61, 57),
    "synth1": (32, 122, 124),
    "synth2": (28, 122, 122),
    "synth3": (30, 122, 123),
}
CHANNELS = {"synth1": 3, "synth2": 3, "synth3": 3}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cases")


_LOADED: dict[str, realcases.Case] = {}


def _load(name: str, workdir) -> realcases.Case:
    """Case ``name`` (loaded once per test session); skipped when its package is missing."""
    reason = realcases.unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    if name not in _LOADED:
        _LOADED[name] = realcases.load_case(name, workdir)
    return _LOADED[name]


def _tiny_case() -> realcases.Case:
    """A 2-class ball scene, (1, 20, 24, 28)."""
    z, y, x = np.indices((20, 24, 28))
    truth = ((z - 10) ** 2 + (y - 12) ** 2 + (x - 14) ** 2 < 49).astype(np.uint8)
    image = (50.0 + 100.0 * truth)[None].astype(np.float32)
    return realcases.Case(
        "tiny", image, truth, ("outside", "ball"), (2.0, 1.0, 1.0), ("stain",), "a ball"
    )


def test_registry_covers_the_expected_cases():
    assert set(realcases.CASES) == set(EXPECTED_SHAPES)
    with pytest.raises(KeyError, match="unknown case"):
        realcases.load_case("nope")


@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_case_loads_with_every_class_present(name, workdir):
    case = _load(name, workdir)
    assert case.name == name
    assert case.shape_zyx == EXPECTED_SHAPES[name]
    assert case.image.dtype == np.float32 and case.image.shape[1:] == case.shape_zyx
    assert case.image.shape[0] == CHANNELS.get(name, 1) == len(case.channel_names)
    assert np.isfinite(case.image).all()
    assert case.truth.dtype == np.uint8
    fractions = case.class_fractions()
    assert list(fractions) == list(case.class_names)
    assert all(f > 0 for f in fractions.values()), fractions
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert len(case.voxel_size_zyx_um) == 3 and min(case.voxel_size_zyx_um) > 0
    assert case.description and "\n" not in case.description


@pytest.mark.parametrize("name", ["mni_tissue", "mni_aparc"])
def test_mni_cases_are_reduced_and_cropped_with_a_background_margin(name, workdir):
    case = _load(name, workdir)
    assert 400_000 < case.truth.size < 1_200_000
    assert case.voxel_size_zyx_um == (2000.0, 2000.0, 2000.0)
    # no all-background slab thicker than the margin is left on any side (a side where the
    # template's field of view cuts the brain keeps none)
    idx = np.argwhere(case.truth != 0)
    assert (idx.min(axis=0) <= realcases.CROP_MARGIN).all()
    assert (np.asarray(case.shape_zyx) - 1 - idx.max(axis=0) <= realcases.CROP_MARGIN).all()


def test_mni_aparc_tissue_intensities_are_ordered(workdir):
    """The atlas lands on the matching anatomy: T1 white matter > deep grey > cortex >
    ventricles (median intensities)."""
    case = _load("mni_aparc", workdir)
    med = {
        n: float(np.median(case.image[0][case.truth == i])) for i, n in enumerate(case.class_names)
    }
    assert med["white_matter"] > med["deep_grey"] > med["cortex"] > med["ventricles"]


def test_stardist_boundary_is_one_voxel_inside_the_nuclei(workdir):
    case = _load("stardist_nuclei", workdir)
    boundary, interior = case.truth == 2, case.truth == 1
    # every interior voxel has nucleus voxels on its 6 faces (the volume's edge cuts nuclei,
    # it is no boundary of theirs)
    nucleus = np.pad(case.truth > 0, 1, constant_values=True)
    inner = np.argwhere(interior) + 1
    for d in np.eye(3, dtype=int):
        assert nucleus[tuple((inner + d).T)].all() and nucleus[tuple((inner - d).T)].all()
    assert boundary.any()


def test_nucleus_boundary_marks_the_nucleus_side_of_every_contact():
    ids = np.zeros((5, 6, 8), dtype=np.uint16)
    ids[1:4, 1:5, 1:4] = 1
    ids[1:4, 1:5, 4:7] = 2  # touches nucleus 1 along x
    b = realcases.nucleus_boundary(ids)
    assert not b[ids == 0].any()
    assert b[2, 2, 3] and b[2, 2, 4]  # both sides of the contact
    assert not b[2, 2, 2] and not b[2, 2, 5]  # interior voxels (all faces within their nucleus)
    assert b[1, 1, 1]  # a corner touches background


def test_block_reduction_takes_means_and_majorities():
    image = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    small = realcases.block_mean(image, 2)
    assert small.shape == (2, 2, 2, 2)
    assert small[1, 0, 1, 1] == pytest.approx(image[1, 0:2, 2:4, 2:4].mean())
    truth = np.zeros((4, 4, 5), dtype=np.uint8)  # odd last axis: the remainder is cut
    truth[:2, :2, :2] = 2
    truth[0, 0, 0] = 1
    truth[2:, 2:, 2:4] = 1
    truth[2, 2, 2] = truth[2, 3, 2] = truth[3, 2, 2] = truth[3, 3, 3] = 2  # 4 vs 4: lower code
    maj = realcases.block_majority(truth, 3, 2)
    assert maj.shape == (2, 2, 2)
    assert maj[0, 0, 0] == 2 and maj[1, 1, 1] == 1 and maj[0, 1, 0] == 0


def test_resample_nearest_follows_the_affines():
    src = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (k, j, i)
    eye = np.eye(4)
    same = realcases._resample_nearest(src, eye, src.shape, eye)
    np.testing.assert_array_equal(same, src)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, 5.0  # target i -> world x = 5 - i
    out = realcases._resample_nearest(src, eye, src.shape, flip)
    np.testing.assert_array_equal(out, src[:, :, ::-1])
    shifted = np.eye(4)
    shifted[2, 3] = 10.0  # target k lies 10 beyond the source: outside -> 0
    assert not realcases._resample_nearest(src, eye, src.shape, shifted).any()


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_write_case_annotates_k_interior_planes_per_axis(k, tmp_path):
    case = _tiny_case()
    path, planes = realcases.write_case(case, k, tmp_path / f"tiny_k{k}.h5")
    vol = load_volume(path)
    assert vol.meta.labels.class_names == case.class_names
    assert vol.meta.labels.ignore_index == len(case.class_names)
    assert vol.meta.voxel_size_zyx_um == case.voxel_size_zyx_um
    for ax, n in zip("zyx", case.shape_zyx, strict=True):
        assert len(planes[ax]) == k and vol.meta.annotated_slices[ax] == planes[ax]
        assert 0 < min(planes[ax]) and max(planes[ax]) < n - 1  # never on the border
    on = slice_mask(case.shape_zyx, planes)
    ignore = vol.meta.labels.ignore_index
    np.testing.assert_array_equal(vol.label != ignore, on)  # labels only on the planes ...
    np.testing.assert_array_equal(vol.label[on], case.truth[on])  # ... and equal to the truth
    np.testing.assert_array_equal(vol.dense_label, case.truth)
    np.testing.assert_array_equal(vol.image, case.image)


def test_real_case_sparse_planes_avoid_the_border(workdir, tmp_path):
    case = _load("stardist_nuclei", workdir)
    path, planes = realcases.write_case(case, 5, tmp_path / "s.h5")
    vol = load_volume(path)
    for ax, n in zip("zyx", case.shape_zyx, strict=True):
        assert 0 not in planes[ax] and n - 1 not in planes[ax]
    labelled = vol.label != 3
    np.testing.assert_array_equal(labelled, slice_mask(case.shape_zyx, planes))


def test_plane_positions_refuses_axes_too_short_for_interior_planes():
    assert realcases.plane_positions((7, 7, 7), 3) == {
        "z": (1, 3, 5),
        "y": (1, 3, 5),
        "x": (1, 3, 5),
    }
    with pytest.raises(ValueError, match="too short"):
        realcases.plane_positions((6, 30, 30), 3)
    with pytest.raises(ValueError, match="k must be"):
        realcases.plane_positions((6, 30, 30), 0)


def test_missing_package_is_reported_not_imported(monkeypatch):
    monkeypatch.setattr(realcases, "package_dir", lambda package: None)
    assert "not installed" in realcases.unavailable_reason("stardist_nuclei")
    assert realcases.unavailable_reason("synth1") is None
    with pytest.raises(realcases.CaseUnavailable, match="pip install --no-deps stardist"):
        realcases.load_case("stardist_nuclei")


def test_synth_case_file_is_regenerated_when_stale(tmp_path, monkeypatch):
    """A synthetic case's file goes through the generator's provenance check: a file from
    another generator version is rebuilt, not read."""
    from sparse3d.data.synth import SAMPLE1, provenance_for, read_provenance

    monkeypatch.setattr(realcases, "SYNTH_SCALE", 0.2)  # small and fast
    first = realcases.load_case("synth1", tmp_path)
    path = realcases.synth_folder(tmp_path) / "sample1.h5"
    assert read_provenance(path) == provenance_for(SAMPLE1, 0.2, realcases.SYNTH_SEED)
    assert str(path) in first.description
    with h5py.File(path, "r+") as f:
        f.attrs["generator_version"] = np.int64(-1)
        f["image"][...] = 0.0
    again = realcases.load_case("synth1", tmp_path)
    np.testing.assert_array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.truth, first.truth)
    assert read_provenance(path) == provenance_for(SAMPLE1, 0.2, realcases.SYNTH_SEED)
