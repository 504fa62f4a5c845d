"""From a source label file to sparse class labels (layer 1): the label map (source code ->
class code or ignore), boundaries between painted instances, and which slices were annotated.

The label map sends every source code to a class code or to the ignore value (``0:ignore,1:0,2:1``,
targets may also be class names, ``*`` maps every code not listed). A source code without an entry
is an error that lists the codes.

Annotated slices are derived from the label (see :func:`derive_annotated_slices`): every fully
labelled slice counts, and labelled voxels outside those are covered greedily by the (painted)
slices that hold most of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.axes import AXES
from sparse3d.data.formats import ConvertError
from sparse3d.labels import LabelSpec

logger = logging.getLogger(__name__)

#: Key of a label map entry that applies to every source code not listed explicitly.
OTHER = "*"


def parse_label_map(
    text: str | Mapping[int | str, int | str], labels: LabelSpec
) -> dict[int | str, int]:
    """Parse a label map into ``{source code or "*": target code}``.

    ``text`` is ``"0:ignore,1:0,2:tubule,*:background"`` or a mapping with the same keys and
    targets. Targets are class codes (``0..K-1``), class names, ``"ignore"`` or the ignore value.
    """
    if isinstance(text, str):
        items: list[tuple[str, str]] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            src, sep, dst = part.partition(":")
            if not sep or not src.strip() or not dst.strip():
                raise ConvertError(f"label map entry {part!r} is not 'source:target'")
            items.append((src.strip(), dst.strip()))
    else:
        items = [(str(k), str(v)) for k, v in text.items()]
    if not items:
        raise ConvertError("label map is empty")
    names = {n: i for i, n in enumerate(labels.class_names)}
    result: dict[int | str, int] = {}
    for src, dst in items:
        if src == OTHER:
            key: int | str = OTHER
        else:
            try:
                key = int(src)
            except ValueError:
                raise ConvertError(f"label map source {src!r} is not an integer or '*'") from None
        if dst.lower() == "ignore":
            target = labels.ignore_index
        elif dst in names:
            target = names[dst]
        else:
            try:
                target = int(dst)
            except ValueError:
                raise ConvertError(
                    f"label map target {dst!r} is not a class code, one of "
                    f"{list(labels.class_names)} or 'ignore'"
                ) from None
            if target not in labels.allowed_codes():
                raise ConvertError(
                    f"label map target {target} is neither a class 0..{labels.num_classes - 1} "
                    f"nor the ignore value {labels.ignore_index}"
                )
        if key in result:
            raise ConvertError(f"label map lists source {src!r} twice")
        result[key] = target
    return result


def apply_label_map(
    label: np.ndarray, label_map: Mapping[int | str, int], where: str | Path = "label"
) -> np.ndarray:
    """Map source codes of ``label`` (any shape) to target codes -> uint8 array, same shape.

    Raises:
        ConvertError: codes without an entry (and no ``"*"`` entry), listed in the message.
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise ConvertError(f"{where}: label has non-integer values")
        label = label.astype(np.int64)
    elif label.dtype.kind not in "uib":
        raise ConvertError(f"{where}: label dtype {label.dtype} is not integer")
    codes, inverse = np.unique(label, return_inverse=True)
    default = label_map.get(OTHER)
    lut = np.empty(len(codes), dtype=np.uint8)
    missing = []
    for i, c in enumerate(codes.tolist()):
        target = label_map.get(int(c), default)
        if target is None:
            missing.append(int(c))
        else:
            lut[i] = target
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ConvertError(
            f"{where}: {len(missing)} label code(s) have no entry in the label map: [{shown}]; "
            f"add them (e.g. '{missing[0]}:ignore') or map the rest with '*:<target>'"
        )
    return lut[inverse.reshape(label.shape)]


def instance_boundaries(
    source: np.ndarray, labelled: np.ndarray, annotated: Mapping[str, Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries between painted instances, for instance-id annotations such as CREMI's.

    Args:
        source: (Z, Y, X) source codes (instance ids).
        labelled: (Z, Y, X) bool, voxels whose code maps to a class.
        annotated: annotated slices per axis (planes in which painting happened).

    Returns:
        ``boundary``: labelled voxels with a face neighbour (along any axis) that is labelled
        with a different source code; both sides of a contact are marked (2 voxels wide).
        ``edge``: labelled voxels, not ``boundary``, with an unlabelled face neighbour inside the
        same annotated plane. The painted region stops somewhere in the membrane there, so its
        edge voxel is neither surely inside nor surely boundary.
    """
    boundary = np.zeros(source.shape, dtype=bool)
    edge = np.zeros(source.shape, dtype=bool)
    shape = source.shape
    for a in range(3):
        # voxels lying in an annotated plane that contains axis a (a plane along another axis b)
        in_plane = np.zeros(shape, dtype=bool)
        for b, ax in enumerate(AXES):
            if b != a and annotated.get(ax):
                idx = [slice(None)] * 3
                idx[b] = list(annotated[ax])  # type: ignore[call-overload]
                in_plane[tuple(idx)] = True
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(None, -1), slice(1, None)
        lo_t, hi_t = tuple(lo), tuple(hi)
        differ = source[lo_t] != source[hi_t]
        both = labelled[lo_t] & labelled[hi_t]
        contact = differ & both
        boundary[lo_t] |= contact
        boundary[hi_t] |= contact
        plane = in_plane[lo_t]  # both voxels of a pair share their plane along b != a
        edge[lo_t] |= labelled[lo_t] & ~labelled[hi_t] & plane
        edge[hi_t] |= labelled[hi_t] & ~labelled[lo_t] & plane
    return boundary, edge & ~boundary


# --------------------------------------------------------------------------------------------
# annotated slices


def derive_annotated_slices(
    label: np.ndarray, ignore_index: int, crowded_fraction: float = 0.25
) -> dict[str, tuple[int, ...]]:
    """Which slices of a (Z, Y, X) label count as annotated, per axis (keys of :data:`AXES`).

    Rule:

    1. A slice is annotated when it is fully labelled (no ignore voxel). This is the paper's
       setting (Sec. 3.1): whole orthogonal xy, xz and yz slices were annotated.
    2. Labelled voxels outside every fully labelled slice come from sections that were painted
       only in part (e.g. CREMI's instance painting on one section). They are covered greedily
       by slices: repeatedly take the slice (any axis) holding most of the still-uncovered
       labelled voxels. Painted sections are confined to their plane, so the greedy cover picks
       exactly those planes (a plane across a painted section only holds one line of it).

    So every labelled voxel lies in a recorded slice, and every fully labelled slice is recorded.
    When labels are scattered in 3D rather than painted in sections the cover becomes large; a
    warning is logged when it takes more than ``crowded_fraction`` of the slices of an axis.
    A dense label gives every slice along every axis.
    """
    labelled = np.asarray(label) != ignore_index
    shape = labelled.shape
    chosen: list[set[int]] = [set(), set(), set()]
    covered = np.zeros(shape, dtype=bool)
    for a in range(3):
        full = np.all(labelled, axis=tuple(b for b in range(3) if b != a))
        for i in np.flatnonzero(full).tolist():
            chosen[a].add(i)
            idx: list[Any] = [slice(None)] * 3
            idx[a] = i
            covered[tuple(idx)] = True
    rest = labelled & ~covered
    counts = [
        rest.sum(axis=tuple(b for b in range(3) if b != a)).astype(np.int64) for a in range(3)
    ]
    while any(c.size and c.max() > 0 for c in counts):
        a = int(np.argmax([c.max() if c.size else 0 for c in counts]))  # ties: z, then y, then x
        i = int(np.argmax(counts[a]))
        chosen[a].add(i)
        idx = [slice(None)] * 3
        idx[a] = i
        plane = rest[tuple(idx)].copy()  # 2D over the other two axes, in order
        rest[tuple(idx)] = False
        counts[a][i] = 0
        others = [b for b in range(3) if b != a]
        counts[others[0]] -= plane.sum(axis=1)
        counts[others[1]] -= plane.sum(axis=0)
    for a, ax in enumerate(AXES):
        if len(chosen[a]) > crowded_fraction * shape[a] and len(chosen[a]) < shape[a]:
            logger.warning(
                "labels are not confined to a few slices: %d of %d slices along %s hold labels",
                len(chosen[a]),
                shape[a],
                ax,
            )
    return {ax: tuple(sorted(chosen[a])) for a, ax in enumerate(AXES)}
