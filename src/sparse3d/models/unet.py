"""The 3D U-Net of Cicek et al. (paper Sec. 2, Fig. 2), and its 2D counterpart.

Analysis path: per level two ``3^dim`` convolutions (each followed by norm, then ReLU), channels
doubled already before pooling to avoid bottlenecks (3->32->64, 64->64->128, 128->128->256,
256->256->512), then ``2^dim`` max pooling. Synthesis path: ``2^dim`` stride-2 up-convolution
keeping channels, concatenation with the centre-cropped skip, two convolutions. A final
``1^dim`` convolution gives ``num_classes`` logits.

With ``norm="none"`` the paper configuration has exactly 19,069,955 parameters, and with valid
padding a 132x132x116 (x, y, z) input tile gives a 44x44x28 output tile.

Initial weights (``init``): ``"torch"`` keeps PyTorch's default for convolutions
(``kaiming_uniform(a=sqrt(5))``, std ``1 / sqrt(3 N)``: a variance gain of 1/6 per ReLU layer, so
the signal of a deep network without normalisation shrinks layer by layer); ``"he"`` draws every
convolution's weights from a Gaussian with std ``sqrt(2 / N)`` (He et al. 2015; the U-Net papers'
choice, Ronneberger et al. 2015 Sec. 3), biases 0. ``N`` is the number of incoming connections of
one output voxel (:func:`fan_in`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparse3d.crop import center_crop
from sparse3d.models.blocks import DoubleConv, PaperBatchNorm, Up, conv_cls
from sparse3d.models.geometry import UNetGeometry

INITS = ("torch", "he")
_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def fan_in(conv: nn.Module) -> int:
    """Incoming connections of one output voxel of ``conv``: ``in_channels x prod(kernel)`` for a
    convolution; for an up-convolution ``in_channels x prod(kernel / stride)`` (with the paper's
    kernel 2, stride 2 each output voxel sees one tap per input channel)."""
    k = [int(v) for v in conv.kernel_size]
    n = conv.in_channels // conv.groups
    if isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        taps = 1.0
        for kk, ss in zip(k, conv.stride, strict=True):
            taps *= max(kk / int(ss), 1.0)
        return max(int(round(n * taps)), 1)
    for kk in k:
        n *= kk
    return n


def init_weights(net: nn.Module, init: str, generator: torch.Generator | None = None) -> None:
    """Re-initialise every convolution of ``net`` (see the module doc): ``"torch"`` leaves the
    weights alone, ``"he"`` draws N(0, 2 / fan_in) weights and zero biases."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "torch":
        return
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _CONVS):
                m.weight.normal_(0.0, (2.0 / fan_in(m)) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()


class UNet(nn.Module):
    """U-Net for ``dim``-dimensional images; returns logits.

    ``forward``: ``(B, in_channels, *input_spatial) -> (B, num_classes, *output_shape(...))``.

    Args:
        in_channels: image channels (3 in the paper: lectin, DAPI, beta-catenin).
        num_classes: label classes, without the ignore code (3 in the paper).
        base_channels: channels of the first convolution (32 in the paper).
        depth: resolution levels, ``depth - 1`` poolings (4 in the paper).
        dim: 3 for the 3D U-Net, 2 for the 2D baseline.
        padding: ``"valid"`` (paper, seamless overlap-tile) or ``"same"``.
        norm: ``"batch"`` (paper, BN before each ReLU), ``"instance"`` or ``"none"``.
        bn_eval_stats: test-time BN statistics, ``"batch"`` (paper's choice for batch size 1)
            or ``"running"``.
        init: initial convolution weights, ``"torch"`` (PyTorch's default) or ``"he"``
            (Gaussian, std ``sqrt(2 / fan_in)``); see the module doc.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        depth: int = 4,
        dim: int = 3,
        padding: str = "valid",
        norm: str = "batch",
        bn_eval_stats: str = "batch",
        init: str = "torch",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.geometry = UNetGeometry(depth=depth, padding=padding)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dim = dim
        pool = nn.MaxPool3d if dim == 3 else nn.MaxPool2d

        self.down = nn.ModuleList()
        c_in = in_channels
        skips = []
        for level in range(depth):
            mid, out = base_channels * 2**level, base_channels * 2 ** (level + 1)
            self.down.append(DoubleConv(c_in, mid, out, dim, padding, norm))
            skips.append(out)
            c_in = out
        self.pool = pool(2)
        self.up = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.up.append(Up(c_in, skips[level], skips[level], dim, padding, norm))
            c_in = skips[level]
        self.head = conv_cls(dim)(c_in, num_classes, kernel_size=1)
        self.bn_eval_stats = bn_eval_stats
        self.init = init
        init_weights(self, init)

    # -- test-time batch normalisation -------------------------------------------------------
    @property
    def bn_eval_stats(self) -> str:
        return self._bn_eval_stats

    @bn_eval_stats.setter
    def bn_eval_stats(self, value: str) -> None:
        for m in self.modules():
            if isinstance(m, PaperBatchNorm):
                m.eval_stats = value  # validates
        self._bn_eval_stats = value

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, PaperBatchNorm) for m in self.modules())

    # -- geometry ----------------------------------------------------------------------------
    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape; ValueError names the legal sizes."""
        if len(input_shape) != self.dim:
            raise ValueError(f"expected a {self.dim}D spatial shape, got {tuple(input_shape)}")
        return self.geometry.output_shape(input_shape)

    def smallest_input_shape(self) -> tuple[int, ...]:
        return (self.geometry.smallest_input(),) * self.dim

    def input_shape_for_output(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        """Smallest legal input shape whose output covers ``output_shape``."""
        return tuple(self.geometry.input_for_output(int(o)) for o in output_shape)

    def skip_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per level, top first, the spatial shape each skip connection is cropped to."""
        self.output_shape(input_shape)  # clear error for an illegal tile
        per_axis = [self.geometry.skip_sizes(int(n)) for n in input_shape]
        return [tuple(axis[level] for axis in per_axis) for level in range(len(self.up))]

    @property
    def receptive_field(self) -> int:
        return self.geometry.receptive_field()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *s) -> (B, K, *output_shape(s))`` logits.

        Written for low peak memory at prediction (the only forward pass, training and
        inference alike): each skip is cropped as soon as it is produced (and compacted when no
        gradient is kept, so the full-size tensor is freed), each block's input is released
        after the block's first module, the up-convolution output and the concatenation after
        their first use. With autograd on, the same tensors stay alive for the backward pass
        as in a plain forward; the arithmetic is identical either way.
        """
        if x.dim() != self.dim + 2:
            raise ValueError(f"expected (B, C, {self.dim} spatial axes), got {tuple(x.shape)}")
        crops = self.skip_shapes(tuple(x.shape[2:]))
        last = len(self.down) - 1
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            for module in block:  # rebinding x releases the block input after its first module
                x = module(x)
            if i < last:
                skips.append(_crop_skip(x, crops[i]))
                x = self.pool(x)
        for block in self.up:
            skip = skips.pop()
            h = block.up(x)
            del x
            h = torch.cat([center_crop(skip, h.shape[2:]), h], dim=1)  # paper Fig. 2: skip first
            del skip
            for module in block.conv:  # the concatenation is released after the first conv
                h = module(h)
            x = h
            del h
        return self.head(x)


def _crop_skip(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The centre ``shape`` of skip ``x (B, C, *s)``; without autograd a compact copy in ``x``'s
    memory layout, so the full-size tensor can be freed at once."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    crop = center_crop(x, shape)
    if torch.is_grad_enabled() and x.requires_grad:
        return crop
    channels_last = (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    )
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return crop.contiguous(memory_format=fmt)
