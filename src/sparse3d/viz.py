"""Overview pictures of a volume: orthogonal slices of the image with label / prediction overlays.

Each panel block is an orthogonal view through one position: the xy slice (top left), the zy slice
to its right (z horizontal) and the xz slice below it (z vertical), drawn in micrometres so that
anisotropic voxels keep their true aspect. Blocks, left to right: image, label, dense ground truth,
prediction (those given). Uses matplotlib's Agg backend; files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from sparse3d.atomic import atomic_path
from sparse3d.labels import LabelSpec  # noqa: E402

#: Width and height of one block in inches; the PNG is ``(BLOCK_W_IN * n_blocks * DPI,
#: BLOCK_H_IN * DPI)`` pixels.
BLOCK_W_IN = 6.0
BLOCK_H_IN = 6.4
DPI = 100

#: Default overlay colours (RGBA) for class codes; the Xenopus coding (Sec. 3.1) gets inside tubule
#: yellow, tubule magenta, background faint blue. Other classes cycle through tab10.
XENOPUS_COLORS: dict[str, tuple[float, float, float, float]] = {
    "inside_tubule": (1.0, 0.9, 0.0, 0.65),
    "tubule": (1.0, 0.0, 0.85, 0.55),
    "background": (0.2, 0.45, 1.0, 0.18),
}

#: Display tint (RGB) of each stain, by channel name: the one stain -> colour mapping of the
#: project, used by every picture (the synthetic benchmark's previews and the overviews of
#: training, prediction and densification). Tints follow the fluorophores' emission: the paper's
#: channels (Sec. 3.1) are Tomato-Lectin/fluorescein green, DAPI blue, beta-catenin/Cy3
#: red-magenta.
STAIN_COLORS: dict[str, tuple[float, float, float]] = {
    "tomato_lectin_fluorescein": (0.1, 1.0, 0.1),
    "dapi": (0.25, 0.45, 1.0),
    "beta_catenin_cy3": (1.0, 0.15, 0.6),
}

#: Tints by channel count for channels that are not all in :data:`STAIN_COLORS`.
_DEFAULT_CHANNEL_COLORS: dict[int, tuple[tuple[float, float, float], ...]] = {
    1: ((1.0, 1.0, 1.0),),
    2: ((0.0, 1.0, 0.0), (1.0, 0.0, 1.0)),
    3: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}


def overview_size_px(n_blocks: int) -> tuple[int, int]:
    """(width, height) in pixels of a :func:`save_overview` PNG with ``n_blocks`` blocks."""
    return int(round(BLOCK_W_IN * n_blocks * DPI)), int(round(BLOCK_H_IN * DPI))


def stain_colors(
    channel_names: Sequence[str] | None, n_channels: int | None = None
) -> tuple[tuple[float, float, float], ...]:
    """RGB tint of each of the first ``n_channels`` channels (default: all named).

    When every one of those channels is a stain of :data:`STAIN_COLORS` (names compared without
    case) its tint is used; otherwise the default tints for that many channels (one: grey;
    two: green/magenta; three: red/green/blue).
    """
    names = [] if channel_names is None else [str(n).lower() for n in channel_names]
    n = len(names) if n_channels is None else int(n_channels)
    if 0 < n <= len(names) and all(name in STAIN_COLORS for name in names[:n]):
        return tuple(STAIN_COLORS[name] for name in names[:n])
    if n not in _DEFAULT_CHANNEL_COLORS:
        raise ValueError(f"stain_colors: no default tints for {n} channels (1 to 3)")
    return _DEFAULT_CHANNEL_COLORS[n]


def class_colors(labels: LabelSpec) -> np.ndarray:
    """(num_classes, 4) RGBA overlay colours for the classes of ``labels``."""
    cmap = matplotlib.colormaps["tab10"]
    others = [i for i in range(10) if i != 0]  # tab10 without its blue: blue is the background's
    out = np.zeros((labels.num_classes, 4))
    k = 0
    for c, name in enumerate(labels.class_names):
        if name in XENOPUS_COLORS:
            out[c] = XENOPUS_COLORS[name]
        else:
            out[c] = (*cmap(others[k % len(others)])[:3], 0.5)
            k += 1
    return out


def _percentile_limits(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """(C, 2) per-channel percentiles from a strided subsample of (C, Z, Y, X) ``image``."""
    c = image.shape[0]
    n = int(np.prod(image.shape[1:]))
    stride = max(1, n // 1_000_000)
    out = np.empty((c, 2))
    for ch in range(c):
        sample = np.asarray(image[ch]).ravel()[::stride]
        lo, hi = np.percentile(sample, [low, high])
        out[ch] = (lo, hi if hi > lo else lo + 1e-6)
    return out


def _composite(
    planes: np.ndarray, limits: np.ndarray, colors: Sequence[Sequence[float]]
) -> np.ndarray:
    """(C, H, W) planes -> (H, W, 3) RGB in [0, 1]: each channel normalised and tinted."""
    rgb = np.zeros((*planes.shape[1:], 3))
    for ch in range(planes.shape[0]):
        lo, hi = limits[ch]
        v = np.clip((planes[ch] - lo) / (hi - lo), 0.0, 1.0)
        rgb += v[..., None] * np.asarray(colors[ch], dtype=float)[None, None, :]
    return np.clip(rgb, 0.0, 1.0)


def _overlay(
    base_rgb: np.ndarray, label: np.ndarray, colors: np.ndarray, ignore_index: int
) -> np.ndarray:
    """Alpha-blend class colours over a dimmed ``base_rgb``; ignore (and unknown) stay see-through."""
    out = base_rgb * 0.6
    for c in range(colors.shape[0]):
        m = label == c
        if c == ignore_index or not m.any():
            continue
        a = colors[c, 3]
        out[m] = (1 - a) * out[m] + a * colors[c, :3]
    return out


def _views(vol: np.ndarray, pos: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Three planes of a (..., Z, Y, X) array through ``pos``: xy (Y,X), zy (Y,Z), xz (Z,X)."""
    z, y, x = pos
    xy = vol[..., z, :, :]
    zy = np.swapaxes(vol[..., :, :, x], -1, -2)  # (..., Y, Z): z runs horizontally
    xz = vol[..., :, y, :]
    return xy, zy, xz


def save_overview(
    path: str | os.PathLike[str],
    image: np.ndarray,
    label: np.ndarray | None,
    labels: LabelSpec,
    title: str = "",
    prediction: np.ndarray | None = None,
    position_zyx: Sequence[int] | None = None,
    voxel_size_zyx_um: Sequence[float] | None = None,
    dense_label: np.ndarray | None = None,
    channel_colors: Sequence[Sequence[float]] | None = None,
    channel_names: Sequence[str] | None = None,
    percentiles: tuple[float, float] = (1.0, 99.7),
    overwrite: bool = True,
) -> Path:
    """Save a PNG of orthogonal slices through ``position_zyx`` (default: the centre).

    Args:
        path: output ``.png``; written to a temporary name in the same folder, then renamed.
        image: (C, Z, Y, X) image; up to 3 channels are shown as an RGB composite, each channel
            normalised between its ``percentiles`` over the volume.
        label: (Z, Y, X) label (e.g. the sparse annotation) or None; ``labels.ignore_index`` is
            transparent.
        labels: class names and ignore code.
        title: figure title.
        prediction: optional (Z, Y, X) predicted classes, shown as its own block.
        position_zyx: voxel the three planes pass through.
        voxel_size_zyx_um: voxel size (z, y, x) in micrometres; panels are drawn to scale. Without
            it voxels are drawn as cubes.
        dense_label: optional (Z, Y, X) dense ground truth, shown as its own block.
        channel_colors: RGB tint per channel; default :func:`stain_colors` of ``channel_names``
            (the stain's own tint when every shown channel is a known stain, otherwise
            red/green/blue by channel order; one channel: grey; two: green/magenta).
        channel_names: names for the legend of the image block (and the default tints).
        percentiles: (low, high) display percentiles per channel.
        overwrite: replace an existing file (default True: pictures are cheap previews).

    Returns:
        The written path. The PNG is :func:`overview_size_px` pixels.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it")
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"save_overview: image must be 4D (C,Z,Y,X), got shape {image.shape}")
    shape = image.shape[1:]
    for name, arr in (("label", label), ("prediction", prediction), ("dense_label", dense_label)):
        if arr is not None and np.shape(arr) != shape:
            raise ValueError(
                f"save_overview: {name} shape {np.shape(arr)} != image spatial shape {shape}"
            )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output folder {path.parent} does not exist")
    img = image[:3].astype(np.float32, copy=False)
    n_ch = img.shape[0]
    colors = channel_colors or stain_colors(channel_names, n_ch)
    if len(colors) < n_ch:
        raise ValueError(f"save_overview: {len(colors)} channel colours for {n_ch} channels")
    pos = (
        tuple(n // 2 for n in shape)
        if position_zyx is None
        else tuple(int(np.clip(p, 0, n - 1)) for p, n in zip(position_zyx, shape, strict=True))
    )
    vz, vy, vx = (1.0, 1.0, 1.0) if voxel_size_zyx_um is None else map(float, voxel_size_zyx_um)
    Z, Y, X = shape
    ext_x, ext_y, ext_z = X * vx, Y * vy, Z * vz
    limits = _percentile_limits(img, *percentiles)
    rgb_views = [_composite(v, limits, colors) for v in _views(img, pos)]
    ccols = class_colors(labels)

    blocks: list[tuple[str, list[np.ndarray]]] = [("image", rgb_views)]
    for name, arr in (("label", label), ("ground truth", dense_label), ("prediction", prediction)):
        if arr is None:
            continue
        lv = _views(np.asarray(arr), pos)
        blocks.append(
            (
                name,
                [
                    _overlay(b, v, ccols, labels.ignore_index)
                    for b, v in zip(rgb_views, lv, strict=True)
                ],
            )
        )

    w_px, h_px = overview_size_px(len(blocks))
    fig = Figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI)
    outer = fig.add_gridspec(
        1, len(blocks), left=0.02, right=0.98, top=0.86, bottom=0.08, wspace=0.12
    )
    unit = "µm" if voxel_size_zyx_um is not None else "vox"
    extents = (ext_z, ext_y, ext_x)
    for b, (bname, views) in enumerate(blocks):
        if b == 0:
            names = list(channel_names or [f"ch{i}" for i in range(n_ch)])[:n_ch]
            handles = [Patch(color=tuple(colors[i])[:3], label=names[i]) for i in range(n_ch)]
        else:
            handles = [
                Patch(color=tuple(ccols[c, :3]), label=labels.class_names[c])
                for c in range(labels.num_classes)
            ]
        _draw_block(fig, outer[0, b], bname, views, pos, (vz, vy, vx), extents, unit, handles)
    if title:
        fig.suptitle(title, fontsize=10)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _draw_block(fig, cell, name, views, pos, voxel_zyx, extents_zyx, unit, handles) -> None:
    """One block of the overview in grid cell ``cell``: the xy, zy and xz planes through
    ``pos`` (drawn to scale, physical ``extents_zyx``) and a legend of ``handles``."""
    xy, zy, xz = views
    vz, vy, vx = voxel_zyx
    ext_z, ext_y, ext_x = extents_zyx
    gs = cell.subgridspec(
        2, 2, width_ratios=[ext_x, ext_z], height_ratios=[ext_y, ext_z], wspace=0.04, hspace=0.04
    )
    a_xy = fig.add_subplot(gs[0, 0])
    a_zy = fig.add_subplot(gs[0, 1])
    a_xz = fig.add_subplot(gs[1, 0])
    # extents (left, right, bottom, top) in physical units; row 0 at the top
    a_xy.imshow(xy, extent=(0, ext_x, ext_y, 0), interpolation="nearest")
    a_zy.imshow(zy, extent=(0, ext_z, ext_y, 0), interpolation="nearest")
    a_xz.imshow(xz, extent=(0, ext_x, ext_z, 0), interpolation="nearest")
    cz, cy, cx = ((pos[0] + 0.5) * vz, (pos[1] + 0.5) * vy, (pos[2] + 0.5) * vx)
    line = {"color": "w", "lw": 0.5, "alpha": 0.5}
    a_xy.axhline(cy, **line)
    a_xy.axvline(cx, **line)
    a_zy.axhline(cy, **line)
    a_zy.axvline(cz, **line)
    a_xz.axhline(cz, **line)
    a_xz.axvline(cx, **line)
    for ax in (a_xy, a_zy, a_xz):
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    a_xy.set_anchor("SE")
    a_zy.set_anchor("SW")
    a_xz.set_anchor("NE")
    a_xy.set_title(f"{name}: xy z={pos[0]}", fontsize=8, loc="left")
    a_zy.set_title(f"zy x={pos[2]}", fontsize=7, loc="left")
    a_xz.set_xlabel(f"xz y={pos[1]}  ({ext_x:.0f}×{ext_y:.0f}×{ext_z:.0f} {unit})", fontsize=7)
    legend_ax = fig.add_subplot(gs[1, 1])
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, loc="center", fontsize=6, frameon=False)
