"""Parameters of the synthetic samples: the frozen anatomy, staining and imaging of each (Sec. 3.1).

Set once from the biology and the optics and never tuned towards the paper's results. Lengths are
in micrometres, shapes (Z, Y, X). Changing anything here changes the generated volumes: bump
:data:`sparse3d.data.synth.provenance.GENERATOR_VERSION` with it (the parameter hash in each file
catches a forgotten bump).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Channel names in storage order (Sec. 3.1).
CHANNEL_NAMES: tuple[str, str, str] = ("tomato_lectin_fluorescein", "dapi", "beta_catenin_cy3")
#: Excitation wavelengths in nm of the three channels (Sec. 3.1: 488, 405, 564 nm).
EXCITATION_NM: tuple[float, float, float] = (488.0, 405.0, 564.0)

#: Objective of the paper: Plan-Apochromat 40x/1.3 oil; immersion oil refractive index.
NUMERICAL_APERTURE = 1.3
IMMERSION_INDEX = 1.518
#: Voxel size of the original recording (Sec. 3.1), before the 2x down-sampling.
RECORDED_VOXEL_ZYX_UM = (1.02, 0.88, 0.88)

LUMEN, TUBULE, BACKGROUND = 0, 1, 2


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


def params_dict(p: SampleParams) -> dict:
    """The parameters of a sample as a plain dict (for logging / reports)."""
    return asdict(p)
