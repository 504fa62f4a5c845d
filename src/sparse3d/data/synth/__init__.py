"""Synthetic stand-in for the paper's three Xenopus pronephros confocal volumes (Sec. 3.1).

The recordings of the paper are not public. This package renders three volumes with the paper's
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

Every written file records its provenance (generator version, seed, scale, parameter hash;
:mod:`~sparse3d.data.synth.provenance`); :func:`ensure_benchmark` checks it on load.

Not modelled: the glomus, coelom and nephrostome funnels, pigment cells, refractive focal shift,
bleaching along the stack, the 8-bit quantisation before down-sampling; the PSF is Gaussian.

Modules, in the order of the rendering:

=============  ================================================================================
params         the frozen sample parameters and constants
grid, fields   the voxel grid, nearest-point maps, random fields
body           embryo surface and somite boundary
walk, anatomy  centre-line growth; the tubes (tubules, branches, vessels) of a sample
tissue         tubes and body layers per voxel (compartments), the dense ground truth
cells          cell seeds and their voxel maps (ownership, borders, nuclei)
stains         fluorophore densities per channel
microscope     PSF, attenuation, vignetting, noise: grey values
render         :func:`render_sample`, the stages in order; the annotated slices
preview        the PNG preview of a sample
provenance     generator version, parameter hash, staleness
benchmark      :func:`generate_benchmark`, :func:`ensure_benchmark`: files on disk
cli            the command line
=============  ================================================================================

Command line::

    python -m sparse3d.data.synth --out data --scale 1.0 --seed 0 [--overwrite]
"""

from __future__ import annotations

from sparse3d.data.synth.benchmark import (
    SAMPLE_NAMES,
    ensure_benchmark,
    generate_benchmark,
    regenerate_command,
    sample_params,
)
from sparse3d.data.synth.cli import main
from sparse3d.data.synth.params import (
    BACKGROUND,
    CHANNEL_NAMES,
    EXCITATION_NM,
    IMMERSION_INDEX,
    LUMEN,
    NUMERICAL_APERTURE,
    RECORDED_VOXEL_ZYX_UM,
    SAMPLE1,
    SAMPLE2,
    SAMPLE3,
    SAMPLES,
    TUBULE,
    SampleParams,
    params_dict,
)
from sparse3d.data.synth.provenance import (
    GENERATOR_VERSION,
    Provenance,
    StaleBenchmarkError,
    provenance_for,
    read_provenance,
    stale_reason,
)
from sparse3d.data.synth.render import SyntheticVolume, annotated_slices_for, render_sample

__all__ = [
    "BACKGROUND",
    "CHANNEL_NAMES",
    "EXCITATION_NM",
    "GENERATOR_VERSION",
    "IMMERSION_INDEX",
    "LUMEN",
    "NUMERICAL_APERTURE",
    "RECORDED_VOXEL_ZYX_UM",
    "SAMPLE1",
    "SAMPLE2",
    "SAMPLE3",
    "SAMPLES",
    "SAMPLE_NAMES",
    "TUBULE",
    "Provenance",
    "SampleParams",
    "StaleBenchmarkError",
    "SyntheticVolume",
    "annotated_slices_for",
    "ensure_benchmark",
    "generate_benchmark",
    "main",
    "params_dict",
    "provenance_for",
    "read_provenance",
    "regenerate_command",
    "render_sample",
    "sample_params",
    "stale_reason",
]
