"""Tests for the overview pictures (orthogonal slices, label overlays, atomic PNG writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from sparse3d.labels import XENOPUS, LabelSpec
from sparse3d.viz import (
    STAIN_COLORS,
    class_colors,
    overview_size_px,
    save_overview,
    stain_colors,
)

SHAPE = (10, 24, 28)


def _data(channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 10.0, size=(channels, *SHAPE)).astype(np.float32)
    label = rng.integers(0, 4, size=SHAPE).astype(np.uint8)
    return image, label


def test_overview_png_has_expected_size(tmp_path: Path) -> None:
    image, label = _data()
    dense = np.where(label == 3, 2, label).astype(np.uint8)
    path = save_overview(
        tmp_path / "o.png",
        image,
        label,
        XENOPUS,
        title="t",
        prediction=dense,
        dense_label=dense,
        voxel_size_zyx_um=(2.04, 1.76, 1.76),
        position_zyx=(3, 5, 7),
    )
    assert path == tmp_path / "o.png"
    assert path.stat().st_size > 10_000
    png = imread(path)
    w, h = overview_size_px(4)  # image, label, ground truth, prediction blocks
    assert png.shape[:2] == (h, w)
    # the picture is not blank: several distinct colours
    assert len(np.unique(png[..., :3].reshape(-1, 3), axis=0)) > 50
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_overview_channel_counts_and_no_label(tmp_path: Path, channels: int) -> None:
    image, _ = _data(channels)
    path = save_overview(tmp_path / f"c{channels}.png", image, None, XENOPUS)
    assert imread(path).shape[:2] == overview_size_px(1)[::-1]


def test_overview_errors_and_overwrite(tmp_path: Path) -> None:
    image, label = _data()
    with pytest.raises(ValueError, match="label shape"):
        save_overview(tmp_path / "a.png", image, label[:-1], XENOPUS)
    with pytest.raises(ValueError, match="4D"):
        save_overview(tmp_path / "a.png", image[0], label, XENOPUS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_overview(tmp_path / "missing" / "a.png", image, label, XENOPUS)
    p = save_overview(tmp_path / "a.png", image, label, XENOPUS)
    with pytest.raises(FileExistsError):
        save_overview(p, image, label, XENOPUS, overwrite=False)


def test_class_colors() -> None:
    c = class_colors(XENOPUS)
    assert c.shape == (3, 4)
    np.testing.assert_allclose(c[0, :3], (1.0, 0.9, 0.0))  # inside tubule: yellow
    assert c[1, 0] == 1.0 and c[1, 1] == 0.0  # tubule: magenta
    assert c[2, 3] < 0.3  # background: faint
    other = class_colors(LabelSpec(("a", "b", "c", "d"), 255))
    assert other.shape == (4, 4) and len({tuple(r) for r in other}) == 4


def test_own_classes_stand_out_from_the_background() -> None:
    """A user's class next to "background" gets a colour far from the background's blue."""
    c = class_colors(LabelSpec(("nucleus", "background"), 2))
    nucleus, background = c[0, :3], c[1, :3]
    assert np.abs(nucleus - background).sum() > 0.8
    assert nucleus[2] < max(nucleus[0], nucleus[1])  # not a blue


def test_stain_colors_by_name_else_by_count() -> None:
    names = ("tomato_lectin_fluorescein", "dapi", "beta_catenin_cy3")
    assert stain_colors(names) == tuple(STAIN_COLORS[n] for n in names)
    assert stain_colors(("DAPI",)) == (STAIN_COLORS["dapi"],)  # case does not matter
    assert stain_colors(names, 2) == (STAIN_COLORS[names[0]], STAIN_COLORS[names[1]])
    # an unknown stain among them: the default tints for that many channels
    assert stain_colors(("dapi", "mystery")) == ((0.0, 1.0, 0.0), (1.0, 0.0, 1.0))
    assert stain_colors(None, 3) == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    assert stain_colors(None, 1) == ((1.0, 1.0, 1.0),)


def _dominant_channel(png_path: Path, n_blocks: int) -> int:
    """The RGB channel (0 red, 1 green, 2 blue) strongest in most coloured pixels of the
    picture's first (image) block."""
    png = imread(png_path)[..., :3]
    block = png[:, : png.shape[1] // n_blocks].reshape(-1, 3)
    coloured = block[block.max(axis=1) - block.min(axis=1) > 0.15]
    return int(np.bincount(coloured.argmax(axis=1), minlength=3).argmax())


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_synthetic_preview_and_overview_colour_a_stain_alike(tmp_path: Path, channel: int) -> None:
    """The data preview (``sampleN.png``) and the training / prediction overview, which only
    knows the stored channel names, tint each stain the same: lectin green, DAPI blue,
    beta-catenin red-magenta."""
    from sparse3d.data.synth import CHANNEL_NAMES, SAMPLE1, SyntheticVolume, annotated_slices_for
    from sparse3d.data.synth.preview import save_preview
    from sparse3d.data.volume import VolumeMeta

    image, label = _data()
    image[[c for c in range(3) if c != channel]] = 0.0  # only this stain shows
    dense = np.where(label == 3, 2, label).astype(np.uint8)
    meta = VolumeMeta(
        (2.04, 1.76, 1.76), CHANNEL_NAMES, XENOPUS, annotated_slices_for(SAMPLE1, SHAPE)
    )
    vol = SyntheticVolume(image, dense, label, meta, SAMPLE1, {})
    preview = save_preview(tmp_path / "preview.png", vol, "preview")
    overview = save_overview(  # as training and prediction call it
        tmp_path / "overview.png",
        image,
        None,
        XENOPUS,
        prediction=dense,
        voxel_size_zyx_um=meta.voxel_size_zyx_um,
        channel_names=meta.channel_names,
    )
    expected = int(np.argmax(STAIN_COLORS[CHANNEL_NAMES[channel]]))
    assert _dominant_channel(preview, 3) == expected
    assert _dominant_channel(overview, 2) == expected
