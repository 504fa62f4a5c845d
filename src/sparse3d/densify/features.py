"""Random-forest voxel classifier from sparse annotation, in the manner of ilastik's pixel
classification (layer 1: numpy, scipy, scikit-learn; no Lightning, no Hydra).

A fast baseline beside the paper's 3D U-Net for the same semi-automated use (Sec. 1, Fig. 1a):
the user annotates a few slices, a classifier learns from those voxels alone and labels the rest.

1. :func:`voxel_features` turns an image ``(C, Z, Y, X)`` into a stack of filter responses
   ``(F, Z, Y, X)`` float32 at several scales (Gaussian smoothing, Laplacian of Gaussian,
   Gaussian gradient magnitude, difference of Gaussians, structure-tensor and Hessian
   eigenvalues) plus the intensity itself, after the per-channel percentile normalisation used
   for the network (``sparse3d.data.normalize``).
2. :class:`sparse3d.densify.forests.RandomForestSegmenter` learns from them (next module).

Scales are given in voxels of the finest axis. With a voxel size, each axis' sigma is divided by
its voxel size relative to the finest one and derivatives are taken per finest-voxel length, so
every filter is isotropic in physical space (an axis twice as coarse gets half the sigma in
voxels).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from sparse3d.data.normalize import apply_percentiles, normalize_volume

#: Scales (in voxels of the finest axis) of ilastik's default feature set.
DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.6, 3.5, 5.0)
#: Structure tensor: derivatives at sigma, products integrated at this fraction of sigma
#: (ilastik's inner and outer scales).
STRUCTURE_OUTER_FRACTION = 0.5
#: Progress bars are shown from this many voxels on (smaller volumes take a second or two).
PROGRESS_MIN_VOXELS = 2_000_000
#: Voxels per block of the closed-form eigenvalue computation (float64 temporaries).
_EIG_BLOCK = 1 << 18

#: Features at each sigma, in order (``dog`` from the second sigma on).
_PER_SIGMA = (
    *("gauss", "log", "gradmag", "dog"),
    *("st_eig0", "st_eig1", "st_eig2"),
    *("hess_eig0", "hess_eig1", "hess_eig2"),
)


def _sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in sigmas)
    if not out or any(not math.isfinite(s) or s <= 0 for s in out):
        raise ValueError(f"sigmas must be a non-empty list of positive numbers, got {sigmas!r}")
    return out


def _axis_ratios(voxel_size_zyx_um: Sequence[float] | None) -> np.ndarray:
    """``(3,)`` voxel size of each axis over the finest one (all 1 without a voxel size)."""
    if voxel_size_zyx_um is None:
        return np.ones(3)
    vs = np.asarray([float(v) for v in voxel_size_zyx_um])
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(
            f"voxel_size_zyx_um must be three positive numbers, got {voxel_size_zyx_um}"
        )
    return vs / vs.min()


def feature_names(num_channels: int, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> list[str]:
    """Names of the ``F`` features :func:`voxel_features` returns, in order.

    Per channel: ``raw``, then for each sigma ``gauss``, ``log``, ``gradmag``, ``dog`` (from the
    second sigma on: this sigma's smoothing minus the previous one's), the structure-tensor and
    the Hessian eigenvalues in decreasing order.
    """
    sig = _sigmas(sigmas)
    names = []
    for c in range(num_channels):
        names.append(f"ch{c}/raw")
        for i, s in enumerate(sig):
            names += [f"ch{c}/{f}@{s:g}" for f in _PER_SIGMA if f != "dog" or i > 0]
    return names


Map = Callable[[Callable, Iterable], Iterator]


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _radius(sigma: float) -> int:
    """Voxels each side that SciPy's Gaussian filters of ``sigma`` read (truncated at 4 sigma)."""
    return int(4.0 * float(sigma) + 0.5)


def _grow_within(
    box: Sequence[slice], by: Sequence[int], shape: Sequence[int]
) -> tuple[slice, ...]:
    """``box`` grown by ``by`` voxels each side along each axis, clipped to ``shape``."""
    return tuple(
        slice(max(0, b.start - r), min(n, b.stop + r))
        for b, r, n in zip(box, by, shape, strict=True)
    )


def _shift(box: Sequence[slice], origin: Sequence[slice]) -> tuple[slice, ...]:
    """``box`` in the coordinates of an array that starts at ``origin``'s starts."""
    return tuple(
        slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, origin, strict=True)
    )


def _derivatives(
    image: np.ndarray,
    sigma_zyx: np.ndarray,
    ratio_zyx: np.ndarray,
    pmap: Map = map,
    keep: Sequence[slice] | None = None,
) -> dict[tuple[int, int, int], np.ndarray]:
    """Gaussian derivatives of ``image (Z, Y, X)`` up to order 2, ``{(oz, oy, ox): array}``.

    Separable filtering shares the passes between derivatives (19 one-dimensional passes for
    the 10 responses instead of 30); each derivative is scaled to finest-voxel units. The
    passes of one axis are independent and run through ``pmap`` (SciPy releases the GIL).

    ``keep`` (slices of ``image``): only these voxels are wanted, and ``image`` holds every
    voxel they read. After the pass along an axis, the arrays are cut to ``keep`` along that
    axis, so the later passes filter fewer voxels; each kept voxel is computed from the same
    inputs in the same order as without the cut. The arrays returned cover ``keep``.
    """
    wanted = [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (0, 0, 1),
        (2, 0, 0),
        (0, 2, 0),
        (0, 0, 2),
        (1, 1, 0),
        (1, 0, 1),
        (0, 1, 1),
    ]
    level: dict[tuple[int, ...], np.ndarray] = {(): image}
    for axis in range(3):
        keys = sorted({w[: axis + 1] for w in wanted})
        cut = [slice(None)] * 3
        if keep is not None:
            cut[axis] = keep[axis]

        def one(key: tuple[int, ...], axis: int = axis, level=level, cut=tuple(cut)) -> np.ndarray:
            out = ndi.gaussian_filter1d(
                level[key[:-1]], sigma_zyx[axis], axis=axis, order=key[-1], output=np.float32
            )
            return out[cut]

        level = dict(zip(keys, pmap(one, keys), strict=True))
    out = {}
    for w in wanted:
        arr = level[w]
        scale = float(np.prod(ratio_zyx ** -np.asarray(w, dtype=float)))
        if scale != 1.0:
            arr *= np.float32(scale)
        out[w] = arr
    return out


def _smooth(image: np.ndarray, sigma_zyx: np.ndarray, keep: Sequence[slice]) -> np.ndarray:
    """SciPy's ``gaussian_filter(image, sigma_zyx, output=float32)[keep]``, cutting each axis to
    ``keep`` after its pass (same numbers, fewer voxels filtered)."""
    out = image
    for axis in range(3):
        out = ndi.gaussian_filter1d(out, sigma_zyx[axis], axis=axis, output=np.float32)
        cut = [slice(None)] * 3
        cut[axis] = keep[axis]
        out = out[tuple(cut)]
    return out


def feature_halo(
    sigmas: Sequence[float] = DEFAULT_SIGMAS, voxel_size_zyx_um: Sequence[float] | None = None
) -> tuple[int, int, int]:
    """Voxels ``(z, y, x)`` of context each side that :func:`voxel_features` reads for one
    voxel: the derivative filters' radius plus the structure tensor's integration radius (SciPy
    truncates Gaussians at 4 sigma). A block computed with this much of its neighbours around it
    (or the volume's edge) has exactly the features of the whole-volume pass."""
    ratio = _axis_ratios(voxel_size_zyx_um)
    out = []
    for r in ratio:
        out.append(
            max(
                int(4.0 * s / r + 0.5) + int(4.0 * STRUCTURE_OUTER_FRACTION * s / r + 0.5)
                for s in _sigmas(sigmas)
            )
        )
    return tuple(out)  # type: ignore[return-value]


def _chunks(shape: Sequence[int], limit: int) -> Iterator[tuple[int | slice, ...]]:
    """Indices that cover an array of ``shape`` in pieces of at most ``limit`` elements, each
    a run of whole sub-arrays along the first axes: slicing a strided view by one copies no
    more than that piece."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= limit:
        step = max(1, limit // max(inner, 1))
        for s in range(0, shape[0], step):
            yield (slice(s, min(shape[0], s + step)),)
        return
    for i in range(shape[0]):
        for rest in _chunks(shape[1:], limit):
            yield (i, *rest)


def symmetric_eigvals3(
    a11: np.ndarray,
    a22: np.ndarray,
    a33: np.ndarray,
    a12: np.ndarray,
    a13: np.ndarray,
    a23: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Eigenvalues of the symmetric 3x3 matrices given by their six entries (arrays of one shape
    ``S``) -> ``(3, *S)`` float32, decreasing along the first axis.

    Closed form (trigonometric solution of the characteristic cubic), computed in float64 blocks
    so memory stays bounded and no ``(..., 3, 3)`` stack is built.
    """
    shape = np.shape(a11)
    if out is None:
        out = np.empty((3, *shape), dtype=np.float32)
    ins = [np.asarray(a) for a in (a11, a22, a33, a12, a13, a23)]
    for idx in _chunks(shape, _EIG_BLOCK):
        d1, d2, d3, o12, o13, o23 = (a[idx].astype(np.float64) for a in ins)
        q = (d1 + d2 + d3) / 3.0
        d1 -= q
        d2 -= q
        d3 -= q
        off = o12 * o12 + o13 * o13 + o23 * o23
        p = np.sqrt((d1 * d1 + d2 * d2 + d3 * d3 + 2.0 * off) / 6.0)
        safe = np.where(p > 0, p, 1.0)
        # r = det((A - qI) / p) / 2, in [-1, 1] up to rounding
        det = (
            d1 * (d2 * d3 - o23 * o23) - o12 * (o12 * d3 - o23 * o13) + o13 * (o12 * o23 - d2 * o13)
        )
        r = np.clip(det / (2.0 * safe**3), -1.0, 1.0)
        phi = np.arccos(r) / 3.0
        big = q + 2.0 * p * np.cos(phi)
        small = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
        out[(0, *idx)] = big
        out[(1, *idx)] = 3.0 * q - big - small
        out[(2, *idx)] = small
    return out


def voxel_features(
    image: np.ndarray,
    voxel_size_zyx_um: Sequence[float] | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    percentiles: np.ndarray | None = None,
    threads: int | None = None,
    crop: Sequence[slice] | None = None,
    progress: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Filter-bank features of every voxel: image ``(C, Z, Y, X)`` -> ``(F, Z, Y, X)`` float32.

    Each channel is first normalised by its robust percentiles (1 -> 0, 99.5 -> 1;
    ``sparse3d.data.normalize``): ``percentiles (C, 2)`` when given (a block of a larger volume
    is normalised by the volume's), else this image's own. Per channel the features are the normalised intensity and, at
    each sigma: Gaussian smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, the
    difference of Gaussians with the previous sigma (from the second sigma on), the three
    eigenvalues of the structure tensor (derivatives at sigma, integrated at sigma / 2) and the
    three eigenvalues of the Hessian of Gaussian, eigenvalues in decreasing order;
    ``F = C * (1 + 9 * len(sigmas) + len(sigmas) - 1)``, named by :func:`feature_names`.

    Args:
        image: ``(C, Z, Y, X)`` real array.
        voxel_size_zyx_um: voxel size (z, y, x) in micrometres; filters are made isotropic in
            physical space. None: voxels are cubes.
        sigmas: scales in voxels of the finest axis.
        percentiles: ``(C, 2)`` low/high intensities mapped to 0/1 (None: from ``image``).
        threads: filter passes run in parallel (None: every core this process may use).
        crop: ``(z, y, x)`` slices: filter the whole ``image`` (a block with its halo) but keep
            only these voxels (the block's core); eigenvalues are computed for them alone.
        progress: a progress bar for big images (blocks of a blockwise pass have the pass's).
        out: float32 array of the returned shape to write the features into (a block's
            features followed by its context features, with no copy).

    Returns:
        ``(F, Z, Y, X)`` float32 (or ``(F, *crop)``), finite for finite input.
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {image.shape}")
    sig = _sigmas(sigmas)
    ratio = _axis_ratios(voxel_size_zyx_um)
    c = image.shape[0]
    shape = image.shape[1:]
    names = feature_names(c, sig)
    box = tuple(slice(None) for _ in range(3)) if crop is None else tuple(crop)
    kept = tuple(len(range(*b.indices(n))) for b, n in zip(box, shape, strict=True))
    if out is not None and (out.shape != (len(names), *kept) or out.dtype != np.float32):
        raise ValueError(f"out must be float32 of shape {(len(names), *kept)}, got {out.shape}")
    feats = np.empty((len(names), *kept), dtype=np.float32) if out is None else out
    norm = normalize_volume(image) if percentiles is None else apply_percentiles(image, percentiles)
    bar = tqdm(
        total=c * len(sig),
        desc="voxel features",
        unit="scale",
        leave=False,
        disable=not progress or math.prod(shape) * c < PROGRESS_MIN_VOXELS,
    )
    k = 0
    with bar, ThreadPoolExecutor(threads or _workers()) as pool:
        for ch in range(c):
            feats[k] = norm[ch][box]
            k += 1
            previous = -1
            for s in sig:
                k, previous = _features_at(norm[ch], s, ratio, feats, k, previous, pool.map, box)
                bar.update(1)
    assert k == len(names)
    return feats


def _features_at(
    channel: np.ndarray,
    sigma: float,
    ratio: np.ndarray,
    feats: np.ndarray,
    k: int,
    previous: int,
    pmap: Map = map,
    box: tuple[slice, ...] = (slice(None),) * 3,
) -> tuple[int, int]:
    """Write one channel's features at one ``sigma`` into ``feats[k:]`` (the voxels ``box`` of
    ``channel``); returns the next index and the index of this sigma's Gaussian (for the next
    difference of Gaussians).

    Only the part of ``channel`` that this sigma's filters read for ``box`` is filtered (a
    block's halo is sized for the largest sigma), and each separable pass cuts the axis it has
    filtered to what the next steps read: the numbers are those of filtering all of
    ``channel``, for a fraction of the work when ``box`` is a block's core.
    """
    shape = channel.shape
    box = tuple(slice(*b.indices(n)[:2]) for b, n in zip(box, shape, strict=True))
    sigma_zyx = sigma / ratio
    outer = STRUCTURE_OUTER_FRACTION * sigma_zyx
    outer_r = [_radius(o) for o in outer]
    # gradients are needed around the box for the structure tensor's smoothing
    grad_box = _grow_within(box, outer_r, shape)
    read_box = _grow_within(grad_box, [_radius(s) for s in sigma_zyx], shape)
    whole = _derivatives(channel[read_box], sigma_zyx, ratio, pmap, _shift(grad_box, read_box))
    inner = _shift(box, grad_box)
    d = {key: arr[inner] for key, arr in whole.items()}
    gauss = k
    feats[k] = d[0, 0, 0]
    feats[k + 1] = d[2, 0, 0] + d[0, 2, 0] + d[0, 0, 2]  # Laplacian = trace of the Hessian
    gz, gy, gx = d[1, 0, 0], d[0, 1, 0], d[0, 0, 1]
    np.sqrt(gz * gz + gy * gy + gx * gx, out=feats[k + 2])
    k += 3
    if previous >= 0:
        np.subtract(feats[gauss], feats[previous], out=feats[k])
        k += 1

    def smoothed_product(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return _smooth(pair[0] * pair[1], outer, inner)

    wz, wy, wx = whole[1, 0, 0], whole[0, 1, 0], whole[0, 0, 1]
    pairs = [(wz, wz), (wy, wy), (wx, wx), (wz, wy), (wz, wx), (wy, wx)]
    symmetric_eigvals3(*pmap(smoothed_product, pairs), out=feats[k : k + 3])
    k += 3
    symmetric_eigvals3(
        d[2, 0, 0], d[0, 2, 0], d[0, 0, 2], d[1, 1, 0], d[1, 0, 1], d[0, 1, 1], out=feats[k : k + 3]
    )
    return k + 3, gauss
