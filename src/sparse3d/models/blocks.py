"""Building blocks of the U-Net: normalisation, double convolution, down and up steps.

Everything works in 2D and 3D (``dim`` in {2, 3}). Shapes: ``(B, C, *spatial)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORMS = ("batch", "instance", "none")
BN_EVAL_STATS = ("batch", "running")


#: Channels converted to float32 at a time when reducing a low-precision activation.
_CHANNEL_CHUNK = 8


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of ``x (B, C, *s)`` in float32."""
    dims = [0, *range(2, x.dim())]
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean.float(), var.float()
    means, variances = [], []
    for c0 in range(0, x.shape[1], _CHANNEL_CHUNK):
        var, mean = torch.var_mean(x[:, c0 : c0 + _CHANNEL_CHUNK].float(), dim=dims, correction=0)
        means.append(mean)
        variances.append(var)
    return torch.cat(means), torch.cat(variances)


def batch_stats_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one test-time normalisation with the current batch's statistics (paper Sec. 2):
    ``x (B, C, *s)`` -> ``(normalised x, mean (C,), biased variance (C,))``.

    Training-mode batch-norm arithmetic (ATen's kernel), without touching running statistics.
    ``inplace`` writes the result over ``x`` (prediction passes: no second activation; the
    statistics are complete before any element is written). Where the kernel is missing for
    a dtype or backend, the same arithmetic in plain tensor operations."""
    c = x.shape[1]
    try:
        if inplace:
            mean = torch.empty(c, device=x.device, dtype=torch.float32)
            invstd = torch.empty(c, device=x.device, dtype=torch.float32)
            torch.ops.aten.native_batch_norm.out(
                x, weight, bias, None, None, True, 0.0, eps,
                out=x, save_mean=mean, save_invstd=invstd,
            )  # fmt: skip
            y = x
        else:
            y, mean, invstd = torch.ops.aten.native_batch_norm(
                x, weight, bias, None, None, True, 0.0, eps
            )
        var = invstd.double().pow(-2).sub(eps).clamp_min(0.0).float()
        return y, mean.float(), var
    except (RuntimeError, NotImplementedError):
        return plain_batch_stats_norm(x, weight, bias, eps, inplace)


def plain_batch_stats_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_stats_norm` in plain tensor operations (any dtype and backend)."""
    mean, var = channel_moments(x)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    view = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift = scale.to(x.dtype).view(view), shift.to(x.dtype).view(view)
    y = x.mul_(scale).add_(shift) if inplace else x * scale + shift
    return y, mean, var


class PaperBatchNorm(_BatchNorm):
    """Batch normalisation for any spatial dimension with a selectable test-time behaviour.

    ``eval_stats="batch"`` normalises with the current batch statistics also in eval mode, which
    the paper found best with batch size 1 (Sec. 2); ``eval_stats="running"`` uses the running
    (global) statistics as in Ioffe & Szegedy. Training always uses batch statistics and updates
    the running ones.
    """

    def __init__(self, num_features: int, eval_stats: str = "batch", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.eval_stats = eval_stats

    @property
    def eval_stats(self) -> str:
        return self._eval_stats

    @eval_stats.setter
    def eval_stats(self, value: str) -> None:
        if value not in BN_EVAL_STATS:
            raise ValueError(f"eval_stats must be one of {BN_EVAL_STATS}, got {value!r}")
        self._eval_stats = value

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"expected a (B, C, *spatial) tensor, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_stats == "batch":
            return batch_stats_norm(input, self.weight, self.bias, self.eps)[0]
        return super().forward(input)


class PaperSyncBatchNorm(nn.SyncBatchNorm):
    """:class:`PaperBatchNorm` for multi-process training: training statistics are pooled over
    the processes (``torch.nn.SyncBatchNorm``); the test-time behaviour (``eval_stats``) is
    PaperBatchNorm's, and ``"batch"`` statistics at test time are the local batch's, so a single
    process can evaluate without the others.

    Made by :func:`sync_paper_batchnorm` from a PaperBatchNorm and turned back by
    :func:`unsync_paper_batchnorm`; both share parameters and buffers.
    """

    def __init__(self, num_features: int, eval_stats: str = "batch", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.eval_stats = eval_stats

    eval_stats = PaperBatchNorm.eval_stats

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_stats == "batch":
            return batch_stats_norm(input, self.weight, self.bias, self.eps)[0]
        return super().forward(input)


def _move_norm_state(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Give ``dst`` the parameters and buffers of ``src`` (the same tensors, not copies)."""
    if src.affine:
        dst.weight, dst.bias = src.weight, src.bias
    if src.track_running_stats:
        dst.running_mean, dst.running_var = src.running_mean, src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    return dst


def _norm_kwargs(m: _BatchNorm) -> dict:
    return {
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def sync_paper_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every :class:`PaperBatchNorm` replaced by a :class:`PaperSyncBatchNorm`
    (same parameters and buffers, same ``eval_stats``); returns the new root. Unlike
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` it keeps the test-time behaviour."""
    out = module
    if isinstance(module, PaperBatchNorm):
        out = PaperSyncBatchNorm(
            module.num_features,
            eval_stats=module.eval_stats,
            process_group=process_group,
            **_norm_kwargs(module),
        )
        _move_norm_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, sync_paper_batchnorm(child, process_group))
    return out


def unsync_paper_batchnorm(module: nn.Module) -> nn.Module:
    """Inverse of :func:`sync_paper_batchnorm`: every :class:`PaperSyncBatchNorm` becomes a
    :class:`PaperBatchNorm` again; returns the new root."""
    out = module
    if isinstance(module, PaperSyncBatchNorm):
        out = PaperBatchNorm(
            module.num_features, eval_stats=module.eval_stats, **_norm_kwargs(module)
        )
        _move_norm_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, unsync_paper_batchnorm(child))
    return out


def make_norm(norm: str, channels: int, dim: int) -> nn.Module:
    if norm == "batch":
        return PaperBatchNorm(channels)
    if norm == "instance":
        return (nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that trains correctly under CPU bfloat16 autocast at any depth.

    With torch 2.13's oneDNN on an AVX-512-bf16 CPU, the weight gradient of a bf16 3x3x3
    convolution (padding 1) whose input is exactly 2 voxels deep is garbage (errors of 90 % to
    1e36 of the gradient, different on every call); the forward pass and the input gradient are
    right, as is every case with depth 1 or 3+, float32, and the 2D convolution
    (``tests/test_training_precision.py``). Such inputs are the deepest levels of a same-padded
    network on a thin tile, tiny tensors: this layer runs them in float32 while autograd
    records, and everything else as ``nn.Conv3d`` does. Parameters and state dict are
    ``nn.Conv3d``'s.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[2] <= 2 and self.weight.dtype == torch.float32 and _cpu_bf16_autocast(input):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether ``x`` enters a CPU bfloat16-autocast convolution whose weight gradient is kept."""
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def conv_cls(dim: int) -> type[nn.Module]:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    return Conv3d if dim == 3 else nn.Conv2d


class DoubleConv(nn.Sequential):
    """Two ``3^dim`` convolutions, each followed by norm then ReLU (paper Sec. 2: BN before ReLU).

    ``(B, in, *s) -> (B, out, *s')`` with ``s' = s - 4`` (valid) or ``s' = s`` (same).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        dim: int,
        padding: str,
        norm: str,
    ) -> None:
        conv = conv_cls(dim)
        pad = 0 if padding == "valid" else 1
        bias = norm == "none"
        super().__init__(
            conv(in_channels, mid_channels, 3, padding=pad, bias=bias),
            make_norm(norm, mid_channels, dim),
            nn.ReLU(inplace=True),
            conv(mid_channels, out_channels, 3, padding=pad, bias=bias),
            make_norm(norm, out_channels, dim),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Synthesis step: ``2^dim`` stride-2 up-convolution keeping channels (no bias), concatenation
    with the centre-cropped skip, double convolution (paper Sec. 2, Fig. 2).

    ``(B, c, *s), skip (B, c_skip, *t) -> (B, out, *(2 s - 4))`` (valid padding). Its modules
    are run by ``UNet.forward`` (the one forward pass, written for low peak memory).
    """

    def __init__(
        self,
        channels: int,
        skip_channels: int,
        out_channels: int,
        dim: int,
        padding: str,
        norm: str,
    ) -> None:
        super().__init__()
        up = nn.ConvTranspose3d if dim == 3 else nn.ConvTranspose2d
        self.up = up(channels, channels, kernel_size=2, stride=2, bias=False)
        self.conv = DoubleConv(
            channels + skip_channels, out_channels, out_channels, dim, padding, norm
        )
