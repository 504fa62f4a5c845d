"""The PNG preview of a generated sample: orthogonal slices with the sparse and dense labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sparse3d.data.synth.render import SyntheticVolume
from sparse3d.data.volume import VolumeMeta

#: Short legend names of the three channels (storage order, see ``CHANNEL_NAMES``).
LEGEND_NAMES = ("lectin", "DAPI", "β-catenin")


def preview_position(meta: VolumeMeta, shape: Sequence[int]) -> tuple[int, int, int]:
    """Preview planes (z, y, x): the annotated xy slice nearest the centre, and y, x positions
    next to the centre that are *not* annotated, so the zy and xz panels show the annotated
    slices as lines."""
    z_ann = meta.annotated_slices["z"]
    z = min(z_ann, key=lambda i: abs(i - shape[0] // 2)) if z_ann else shape[0] // 2
    yx = []
    for ax, n in (("y", shape[1]), ("x", shape[2])):
        free = [i for i in range(n) if i not in set(meta.annotated_slices[ax])]
        yx.append(min(free, key=lambda i: abs(i - n // 2)) if free else n // 2)
    return z, yx[0], yx[1]


def preview_title(vol: SyntheticVolume, scale: float, seed: int) -> str:
    """One-line title: sample, stage, scale, seed and class fractions."""
    fr, sp = vol.class_fractions, vol.params
    return (
        f"{sp.name} (synthetic, {sp.stage}, scale {scale:g}, seed {seed}) — "
        f"lumen {fr['inside_tubule']:.1%}, tubule {fr['tubule']:.1%}, "
        f"background {fr['background']:.1%}"
    )


def save_preview(path: str | Path, vol: SyntheticVolume, title: str) -> Path:
    """Write the preview PNG of ``vol`` (image, sparse label, dense ground truth blocks) to
    ``path`` (atomically, replacing it); channels tinted by :func:`sparse3d.viz.stain_colors`."""
    from sparse3d.viz import save_overview, stain_colors

    return save_overview(
        path,
        vol.image,
        vol.label,
        vol.meta.labels,
        title=title,
        position_zyx=preview_position(vol.meta, vol.image.shape[1:]),
        voxel_size_zyx_um=vol.meta.voxel_size_zyx_um,
        dense_label=vol.dense_label,
        channel_colors=stain_colors(vol.meta.channel_names),
        channel_names=LEGEND_NAMES,
        overwrite=True,
    )
