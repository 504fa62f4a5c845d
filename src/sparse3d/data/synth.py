"""Synthetic stand-in for the paper's three Xenopus pronephros confocal volumes (Sec. 3.1).

The recordings of the paper are not public. This module renders three volumes with the paper's
sizes, voxel size, channels, label coding and numbers of annotated slices, from a simple model of
the tissue and of the microscope:

Anatomy (all in micrometres, independent of the voxel grid)
    Pronephric tubules at Nieuwkoop-Faber stage 36-37 are smooth, convoluted, branching tubes: a
    persistent random walk with smoothly varying curvature (a worm-like chain) gives each centre
    line; short side branches stand for the proximal branches that lead to the nephrostomes.
    Each tube is a one-cell-thick epithelium (cells are Voronoi cells of seeds on the mid-wall
    surface, so lateral membranes run radially) around a lumen. Tubes avoid each other but may
    touch. Around them lies non-empty tissue: loose mesenchyme with interstitial spaces, a
    two-layer epidermis near the embryo surface (close to the coverslip, small z), somitic muscle
    (cells elongated along the body axis, x) deep in the stack, and large blood vessels (posterior
    cardinal vein) with a thin endothelium and a few nucleated blood cells. Every cell has a
    nucleus. The proximal tubule coils within a compact region of the field; the distal tubule
    leaves the field.

Stains (Sec. 3.1)
    ch0 Tomato-Lectin/fluorescein: apical brush border of the proximal tubule (weak in the distal
    part), some basal lamina, blood vessel endothelium (tomato lectin binds endothelium), yolk
    platelet autofluorescence in all cells. ch1 DAPI: nuclei with chromatin texture, a few brighter
    mitotic figures. ch2 beta-catenin/Cy3: cell borders, strongest in epithelia, weak in
    mesenchyme.

Microscope (Zeiss LSM 510, Plan-Apochromat 40x/1.3 oil, Sec. 3.1)
    Whole-mount stain penetration falls with depth below the embryo surface; excitation/emission
    light is attenuated with depth (stronger for blue); the confocal PSF is a Gaussian whose axial
    width grows with depth (refractive-index mismatch between oil and tissue); the 2x down-sampling
    of the paper (0.88 -> 1.76 um, 1.02 -> 2.04 um) is a box filter and averages 8 recorded voxels;
    the four stitched tiles each show vignetting; photon shot noise (Poisson), detector read noise
    (Gaussian), spectral bleed-through, 8-bit range with saturation.

Labels: 0 inside tubule (lumen), 1 tubule (epithelial wall), 2 background (everything else,
including vessels and epidermis); 3 unlabeled outside the annotated slices. The dense ground truth
is stored as ``dense_label`` beside the sparse ``label``.

The parameters are set once from the biology and the optics (see :class:`SampleParams` and the
three frozen instances :data:`SAMPLES`) and must not be tuned to make experiments match the paper.

``scale`` renders the same tissue (same seed, same anatomy) on a coarser grid: shape times
``scale``, voxel size divided by it, as if the recording had been down-sampled further; the
annotated slice counts stay the paper's, clipped to the axis length.

Not modelled: the glomus, coelom and nephrostome funnels, pigment cells, refractive focal shift,
bleaching along the stack, the 8-bit quantisation before down-sampling; the PSF is Gaussian.

Command line::

    python -m sparse3d.data.synth --out data --scale 1.0 --seed 0 [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from scipy.special import ndtri

from sparse3d.data.annotation import sparse_label, uniform_positions
from sparse3d.data.volume import VolumeMeta, write_volume
from sparse3d.labels import XENOPUS

logger = logging.getLogger(__name__)

#: Channel names in storage order (Sec. 3.1).
CHANNEL_NAMES: tuple[str, str, str] = ("tomato_lectin_fluorescein", "dapi", "beta_catenin_cy3")
#: Excitation wavelengths in nm of the three channels (Sec. 3.1: 488, 405, 564 nm).
EXCITATION_NM: tuple[float, float, float] = (488.0, 405.0, 564.0)
#: Preview tint per channel: fluorescein green, DAPI blue, Cy3 red/magenta.
PREVIEW_COLORS = ((0.1, 1.0, 0.1), (0.25, 0.45, 1.0), (1.0, 0.15, 0.6))

#: Objective of the paper: Plan-Apochromat 40x/1.3 oil; immersion oil refractive index.
NUMERICAL_APERTURE = 1.3
IMMERSION_INDEX = 1.518
#: Voxel size of the original recording (Sec. 3.1), before the 2x down-sampling.
RECORDED_VOXEL_ZYX_UM = (1.02, 0.88, 0.88)

LUMEN, TUBULE, BACKGROUND = 0, 1, 2

# tissue compartments of the model (internal)
_OUT, _EPI, _MES, _GAP, _SOM, _WALL, _LUMEN, _VLUMEN, _ENDO = range(9)


@dataclass(frozen=True)
class SampleParams:
    """Frozen description of one synthetic sample: anatomy, staining and imaging.

    Lengths in micrometres; stain levels are relative fluorophore densities (1 = the brightest
    structure of a channel at the embryo surface). Pairs ``(lo, hi)`` are ranges drawn from
    uniformly. Defaults hold for all samples; each sample overrides what differs, with reasons.
    """

    name: str
    #: Volume size (Z, Y, X) in voxels after the paper's 2x down-sampling (Sec. 3.1).
    shape_zyx: tuple[int, int, int]
    #: Annotated slices in the paper's (yz, xz, xy) order = counts along (x, y, z) (Sec. 3.1).
    annotated_counts_xyz: tuple[int, int, int]
    #: 1.76 x 1.76 x 2.04 um after down-sampling 0.88 x 0.88 x 1.02 um by two (Sec. 3.1, 2).
    voxel_size_zyx_um: tuple[float, float, float] = (2.04, 1.76, 1.76)
    stage: str = "NF 36"

    # ---- tubules ------------------------------------------------------------------------------
    #: Main tubules crossing the field. The field is framed on the pronephros, whose coiled
    #: proximal tubule folds back on itself, so a slice cuts the same tubule many times.
    n_tubules: int = 2
    #: Centre-line length (um) of each main tubule inside the field before it heads out of the
    #: field: ~1-2 mm of coiled tubule in a field framed on the pronephros, so that the
    #: epithelium fills about a tenth of the field and the coil is densely packed.
    tubule_length_um: float = 1800.0
    #: Side branches per main tubule (the proximal branches towards the nephrostomes; stage 36-37
    #: pronephroi have three nephrostomes shared by the tubules of the field).
    n_branches: int = 2
    branch_length_um: tuple[float, float] = (120.0, 260.0)
    #: Branches are narrower than the common tubule.
    branch_radius_factor: tuple[float, float] = (0.65, 0.85)
    #: Outer radius of a tubule: outer diameters of ~20-40 um at stage 36-37.
    outer_radius_um: tuple[float, float] = (11.0, 17.0)
    #: Wall = one layer of cuboidal epithelial cells, 7-10 um high; the lumen is then about a
    #: third of the outer diameter.
    wall_thickness_um: tuple[float, float] = (7.0, 10.0)
    #: The lumen never closes completely in a patent tubule (>= ~6 um across).
    min_lumen_radius_um: float = 3.0
    #: Relative s.d. of the calibre along a tubule (correlation ~40 um) and of the surface
    #: roughness (correlation ~8 um); epithelia bulge where cells are tall.
    calibre_variation: float = 0.10
    surface_roughness: float = 0.05
    lumen_roughness: float = 0.12
    #: Persistence length of the centre line: the proximal tubule is tightly convoluted, the
    #: distal tubule runs straighter towards the posterior.
    persistence_proximal_um: float = 35.0
    persistence_distal_um: float = 110.0
    #: Fraction of a main tubule's length that is proximal (brush border, lectin-positive).
    proximal_fraction: float = 0.7
    #: The proximal tubules coil within a compact region (radius in the xy plane) of the field;
    #: the distal tubule then leaves it.
    coil_radius_um: float = 120.0
    #: Correlation length of the curvature: bends are smooth on the scale of a cell.
    curvature_correlation_um: float = 15.0
    #: Tightest bend relative to the outer radius (a hairpin cannot be sharper than the tube).
    min_bend_radius_factor: float = 1.3

    # ---- cells --------------------------------------------------------------------------------
    #: Epithelial cell width along the wall (apical-basal height is the wall thickness).
    epithelial_cell_um: float = 10.0
    #: Mesenchymal / lateral plate cells are loosely packed and a little larger.
    mesenchyme_cell_um: float = 13.0
    #: Fraction of the mesenchyme that is cell-free interstitial space / coelom.
    interstitial_fraction: float = 0.05
    #: Epidermis: two layers (outer ciliated/goblet layer, inner sensorial layer).
    epidermis_cell_um: float = 11.0
    epidermis_thickness_um: float = 12.0
    #: Somitic muscle cells: ~11 um wide, elongated along the body axis (x).
    somite_cell_um: float = 11.0
    somite_elongation: float = 3.0
    #: Nuclei: 6-8.5 um diameter; embryonic Xenopus cells are large.
    nucleus_radius_um: tuple[float, float] = (3.0, 4.2)
    #: Fraction of mitotic (condensed, brighter, smaller) nuclei in a growing embryo.
    mitotic_fraction: float = 0.03
    #: Yolk platelets (autofluorescent) per 1000 um^3 of tissue; embryonic cells still carry yolk
    #: at stage 36-37; the tubule epithelium has used up more of it.
    yolk_per_1000um3: float = 5.0
    yolk_in_epithelium: float = 0.4

    # ---- body layout --------------------------------------------------------------------------
    #: The embryo lies on its side on the coverslip of the inverted microscope; the stack starts
    #: near the lateral surface. Depth (z, um) of the embryo surface at the field centre
    #: (negative: above the first slice) and its tilt (dz/dy, dz/dx).
    surface_depth_um: float = 4.0
    surface_tilt: tuple[float, float] = (0.03, -0.02)
    #: Radius of curvature of the body surface across the dorso-ventral axis (y); a ~1 mm wide
    #: tadpole trunk.
    surface_curvature_radius_um: float = 900.0
    #: Depth below the surface where the somites begin (medial to the pronephros), and its tilt.
    somite_depth_um: float = 108.0
    somite_tilt: tuple[float, float] = (0.12, 0.0)
    #: Blood vessels (posterior cardinal vein runs beside the pronephros) and their radius.
    n_vessels: int = 1
    vessel_radius_um: tuple[float, float] = (9.0, 13.0)
    vessel_persistence_um: float = 250.0
    endothelium_um: float = 1.5
    #: Nucleated blood cells per 100 um of vessel (circulation has just begun).
    blood_cells_per_100um: float = 1.5

    # ---- staining (relative fluorophore density) ----------------------------------------------
    #: Tomato lectin binds the glycocalyx of the proximal tubule's apical brush border (~2 um
    #: of microvilli): the brightest lectin structure.
    lectin_brush_border: float = 1.0
    brush_border_um: float = 2.0
    #: Distal tubule has no brush border: little lectin.
    lectin_distal: float = 0.15
    #: Proximal branches carry a brush border too.
    lectin_branch: float = 0.9
    #: Glycoproteins of the tubule's basal lamina, of the lumen content and of the interstitial
    #: matrix bind some lectin.
    lectin_basal: float = 0.22
    lectin_lumen: float = 0.06
    lectin_ecm: float = 0.05
    #: Tomato lectin is a classic marker of vascular endothelium.
    lectin_endothelium: float = 0.6
    #: Autofluorescence at 488 nm of yolk platelets and of cytoplasm (independent of staining).
    yolk_autofluorescence: float = 0.2
    tissue_autofluorescence: float = 0.04
    #: DAPI: nuclei, with chromatin texture (relative s.d.).
    dapi_nucleus: float = 1.0
    dapi_texture: float = 0.35
    #: Beta-catenin at adherens junctions / lateral membranes: strongest in epithelia (tubule,
    #: epidermis), weaker and patchy in mesenchyme and muscle; basal membranes of the tubule carry
    #: less; a little cytoplasmic pool.
    bcat_epithelium: float = 1.0
    bcat_epithelium_basal: float = 0.5
    bcat_epidermis: float = 0.75
    bcat_mesenchyme: float = 0.35
    bcat_somite: float = 0.45
    bcat_endothelium: float = 0.5
    bcat_cytoplasm: float = 0.07
    #: Overall staining strength per channel (lectin, DAPI, antibody) of this preparation; it
    #: scales the stains, not the autofluorescence.
    stain_strength: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: Cell-to-cell variation (log-normal s.d.) of stain levels.
    cell_variation: float = 0.2
    #: Smooth staining unevenness across the sample (log-normal s.d., correlation ~50 um).
    staining_unevenness: float = 0.15
    #: Whole-mount stain penetration length (um below the surface), per channel (lectin, DAPI,
    #: antibody). Small DAPI penetrates best, IgG + secondary antibody worst.
    penetration_um: tuple[float, float, float] = (300.0, 600.0, 220.0)
    #: Spectral bleed-through: fluorescein into the Cy3 channel, DAPI into the fluorescein channel.
    bleed_fitc_to_cy3: float = 0.04
    bleed_dapi_to_fitc: float = 0.03

    # ---- imaging ------------------------------------------------------------------------------
    #: Attenuation length (um) of the 488 nm channel in tissue (scattering + absorption by yolk
    #: and pigment); other channels scale with wavelength (blue attenuates faster).
    attenuation_um_488: float = 170.0
    #: Axial FWHM growth with depth from oil/tissue refractive-index mismatch (um per um).
    axial_psf_growth: float = 0.02
    #: Expected photons in one recorded (0.88 um) voxel for density 1 at the surface, per channel:
    #: a few to a few tens of photons per pixel, typical of point-scanning confocal recordings.
    peak_photons: tuple[float, float, float] = (14.0, 18.0, 12.0)
    #: Background photons per recorded voxel (detector dark counts, mounting medium).
    background_photons: tuple[float, float, float] = (0.4, 0.3, 0.4)
    #: Grey value (8-bit) of density 1 at the surface: detector gain set to use the range.
    grey_at_unit: float = 170.0
    grey_offset: float = 4.0
    #: Detector read noise (grey values, s.d. per recorded voxel).
    read_noise_grey: float = 3.0
    #: Vignetting of each of the 2 x 2 stitched tiles (relative loss at a tile corner).
    vignetting: float = 0.15


#: Sample 1 (reference): a stage 36 embryo, good staining, pronephros well inside the field.
SAMPLE1 = SampleParams(name="sample1", shape_zyx=(64, 244, 248), annotated_counts_xyz=(7, 5, 21))

#: Sample 2: another stage 36 embryo, prepared and imaged like sample 1 but mounted differently.
SAMPLE2 = SampleParams(
    name="sample2",
    shape_zyx=(56, 244, 245),
    annotated_counts_xyz=(6, 7, 12),
    n_tubules=3,  # the field cuts the coil so that more, shorter passes of tubule lie in it
    tubule_length_um=1100.0,
    outer_radius_um=(10.5, 16.0),  # embryo-to-embryo variation in calibre
    surface_depth_um=2.0,  # mounted with another tilt: the surface crosses the field differently
    surface_tilt=(-0.04, 0.05),
    somite_depth_um=100.0,  # thinner stack (56 slices): somites reach into its last slices
    somite_tilt=(-0.1, 0.05),
    attenuation_um_488=160.0,  # a little more scattering than sample 1
    peak_photons=(13.0, 17.0, 13.0),  # same settings; detector gains differ slightly per session
    vignetting=0.18,
)

#: Sample 3 differs strongly from the other two: an older (stage 37) embryo, prepared with weaker
#: staining and imaged through more tissue. Each change has a biological or optical reason:
SAMPLE3 = SampleParams(
    name="sample3",
    shape_zyx=(59, 244, 246),
    annotated_counts_xyz=(4, 5, 10),
    stage="NF 37",
    # biology: at stage 37 glomerular filtration has started and the tubule lumen dilates while
    # the epithelium flattens: wider tubes, thinner walls, wider lumen
    outer_radius_um=(13.0, 19.0),
    wall_thickness_um=(6.5, 9.0),
    min_lumen_radius_um=4.0,
    # the field frames less of the proximal coil and more of the distal (lectin-weak) tubule, whose
    # wider passes are less tightly convoluted
    n_tubules=2,
    tubule_length_um=1300.0,
    proximal_fraction=0.5,
    persistence_proximal_um=45.0,
    n_vessels=2,  # the vasculature grows: a second vessel crosses the field
    # preparation: shorter lectin incubation and poorer antibody penetration in an older, thicker
    # embryo -> weaker lectin and beta-catenin stains, steeper fall-off with depth
    stain_strength=(0.6, 1.0, 0.8),
    penetration_um=(200.0, 500.0, 150.0),
    # imaging: the pronephros lies deeper (embryo surface above the first slice); more yolk and
    # pigment scatter -> stronger attenuation and more aberration with depth; lower laser power to
    # limit bleaching -> fewer photons, higher detector gain -> more read noise
    surface_depth_um=-10.0,
    surface_tilt=(0.02, 0.03),
    somite_depth_um=115.0,
    attenuation_um_488=120.0,
    axial_psf_growth=0.03,
    peak_photons=(9.0, 13.0, 9.0),
    background_photons=(0.5, 0.4, 0.5),
    read_noise_grey=4.5,
    vignetting=0.22,
)

#: The three frozen samples, in order.
SAMPLES: tuple[SampleParams, SampleParams, SampleParams] = (SAMPLE1, SAMPLE2, SAMPLE3)


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


# ============================================================================================
# grids and random fields


@dataclass(frozen=True)
class _Grid:
    """Voxel grid of one rendering: shape (Z, Y, X), voxel size and physical extent in um."""

    shape: tuple[int, int, int]
    voxel: tuple[float, float, float]
    extent: tuple[float, float, float]  # physical extent of the scale-1 volume (geometry frame)

    def centres(self, axis: int) -> np.ndarray:
        return ((np.arange(self.shape[axis]) + 0.5) * self.voxel[axis]).astype(np.float32)

    def broadcast_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = self.centres(0)[:, None, None]
        y = self.centres(1)[None, :, None]
        x = self.centres(2)[None, None, :]
        return z, y, x


def _interp_axis(arr: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices ``coords``."""
    n = arr.shape[axis]
    c = np.clip(coords, 0, n - 1.000001)
    i0 = np.floor(c).astype(np.int64)
    shape = [1] * arr.ndim
    shape[axis] = len(c)
    w = (c - i0).astype(np.float32).reshape(shape)
    return np.take(arr, i0, axis=axis) * (1 - w) + np.take(arr, i0 + 1, axis=axis) * w


def _smooth_field(rng: np.random.Generator, grid: _Grid, corr_um: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field sampled at the voxel centres, (Z, Y, X) float32.

    Drawn on a coarse grid in micrometres (spacing ``corr_um / 2``) that depends only on the
    physical extent, then interpolated: the same seed gives the same field at every scale."""
    h = corr_um / 2.0
    n = [int(math.ceil(e / h)) + 5 for e in grid.extent]
    coarse = ndi.gaussian_filter(rng.standard_normal(n), sigma=1.0, mode="wrap")
    f = (coarse / (coarse.std() + 1e-12)).astype(np.float32)
    for a in range(3):
        f = _interp_axis(f, grid.centres(a) / h + 2.0, a)
    return np.ascontiguousarray(f, dtype=np.float32)


def _fine_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Unit-variance noise smoothed over ``sigma_vox`` voxels (texture; depends on the grid)."""
    f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma_vox)
    return f / (f.std() + 1e-12)


def _smooth_1d(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Unit-variance smooth 1D noise of length ``n`` with correlation ``corr`` samples."""
    pad = int(3 * corr) + 1
    f = ndi.gaussian_filter1d(rng.standard_normal(n + 2 * pad), sigma=max(corr, 1e-3))[pad:-pad]
    return f / (f.std() + 1e-12) if n > 1 else np.zeros(n)


# ============================================================================================
# body layout: embryo surface and somite boundary


@dataclass(frozen=True)
class _Body:
    p: SampleParams
    extent: tuple[float, float, float]

    def surface_z(self, y: np.ndarray | float, x: np.ndarray | float) -> np.ndarray:
        """Depth (um) of the embryo surface at (y, x): tilted, curved across y."""
        cy, cx = self.extent[1] / 2, self.extent[2] / 2
        ty, tx = self.p.surface_tilt
        y = np.asarray(y, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        return (
            self.p.surface_depth_um
            + ty * (y - cy)
            + tx * (x - cx)
            + (y - cy) ** 2 / (2 * self.p.surface_curvature_radius_um)
        )

    def somite_z(self, y: np.ndarray | float, x: np.ndarray | float) -> np.ndarray:
        cy, cx = self.extent[1] / 2, self.extent[2] / 2
        ty, tx = self.p.somite_tilt
        return (
            self.surface_z(y, x)
            + self.p.somite_depth_um
            + ty * (np.asarray(y) - cy)
            + tx * (np.asarray(x) - cx)
        )

    def tube_z_range(self, y: float, x: float, r: float) -> tuple[float, float]:
        """Allowed centre-line depth for a tube of outer radius ``r`` at (y, x): below the
        epidermis, above the somites, at most partly cut by the first and last slice."""
        lo = float(self.surface_z(y, x)) + self.p.epidermis_thickness_um + r + 3.0
        hi = float(self.somite_z(y, x)) - r - 3.0
        lo = max(lo, 0.35 * r)
        hi = min(hi, self.extent[0] - 0.35 * r)
        if hi < lo:  # slab too thin here: aim at its middle
            mid = 0.5 * (lo + hi)
            return mid, mid
        return lo, hi


# ============================================================================================
# centre lines


class _World:
    """Committed centre-line points and their outer radii, for collision checks."""

    def __init__(self) -> None:
        self.pts = np.zeros((4096, 3))
        self.rad = np.zeros(4096)
        self.n = 0
        self.tree: cKDTree | None = None
        self.n_tree = 0
        self.rmax = 0.0

    def add(self, p: np.ndarray, r: float) -> int:
        if self.n == len(self.rad):
            self.pts = np.concatenate([self.pts, np.zeros_like(self.pts)])
            self.rad = np.concatenate([self.rad, np.zeros_like(self.rad)])
        self.pts[self.n] = p
        self.rad[self.n] = r
        self.n += 1
        self.rmax = max(self.rmax, r)
        if self.n - self.n_tree >= 64:
            self.tree = cKDTree(self.pts[: self.n])
            self.n_tree = self.n
        return self.n - 1

    def gaps(
        self, q: np.ndarray, r: float, exclude: Sequence[tuple[int, int]], buffer: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaps (surface-to-surface, um) between a tube of radius ``r`` at ``q`` and committed
        points closer than ``buffer`` beyond contact, and unit vectors from them to ``q``.
        Point-index ranges ``[lo, hi)`` in ``exclude`` are skipped."""
        reach = r + self.rmax + buffer + 1.0
        idx_list = []
        if self.tree is not None:
            idx_list.append(np.asarray(self.tree.query_ball_point(q, reach), dtype=np.int64))
        if self.n > self.n_tree:
            idx_list.append(np.arange(self.n_tree, self.n))
        if not idx_list:
            return np.zeros(0), np.zeros((0, 3))
        idx = np.concatenate(idx_list)
        keep = np.ones(len(idx), dtype=bool)
        for lo, hi in exclude:
            keep &= (idx < lo) | (idx >= hi)
        idx = idx[keep]
        vec = q - self.pts[idx]
        dist = np.linalg.norm(vec, axis=1)
        gap = dist - r - self.rad[idx]
        near = gap < buffer
        return gap[near], vec[near] / (dist[near, None] + 1e-9)

    def clearance(self, q: np.ndarray, r: float, exclude: Sequence[tuple[int, int]]) -> float:
        """Smallest gap between a tube of radius ``r`` at ``q`` and committed tubes (inf if none
        is near)."""
        gap, _ = self.gaps(q, r, exclude)
        return float(gap.min()) if len(gap) else math.inf


@dataclass
class _Tube:
    points: np.ndarray  # (n, 3) zyx um
    r_out: np.ndarray  # (n,)
    r_lum: np.ndarray  # (n,)  0 for vessels
    lectin: np.ndarray  # (n,) relative brush-border level
    kind: int  # 0 tubule, 1 vessel
    world_start: int = 0
    branch: bool = False


def _perp(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    return v - np.dot(v, t) * t


def _walk(
    world: _World,
    body: _Body,
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    r_out: np.ndarray,
    persistence: np.ndarray,
    corr: float,
    min_bend: float,
    exit_when_done: bool,
    exclude: Sequence[tuple[int, int]] = (),
    exit_face: int | None = None,
    coil: tuple[float, float, float] | None = None,
    coil_weight: np.ndarray | None = None,
    step: float = 1.0,
) -> tuple[np.ndarray, int]:
    """Grow one centre line as a worm-like chain with smooth curvature (Ornstein-Uhlenbeck
    angular velocity), steered to stay in the tissue slab and away from committed tubes.

    The curvature is limited to ``1 / (min_bend * r)``; tubes ahead (looked for one radius in
    front) push the walk aside, and a walk that cannot move without overlapping for a while ends
    blind. ``r_out`` and ``persistence`` are per-step profiles whose length bounds the number of
    steps. After ``length`` um the walk heads for the nearest side face of the field (or
    ``exit_face``: 0..3 = y low, y high, x low, x high) and stops outside, when
    ``exit_when_done``; otherwise it stops. With ``coil = (y, x, radius)`` the walk is kept
    within ``radius`` of (y, x) in the plane, weighted per step by ``coil_weight`` (the compact
    proximal coil of the pronephros). Returns the points (n, 3) and the world index of the first
    point."""
    extent = np.asarray(body.extent)
    p = np.asarray(start, dtype=np.float64)
    t = np.asarray(direction, dtype=np.float64)
    t /= np.linalg.norm(t)
    omega = np.zeros(3)
    rho = math.exp(-step / corr)
    max_steps = len(r_out)
    pts = [p.copy()]
    first = world.add(p, float(r_out[0]))
    exiting = False
    stuck = 0
    push = np.zeros(3)
    last_cl = -math.inf
    flat = np.array([0.7, 1.0, 1.0])  # tubes bend less in z: the tissue slab is thin
    for i in range(1, max_steps):
        r = float(r_out[i])
        sigma_k = 1.0 / math.sqrt(float(persistence[i]) * corr)
        kmax = 1.0 / (min_bend * r)
        if not exiting and i * step >= length:
            if not exit_when_done:
                break
            exiting = True
        # boundaries: stay within the slab (z) and, until done, inside the field (y, x)
        steer = np.zeros(3)
        zlo, zhi = body.tube_z_range(p[1], p[2], r)
        margin = 10.0
        if p[0] < zlo + margin:
            steer[0] += min((zlo + margin - p[0]) / margin, 2.0)
        if p[0] > zhi - margin:
            steer[0] -= min((p[0] - zhi + margin) / margin, 2.0)
        if exiting:
            k = exit_face
            if k is None:
                k = int(np.argmin([p[1], extent[1] - p[1], p[2], extent[2] - p[2]]))
            steer[1 + k // 2] += 1.0 if k % 2 else -1.0
        else:
            if coil is not None and coil_weight is not None and coil_weight[i] > 0:
                dv = np.array([coil[0] - p[1], coil[1] - p[2]])
                dist = float(np.linalg.norm(dv))
                over = (dist - coil[2]) / 30.0
                if over > 0:
                    steer[1:] += coil_weight[i] * min(over, 1.5) * dv / dist
            m = r + 10.0
            for a in (1, 2):
                if p[a] < m:
                    steer[a] += min((m - p[a]) / m, 2.0)
                if p[a] > extent[a] - m:
                    steer[a] -= min((p[a] - extent[a] + m) / m, 2.0)
        own = (first + max(0, i - int(2.4 * r / step) - 2), world.n + 1)
        excl = [*exclude, own]
        # obstacles ahead push sideways
        if i % 2 == 1:  # (every other step is enough: the push changes slowly)
            look = p + t * r
            own_ahead = (first + max(0, i - int(3.4 * r) - 2), world.n + 1)
            gap, away = world.gaps(look, r, [*exclude, own_ahead], buffer=6.0)
            push = np.zeros(3)
            if len(gap):
                wgt = np.clip((6.0 - gap) / 6.0, 0.0, 2.0)
                push = (wgt[:, None] * away).sum(0)
        noise = rng.standard_normal(3) * flat
        # the random curvature persists (OU process); steering acts on this step only
        omega = _perp(t, rho * omega + math.sqrt(1 - rho * rho) * sigma_k * noise)
        turn = omega + _perp(t, 0.5 * kmax * steer + 0.8 * kmax * push)
        norm = np.linalg.norm(turn)
        if norm > kmax:
            turn *= kmax / norm
        tn = t + turn * step
        # hard limit: never leave the slab further (the soft steering above normally suffices)
        if (p[0] < zlo and tn[0] < 0) or (p[0] > zhi and tn[0] > 0):
            tn[0] = -0.3 * tn[0]
        if not exiting:
            for a in (1, 2):
                if (p[a] < 0 and tn[a] < 0) or (p[a] > extent[a] and tn[a] > 0):
                    tn[a] = -0.3 * tn[a]
        tn /= np.linalg.norm(tn)
        q = p + tn * step
        # Clearance changes by at most one step per step, so a walk far from everything
        # (last clearance > 3 um) only needs an occasional check.
        if last_cl > 3.0 and i % 4:
            last_cl -= step
        else:
            last_cl = world.clearance(q, r, excl)
        if last_cl < -1.0:  # tubes may touch, not overlap
            # try sharper escapes before giving up
            best_cl, best = -math.inf, None
            for c in range(1, 9):
                td = tn + (0.15 * c) * _unit_perp(tn, rng)
                td /= np.linalg.norm(td)
                cl = world.clearance(p + td * step, r, excl)
                if cl > best_cl:
                    best_cl, best = cl, td
                if cl >= -1.0:
                    break
            assert best is not None
            tn = best
            q = p + tn * step
            last_cl = best_cl
            stuck = 0 if best_cl >= -1.0 else stuck + 1
            if stuck > 12:
                break
        else:
            stuck = 0
        p, t = q, tn
        pts.append(p.copy())
        world.add(p, r)
        if exiting and (
            p[1] < -r - 2 or p[1] > extent[1] + r + 2 or p[2] < -r - 2 or p[2] > extent[2] + r + 2
        ):
            break
    return np.asarray(pts), first


def _unit_perp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = _perp(t, rng.standard_normal(3))
    return v / (np.linalg.norm(v) + 1e-12)


def _tube_profiles(
    rng: np.random.Generator, n: int, r0: float, p: SampleParams, wall0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Outer and lumen radius along a tube (per 1 um step): calibre varies smoothly."""
    r_out = r0 * (1 + p.calibre_variation * _smooth_1d(rng, n, 40.0))
    wall = wall0 * (1 + 0.6 * p.calibre_variation * _smooth_1d(rng, n, 30.0))
    r_lum = np.maximum(r_out - wall, p.min_lumen_radius_um)
    r_out = np.maximum(r_out, r_lum + 5.0)
    return r_out, r_lum


def _random_in_coil(
    rng: np.random.Generator,
    body: _Body,
    r: float,
    coil: tuple[float, float, float],
    widen: float = 1.0,
) -> np.ndarray:
    """A random tube start inside the coil region (disc of radius ``coil[2] * widen``)."""
    ext = body.extent
    rad = coil[2] * widen * math.sqrt(rng.uniform())
    a = rng.uniform(0, 2 * np.pi)
    y = float(np.clip(coil[0] + rad * math.sin(a), r, ext[1] - r))
    x = float(np.clip(coil[1] + rad * math.cos(a), r, ext[2] - r))
    lo, hi = body.tube_z_range(y, x, r)
    return np.array([rng.uniform(lo, hi), y, x])


def _flat_direction(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)
    d = np.array([rng.normal(0, 0.15), np.sin(a), np.cos(a)])
    return d / np.linalg.norm(d)


def _branches(
    world: _World,
    body: _Body,
    rng: np.random.Generator,
    p: SampleParams,
    tubes: list[_Tube],
    main: _Tube,
    wall0: float,
) -> None:
    """Side branches from the proximal part of ``main`` that end blind (nephrostome funnels)."""
    pts, m = main.points, len(main.points)
    corr = p.curvature_correlation_um
    for _b in range(p.n_branches):
        if m < 60:
            return
        j = int(rng.uniform(0.05, max(0.1, min(0.4, p.proximal_fraction * 0.5))) * m)
        j = int(np.clip(j, 10, m - 10))
        tvec = pts[min(j + 3, m - 1)] - pts[max(j - 3, 0)]
        tvec /= np.linalg.norm(tvec) + 1e-12
        d = _unit_perp(tvec, rng) * np.array([0.4, 1.0, 1.0])
        d /= np.linalg.norm(d)
        fac = rng.uniform(*p.branch_radius_factor)
        blen = rng.uniform(*p.branch_length_um)
        nb = int(blen) + 2
        rb_out, rb_lum = _tube_profiles(rng, nb, main.r_out[j] * fac, p, wall0 * 0.9)
        win = int(3 * main.r_out[j]) + 2
        first = main.world_start
        bpts, bfirst = _walk(
            world,
            body,
            rng,
            pts[j],
            d,
            blen,
            rb_out,
            np.full(nb, p.persistence_proximal_um * 1.5),
            corr,
            p.min_bend_radius_factor,
            exit_when_done=False,
            exclude=[(first + max(0, j - win), first + j + win)],
        )
        mb = len(bpts)
        tubes.append(
            _Tube(
                bpts,
                rb_out[:mb],
                rb_lum[:mb],
                np.full(mb, p.lectin_branch) * (1 + 0.1 * _smooth_1d(rng, mb, 40.0)),
                kind=0,
                world_start=bfirst,
                branch=True,
            )
        )


def _centrelines(p: SampleParams, body: _Body, rng: np.random.Generator) -> list[_Tube]:
    """All tubes of a sample: vessels first (long, straight, along x), then tubules + branches."""
    world = _World()
    tubes: list[_Tube] = []
    ext = body.extent
    corr = p.curvature_correlation_um
    # vessels: posterior cardinal vein-like, crossing the field along the body axis (x)
    for _ in range(p.n_vessels):
        r0 = rng.uniform(*p.vessel_radius_um)
        n = int(ext[2] * 1.6)
        r_out = r0 * (1 + 0.08 * _smooth_1d(rng, n, 60.0))
        y = rng.uniform(0.15, 0.85) * ext[1]
        lo, hi = body.tube_z_range(y, 0.0, r0)
        start = np.array([rng.uniform(lo, hi), y, -r0])
        d = np.array([rng.normal(0, 0.05), rng.normal(0, 0.25), 1.0])
        pts, first = _walk(
            world,
            body,
            rng,
            start,
            d,
            ext[2] * 0.9,
            r_out,
            np.full(n, p.vessel_persistence_um),
            corr * 3,
            p.min_bend_radius_factor * 2,
            exit_when_done=True,
            exit_face=3,
        )
        m = len(pts)
        tubes.append(_Tube(pts, r_out[:m], np.zeros(m), np.zeros(m), kind=1, world_start=first))
    # tubules: the proximal parts coil within a compact region of the field
    cy = ext[1] * (0.5 + rng.uniform(-0.12, 0.12))
    cx = ext[2] * (0.5 + rng.uniform(-0.12, 0.12))
    coil = (cy, cx, p.coil_radius_um)
    for _ in range(p.n_tubules):
        r0 = rng.uniform(*p.outer_radius_um)
        wall0 = rng.uniform(*p.wall_thickness_um)
        n = int(p.tubule_length_um + 1.5 * max(ext[1], ext[2]))
        r_out, r_lum = _tube_profiles(rng, n, r0, p, wall0)
        s = np.arange(n, dtype=np.float64)
        s_prox = p.proximal_fraction * p.tubule_length_um
        w = 1.0 / (1.0 + np.exp(-(s - s_prox) / 25.0))  # 0 proximal -> 1 distal
        persistence = p.persistence_proximal_um * (1 - w) + p.persistence_distal_um * w
        coil_weight = 1.0 - w
        lectin = p.lectin_brush_border * (
            (1 - w) * (1 + 0.12 * _smooth_1d(rng, n, 50.0)) + w * p.lectin_distal
        )
        # A walk that runs into a dead end stops (a blind end, like a nephrostome); the rest of
        # the tubule's length then continues as a new pass elsewhere in the field.
        s_done = 0
        for piece in range(6):
            remaining = p.tubule_length_um - s_done
            if piece > 0 and remaining < 80.0:
                break
            start = _random_in_coil(rng, body, r0, coil)
            for _attempt in range(40):
                if world.clearance(start, r0, ()) > 4.0:
                    break
                start = _random_in_coil(rng, body, r0, coil, 1.0 + _attempt / 10)
            sl = slice(s_done, n)
            pts, first = _walk(
                world,
                body,
                rng,
                start,
                _flat_direction(rng),
                remaining,
                r_out[sl],
                persistence[sl],
                corr,
                p.min_bend_radius_factor,
                exit_when_done=True,
                coil=coil,
                coil_weight=coil_weight[sl],
            )
            m = len(pts)
            tubes.append(
                _Tube(pts, r_out[sl][:m], r_lum[sl][:m], lectin[sl][:m], kind=0, world_start=first)
            )
            s_done += m
            if piece == 0:
                _branches(world, body, rng, p, tubes, tubes[-1], wall0)
            if m >= remaining:
                break
    return tubes


# ============================================================================================
# nearest-point maps (vectorised Voronoi / distance fields)


def _nearest(
    points_um: np.ndarray,
    grid: _Grid,
    pad_um: float | Sequence[float],
    metric: tuple[float, float, float] = (1.0, 1.0, 1.0),
    z_from: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel centre: index of the nearest point (-1 if none) and the exact distance to
    it in the scaled ``metric`` (distance along axis a counts ``metric[a]`` times).

    The points are rasterised into a grid padded by ``pad_um`` (per axis, so points just outside
    the volume still count) and a Euclidean distance transform finds the nearest rasterised
    point. Only slices ``z >= z_from`` are computed (the rest get -1 / inf)."""
    shape = grid.shape
    ids_full = np.full(shape, -1, np.int32)
    dist_full = np.full(shape, np.inf, np.float32)
    z_from = int(np.clip(z_from, 0, shape[0]))
    if len(points_um) == 0 or z_from >= shape[0]:
        return ids_full, dist_full
    voxel = np.asarray(grid.voxel)
    pad = np.ceil(np.broadcast_to(np.asarray(pad_um, float), (3,)) / voxel).astype(int)
    sub = (shape[0] - z_from, shape[1], shape[2])
    origin = np.array([z_from, 0, 0]) - pad  # voxel index of the padded grid's first voxel
    pshape = tuple(int(s + 2 * q) for s, q in zip(sub, pad, strict=True))
    cell = np.floor(points_um / voxel).astype(np.int64) - origin
    ok = np.all((cell >= 0) & (cell < np.asarray(pshape)), axis=1)
    if not ok.any():
        return ids_full, dist_full
    seeds = np.full(pshape, -1, dtype=np.int32)
    seeds[tuple(cell[ok].T)] = np.nonzero(ok)[0].astype(np.int32)
    ind = ndi.distance_transform_edt(
        seeds < 0,
        sampling=tuple(voxel * np.asarray(metric)),
        return_distances=False,
        return_indices=True,
    )
    crop = tuple(slice(q, q + s) for q, s in zip(pad, sub, strict=True))
    ids = seeds[ind[0][crop], ind[1][crop], ind[2][crop]]
    del ind
    pts = points_um.astype(np.float32)
    z, y, x = grid.broadcast_centres()
    z = z[z_from:]
    dist2 = ((z - pts[ids, 0]) * metric[0]) ** 2
    dist2 += ((y - pts[ids, 1]) * metric[1]) ** 2
    dist2 += ((x - pts[ids, 2]) * metric[2]) ** 2
    ids_full[z_from:] = ids
    dist_full[z_from:] = np.sqrt(dist2)
    return ids_full, dist_full


def _random_packing(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: float, scale_zyx=(1, 1, 1)
) -> np.ndarray:
    """Irregular cell centres with mean spacing ``spacing``: uniform random points thinned so no
    two are closer than ~0.6 spacing (in coordinates divided by ``scale_zyx``)."""
    sc = np.asarray(scale_zyx, float)
    vol = float(np.prod((hi - lo) / sc))
    n = rng.poisson(1.95 * vol / spacing**3)
    pts = rng.uniform(0, 1, (n, 3)) * ((hi - lo) / sc)
    pairs = cKDTree(pts).query_pairs(0.62 * spacing, output_type="ndarray")
    keep = np.ones(n, dtype=bool)
    keep[pairs[:, 1]] = False
    return pts[keep] * sc + lo


def _jittered_lattice(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray, jitter: float
) -> np.ndarray:
    """Points of a jittered cubic lattice (spacing per axis) covering the box [lo, hi]."""
    axes = [np.arange(a, b + s, s) for a, b, s in zip(lo, hi, spacing, strict=True)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    return g + rng.uniform(-jitter, jitter, g.shape) * spacing


# ============================================================================================
# rendering


def _border(cell: np.ndarray) -> np.ndarray:
    """One-voxel cell borders: where the cell id changes along any axis, marked on the cellular
    side (id > 0), the lower voxel when both are cellular."""
    memb = np.zeros(cell.shape, dtype=bool)
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a] = slice(0, -1)
        hi[a] = slice(1, None)
        ca, cb = cell[tuple(lo)], cell[tuple(hi)]
        diff = ca != cb
        memb[tuple(lo)] |= diff & (ca > 0)
        memb[tuple(hi)] |= diff & (ca == 0)
    return memb


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _psf_sigmas_um(p: SampleParams, grid: _Grid, depth_um: float) -> list[tuple[float, ...]]:
    """Per channel (sigma_z, sigma_y, sigma_x) in um of the effective blur at ``depth_um``: the
    confocal PSF (lateral FWHM 0.51 lambda/NA; axial FWHM 0.88 lambda/(n - sqrt(n^2 - NA^2)),
    growing with depth) combined with the box filter of binning recorded voxels into one voxel."""
    n, na = IMMERSION_INDEX, NUMERICAL_APERTURE
    out = []
    for lam_nm in EXCITATION_NM:
        lam = lam_nm / 1000.0
        fwhm_lat = 0.51 * lam / na
        fwhm_ax = 0.88 * lam / (n - math.sqrt(n * n - na * na)) + p.axial_psf_growth * depth_um
        sig = []
        for a, fwhm in ((0, fwhm_ax), (1, fwhm_lat), (2, fwhm_lat)):
            box = grid.voxel[a] / math.sqrt(12.0)
            sig.append(math.hypot(fwhm / 2.355, box))
        out.append(tuple(sig))
    return out


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
    if not 0.05 <= scale <= 1.0:
        raise ValueError(f"render_sample: scale must be in [0.05, 1], got {scale}")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    last = [t0]

    def _tick(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - last[0]
        last[0] = now

    # independent streams per sample (by name) and purpose; all fixed by ``seed``
    ss = np.random.SeedSequence([int(seed), zlib.crc32(p.name.encode())])
    rng_geo, rng_cells, rng_field, rng_fine, rng_noise = (
        np.random.default_rng(s) for s in ss.spawn(5)
    )
    extent = tuple(n * v for n, v in zip(p.shape_zyx, p.voxel_size_zyx_um, strict=True))
    shape = tuple(max(4, int(round(n * scale))) for n in p.shape_zyx)
    voxel = tuple(e / n for e, n in zip(extent, shape, strict=True))
    grid = _Grid(shape=shape, voxel=voxel, extent=extent)  # type: ignore[arg-type]
    body = _Body(p, extent)  # type: ignore[arg-type]
    z, y, x = grid.broadcast_centres()

    # ---- anatomy: centre lines (um) -----------------------------------------------------------
    tubes = _centrelines(p, body, rng_geo)
    P = np.concatenate([t.points for t in tubes])
    R_out = np.concatenate([t.r_out for t in tubes]).astype(np.float32)
    R_lum = np.concatenate([t.r_lum for t in tubes]).astype(np.float32)
    LECT = np.concatenate([t.lectin for t in tubes]).astype(np.float32)
    KIND = np.concatenate([np.full(len(t.points), t.kind, np.int8) for t in tubes])
    TUBE = np.concatenate([np.full(len(t.points), i, np.int32) for i, t in enumerate(tubes)])
    LAYER = np.concatenate([np.full(len(t.points), int(t.branch), np.int8) for t in tubes])
    r_max = float(R_out.max())

    # smooth fields (drawn in um: identical at every scale)
    n_rough = _smooth_field(rng_field, grid, 8.0)
    n_lum = _smooth_field(rng_field, grid, 8.0)
    n_gap = _smooth_field(rng_field, grid, 18.0)
    uneven = [_smooth_field(rng_field, grid, 50.0) for _ in range(3)]

    # Tubes as unions of layers (main tubes + vessels, branches): a branch starting inside its
    # parent must not carve the parent's wall, so each layer gets its own nearest-point map.
    pid = np.zeros(shape, np.int64)
    d_tube = np.full(shape, np.inf, np.float32)
    ro = np.ones(shape, np.float32)
    rl = np.zeros(shape, np.float32)
    score = np.full(shape, np.inf, np.float32)
    in_lumen = np.zeros(shape, bool)
    in_tubule = np.zeros(shape, bool)
    in_vessel = np.zeros(shape, bool)
    in_vlumen = np.zeros(shape, bool)
    for layer in (0, 1):
        sel = np.nonzero(LAYER == layer)[0]
        if len(sel) == 0:
            continue
        pid_l, d_l = _nearest(P[sel], grid, pad_um=r_max + 4.0)
        pid_l = sel[pid_l]
        ro_l = R_out[pid_l] * (1 + p.surface_roughness * n_rough)
        rl_l = R_lum[pid_l] * (1 + p.lumen_roughness * n_lum)
        tub = KIND[pid_l] == 0
        in_lumen |= tub & (d_l < rl_l)
        in_tubule |= tub & (d_l < ro_l)
        in_vessel |= ~tub & (d_l < ro_l)
        in_vlumen |= ~tub & (d_l < ro_l - p.endothelium_um)
        sc = d_l / ro_l
        take = sc < score
        pid[take], d_tube[take], ro[take], rl[take], score[take] = (
            pid_l[take],
            d_l[take],
            ro_l[take],
            rl_l[take],
            sc[take],
        )
    is_tubule = KIND[pid] == 0
    is_vessel = ~is_tubule

    _tick("tubes")

    # ---- compartments -------------------------------------------------------------------------
    zs = body.surface_z(y, x).astype(np.float32)  # (1, Y, X)
    zm = body.somite_z(y, x).astype(np.float32)
    region = np.full(shape, _MES, dtype=np.uint8)
    region[np.broadcast_to(z >= zm, shape)] = _SOM
    region[np.broadcast_to(z < zs + p.epidermis_thickness_um, shape)] = _EPI
    region[np.broadcast_to(z < zs, shape)] = _OUT
    gap = n_gap > ndtri(1.0 - p.interstitial_fraction)
    region[(region == _MES) & gap] = _GAP
    region[in_vessel] = _ENDO
    region[in_vlumen] = _VLUMEN
    region[in_tubule] = _WALL
    region[in_lumen] = _LUMEN
    dense = np.full(shape, BACKGROUND, dtype=np.uint8)
    dense[region == _WALL] = TUBULE
    dense[region == _LUMEN] = LUMEN

    _tick("compartments")
    # ---- cells: seeds (um) --------------------------------------------------------------------
    tree = cKDTree(P)

    def tube_distance(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, i = tree.query(q, k=1)
        return d, i

    # epithelial cells: rings of seeds on the mid-wall surface, staggered, one every cell width
    wall_seeds = []
    for ti, t in enumerate(tubes):
        if t.kind != 0 or len(t.points) < 3:
            continue
        tang = np.gradient(t.points, axis=0)
        tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-12
        stride = max(1, int(round(p.epithelial_cell_um * 0.9)))
        for j in range(0, len(t.points), stride):
            tv = tang[j]
            u = np.cross(tv, [1.0, 0.0, 0.0])
            if np.linalg.norm(u) < 0.3:
                u = np.cross(tv, [0.0, 1.0, 0.0])
            u /= np.linalg.norm(u)
            v = np.cross(tv, u)
            rmid = t.r_lum[j] + rng_cells.uniform(0.45, 0.65) * (t.r_out[j] - t.r_lum[j])
            k = max(3, int(round(2 * np.pi * rmid / p.epithelial_cell_um)))
            ang = rng_cells.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k
            ang += rng_cells.uniform(-0.25, 0.25, k) * 2 * np.pi / k
            along = rng_cells.uniform(-0.25, 0.25, k) * p.epithelial_cell_um
            pts = (
                t.points[j][None]
                + rmid * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)
                + along[:, None] * tv
            )
            wall_seeds.append(np.concatenate([pts, np.full((k, 1), ti)], axis=1))
    ws = np.concatenate(wall_seeds) if wall_seeds else np.zeros((0, 4))
    if len(ws):  # keep seeds that lie in the wall of their own tube
        d, i = tube_distance(ws[:, :3])
        ok = (TUBE[i] == ws[:, 3]) & (d > R_lum[i]) & (d < R_out[i])
        ws = ws[ok, :3]
    n_wall = len(ws)

    # tissue: irregular mesenchyme, two epidermal layers, endothelium, blood cells
    lo = np.array([-15.0, -15.0, -15.0])
    hi = np.asarray(extent) + 15.0
    mes = _random_packing(rng_cells, lo, hi, p.mesenchyme_cell_um)
    mz_s = body.surface_z(mes[:, 1], mes[:, 2])
    mz_m = body.somite_z(mes[:, 1], mes[:, 2])
    mes = mes[(mes[:, 0] > mz_s + p.epidermis_thickness_um) & (mes[:, 0] < mz_m)]
    epi_xy = _jittered_lattice(rng_cells, lo[1:], hi[1:], np.full(2, p.epidermis_cell_um), 0.35)
    epi = []
    for frac in (0.25, 0.72):
        zz = body.surface_z(epi_xy[:, 0], epi_xy[:, 1]) + frac * p.epidermis_thickness_um
        epi.append(np.column_stack([zz, epi_xy]))
        epi_xy = epi_xy + p.epidermis_cell_um * 0.5  # stagger the second layer
    epi_pts = np.concatenate(epi)
    endo, blood = [], []
    for t in tubes:
        if t.kind != 1:
            continue
        for j in range(0, len(t.points), 14):
            tv = t.points[min(j + 1, len(t.points) - 1)] - t.points[max(j - 1, 0)]
            tv /= np.linalg.norm(tv) + 1e-12
            k = max(3, int(2 * np.pi * t.r_out[j] / 20.0))
            ang = rng_cells.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k
            u = _unit_perp(tv, rng_cells)
            v = np.cross(tv, u)
            rr = t.r_out[j] - 0.5 * p.endothelium_um
            endo.append(
                t.points[j][None] + rr * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)
            )
        nb = rng_cells.poisson(p.blood_cells_per_100um * len(t.points) / 100.0)
        for _ in range(nb):
            j = int(rng_cells.integers(len(t.points)))
            off = _unit_perp(np.array([0.0, 0.0, 1.0]), rng_cells) * rng_cells.uniform(
                0, max(t.r_out[j] - 8.0, 0.0)
            )
            blood.append(t.points[j] + off)
    endo_pts = np.concatenate(endo) if endo else np.zeros((0, 3))
    blood_pts = np.asarray(blood).reshape(-1, 3)
    # tissue seeds must not sit inside tubes
    d, i = tube_distance(mes)
    mes = mes[d > R_out[i] + 1.0]
    d, i = tube_distance(epi_pts)
    epi_pts = epi_pts[d > R_out[i] + 1.0]
    tissue = np.concatenate([mes, epi_pts, endo_pts, blood_pts])
    n_tis = len(tissue)
    t_kind = np.concatenate(
        [
            np.zeros(len(mes), np.int8),
            np.ones(len(epi_pts), np.int8),
            np.full(len(endo_pts), 2, np.int8),
            np.full(len(blood_pts), 3, np.int8),
        ]
    )
    # somitic muscle: packed in a metric that shrinks x, so cells are long along the body axis
    el = p.somite_elongation
    som = _random_packing(rng_cells, lo, hi, p.somite_cell_um, scale_zyx=(1.0, 1.0, el))
    som = som[som[:, 0] >= body.somite_z(som[:, 1], som[:, 2])]
    d, i = tube_distance(som)
    som = som[d > R_out[i] + 1.0]
    n_som = len(som)

    # per-cell attributes (drawn in um space, scale independent)
    n_cells = n_wall + n_tis + n_som
    r_nuc = rng_cells.uniform(*p.nucleus_radius_um, n_cells).astype(np.float32)
    nuc_bright = rng_cells.lognormal(0.0, p.cell_variation, n_cells).astype(np.float32)
    memb_bright = rng_cells.lognormal(0.0, p.cell_variation, n_cells).astype(np.float32)
    mitotic = rng_cells.random(n_cells) < p.mitotic_fraction
    r_nuc[mitotic] *= 0.75
    nuc_bright[mitotic] *= 1.8
    r_nuc[n_wall : n_wall + n_tis][t_kind == 2] = 2.2  # flat endothelial nuclei
    r_nuc[n_wall : n_wall + n_tis][t_kind == 3] = 2.6  # erythrocyte nuclei
    cell_r = np.full(n_tis, np.inf, np.float32)
    cell_r[t_kind == 3] = 6.5  # blood cells are free-floating ellipsoid-ish bodies
    # nuclei sit off-centre in loose mesenchymal cells
    nuc_c = np.concatenate([ws, tissue, som]).astype(np.float32)
    off = rng_cells.normal(0, 1, (n_tis, 3))
    off *= (rng_cells.uniform(0, 0.18, n_tis) * p.mesenchyme_cell_um / np.linalg.norm(off, axis=1))[
        :, None
    ]
    nuc_c[n_wall : n_wall + n_tis][t_kind == 0] += off[t_kind == 0].astype(np.float32)

    _tick("seeds")
    # ---- cells: voxel maps --------------------------------------------------------------------
    wid, _ = _nearest(ws, grid, pad_um=p.epithelial_cell_um)
    tid, td = _nearest(tissue, grid, pad_um=p.mesenchyme_cell_um)
    z_som = int(np.floor(float(zm.min()) / voxel[0])) - 1  # somites only below this slice
    sc = p.somite_cell_um
    sid, _ = _nearest(
        som, grid, pad_um=(sc, sc, sc * el), metric=(1.0, 1.0, 1.0 / el), z_from=z_som
    )

    cell = np.zeros(shape, dtype=np.int32)
    own = np.full(shape, -1, dtype=np.int32)  # global cell index
    m = region == _WALL
    if n_wall:
        own[m] = wid[m]
    if n_tis:
        m = np.isin(region, (_EPI, _MES, _ENDO)) & (tid >= 0)
        own[m] = n_wall + tid[m]
        m = region == _VLUMEN
        inside_blood = m & (t_kind[np.maximum(tid, 0)] == 3) & (td < cell_r[np.maximum(tid, 0)])
        own[inside_blood] = n_wall + tid[inside_blood]
    m = (region == _SOM) & (sid >= 0)
    if n_som:
        own[m] = n_wall + n_tis + sid[m]
    cellular = own >= 0
    cell[cellular] = own[cellular] * 16 + region[cellular].astype(np.int32) + 1
    memb = _border(cell)
    ownc = np.maximum(own, 0)

    fine_a = _fine_noise(rng_fine, shape, 0.8)
    fine_b = _fine_noise(rng_fine, shape, 1.2 * 1.76 / grid.voxel[2])
    nucleus = np.zeros(shape, dtype=np.float32)
    edge = 0.5  # um, soft nuclear edge
    ci = ownc[cellular]
    zz, yy, xx = (np.broadcast_to(c, shape)[cellular] for c in (z, y, x))
    mx = np.where(region[cellular] == _SOM, np.float32(1.0 / el), np.float32(1.0))
    d_nuc = np.sqrt(
        (zz - nuc_c[ci, 0]) ** 2 + (yy - nuc_c[ci, 1]) ** 2 + ((xx - nuc_c[ci, 2]) * mx) ** 2
    )
    d_nuc *= 1 + 0.1 * fine_b[cellular]
    nucleus[cellular] = _sigmoid((r_nuc[ci] - d_nuc) / edge)
    del zz, yy, xx, mx, d_nuc, ci

    _tick("cell maps")
    # ---- stains: fluorophore densities --------------------------------------------------------
    # ch1 DAPI: nuclei with chromatin texture
    dapi = nucleus * nuc_bright[ownc] * p.dapi_nucleus
    dapi *= np.clip(1 + p.dapi_texture * fine_a, 0.2, None)

    # ch2 beta-catenin: cell borders, strongest in epithelia
    w_memb = np.zeros(9, dtype=np.float32)
    w_memb[_WALL] = p.bcat_epithelium
    w_memb[_EPI] = p.bcat_epidermis
    w_memb[_MES] = p.bcat_mesenchyme
    w_memb[_SOM] = p.bcat_somite
    w_memb[_ENDO] = p.bcat_endothelium
    w_memb[_VLUMEN] = 0.3 * p.bcat_mesenchyme  # blood cell membranes
    bcat = np.where(memb, w_memb[region] * memb_bright[ownc], 0.0).astype(np.float32)
    # mesenchymal and muscle contacts are patchy, not continuous belts as in epithelia
    patchy = np.isin(region, (_MES, _SOM))
    bcat[patchy] *= np.clip(1 + 0.7 * fine_b[patchy], 0.05, None)
    basal = (region == _WALL) & (d_tube > ro - 1.5) & memb
    bcat[basal] *= p.bcat_epithelium_basal / max(p.bcat_epithelium, 1e-6)
    bcat += cellular * (p.bcat_cytoplasm * (1 - 0.6 * nucleus))

    # ch0 lectin: apical brush border, basal lamina, endothelium, yolk autofluorescence
    lect_lvl = LECT[pid]
    brush = _sigmoid((d_tube - rl) / 0.35) * _sigmoid((rl + p.brush_border_um - d_tube) / 0.35)
    lectin = np.where(region == _WALL, brush * lect_lvl, 0.0).astype(np.float32)
    lectin += np.where(region == _LUMEN, p.lectin_lumen * lect_lvl, 0.0)
    basal_lam = np.exp(-0.5 * ((d_tube - ro) / 0.7) ** 2)
    lectin += np.where(is_tubule, p.lectin_basal * basal_lam, 0.0)
    endo_prof = np.exp(-0.5 * ((d_tube - ro + 0.5 * p.endothelium_um) / 0.7) ** 2)
    lectin += np.where(is_vessel, p.lectin_endothelium * endo_prof, 0.0)
    # yolk platelets: Poisson points in um, rasterised and blurred to ~1.5 um blobs
    vol_um3 = float(np.prod(extent))
    n_yolk = rng_cells.poisson(p.yolk_per_1000um3 * vol_um3 / 1000.0)
    yolk_pts = rng_cells.uniform(0, 1, (n_yolk, 3)) * np.asarray(extent)
    yolk_amp = rng_cells.uniform(0.5, 1.0, n_yolk)
    yi = np.minimum((yolk_pts / np.asarray(voxel)).astype(np.int64), np.asarray(shape) - 1)
    yolk = np.zeros(shape, dtype=np.float32)
    np.add.at(yolk, tuple(yi.T), yolk_amp.astype(np.float32))
    vox_um3 = float(np.prod(voxel))
    yolk *= min(1.0, 3.0 / vox_um3)  # platelet (~3 um^3) dilutes into bigger voxels
    yolk = ndi.gaussian_filter(yolk, sigma=[max(1.0 / v, 0.3) for v in voxel]) * 6.0
    yolk *= cellular * (1 - nucleus)
    yolk[region == _WALL] *= p.yolk_in_epithelium
    lectin += np.where(region == _GAP, p.lectin_ecm, 0.0)  # glycoproteins of the interstitial ECM
    # staining strength of the preparation, then autofluorescence (independent of the stains)
    lectin *= p.stain_strength[0]
    dapi *= p.stain_strength[1]
    bcat *= p.stain_strength[2]
    lectin += p.yolk_autofluorescence * yolk + p.tissue_autofluorescence * cellular
    lectin += np.where(region == _VLUMEN, 0.15 * (own >= 0), 0.0)  # erythrocyte autofluorescence
    dapi += 0.25 * p.yolk_autofluorescence * yolk + 0.02 * cellular

    dens = [lectin, dapi, bcat]
    # bleed-through between channels
    dens[2] = dens[2] + p.bleed_fitc_to_cy3 * dens[0]
    dens[0] = dens[0] + p.bleed_dapi_to_fitc * dens[1]

    _tick("stains")
    # ---- microscope -----------------------------------------------------------------------------
    depth = np.broadcast_to(np.maximum(z - zs, 0.0), shape)  # um below the embryo surface
    max_depth = float(depth.max())
    sig0 = _psf_sigmas_um(p, grid, 0.0)
    sig1 = _psf_sigmas_um(p, grid, max_depth)
    wdepth = (depth / max(max_depth, 1e-6)).astype(np.float32)
    # vignetting of 2 x 2 stitched tiles: quadratic fall-off from each tile centre
    vig = np.ones((1, shape[1], shape[2]), dtype=np.float32)
    for a, coord in ((1, y), (2, x)):
        half = extent[a] / 2
        u = (coord % half) / half * 2 - 1  # -1..1 within a tile
        vig = vig * (1 - 0.5 * p.vignetting * u**2)
    # recorded voxels averaged into one voxel: 8 at scale 1 (the paper's 2x down-sampling)
    n_avg = float(np.prod(voxel) / np.prod(RECORDED_VOXEL_ZYX_UM))
    image = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        f = dens[c] * np.exp(-depth / p.penetration_um[c])
        f *= np.exp(p.staining_unevenness * uneven[c])
        blur0 = ndi.gaussian_filter(f, [s / v for s, v in zip(sig0[c], voxel, strict=True)])
        blur1 = ndi.gaussian_filter(f, [s / v for s, v in zip(sig1[c], voxel, strict=True)])
        f = blur0 * (1 - wdepth) + blur1 * wdepth
        att = p.attenuation_um_488 * (EXCITATION_NM[c] / 488.0) ** 1.5
        f *= np.exp(-depth / att) * vig
        photons = f * p.peak_photons[c] + p.background_photons[c]
        counts = rng_noise.poisson(np.maximum(photons, 0) * n_avg).astype(np.float32) / n_avg
        grey = counts * (p.grey_at_unit / p.peak_photons[c]) + p.grey_offset
        grey += rng_noise.normal(0, p.read_noise_grey / math.sqrt(n_avg), shape)
        image[c] = np.clip(grey, 0, 255)

    _tick("microscope")
    # ---- annotation -----------------------------------------------------------------------------
    annotated = annotated_slices_for(p, shape)
    label = sparse_label(dense, annotated, XENOPUS.ignore_index)
    meta = VolumeMeta(
        voxel_size_zyx_um=voxel,  # type: ignore[arg-type]
        channel_names=CHANNEL_NAMES,
        labels=XENOPUS,
        annotated_slices=annotated,
    )
    fractions = {name: float(np.mean(dense == c)) for c, name in enumerate(XENOPUS.class_names)}
    _tick("annotation")
    logger.debug("%s timings: %s", p.name, {k: round(v, 2) for k, v in timings.items()})
    logger.info(
        "%s (scale %.2f): shape_zyx %s, %d tubes, %d cells; class fractions %s; %.1f s",
        p.name,
        scale,
        shape,
        len(tubes),
        n_cells,
        ", ".join(f"{k} {v:.3f}" for k, v in fractions.items()),
        time.perf_counter() - t0,
    )
    return SyntheticVolume(
        image=image, dense_label=dense, label=label, meta=meta, params=p, class_fractions=fractions
    )


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


def _preview_position(meta: VolumeMeta, shape: Sequence[int]) -> tuple[int, int, int]:
    """Preview planes: the annotated xy slice nearest the centre, and y, x positions next to the
    centre that are *not* annotated, so the zy and xz panels show the annotated slices as lines."""
    z_ann = meta.annotated_slices["z"]
    z = min(z_ann, key=lambda i: abs(i - shape[0] // 2)) if z_ann else shape[0] // 2
    yx = []
    for ax, n in (("y", shape[1]), ("x", shape[2])):
        free = [i for i in range(n) if i not in set(meta.annotated_slices[ax])]
        yx.append(min(free, key=lambda i: abs(i - n // 2)) if free else n // 2)
    return z, yx[0], yx[1]


def generate_benchmark(
    out_dir: str | Path,
    scale: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    samples: Sequence[SampleParams] = SAMPLES,
    previews: bool = True,
    summary: list[dict] | None = None,
) -> list[Path]:
    """Render the three samples and write ``sample{1,2,3}.h5`` (+ ``.png`` previews).

    Args:
        out_dir: output folder (created if missing).
        scale: resolution factor (see :func:`render_sample`).
        seed: random seed; same seed, same volumes.
        overwrite: replace existing files; otherwise an existing output raises FileExistsError
            before anything is rendered.
        samples: which samples (default all three).
        previews: also write a PNG overview per volume.
        summary: if given, one dict per volume is appended (name, shape_zyx, class fractions,
            annotated slice counts, labelled fraction, seconds).

    Returns:
        Paths of the written ``.h5`` files.
    """
    from tqdm.auto import tqdm

    from sparse3d.viz import save_overview

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        for sp in samples:
            for suffix in (".h5", ".png") if previews else (".h5",):
                target = out / f"{sp.name}{suffix}"
                if target.exists():
                    raise FileExistsError(f"{target}: file exists; pass overwrite=True")
    paths = []
    for sp in tqdm(samples, desc="synthetic volumes", disable=None):
        t0 = time.perf_counter()
        vol = render_sample(sp, scale=scale, seed=seed)
        path = write_volume(
            out / f"{sp.name}.h5", vol.image, vol.label, vol.meta, vol.dense_label, overwrite
        )
        if previews:
            fr = vol.class_fractions
            save_overview(
                out / f"{sp.name}.png",
                vol.image,
                vol.label,
                XENOPUS,
                title=(
                    f"{sp.name} (synthetic, {sp.stage}, scale {scale:g}, seed {seed}) — "
                    f"lumen {fr['inside_tubule']:.1%}, tubule {fr['tubule']:.1%}, "
                    f"background {fr['background']:.1%}"
                ),
                position_zyx=_preview_position(vol.meta, vol.image.shape[1:]),
                voxel_size_zyx_um=vol.meta.voxel_size_zyx_um,
                dense_label=vol.dense_label,
                channel_colors=PREVIEW_COLORS,
                channel_names=("lectin", "DAPI", "β-catenin"),
                overwrite=True,
            )
        paths.append(path)
        if summary is not None:
            summary.append(
                {
                    "name": sp.name,
                    "path": str(path),
                    "shape_zyx": list(vol.dense_label.shape),
                    "voxel_size_zyx_um": list(vol.meta.voxel_size_zyx_um),
                    "class_fractions": dict(vol.class_fractions),
                    "annotated_counts_xyz": [
                        len(vol.meta.annotated_slices[a]) for a in ("x", "y", "z")
                    ],
                    "labelled_fraction": float(np.mean(vol.label != XENOPUS.ignore_index)),
                    "seconds": time.perf_counter() - t0,
                }
            )
    return paths


def params_dict(p: SampleParams) -> dict:
    """The parameters of a sample as a plain dict (for logging / reports)."""
    return asdict(p)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sparse3d.data.synth",
        description="Render the synthetic Xenopus-kidney-like benchmark (3 volumes + previews).",
    )
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--scale", type=float, default=1.0, help="resolution factor (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing files")
    ap.add_argument("--no-previews", action="store_true", help="skip the PNG previews")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    summary: list[dict] = []
    try:
        generate_benchmark(
            args.out,
            args.scale,
            args.seed,
            args.overwrite,
            previews=not args.no_previews,
            summary=summary,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 1
    print(
        f"{'volume':<9} {'shape_zyx':<15} {'lumen':>6} {'tubule':>7} {'backgr':>7} "
        f"{'slices x,y,z':>13} {'labelled':>9} {'seconds':>8}"
    )
    for row in summary:
        fr = row["class_fractions"]
        n = row["annotated_counts_xyz"]
        print(
            f"{row['name']:<9} {str(tuple(row['shape_zyx'])):<15} {fr['inside_tubule']:>6.3f} "
            f"{fr['tubule']:>7.3f} {fr['background']:>7.3f} {f'{n[0]},{n[1]},{n[2]}':>13} "
            f"{row['labelled_fraction']:>9.3f} {row['seconds']:>8.1f}"
        )
    print(f"wrote {len(summary)} volumes to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
