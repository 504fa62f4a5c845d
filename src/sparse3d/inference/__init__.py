"""Whole-volume prediction (layer 1): seamless overlap-tile for valid-convolution U-Nets (paper
Sec. 1.1, 2), blended tiles for same-padded ones, test-time batch normalisation modes, automatic
tile size from a memory budget, streaming of volumes larger than memory.

Main entry: :class:`Predictor`. Modules: ``tiling`` (layouts, mirror padding), ``memory``
(activation memory / compute estimate, layout choice), ``bn`` (test-time batch normalisation),
``precision``, ``writers`` (result files), ``compare``. Passes run the network's own forward.
"""

from sparse3d.inference.bn import BN_MODES, fuse_batchnorm, recalibrate_bn
from sparse3d.inference.compare import bn_mode_iou
from sparse3d.inference.memory import NetProfile, choose_plan
from sparse3d.inference.predictor import PredictionInputError, PredictionReport, Predictor
from sparse3d.inference.tiling import TilePlan, reflect_indices

__all__ = [
    "BN_MODES",
    "NetProfile",
    "PredictionInputError",
    "PredictionReport",
    "Predictor",
    "TilePlan",
    "bn_mode_iou",
    "choose_plan",
    "fuse_batchnorm",
    "recalibrate_bn",
    "reflect_indices",
]
