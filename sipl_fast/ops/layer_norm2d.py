"""LayerNorm2d: per-pixel LayerNorm over the channel axis of an NCHW tensor.

``y[b, c, h, w] = (x - mu) / sqrt(var + eps) * weight[c] + bias[c]`` with mu and
the biased var taken over c at each (b, h, w): the norm of every Restormer
block in SIPL.

Backends:
- ``"torch"``: the reference, the published formula op by op (any float dtype,
  differentiable);
- ``"cuda"``: CUDA C++ kernel ``kernels/layer_norm2d.cu`` (forward only; fp32,
  fp16, bf16 with fp32 accumulation), through the compiled extension or, without
  one, JIT-compiled by CuPy. Registered as the custom op
  ``torch.ops.sipl_fast.layer_norm2d_cuda`` so it works under ``torch.compile``
  and CUDA-graph capture.
- ``"triton"``: the Triton kernel below (forward only; same dtypes; NCHW and
  channels-last inputs, the output in the input's layout), the custom op
  ``torch.ops.sipl_fast.layer_norm2d_triton``. With ``TRITON_INTERPRET=1`` it
  also runs on CPU tensors, when asked for explicitly (tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _layout, _triton
from ._backend import Backend, check_real_floating, choose, forward_only_problem

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None

def layer_norm2d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Reference: the published formula, op by op, in the input's dtype; the result in x's
    dtype as every backend gives it (the formula alone would promote a bf16 x with fp32 weights
    to fp32, as under autocast: that result, rounded once)."""
    c = x.shape[1]
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + eps).sqrt()
    return (weight.view(1, c, 1, 1) * y + bias.view(1, c, 1, 1)).to(x.dtype)


@torch.library.custom_op("sipl_fast::layer_norm2d_cuda", mutates_args=(), device_types="cuda")
def layer_norm2d_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """CUDA C++ forward; x (B, C, H, W) is made contiguous NCHW, weight/bias go to fp32."""
    from . import _cuda

    x = x.contiguous()
    y = torch.empty_like(x)
    _cuda.layer_norm2d_fwd(x, weight.float().contiguous(), bias.float().contiguous(), float(eps), y)
    return y


@layer_norm2d_cuda.register_fake
def _(x, weight, bias, eps=1e-5):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


if triton is not None:
    from ._triton import shifted

    @triton.jit
    def _channel_tile(base, c0, pixels, in_image, C, sc, sp, BLOCK_C: tl.constexpr):
        """Offsets and mask of the [BLOCK_C, BLOCK_P] tile of channels c0.. at ``pixels`` (int64 offsets)."""
        channels = c0 + tl.arange(0, BLOCK_C)
        mask = (channels[:, None] < C) & in_image[None, :]
        return base + channels.to(tl.int64)[:, None] * sc + pixels.to(tl.int64)[None, :] * sp, mask, channels

    @triton.jit
    def _layer_norm2d_fwd_kernel(X, W, B, Y, C, HW, sb, sc, sp, syb, syc, syp, eps,
                                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One program normalises BLOCK_P neighbouring pixels of one image.

        A [BLOCK_C, BLOCK_P] tile (channels x pixels) loads coalesced along the pixels in
        NCHW (sp = 1) and along the channels in NHWC (sc = 1). Three sweeps over the
        channels, in fp32: the mean, the biased variance of the deviations (two-pass, no
        E[x^2] - E[x]^2 cancellation), then normalise, scale, shift and store at y's strides.
        Every sweep reads x - x[channel 0] (``_triton.shifted``), so a pixel whose mean dwarfs
        its spread (mean 100, std 1e-3) loses no digits to the mean's rounding.
        The statistics' sweeps add their tiles elementwise and reduce over the channels once,
        at their ends (a reduction per tile is a cross-warp exchange with barriers).
        """
        pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        in_image = pixels < HW
        base = tl.program_id(1).to(tl.int64) * sb
        y_base = tl.program_id(1).to(tl.int64) * syb
        shift = tl.load(X + base + pixels.to(tl.int64)[None, :] * sp, mask=in_image[None, :],
                        other=0.0).to(tl.float32)  # [1, BLOCK_P]: channel 0
        part = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)  # each sweep reduces over channels once
        for c0 in range(0, C, BLOCK_C):
            offsets, mask, channels = _channel_tile(base, c0, pixels, in_image, C, sc, sp, BLOCK_C)
            part += shifted(X + offsets, mask, shift)
        mean = (tl.sum(part, axis=0) / C)[None, :]  # of x - shift
        part = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offsets, mask, channels = _channel_tile(base, c0, pixels, in_image, C, sc, sp, BLOCK_C)
            d = tl.where(mask, shifted(X + offsets, mask, shift) - mean, 0.0)
            part += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(part, axis=0) / C + eps)
        for c0 in range(0, C, BLOCK_C):
            offsets, mask, channels = _channel_tile(base, c0, pixels, in_image, C, sc, sp, BLOCK_C)
            w = tl.load(W + channels, mask=channels < C, other=0.0)
            b = tl.load(B + channels, mask=channels < C, other=0.0)
            y = (shifted(X + offsets, mask, shift) - mean) * rstd[None, :] * w[:, None] + b[:, None]
            y_offsets, _, _ = _channel_tile(y_base, c0, pixels, in_image, C, syc, syp, BLOCK_C)
            tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)


@torch.library.custom_op("sipl_fast::layer_norm2d_triton", mutates_args=())
def layer_norm2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Triton forward; x (B, C, H, W) NCHW or channels-last, or a band of rows of either (else
    copied to NCHW), y dense in x's layout; weight/bias go to fp32."""
    x = _layout.pixels(x)
    y = _layout.empty(x, x.shape[1])
    n, c, h, w = x.shape
    sb, sc, sp = _layout.strides(x)
    # NCHW: 16 channels x 128 pixels, coalesced along pixels; NHWC: 64 channels x 32 pixels
    block_c, block_p = (16, 128) if sp == 1 else (64, 32)
    grid = (triton.cdiv(h * w, block_p), n)
    _triton.launch(_layer_norm2d_fwd_kernel, grid, x, weight.float().contiguous(), bias.float().contiguous(), y, c,
                   h * w, sb, sc, sp, *_layout.strides(y), float(eps), BLOCK_C=block_c, BLOCK_P=block_p)
    return y


@layer_norm2d_triton.register_fake
def _(x, weight, bias, eps=1e-5):
    return _layout.empty(_layout.pixels(x), x.shape[1])


BACKENDS = {
    "torch": Backend("torch", layer_norm2d_torch, lambda *a: None),
    "cuda": Backend("cuda", layer_norm2d_cuda, lambda x, w, b, eps: forward_only_problem("cuda", x, w, b)),
    "triton": Backend("triton", layer_norm2d_triton, lambda x, w, b, eps: forward_only_problem("triton", x, w, b),
                      automatic=lambda x, *args: x.is_cuda),
}
PREFERENCE = ("cuda", "triton", "torch")  # not yet ranked by measurement on a GPU


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"layer_norm2d: expected x of shape (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"layer_norm2d: expected a floating-point x, got {x.dtype}")
    c = x.shape[1]
    if c < 1:  # (the Triton kernel reads channel 0 of every pixel)
        raise ValueError(f"layer_norm2d: expected at least one channel, got x of shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (c,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"layer_norm2d: expected {name} as a tensor of shape ({c},), got {got}")
        if t.device != x.device:
            raise ValueError(f"layer_norm2d: {name} is on {t.device}, x on {x.device}")
    check_real_floating("layer_norm2d", eps, weight=weight, bias=bias)


def layer_norm2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, backend: Optional[str] = None
) -> torch.Tensor:
    """LayerNorm over channels of x (B, C, H, W) with weight, bias (C,); returns (B, C, H, W).

    ``backend``: None/"auto" (the first of cuda, triton, torch that can run), "torch", "cuda" or "triton".
    """
    _check(x, weight, bias, eps)
    return choose("layer_norm2d", BACKENDS, PREFERENCE, backend, x, weight, bias, eps).fn(x, weight, bias, eps)
