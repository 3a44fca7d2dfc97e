"""Gated depthwise-conv GELU: the middle of every GDFN and of the cross blocks' dual gates.

x (B, 2h, H, W) goes through a depthwise 3x3 convolution (zero padding 1, optional bias),
whose output halves y1 = channels [0, h) and y2 = [h, 2h) are gated:

- ``mode="gdfn"``: ``gelu(y1) * y2`` (Restormer's GDFN);
- ``mode="dual"``: ``gelu(y2) * y1 + gelu(y1) * y2`` (SIPL's cross blocks);

gelu is the exact erf form (``F.gelu``'s default). Output (B, h, H, W). Eager PyTorch writes
the 2h-channel conv output and reads it back several times (chunk, gelu, products); the
fused kernels read x once and write only the h-channel result.

Backends (first the reference):

- ``"torch"``: ``F.conv2d`` then the gate, op by op, any float dtype, differentiable.
- ``"triton"``: the kernel below, forward only; fp32, fp16, bf16 with fp32 math; NCHW or
  channels-last input, or a band of rows of either (other strides are copied to NCHW); the
  output dense in the input's layout.
  With ``TRITON_INTERPRET=1`` it also runs CPU tensors when asked for explicitly (tests).
- ``"cuda"``: the CUDA C++ stencil ``kernels/gated_dwconv_gelu.cu`` (shared-memory halos),
  forward only, same dtypes and layouts, through the compiled extension or CuPy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _layout
from ._backend import Backend, choose, forward_only_problem

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None

MODES = ("gdfn", "dual")


def gated_dwconv_gelu_torch(x: torch.Tensor, weight: torch.Tensor, mode: str = "gdfn",
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: the published depthwise convolution and gate, op by op, in x's dtype."""
    x1, x2 = F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]).chunk(2, dim=1)
    if mode == "dual":
        return F.gelu(x2) * x1 + F.gelu(x1) * x2
    return F.gelu(x1) * x2


# ----------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _gelu(v):
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))

    @triton.jit
    def _gated_dwconv_gelu_kernel(X, Wt, Bs, O, h, H, W, sxb, sxc, sxp, sob, soc, sop,
                                  DUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (pixel block, channel block, image): BLOCK_C output channels c at BLOCK_P pixels.

        For each of the 9 taps it loads the shifted [BLOCK_C, BLOCK_P] tiles of input channels
        c and c + h (zero outside the image) and accumulates both convolutions in fp32
        registers; then bias, gate, one store. Neighbouring taps re-read the same lines, which
        the caches serve, so DRAM sees x read about once. Pixels are linear (y * W + x): NCHW
        (sxp = 1) tiles are wide in pixels, NHWC (sxc = 1) tiles wide in channels, so loads
        coalesce in both layouts.
        """
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2).to(tl.int64)
        row = pix // W
        col = pix % W
        in_image = pix < H * W
        in_channels = ch < h
        x1 = X + b * sxb + ch.to(tl.int64)[:, None] * sxc
        x2 = X + b * sxb + (ch + h).to(tl.int64)[:, None] * sxc
        acc1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for tap in tl.static_range(9):
            r = row + (tap // 3 - 1)
            c = col + (tap % 3 - 1)
            ok = in_image & (r >= 0) & (r < H) & (c >= 0) & (c < W)
            offsets = (r * W + c).to(tl.int64)[None, :] * sxp
            mask = in_channels[:, None] & ok[None, :]
            w1 = tl.load(Wt + ch * 9 + tap, mask=in_channels, other=0.0)
            w2 = tl.load(Wt + (ch + h) * 9 + tap, mask=in_channels, other=0.0)
            acc1 += w1[:, None] * tl.load(x1 + offsets, mask=mask, other=0.0).to(tl.float32)
            acc2 += w2[:, None] * tl.load(x2 + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc1 += tl.load(Bs + ch, mask=in_channels, other=0.0)[:, None]
            acc2 += tl.load(Bs + ch + h, mask=in_channels, other=0.0)[:, None]
        if DUAL:
            y = _gelu(acc2) * acc1 + _gelu(acc1) * acc2
        else:
            y = _gelu(acc1) * acc2
        out = O + b * sob + ch.to(tl.int64)[:, None] * soc + pix.to(tl.int64)[None, :] * sop
        tl.store(out, y.to(O.dtype.element_ty), mask=in_channels[:, None] & in_image[None, :])


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().reshape(-1).contiguous()


@torch.library.custom_op("sipl_fast::gated_dwconv_gelu_triton", mutates_args=())
def gated_dwconv_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             dual: bool) -> torch.Tensor:
    """Triton forward: (B, h, H, W) in x's layout (NCHW or channels-last)."""
    x = _layout.pixels(x)
    b, c2, hh, ww = x.shape
    h = c2 // 2
    out = _layout.empty(x, h)
    if out.numel() == 0:
        return out
    w32, b32 = _fp32(weight), _fp32(bias)
    sxb, sxc, sxp = _layout.strides(x)
    # NCHW: 4 channels x 256 pixels, coalesced along pixels, 4 warps; NHWC: 64 channels x 16
    # pixels, 8 warps (with 4 that tile spills registers on sm_90a). The interpreter runs programs
    # one by one: large tiles, few programs.
    block_c, block_p, warps = (32, 512, 4) if not x.is_cuda else (4, 256, 4) if sxp == 1 else (64, 16, 8)
    grid = (triton.cdiv(hh * ww, block_p), triton.cdiv(h, block_c), b)
    _gated_dwconv_gelu_kernel[grid](x, w32, b32 if b32 is not None else w32, out, h, hh, ww, sxb, sxc, sxp,
                                    *_layout.strides(out), DUAL=dual, HAS_BIAS=b32 is not None,
                                    BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return out


@torch.library.custom_op("sipl_fast::gated_dwconv_gelu_cuda", mutates_args=(), device_types="cuda")
def gated_dwconv_gelu_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           dual: bool) -> torch.Tensor:
    """CUDA C++ forward: (B, h, H, W) in x's layout (NCHW or channels-last)."""
    from . import _cuda

    x = _layout.dense(x)
    out = _layout.empty(x, x.shape[1] // 2)
    _cuda.gated_dwconv_gelu_fwd(x, _fp32(weight), _fp32(bias), dual, out)
    return out


gated_dwconv_gelu_triton.register_fake(lambda x, weight, bias, dual: _layout.empty(_layout.pixels(x), x.shape[1] // 2))
gated_dwconv_gelu_cuda.register_fake(lambda x, weight, bias, dual: _layout.empty(_layout.dense(x), x.shape[1] // 2))


# ----------------------------------------------------------------------------- backend choice
BACKENDS = {
    "torch": Backend("torch", gated_dwconv_gelu_torch, lambda *a: None),
    "triton": Backend("triton", lambda x, w, mode, b: gated_dwconv_gelu_triton(x, w, b, mode == "dual"),
                      lambda x, w, mode, b: forward_only_problem("triton", x, w, b), automatic=lambda x, *a: x.is_cuda),
    "cuda": Backend("cuda", lambda x, w, mode, b: gated_dwconv_gelu_cuda(x, w, b, mode == "dual"),
                    lambda x, w, mode, b: forward_only_problem("cuda", x, w, b)),
}
# Not yet ranked by measurement on a GPU: Triton (checked in the interpreter) ahead of the
# CUDA C++ kernel, which has only been compiled so far.
PREFERENCE = ("triton", "cuda", "torch")


def _check(x, weight, mode, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"gated_dwconv_gelu: expected x as a floating-point (B, 2h, H, W) tensor, got "
                         f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    c2 = x.shape[1]
    if c2 % 2:
        raise ValueError(f"gated_dwconv_gelu: expected an even channel count 2h, got {c2}")
    if mode not in MODES:
        raise ValueError(f"gated_dwconv_gelu: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (c2, 1, 3, 3):
        raise ValueError(f"gated_dwconv_gelu: expected weight of shape ({c2}, 1, 3, 3), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (c2,)):
        raise ValueError(f"gated_dwconv_gelu: expected bias of shape ({c2},) or None, "
                         f"got {tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gated_dwconv_gelu: {name} is on {t.device}, x on {x.device}")


def gated_dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, mode: str = "gdfn", bias: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise 3x3 conv of x (B, 2h, H, W) with weight (2h, 1, 3, 3) (and bias (2h,)), then the
    gate of ``mode`` ("gdfn" or "dual") on its two channel halves: (B, h, H, W).

    ``backend``: None/"auto" (the first of triton, cuda, torch that can run), "torch", "triton" or "cuda".
    """
    _check(x, weight, mode, bias)
    return choose("gated_dwconv_gelu", BACKENDS, PREFERENCE, backend, x, weight, mode, bias).fn(x, weight, mode, bias)
