"""Depthwise 3x3 convolution: the cross blocks' ``q_dwconv`` and ``kv_dwconv``.

x (B, C, H, W), weight (C, 1, 3, 3), optional bias (C,), zero padding 1 -> (B, C, H, W):
``F.conv2d(x, weight, bias, padding=1, groups=C)``. The other depthwise convolutions of the
model are fused into the ops that read their output (``gated_dwconv_gelu``,
``channel_attention``'s ``dw_weight``); the cross attention's run alone, and PyTorch's own
NCHW depthwise kernel for them is a thread per output value reading its 9 neighbours.

Backends (first the reference):

- ``"torch"``: ``F.conv2d`` in x's dtype, any float dtype, differentiable.
- ``"triton"``: the stencil of ``gated_dwconv_gelu``'s Triton kernel without its gate
  (``_triton.dwconv3x3``: 9 taps in fp32, unmasked inside the image), forward only; fp32,
  fp16, bf16; NCHW or channels-last x, or a band of rows of either; the output dense in x's
  layout. With ``TRITON_INTERPRET=1`` it also runs CPU tensors when asked for explicitly.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _layout
from ._backend import Backend, choose, forward_only_problem
from .gated_dwconv_gelu import _fp32, check_depthwise, stencil


def depthwise_conv3x3_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: ``F.conv2d`` with groups = C, weights in x's dtype (as autocast casts them)."""
    return _layout.conv2d(x, weight, bias, groups=x.shape[1])


@torch.library.custom_op("sipl_fast::depthwise_conv3x3_triton", mutates_args=())
def depthwise_conv3x3_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton forward: (B, C, H, W) in x's layout (NCHW or channels-last)."""
    return stencil(_layout.pixels(x), _layout.tap_major(weight), _fp32(bias), False, gated=False)


@depthwise_conv3x3_triton.register_fake
def _(x, weight, bias):
    return _layout.empty(_layout.pixels(x), x.shape[1])


BACKENDS = {
    "torch": Backend("torch", depthwise_conv3x3_torch, lambda *a: None),
    "triton": Backend("triton", depthwise_conv3x3_triton, lambda x, w, b: forward_only_problem("triton", x, w, b),
                      automatic=lambda x, *a: x.is_cuda),
}
PREFERENCE = ("triton", "torch")  # not yet ranked by measurement on a GPU


def _check(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"depthwise_conv3x3: expected x as a floating-point (B, C, H, W) tensor, got "
                         f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] < 1:
        raise ValueError("depthwise_conv3x3: expected C >= 1 channels, got 0")
    check_depthwise("depthwise_conv3x3", x, weight, bias)


def depthwise_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise 3x3 convolution, zero padding 1: x (B, C, H, W), weight (C, 1, 3, 3), bias (C,)
    -> (B, C, H, W) in x's dtype.

    ``backend``: None/"auto" (triton where it can run, else torch), "torch" or "triton".
    """
    _check(x, weight, bias)
    return choose("depthwise_conv3x3", BACKENDS, PREFERENCE, backend, x, weight, bias).fn(x, weight, bias)
