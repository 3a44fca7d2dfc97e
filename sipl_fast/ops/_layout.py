"""The two memory layouts of (B, C, H, W) image tensors that the kernels read directly.

NCHW (``torch.contiguous_format``) and NHWC (``torch.channels_last``). Element (b, c, y, x)
sits at ``b * sb + c * sc + (y * W + x) * sp``: NCHW has (sb, sc, sp) = (C*H*W, H*W, 1),
NHWC has (H*W*C, 1, C). Any other strides are copied to NCHW first.
"""
from __future__ import annotations

from typing import Tuple

import torch


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW- or NHWC-contiguous, else an NCHW-contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(sb, sc, sp) of a tensor returned by :func:`dense` (canonical: size-1 dims may carry
    any stride in PyTorch, but the address of every element is the same)."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return c * h * w, h * w, 1
    return h * w * c, 1, c


def empty(x: torch.Tensor, channels: int) -> torch.Tensor:
    """An uninitialised (B, channels, H, W) tensor in ``x``'s layout (from :func:`dense`) and dtype."""
    b, _, h, w = x.shape
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return torch.empty((b, channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
