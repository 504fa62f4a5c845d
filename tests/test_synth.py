"""Tests for the synthetic Xenopus-kidney-like benchmark."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from sparse3d.data import synth
from sparse3d.data.annotation import slice_mask
from sparse3d.data.synth import (
    SAMPLE1,
    SAMPLE3,
    SAMPLES,
    annotated_slices_for,
    generate_benchmark,
    render_sample,
)
from sparse3d.data.volume import open_volume
from sparse3d.labels import XENOPUS

LUMEN, TUBULE, BACKGROUND = 0, 1, 2


@pytest.fixture(scope="module")
def small() -> synth.SyntheticVolume:
    return render_sample(SAMPLE1, scale=0.25, seed=0)


def test_samples_follow_the_paper() -> None:
    # Sec. 3.1: sizes x*y*z, voxel size 1.76 x 1.76 x 2.04 um, annotated (yz, xz, xy) counts
    assert [s.shape_zyx for s in SAMPLES] == [(64, 244, 248), (56, 244, 245), (59, 244, 246)]
    assert [s.annotated_counts_xyz for s in SAMPLES] == [(7, 5, 21), (6, 7, 12), (4, 5, 10)]
    assert all(s.voxel_size_zyx_um == (2.04, 1.76, 1.76) for s in SAMPLES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLE1.n_tubules = 5  # type: ignore[misc]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_annotation_counts_are_the_papers(sample: synth.SampleParams) -> None:
    ann = annotated_slices_for(sample)
    cx, cy, cz = sample.annotated_counts_xyz
    assert (len(ann["x"]), len(ann["y"]), len(ann["z"])) == (cx, cy, cz)
    for ax, n in zip("zyx", sample.shape_zyx, strict=True):
        assert list(ann[ax]) == sorted(set(ann[ax]))
        assert 0 < ann[ax][0] and ann[ax][-1] < n - 1  # away from the borders


def test_annotation_counts_clip_at_small_scale() -> None:
    ann = annotated_slices_for(SAMPLE1, (16, 61, 62))
    assert len(ann["z"]) == 16 and len(ann["y"]) == 5 and len(ann["x"]) == 7


def test_shapes_and_metadata(small: synth.SyntheticVolume) -> None:
    assert small.image.shape == (3, 16, 61, 62)
    assert small.image.dtype == np.float32
    assert small.dense_label.shape == small.label.shape == (16, 61, 62)
    assert small.dense_label.dtype == small.label.dtype == np.uint8
    # the same tissue at a quarter of the resolution: voxel size x4
    np.testing.assert_allclose(small.meta.voxel_size_zyx_um, (8.16, 7.04, 7.04), rtol=0.02)
    assert small.meta.channel_names == synth.CHANNEL_NAMES
    assert small.meta.labels == XENOPUS
    assert np.isfinite(small.image).all()
    assert small.image.min() >= 0 and small.image.max() <= 255


def test_class_fractions_plausible(small: synth.SyntheticVolume) -> None:
    fr = small.class_fractions
    assert set(np.unique(small.dense_label)) == {LUMEN, TUBULE, BACKGROUND}
    assert fr["inside_tubule"] > 0.005
    assert fr["tubule"] > 0.03
    assert fr["background"] > 0.6
    assert fr["inside_tubule"] < fr["tubule"] < fr["background"]
    assert sum(fr.values()) == pytest.approx(1.0)
    assert fr["tubule"] == pytest.approx(np.mean(small.dense_label == TUBULE))


def test_sparse_label_is_dense_on_annotated_slices_only(small: synth.SyntheticVolume) -> None:
    mask = slice_mask(small.label.shape, small.meta.annotated_slices)
    np.testing.assert_array_equal(small.label[mask], small.dense_label[mask])
    assert np.all(small.label[~mask] == XENOPUS.ignore_index)
    assert small.meta.annotated_slices == annotated_slices_for(SAMPLE1, small.label.shape)


def test_deterministic_by_seed(small: synth.SyntheticVolume) -> None:
    again = render_sample(SAMPLE1, scale=0.25, seed=0)
    np.testing.assert_array_equal(again.image, small.image)
    np.testing.assert_array_equal(again.dense_label, small.dense_label)
    other = render_sample(SAMPLE1, scale=0.25, seed=1)
    assert not np.array_equal(other.dense_label, small.dense_label)
    assert not np.allclose(other.image, small.image)


def test_image_shows_the_structures(small: synth.SyntheticVolume) -> None:
    img, d = small.image, small.dense_label
    lectin, dapi, bcat = img
    # beta-catenin and DAPI are brighter in the epithelial wall than in the lumen
    assert bcat[d == TUBULE].mean() > 1.5 * bcat[d == LUMEN].mean()
    assert dapi[d == TUBULE].mean() > 1.5 * dapi[d == LUMEN].mean()
    # lectin marks the tubule (brush border) more than the surrounding tissue
    assert lectin[d == TUBULE].mean() > 1.3 * lectin[d == BACKGROUND].mean()
    # signal falls with depth (staining penetration, attenuation)
    z = img.shape[1]
    assert bcat[: z // 4].mean() > bcat[-z // 4 :].mean()


def test_sample3_differs_in_imaging() -> None:
    # sample 3: weaker staining, stronger attenuation, fewer photons (see SAMPLE3's notes)
    assert SAMPLE3.attenuation_um_488 < SAMPLE1.attenuation_um_488
    assert all(a < b for a, b in zip(SAMPLE3.peak_photons, SAMPLE1.peak_photons, strict=True))
    assert SAMPLE3.stain_strength[0] < SAMPLE1.stain_strength[0]


def test_anatomy_independent_of_scale(small: synth.SyntheticVolume) -> None:
    half = render_sample(SAMPLE1, scale=0.5, seed=0)
    assert half.image.shape == (3, 32, 122, 124)
    for name, f in small.class_fractions.items():
        assert half.class_fractions[name] == pytest.approx(f, abs=0.01)
    # the same tubes: the coarse label agrees with the subsampled finer one on most voxels
    sub = half.dense_label[::2, ::2, ::2]
    assert np.mean(sub == small.dense_label) > 0.9


def test_generate_benchmark_writes_valid_volumes(tmp_path: Path) -> None:
    summary: list[dict] = []
    paths = generate_benchmark(tmp_path, scale=0.2, seed=0, samples=(SAMPLE1,), summary=summary)
    assert paths == [tmp_path / "sample1.h5"]
    with open_volume(paths[0]) as vol:
        assert vol.shape_zyx == (13, 49, 50)
        assert vol.has_dense_label
        assert vol.meta.annotated_slices == annotated_slices_for(SAMPLE1, vol.shape_zyx)
        d = vol.read_dense_label((slice(None), slice(None), slice(None)))
    assert summary[0]["class_fractions"]["tubule"] == pytest.approx(np.mean(d == TUBULE))
    png = tmp_path / "sample1.png"
    assert png.stat().st_size > 10_000
    assert imread(png).shape[:2] == synth_preview_size()
    with pytest.raises(FileExistsError):
        generate_benchmark(tmp_path, scale=0.2, samples=(SAMPLE1,))
    generate_benchmark(tmp_path, scale=0.2, samples=(SAMPLE1,), overwrite=True, previews=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def synth_preview_size() -> tuple[int, int]:
    from sparse3d.viz import overview_size_px

    w, h = overview_size_px(3)  # image, sparse label, dense ground truth
    return h, w


@pytest.mark.slow
def test_cli_writes_three_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synth.main(["--out", str(tmp_path), "--scale", "0.2", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    for s in SAMPLES:
        assert (tmp_path / f"{s.name}.h5").exists() and (tmp_path / f"{s.name}.png").exists()
        assert s.name in out
    assert synth.main(["--out", str(tmp_path), "--scale", "0.2"]) == 1  # no overwrite
