"""Rendering one sample: the stages in order, from parameters and seed to image and labels.

anatomy (centre lines, um) -> tubes and compartments (voxels) -> cells (seeds, voxel maps) ->
stains (fluorophore densities) -> microscope (grey values) -> annotation (sparse label).
Each stage draws from its own random stream, so a stage's draws never shift another's.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sparse3d.data.annotation import sparse_label, uniform_positions
from sparse3d.data.synth.anatomy import TubePoints, centrelines
from sparse3d.data.synth.body import Body
from sparse3d.data.synth.cells import cell_maps, cell_seeds
from sparse3d.data.synth.fields import fine_noise, smooth_field
from sparse3d.data.synth.grid import make_grid
from sparse3d.data.synth.microscope import record
from sparse3d.data.synth.params import CHANNEL_NAMES, SampleParams
from sparse3d.data.synth.stains import stain_densities
from sparse3d.data.synth.tissue import compartments, dense_label, rasterise_tubes
from sparse3d.data.volume import VolumeMeta
from sparse3d.labels import XENOPUS

logger = logging.getLogger(__name__)


@dataclass
class SyntheticVolume:
    """One rendered sample in memory.

    Attributes:
        image: (C, Z, Y, X) float32 grey values (8-bit detector range averaged over the 2x2x2
            down-sampling, so 0..255 with fractions).
        dense_label: (Z, Y, X) uint8 dense ground truth (0 lumen, 1 tubule, 2 background).
        label: (Z, Y, X) uint8 sparse label: dense on the annotated slices, 3 elsewhere.
        meta: voxel size, channels, labels and annotated slices.
        params: the sample's parameters.
        class_fractions: fraction of voxels per class name in the dense ground truth.
    """

    image: np.ndarray
    dense_label: np.ndarray
    label: np.ndarray
    meta: VolumeMeta
    params: SampleParams
    class_fractions: dict[str, float] = field(default_factory=dict)


class _Timer:
    """Seconds per stage, for the debug log."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def tick(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now


#: Range of the resolution factor ``scale``.
MIN_SCALE, MAX_SCALE = 0.05, 1.0


def check_scale(scale: float, where: str) -> float:
    """``scale`` as a float; ValueError naming ``where`` outside [MIN_SCALE, MAX_SCALE]."""
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"{where}: scale must be in [{MIN_SCALE:g}, {MAX_SCALE:g}], got {scale}")
    return float(scale)


def annotated_slices_for(
    p: SampleParams, shape_zyx: Sequence[int] | None = None
) -> dict[str, tuple[int, ...]]:
    """The sample's annotated slices: the paper's counts per axis (Sec. 3.1), placed with
    :func:`uniform_positions`; a count larger than the axis (small ``scale``) is clipped to it.

    Args:
        p: sample parameters (``annotated_counts_xyz`` in (yz, xz, xy) = (x, y, z) order).
        shape_zyx: volume shape; default the sample's full-resolution shape.
    """
    shape = tuple(int(n) for n in (shape_zyx if shape_zyx is not None else p.shape_zyx))
    cx, cy, cz = p.annotated_counts_xyz
    return {
        ax: uniform_positions(n, min(c, n))
        for ax, n, c in zip(("z", "y", "x"), shape, (cz, cy, cx), strict=True)
    }


def _streams(p: SampleParams, seed: int) -> list[np.random.Generator]:
    """Independent random streams per sample (by name) and purpose, all fixed by ``seed``:
    geometry, cells, smooth fields, fine texture, imaging noise."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(p.name.encode())])
    return [np.random.default_rng(s) for s in ss.spawn(5)]


def render_sample(p: SampleParams, scale: float = 1.0, seed: int = 0) -> SyntheticVolume:
    """Render one sample. The anatomy depends only on ``(p, seed)``, not on ``scale``.

    Args:
        p: sample parameters.
        scale: resolution factor: the volume shape is multiplied and the voxel size divided by it
            (0.5 = the same tissue at half the resolution, like a further down-sampled recording).
        seed: random seed.

    Returns:
        A :class:`SyntheticVolume` (image (3, Z, Y, X) float32, labels (Z, Y, X) uint8).
    """
    check_scale(scale, "render_sample")
    timer = _Timer()
    rng_geo, rng_cells, rng_field, rng_fine, rng_noise = _streams(p, seed)
    grid = make_grid(p.shape_zyx, p.voxel_size_zyx_um, scale)
    body = Body(p, grid.extent)
    _, y, x = grid.broadcast_centres()
    surface_z = body.surface_z(y, x).astype(np.float32)  # (1, Y, X)
    somite_z = body.somite_z(y, x).astype(np.float32)

    tp = TubePoints.of(centrelines(p, body, rng_geo))
    # smooth fields (drawn in um: identical at every scale)
    n_rough, n_lum, n_gap = (smooth_field(rng_field, grid, c) for c in (8.0, 8.0, 18.0))
    uneven = [smooth_field(rng_field, grid, 50.0) for _ in range(3)]
    tubes = rasterise_tubes(tp, grid, p, n_rough, n_lum)
    timer.tick("tubes")

    region = compartments(grid, p, tubes, surface_z, somite_z, n_gap)
    dense = dense_label(region)
    timer.tick("compartments")

    seeds = cell_seeds(tp, body, p, rng_cells)
    timer.tick("seeds")
    # voxel texture: chromatin (fine) and patchy contacts / rough nuclei (~1.2 um)
    textures = (
        fine_noise(rng_fine, grid.shape, 0.8),
        fine_noise(rng_fine, grid.shape, 1.2 * 1.76 / grid.voxel[2]),
    )
    maps = cell_maps(seeds, grid, p, region, somite_z, textures[1])
    timer.tick("cell maps")

    dens = stain_densities(tp, tubes, region, seeds, maps, grid, p, textures, rng_cells)
    timer.tick("stains")
    image = record(dens, grid, p, surface_z, uneven, rng_noise)
    timer.tick("microscope")

    annotated = annotated_slices_for(p, grid.shape)
    label = sparse_label(dense, annotated, XENOPUS.ignore_index)
    meta = VolumeMeta(
        voxel_size_zyx_um=grid.voxel,
        channel_names=CHANNEL_NAMES,
        labels=XENOPUS,
        annotated_slices=annotated,
    )
    fractions = {name: float(np.mean(dense == c)) for c, name in enumerate(XENOPUS.class_names)}
    timer.tick("annotation")
    logger.debug("%s timings: %s", p.name, {k: round(v, 2) for k, v in timer.timings.items()})
    logger.info(
        "%s (scale %.2f): shape_zyx %s, %d tubes, %d cells; class fractions %s; %.1f s",
        p.name,
        scale,
        grid.shape,
        len(tp.tubes),
        seeds.n_cells,
        ", ".join(f"{k} {v:.3f}" for k, v in fractions.items()),
        time.perf_counter() - timer.t0,
    )
    return SyntheticVolume(
        image=image, dense_label=dense, label=label, meta=meta, params=p, class_fractions=fractions
    )
