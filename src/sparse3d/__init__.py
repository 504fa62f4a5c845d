"""sparse3d: dense volumetric segmentation from sparse slice annotation.

Implements and productizes the 3D U-Net of Cicek et al., "3D U-Net: Learning Dense Volumetric
Segmentation from Sparse Annotation" (MICCAI 2016).
"""

__version__ = "0.1.0"
