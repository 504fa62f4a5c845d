"""Tests for the synthetic Xenopus-kidney-like benchmark."""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib.image import imread

from sparse3d.data import synth
from sparse3d.data.annotation import slice_mask
from sparse3d.data.synth import (
    GENERATOR_VERSION,
    SAMPLE1,
    SAMPLE2,
    SAMPLE3,
    SAMPLES,
    StaleBenchmarkError,
    annotated_slices_for,
    ensure_benchmark,
    generate_benchmark,
    provenance_for,
    read_provenance,
    render_sample,
)
from sparse3d.data.synth import benchmark as synth_benchmark
from sparse3d.data.synth.provenance import PROVENANCE_ATTRS
from sparse3d.data.volume import load_volume, open_volume
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


# -- provenance ------------------------------------------------------------------------------
SCALE = 0.2


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample1 at scale 0.2, seed 0, written once by the generator (tests work on copies)."""
    folder = tmp_path_factory.mktemp("bench")
    return generate_benchmark(folder, scale=SCALE, seed=0, samples=(SAMPLE1,), previews=False)[0]


def _copy(src: Path, folder: Path) -> Path:
    return Path(shutil.copy2(src, folder / src.name))


#: Ways a file can fail to match the current generator: attribute changes (None deletes).
TAMPERINGS = {
    "old_version": {"generator_version": np.int64(GENERATOR_VERSION - 1)},
    "other_seed": {"generator_seed": np.int64(1)},
    "other_scale": {"generator_scale": np.float64(0.25)},
    "other_params": {"generator_params_sha256": "0" * 64},
    "other_generator": {"generator": "somebody.else"},
    "no_provenance": dict.fromkeys(PROVENANCE_ATTRS),
    "partial_provenance": {"generator_params_sha256": None},
}


def _tamper(path: Path, kind: str) -> None:
    with h5py.File(path, "r+") as f:
        for key, value in TAMPERINGS[kind].items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value


def test_generated_files_record_their_provenance(written: Path) -> None:
    prov = read_provenance(written)
    assert prov == provenance_for(SAMPLE1, SCALE, 0)
    assert (prov.generator, prov.version, prov.seed, prov.scale) == (
        "sparse3d.data.synth",
        GENERATOR_VERSION,
        0,
        SCALE,
    )
    assert re.fullmatch("[0-9a-f]{64}", prov.params_sha256)
    # the hash follows every parameter, and differs between the samples
    tweaked = dataclasses.replace(SAMPLE1, vignetting=SAMPLE1.vignetting + 0.01)
    assert provenance_for(tweaked, SCALE, 0).params_sha256 != prov.params_sha256
    assert provenance_for(SAMPLE2, SCALE, 0).params_sha256 != prov.params_sha256
    assert provenance_for(SAMPLE1, SCALE, 0).params_sha256 == prov.params_sha256  # stable
    with open_volume(written) as vol:  # still a valid volume file
        assert vol.has_dense_label


def test_current_files_are_returned_untouched(
    written: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy(written, tmp_path)
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        for allowed in (False, True):
            assert ensure_benchmark(tmp_path, SCALE, 0, ["sample1"], allowed) == {"sample1": path}
    assert path.stat().st_mtime_ns == before
    assert not caplog.records


@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_stale_file_is_refused_when_generation_is_not_allowed(
    written: Path, tmp_path: Path, kind: str
) -> None:
    path = _copy(written, tmp_path)
    _tamper(path, kind)
    with pytest.raises(StaleBenchmarkError) as info:
        ensure_benchmark(tmp_path, SCALE, 0, ["sample1"], generate_if_missing=False)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg and msg.startswith(f"{path} is stale: ")
    command = f"python -m sparse3d.data.synth --out {shlex.quote(str(tmp_path))} --scale 0.2"
    assert f"`{command} --seed 0 --overwrite`" in msg
    if kind == "no_provenance":
        assert "no generator provenance" in msg
    # nothing was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample1.h5"]


@pytest.mark.parametrize("kind", ["old_version", "no_provenance"])
def test_stale_file_is_regenerated_when_allowed(
    written: Path, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy(written, tmp_path)
    _tamper(path, kind)
    with h5py.File(path, "r+") as f:
        f["image"][...] = 0.0  # so that only a regenerated file has the right image
    with caplog.at_level(logging.INFO):
        out = ensure_benchmark(tmp_path, SCALE, 0, ["sample1"], True, previews=False)
    assert out == {"sample1": path}
    why = [r.getMessage() for r in caplog.records if r.getMessage().startswith("regenerating")]
    assert len(why) == 1 and str(path) in why[0], why
    assert ("generator_version 0" if kind == "old_version" else "no generator provenance") in why[0]
    assert read_provenance(path) == provenance_for(SAMPLE1, SCALE, 0)
    new, ref = load_volume(path), load_volume(written)
    np.testing.assert_array_equal(new.image, ref.image)
    np.testing.assert_array_equal(new.dense_label, ref.dense_label)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample1.h5"]  # no temporary left


def test_failed_regeneration_leaves_the_old_file(
    written: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced only once complete (temporary name, then os.replace)."""
    path = _copy(written, tmp_path)
    _tamper(path, "old_version")

    def broken(path: Path, prov: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth_benchmark, "write_provenance", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_benchmark(tmp_path, SCALE, 0, ["sample1"], True, previews=False)
    assert read_provenance(path).version == GENERATOR_VERSION - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample1.h5"]


def test_missing_files_are_generated_only_when_allowed(tmp_path: Path, written: Path) -> None:
    folder = tmp_path / "bench"
    with pytest.raises(FileNotFoundError, match=r"missing data file .*sample1\.h5: generate it"):
        ensure_benchmark(folder, SCALE, 0, ["sample1"], generate_if_missing=False)
    assert not folder.exists()
    out = ensure_benchmark(folder, SCALE, 0, ["sample1"], generate_if_missing=True)
    assert out == {"sample1": folder / "sample1.h5"}
    assert (folder / "sample1.png").is_file()
    assert read_provenance(out["sample1"]) == provenance_for(SAMPLE1, SCALE, 0)
    np.testing.assert_array_equal(load_volume(out["sample1"]).image, load_volume(written).image)


def test_ensure_benchmark_rejects_unknown_samples_and_scales(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic sample 'sample4'"):
        ensure_benchmark(tmp_path, SCALE, 0, ["sample4"], True)
    with pytest.raises(ValueError, match="scale must be in"):
        ensure_benchmark(tmp_path, 2.0, 0, ["sample1"], True)
    assert not list(tmp_path.iterdir())
