"""A block's features for densify's blockwise forests (layer 1): its filter features, computed
from the image grown by their halo or kept from an earlier pass, followed by the context
features of the previous stage's probabilities.

The filter features of a block are the same in every pass and every stage (the image does not
change), so where they can be kept each block's are computed once in the whole run, as the
in-memory path computes the volume's once: in this process's memory (blocks run as threads,
the whole volume's features fit the budget) or as one raw float32 file per block in a folder
the workers share (the scratch disk has room). Else each pass computes them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse3d.atomic import AtomicPath
from sparse3d.densify.features import feature_halo, feature_names, voxel_features
from sparse3d.densify.forests import context_features


@dataclass(frozen=True)
class FeatureSpec:
    """What a block needs to compute its features: the filters' scales and the volume's voxel
    size and intensity percentiles ``(C, 2)``; ``context_sigmas`` of the auto-context
    features (used when a context store is given)."""

    sigmas: tuple[float, ...]
    voxel_size_zyx_um: tuple[float, float, float] | None
    percentiles: np.ndarray
    context_sigmas: tuple[float, ...] = ()
    threads: int = 1
    #: name under which this process keeps each block's filter features for every later pass
    #: (None: not in memory). Only where the whole volume's features fit the memory budget and
    #: the blocks run in this process (see :func:`drop_cache`).
    cache: str | None = None
    #: a directory (shared by the workers, like the scratch stores) where each block's filter
    #: features are kept as a file for every later pass, where the disk has room for them
    #: (None: not on disk)
    keep_dir: str | None = None

    @property
    def halo(self) -> tuple[int, int, int]:
        return feature_halo(self.sigmas, self.voxel_size_zyx_um)

    @property
    def context_halo(self) -> tuple[int, int, int]:
        r = max((int(4.0 * s + 0.5) for s in self.context_sigmas), default=0)
        return (r, r, r)

    @property
    def filter_features(self) -> int:
        """``F``: the filter features of a block (all channels, every scale)."""
        return len(feature_names(len(self.percentiles), self.sigmas))

    @property
    def keeps(self) -> bool:
        """Whether each block's filter features, once computed, serve every later pass (in
        memory or on disk): a block's features are then computed once in the whole run."""
        return self.cache is not None or self.keep_dir is not None


#: filter features of whole blocks kept between passes: ``{(spec.cache, block core): (F, ...)}``
_CACHE: dict[tuple[str, tuple[tuple[int, int], ...]], np.ndarray] = {}


def drop_cache(token: str | None) -> None:
    """Forget the block features kept under ``token``."""
    for key in [k for k in _CACHE if k[0] == token]:
        del _CACHE[key]


def kept_file(spec: FeatureSpec, region: Sequence[slice]) -> Path | None:
    """The file that keeps the filter features of ``region`` under ``spec.keep_dir``."""
    if spec.keep_dir is None:
        return None
    name = "_".join(f"{int(r.start)}-{int(r.stop)}" for r in region)
    return Path(spec.keep_dir) / f"{name}.f32"


def _read_kept(path: Path, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (C-contiguous float32) with the raw features kept at ``path``: read into
    the array itself, not memory-mapped (mapped pages would count in the worker's resident
    memory, which its nanny watches, on top of the array they are copied into)."""
    with open(path, "rb") as fh:
        got = fh.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise OSError(f"{path}: {got} bytes of kept features, expected {out.nbytes}")
    return out


def _base_features(image_ext, image_box, region, spec: FeatureSpec, out=None) -> np.ndarray:
    """Filter features ``(F, *region)``: kept ones where ``spec`` keeps them (in memory, or in
    a file read into ``out``), else computed from the image (into ``out`` when given) and kept
    for the later passes."""
    key = None
    if spec.cache is not None:
        key = (spec.cache, tuple((int(r.start), int(r.stop)) for r in region))
        if key in _CACHE:
            return _CACHE[key]
    if out is None:
        out = np.empty((spec.filter_features, *(r.stop - r.start for r in region)), np.float32)
    path = kept_file(spec, region)
    if path is not None and path.exists():
        return _read_kept(path, out)
    assert image_ext is not None, "the image is needed where no block features are kept"
    crop = tuple(
        slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, image_box, strict=True)
    )
    voxel_features(
        image_ext,
        spec.voxel_size_zyx_um,
        spec.sigmas,
        spec.percentiles,
        spec.threads,
        crop,
        progress=False,
        out=out,
    )
    if key is not None:
        _CACHE[key] = out
    if path is not None:  # under a temporary name, then renamed: a reader never sees half
        with AtomicPath(path) as tmp:
            out.tofile(tmp)
    return out


def block_features(
    image_ext: np.ndarray | None,
    image_box: Sequence[slice],
    context_ext: np.ndarray | None,
    context_box: Sequence[slice] | None,
    region: Sequence[slice],
    spec: FeatureSpec,
) -> np.ndarray:
    """Features ``(F, *region)`` of the voxels in ``region`` (volume coordinates), from the
    image read over ``image_box`` (``region`` grown by ``spec.halo``; None where ``spec`` keeps
    this region's filter features) and, when given, the context probabilities ``(K, ...)`` read
    over ``context_box``: the filter features, then the context features."""
    if context_ext is None:
        return _base_features(image_ext, image_box, region, spec)
    assert context_box is not None
    k = int(np.shape(context_ext)[0])
    f = spec.filter_features
    # one array for the base and the context features: no concatenated copy of either
    out = np.empty((f + k * (1 + len(spec.context_sigmas)), *(r.stop - r.start for r in region)),
                   np.float32)  # fmt: skip
    if spec.cache is None:  # computed or read from the kept file straight into the array
        _base_features(image_ext, image_box, region, spec, out[:f])
    else:  # kept in memory as an array of their own (a view would hold the context too)
        out[:f] = _base_features(image_ext, image_box, region, spec)
    crop = tuple(
        slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, context_box, strict=True)
    )
    context_features(context_ext, spec.context_sigmas, crop, out=out[f:])
    return out
