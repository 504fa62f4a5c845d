"""Body layout: the embryo surface (epidermis side, near the coverslip) and the somite boundary.

The embryo lies on its side on the coverslip of the inverted microscope; the stack starts near
its lateral surface (small z) and reaches the somitic muscle deep in the stack. Depths in um.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparse3d.data.synth.params import SampleParams


@dataclass(frozen=True)
class Body:
    """The tissue slab of one sample: ``extent`` is the (Z, Y, X) physical extent in um."""

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
        """Depth (um) where the somites begin at (y, x): below the surface, tilted."""
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
