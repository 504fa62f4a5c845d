"""Axis vocabulary: the spatial axis names and the slice sets indexed by them.

Layer 0: standard library only.

The paper annotates orthogonal xy, xz and yz slices (Sec. 3.1). A slice is named by the axis it
is indexed along: ``"z"`` lists xy slices, ``"y"`` xz slices and ``"x"`` yz slices.
"""

from __future__ import annotations

#: Spatial axis names in array order (Z, Y, X); annotated xy slices are indexed along z, xz
#: along y, yz along x.
AXES: tuple[str, str, str] = ("z", "y", "x")

#: Annotated slices of several volumes: ``{volume: {"z": [...], "y": [...], "x": [...]}}``.
SliceSet = dict[str, dict[str, list[int]]]
