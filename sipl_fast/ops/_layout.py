"""The memory layouts of (B, C, H, W) image tensors that the kernels read directly, and of
the depthwise 3x3 weights they read (:func:`tap_major`).

NCHW (``torch.contiguous_format``) and NHWC (``torch.channels_last``). Element (b, c, y, x)
sits at ``b * sb + c * sc + (y * W + x) * sp``: NCHW has (sb, sc, sp) = (C*H*W, H*W, 1),
NHWC has (H*W*C, 1, C). The CUDA C++ kernels take these two exactly (:func:`dense`: a band of
rows of either is copied in its own layout); the Triton kernels take any (sb, sc, sp)
(:func:`pixels`), such as a band of rows of either, which FastSIPL passes. Any other strides are
copied to NCHW first. The torch references convolve through :func:`conv2d`, which keeps a
channels-last input channels-last.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW- or NHWC-contiguous, else a copy: NHWC where x's channels are
    innermost (a band of rows of a channels-last image stays channels-last), else NCHW."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last if channels_last(x) else torch.contiguous_format)


def _pixel_stride(x: torch.Tensor):
    """sp when x's H and W dims flatten into one pixel axis (y * W + x) * sp, else None."""
    _, _, h, w = x.shape
    if w == 1:
        return x.stride(2) if h > 1 else 1
    return x.stride(3) if h == 1 or x.stride(2) == w * x.stride(3) else None


def pixels(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its pixels are one strided axis (NCHW, NHWC, a band of rows of
    either; any batch and channel strides), else an NCHW-contiguous copy."""
    return x if _pixel_stride(x) is not None else x.contiguous()


def strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(sb, sc, sp) of a tensor returned by :func:`dense` or :func:`pixels`."""
    return x.stride(0), x.stride(1), _pixel_stride(x)


#: A tensor whose offsets within one image reach this takes int64 offsets in the Triton kernels.
INT32_OFFSETS = 2**31


def span(t: torch.Tensor) -> int:
    """1 + the largest offset within one image of t (a band of rows counts its whole image's strides)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def wide(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a kernel over these (B, ...) tensors needs int64 offsets within an image (the
    batch offset is always int64); int32 ones take fewer registers."""
    return max(span(t) for t in tensors if t is not None) >= INT32_OFFSETS


def channels_last(x: torch.Tensor) -> bool:
    """Whether x's channels are its innermost axis (NHWC-like)."""
    return x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) for ``F.conv2d``: where its channels are innermost, the same view with
    each size-1 dim's stride as an NHWC tensor's would be. PyTorch's convolutions infer the
    layout from the strides, and a size-1 batch stride that reshapes left small (e.g.
    (C, 1, W*C, C)) reads as NCHW: the CPU convolution then transposes its input to NCHW and,
    in bf16, its output back (on a 2-core x86 CPU 21 ms for a 96 -> 512 channel 1x1 convolution
    of 86x128 pixels that takes 0.8 ms NHWC). A size-1 dim's stride addresses nothing."""
    if not channels_last(x):
        return x
    size, stride = x.shape, list(x.stride())
    least = 0
    for d in (1, 3, 2, 0):  # innermost first (C > 1 here)
        if size[d] == 1:
            stride[d] = least
        least = max(least, stride[d] * size[d])
    return x if stride == list(x.stride()) else x.as_strided(size, stride)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, groups: int = 1) -> torch.Tensor:
    """The torch references' convolution: ``F.conv2d`` of x (B, C, H, W) with zero padding that
    keeps H and W (1 for 3x3, 0 for 1x1), weight and bias cast to x's dtype as autocast casts
    them, x's channels-last layout kept (:func:`conv_input`)."""
    bias = None if bias is None else bias.to(x.dtype)
    return F.conv2d(conv_input(x), weight.to(x.dtype), bias, padding=weight.shape[-1] // 2, groups=groups)


def empty(x: torch.Tensor, channels: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised dense (B, channels, H, W) tensor in ``x``'s layout (NHWC when x's
    channels are innermost, else NCHW) and dtype (or ``dtype``)."""
    b, _, h, w = x.shape
    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
    return torch.empty((b, channels, h, w), dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3 weights (C, 1, 3, 3) as the stencil kernels read them: fp32 (9, C), a tap's
    weights of neighbouring channels neighbours (vector loads). A view, without a copy, of fp32
    weights stored so (:func:`as_tap_major`), as FastSIPL stores them: otherwise a small
    transposing copy on every call."""
    return weight.float().reshape(weight.shape[0], 9).t().contiguous()


def as_tap_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (C, 1, 3, 3) in fp32, its memory tap-major (strides (1, 9C, 3C, C)), so that
    :func:`tap_major` is a view; F.conv2d takes it as it is."""
    return tap_major(weight).t().reshape(weight.shape)
