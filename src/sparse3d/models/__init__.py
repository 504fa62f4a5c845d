"""Networks: the paper's 3D U-Net (and its 2D variant) with its geometry."""

from sparse3d.models.geometry import UNetGeometry
from sparse3d.models.unet import UNet

__all__ = ["UNet", "UNetGeometry"]
