"""Gated depthwise-conv GELU: the middle of every GDFN and of the cross blocks' dual gates.

x (B, 2h, H, W) goes through a depthwise 3x3 convolution (zero padding 1, optional bias),
whose output halves y1 = channels [0, h) and y2 = [h, 2h) are gated:

- ``mode="gdfn"``: ``gelu(y1) * y2`` (Restormer's GDFN);
- ``mode="dual"``: ``gelu(y2) * y1 + gelu(y1) * y2`` (SIPL's cross blocks);

gelu is the exact erf form (``F.gelu``'s default). Output (B, h, H, W). Eager PyTorch writes
the 2h-channel conv output and reads it back several times (chunk, gelu, products); the
fused kernels read x once and write only the h-channel result.

Optionally the GDFN's ``project_out`` (a 1x1 convolution h -> Cout) and its block's residual
add follow in the same pass (``proj_weight``, ``proj_bias``, ``residual``): then the h-channel
gate never reaches memory either; the output is (B, Cout, H, W).

Backends (first the reference):

- ``"torch"``: ``F.conv2d`` then the gate (and ``conv1x1``'s reference), op by op, any float
  dtype, differentiable.
- ``"triton"``: the kernels below, forward only; fp32, fp16, bf16 with fp32 math; NCHW or
  channels-last input, or a band of rows of either (other strides are copied to NCHW); the
  output dense in the input's layout. The projection multiplies on tensor cores.
  With ``TRITON_INTERPRET=1`` it also runs CPU tensors when asked for explicitly (tests;
  not bf16 with the projection, whose dots the interpreter gets wrong).
- ``"cuda"``: the CUDA C++ stencil ``kernels/gated_dwconv_gelu.cu`` (rows through registers,
  no shared memory), forward only, same dtypes and layouts, through the compiled extension or
  CuPy; a projection runs after it as ``conv1x1`` (two passes: the gate reaches memory).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _layout, _triton
from ._backend import Backend, check_real_floating, choose, forward_only_problem, result_dtype
from .conv1x1 import conv1x1, conv1x1_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None

MODES = ("gdfn", "dual")


def gated_dwconv_gelu_torch(x: torch.Tensor, weight: torch.Tensor, mode: str = "gdfn",
                            bias: Optional[torch.Tensor] = None, proj_weight: Optional[torch.Tensor] = None,
                            proj_bias: Optional[torch.Tensor] = None,
                            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: the published depthwise convolution and gate (then the 1x1 projection and
    residual add), op by op, in x's dtype."""
    x1, x2 = _layout.conv2d(x, weight, bias, groups=x.shape[1]).chunk(2, dim=1)
    y = F.gelu(x2) * x1 + F.gelu(x1) * x2 if mode == "dual" else F.gelu(x1) * x2
    return y if proj_weight is None else conv1x1_torch(y, proj_weight, proj_bias, residual)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:
    from ._triton import dwconv3x3, interior, tile

    @triton.jit
    def _gelu(v):
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))

    @triton.jit
    def _gate(x_img, Wt, Bs, ch, pix, h, H, W, sxc, sxp, inside, DUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
              WIDE: tl.constexpr, TAP_UNROLL: tl.constexpr, GATED: tl.constexpr = True):
        """[channels, pixels] fp32: the gate of the depthwise convolution of channels ch and
        ch + h at pixels pix (linear, y * W + x) of the image at ``x_img``; 0 at channels >= h.
        Not ``GATED``: the convolution (and bias) of channels ch < h of an h-channel image
        (``ops.depthwise_conv3x3``).

        Both halves are convolved in fp32 (``_triton.dwconv3x3``, zero outside the image;
        weights tap-major, ``_layout.tap_major``; without masks where ``inside``: all channels
        < h, the pixels consecutive and ``_triton.interior``); then bias and gate.
        """
        in_channels = ch < h
        if WIDE:
            pixels = pix.to(tl.int64)
            c1 = ch.to(tl.int64)
        else:
            pixels = pix
            c1 = ch
        in_image = pix < H * W
        acc1 = dwconv3x3(x_img + c1[:, None] * sxc, in_channels, pixels, in_image, sxp, Wt,
                         2 * h if GATED else h, ch, H, W, inside, TAP_UNROLL)
        if HAS_BIAS:
            acc1 += tl.load(Bs + ch, mask=in_channels, other=0.0)[:, None]
        if not GATED:
            return acc1
        acc2 = dwconv3x3(x_img + (c1 + h)[:, None] * sxc, in_channels, pixels, in_image, sxp, Wt, 2 * h, ch + h, H, W,
                         inside, TAP_UNROLL)
        if HAS_BIAS:
            acc2 += tl.load(Bs + ch + h, mask=in_channels, other=0.0)[:, None]
        if DUAL:
            return _gelu(acc2) * acc1 + _gelu(acc1) * acc2
        return _gelu(acc1) * acc2

    @triton.jit
    def _gated_dwconv_gelu_kernel(X, Wt, Bs, O, h, H, W, sxb, sxc, sxp, sob, soc, sop,
                                  DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, TAP_UNROLL: tl.constexpr = 1,
                                  GATED: tl.constexpr = True):
        """Program (pixel block, channel block, image): BLOCK_C output channels at BLOCK_P pixels
        (``_gate``; not ``GATED``: the plain depthwise convolution of h channels), one store.
        NCHW (sxp = 1) tiles are wide in pixels, NHWC (sxc = 1) tiles wide in channels, so
        loads coalesce in both layouts."""
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2).to(tl.int64)
        inside = interior(tl.program_id(0) * BLOCK_P, BLOCK_P, H, W) & ((tl.program_id(1) + 1) * BLOCK_C <= h)
        y = _gate(X + b * sxb, Wt, Bs, ch, pix, h, H, W, sxc, sxp, inside, DUAL, HAS_BIAS, WIDE, TAP_UNROLL, GATED)
        tl.store(tile(O + b * sob, ch, pix, soc, sop, WIDE), y.to(O.dtype.element_ty),
                 mask=(ch < h)[:, None] & (pix < H * W)[None, :])

    @triton.jit
    def _gated_project_kernel(X, Wt, Bs, P, PB, R, O, h, Cout, H, W, sxb, sxc, sxp, srb, src, srp, sob, soc, sop,
                              DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr,
                              HAS_RESIDUAL: tl.constexpr, WIDE: tl.constexpr, BLOCK_O: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                              TAP_UNROLL: tl.constexpr = 1):
        """Output channels o.. at pixels n.. of image b, for program (n block * o blocks + o block, b):
        ``residual + P @ gate + bias``, the gate never stored.

        The hidden channels are swept in blocks of BLOCK_K: each block's gate (``_gate``, fp32)
        is rounded to x's dtype, as the separate gate would store it, and multiplied with the
        [BLOCK_O, BLOCK_K] projection tile on tensor cores into an fp32 accumulator; bias and
        residual are added in fp32 before the one store. The output-channel blocks of one pixel
        block (Cout > BLOCK_O) are neighbouring programs that recompute its gate from L2.
        """
        blocks_o = tl.cdiv(Cout, BLOCK_O)
        outs = (tl.program_id(0) % blocks_o) * BLOCK_O + tl.arange(0, BLOCK_O)
        first = (tl.program_id(0) // blocks_o) * BLOCK_N
        pix = first + tl.arange(0, BLOCK_N)
        pixels_inside = interior(first, BLOCK_N, H, W)
        b = tl.program_id(1).to(tl.int64)
        x_img = X + b * sxb
        acc = tl.zeros([BLOCK_O, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, h, BLOCK_K):
            ch = k0 + tl.arange(0, BLOCK_K)
            g = _gate(x_img, Wt, Bs, ch, pix, h, H, W, sxc, sxp, pixels_inside & (k0 + BLOCK_K <= h), DUAL, HAS_BIAS,
                      WIDE, TAP_UNROLL).to(X.dtype.element_ty)
            w = tl.load(P + outs[:, None] * h + ch[None, :], mask=(outs < Cout)[:, None] & (ch < h)[None, :], other=0.0)
            acc = tl.dot(w, g, acc, input_precision=PRECISION)
        out_mask = (outs < Cout)[:, None] & (pix < H * W)[None, :]
        if HAS_PROJ_BIAS:
            acc += tl.load(PB + outs, mask=outs < Cout, other=0.0)[:, None]
        if HAS_RESIDUAL:
            acc += tl.load(tile(R + b * srb, outs, pix, src, srp, WIDE), mask=out_mask, other=0.0).to(tl.float32)
        tl.store(tile(O + b * sob, outs, pix, soc, sop, WIDE), acc.to(O.dtype.element_ty), mask=out_mask)


# (BLOCK_N, BLOCK_K, warps, stages) of the projecting kernel, 16-bit and fp32 (whose exact
# products run without tensor cores). On a GPU the autotuner picks among them per shape (the
# first without autotuning); each compiles for sm_90a without register spills, for either
# BLOCK_O and with int64 offsets too (bf16: 80 to 233 registers a thread). The 16-bit list's
# last two unroll the stencil's tap loop at the borders too (``TAP_UNROLL``,
# ``_triton.dwconv3x3``; inside the image it is always unrolled).
_PROJECT_CONFIGS = {False: _triton.configs((64, 32, 8, 1), (32, 32, 8, 1), (32, 16, 4, 1))
                    + _triton.configs((32, 32, 8, 1), TAP_UNROLL=3) + _triton.configs((32, 16, 4, 1), TAP_UNROLL=9),
                    True: _triton.configs((32, 16, 4, 1), (16, 16, 8, 1))} if triton else {}
# The interpreter (CPU tensors) runs programs one by one: large tiles, few programs.
_INTERPRETER_PROJECT = _triton.configs((256, 32, 4, 1)) if triton else []
if triton is not None:
    _gated_project_tuned = _triton.autotune(
        _gated_project_kernel, [c for group in _PROJECT_CONFIGS.values() for c in group], ["h", "Cout", "H", "W", "sxp"],
        lambda nargs, kw: _PROJECT_CONFIGS[nargs["X"].dtype == torch.float32])


# (BLOCK_C, BLOCK_P, warps) of the gate alone, per layout (NCHW: True): NCHW tiles are wide in
# pixels (coalesced along them), NHWC tiles wide in channels; the last of each unroll the
# stencil's tap loop. On a GPU the autotuner picks per shape (the first without autotuning).
def _gate_tiles(*shapes, **meta) -> list:
    return _triton.configs(*shapes, names=("BLOCK_C", "BLOCK_P"), **meta)


_GATE_CONFIGS = {True: _gate_tiles((4, 256, 4, 1), (2, 512, 4, 1), (8, 256, 8, 1), (4, 512, 8, 1))
                 + _gate_tiles((4, 256, 4, 1), TAP_UNROLL=9),
                 False: _gate_tiles((64, 16, 8, 1), (32, 32, 8, 1), (64, 32, 8, 1))
                 + _gate_tiles((64, 16, 8, 1), TAP_UNROLL=9) + _gate_tiles((32, 32, 8, 1), TAP_UNROLL=3)} if triton else {}
# The interpreter runs programs one by one: large tiles, few programs.
_INTERPRETER_GATE = _gate_tiles((32, 512, 4, 1)) if triton else []
if triton is not None:
    # tuned per shape and kind: the gdfn and dual gates and the plain convolution of one shape differ
    _gate_tuned = _triton.autotune(_gated_dwconv_gelu_kernel, [c for group in _GATE_CONFIGS.values() for c in group],
                                   ["h", "H", "W", "sxp", "DUAL", "GATED"],
                                   lambda nargs, kw: _GATE_CONFIGS[nargs["sxp"] == 1])


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().reshape(-1).contiguous()


def _project(x, w32, b32, dual, proj_weight, proj_bias, residual):
    """The projecting kernel's launch: (B, Cout, H, W) in x's layout, dtype promoted with the residual's."""
    b, c2, hh, ww = x.shape
    h, cout = c2 // 2, proj_weight.shape[0]
    out = _layout.empty(x, cout, result_dtype(x, residual))
    if out.numel() == 0:
        return out
    p = proj_weight.reshape(cout, h).to(x.dtype).contiguous()
    pb = _fp32(proj_bias)
    r = None if residual is None else _layout.pixels(residual)
    block_o = 64 if cout <= 64 else 128
    wide = _layout.wide(x, r, out)
    configs = _PROJECT_CONFIGS[x.dtype == torch.float32] if x.is_cuda else _INTERPRETER_PROJECT
    flags = dict(DUAL=dual, HAS_BIAS=b32 is not None, HAS_PROJ_BIAS=pb is not None, HAS_RESIDUAL=r is not None,
                 WIDE=wide)
    _triton.launch_tuned(_gated_project_kernel, _gated_project_tuned,
                         (block_o, x.dtype, x.is_cuda, _layout.strides(x)[2] == 1, *flags.values()),
                         configs, lambda meta: (triton.cdiv(cout, block_o) * triton.cdiv(hh * ww, meta["BLOCK_N"]), b),
                         x, w32, b32 if b32 is not None else w32, p, pb if pb is not None else w32,
                         r if r is not None else x, out, h, cout, hh, ww, *_layout.strides(x),
                         *_layout.strides(r if r is not None else x), *_layout.strides(out), **flags, BLOCK_O=block_o,
                         PRECISION=_triton.precision(x.dtype))
    return out


@torch.library.custom_op("sipl_fast::gated_dwconv_gelu_triton", mutates_args=())
def gated_dwconv_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dual: bool,
                             proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton forward: (B, h, H, W), or (B, Cout, H, W) with the projection, in x's layout (NCHW
    or channels-last)."""
    x = _layout.pixels(x)
    w32, b32 = _layout.tap_major(weight), _fp32(bias)
    if proj_weight is not None:
        return _project(x, w32, b32, dual, proj_weight, proj_bias, residual)
    return stencil(x, w32, b32, dual)


def stencil(x: torch.Tensor, w32: torch.Tensor, b32: Optional[torch.Tensor], dual: bool,
            gated: bool = True) -> torch.Tensor:
    """The gate kernel's launch on x (``_layout.pixels``), weights tap-major fp32 (9, C), bias
    fp32 or None: the gate (B, C/2, H, W), or not ``gated`` the depthwise convolution
    (B, C, H, W) (``ops.depthwise_conv3x3``), in x's layout."""
    b, c, hh, ww = x.shape
    h = c // 2 if gated else c
    out = _layout.empty(x, h)
    if out.numel() == 0:
        return out
    sxb, sxc, sxp = _layout.strides(x)
    wide = _layout.wide(x, out)
    configs = _GATE_CONFIGS[sxp == 1] if x.is_cuda else _INTERPRETER_GATE
    grid = lambda meta: (triton.cdiv(hh * ww, meta["BLOCK_P"]), triton.cdiv(h, meta["BLOCK_C"]), b)  # noqa: E731
    _triton.launch_tuned(_gated_dwconv_gelu_kernel, _gate_tuned, (x.dtype, sxp == 1, dual, b32 is not None, wide, gated),
                         configs, grid,
                         x, w32, b32 if b32 is not None else w32, out, h, hh, ww, sxb, sxc, sxp,
                         *_layout.strides(out), DUAL=dual, HAS_BIAS=b32 is not None, WIDE=wide, GATED=gated)
    return out


@torch.library.custom_op("sipl_fast::gated_dwconv_gelu_cuda", mutates_args=(), device_types="cuda")
def gated_dwconv_gelu_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           dual: bool) -> torch.Tensor:
    """CUDA C++ forward: (B, h, H, W) in x's layout (NCHW or channels-last)."""
    from . import _cuda

    x = _layout.dense(x)
    out = _layout.empty(x, x.shape[1] // 2)
    _cuda.gated_dwconv_gelu_fwd(x, _layout.tap_major(weight), _fp32(bias), dual, out)
    return out


@gated_dwconv_gelu_triton.register_fake
def _(x, weight, bias, dual, proj_weight=None, proj_bias=None, residual=None):
    channels = x.shape[1] // 2 if proj_weight is None else proj_weight.shape[0]
    return _layout.empty(_layout.pixels(x), channels, result_dtype(x, residual))


gated_dwconv_gelu_cuda.register_fake(lambda x, weight, bias, dual: _layout.empty(_layout.dense(x), x.shape[1] // 2))


# ----------------------------------------------------------------------------- backend choice
def _cuda_two_passes(x, w, mode, b, pw, pb, r) -> torch.Tensor:
    """The CUDA C++ gate; a projection after it runs as ``conv1x1`` (its own backend choice)."""
    y = gated_dwconv_gelu_cuda(x, w, b, mode == "dual")
    return y if pw is None else conv1x1(y, pw, pb, r)


BACKENDS = {
    "torch": Backend("torch", gated_dwconv_gelu_torch, lambda *a: None),
    "triton": Backend("triton", lambda x, w, mode, *a: gated_dwconv_gelu_triton(x, w, a[0], mode == "dual", *a[1:]),
                      lambda x, w, mode, b, pw, pb, r: forward_only_problem("triton", x, w, b, pw, pb, r,
                                                                            dots=pw is not None),
                      automatic=lambda x, *a: x.is_cuda),
    "cuda": Backend("cuda", _cuda_two_passes,
                    lambda x, w, mode, b, pw, pb, r: forward_only_problem("cuda", x, w, b, pw, pb, r)),
}
# Not yet ranked by measurement on a GPU: Triton (checked in the interpreter) ahead of the
# CUDA C++ kernel, which has not run on a GPU yet (its device code runs on the host in the tests).
PREFERENCE = ("triton", "cuda", "torch")


def check_depthwise(op: str, x: torch.Tensor, weight, bias) -> None:
    """ValueError unless ``weight`` is a real floating (C, 1, 3, 3) tensor and ``bias`` one of
    shape (C,) or None, both on x's device, for x (B, C, H, W) with H, W >= 1 (which a padded
    convolution needs)."""
    c, height, width = x.shape[1:]
    if not isinstance(weight, torch.Tensor) or weight.shape != (c, 1, 3, 3):
        raise ValueError(f"{op}: expected weight of shape ({c}, 1, 3, 3), got {tuple(getattr(weight, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (c,)):
        raise ValueError(f"{op}: expected bias of shape ({c},) or None, got {tuple(getattr(bias, 'shape', ()))}")
    if height < 1 or width < 1:
        raise ValueError(f"{op}: expected an image of H, W >= 1, got {height} x {width}")
    check_real_floating(op, weight=weight, bias=bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def _check(x, weight, mode, bias, proj_weight, proj_bias, residual) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"gated_dwconv_gelu: expected x as a floating-point (B, 2h, H, W) tensor, got "
                         f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    c2 = x.shape[1]
    if c2 % 2 or c2 < 2:
        raise ValueError(f"gated_dwconv_gelu: expected an even channel count 2h >= 2, got {c2}")
    if mode not in MODES:
        raise ValueError(f"gated_dwconv_gelu: mode must be one of {MODES}, got {mode!r}")
    check_depthwise("gated_dwconv_gelu", x, weight, bias)
    b, h, height, width = x.shape[0], c2 // 2, *x.shape[2:]
    if proj_weight is None:
        if proj_bias is not None or residual is not None:
            raise ValueError("gated_dwconv_gelu: proj_bias and residual need proj_weight")
    else:
        if not isinstance(proj_weight, torch.Tensor) or proj_weight.dim() not in (2, 4) \
                or proj_weight.shape[1] != h or proj_weight.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"gated_dwconv_gelu: expected proj_weight of shape (Cout, {h}) or (Cout, {h}, 1, 1), "
                             f"got {tuple(getattr(proj_weight, 'shape', ()))}")
        cout = proj_weight.shape[0]
        if proj_bias is not None and (not isinstance(proj_bias, torch.Tensor) or proj_bias.shape != (cout,)):
            raise ValueError(f"gated_dwconv_gelu: expected proj_bias of shape ({cout},) or None, "
                             f"got {tuple(getattr(proj_bias, 'shape', ()))}")
        if residual is not None and (not isinstance(residual, torch.Tensor) or not residual.is_floating_point()
                                     or residual.shape != (b, cout, height, width)):
            raise ValueError(f"gated_dwconv_gelu: expected a floating-point residual of shape "
                             f"({b}, {cout}, {height}, {width}) or None, got {getattr(residual, 'dtype', type(residual))} "
                             f"of shape {tuple(getattr(residual, 'shape', ()))}")
    check_real_floating("gated_dwconv_gelu", proj_weight=proj_weight, proj_bias=proj_bias)
    for name, t in (("proj_weight", proj_weight), ("proj_bias", proj_bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gated_dwconv_gelu: {name} is on {t.device}, x on {x.device}")


def gated_dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, mode: str = "gdfn", bias: Optional[torch.Tensor] = None,
                      proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                      residual: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise 3x3 conv of x (B, 2h, H, W) with weight (2h, 1, 3, 3) (and bias (2h,)), then the
    gate of ``mode`` ("gdfn" or "dual") on its two channel halves: (B, h, H, W).

    With ``proj_weight`` (Cout, h) or (Cout, h, 1, 1): ``residual + conv1x1(gate, proj_weight,
    proj_bias)``, (B, Cout, H, W) (the GDFN's ``project_out`` and the block's residual add; the
    residual (B, Cout, H, W) optional), in x's dtype promoted with the residual's.

    ``backend``: None/"auto" (the first of triton, cuda, torch that can run), "torch", "triton" or
    "cuda".
    """
    args = (x, weight, mode, bias, proj_weight, proj_bias, residual)
    _check(*args)
    return choose("gated_dwconv_gelu", BACKENDS, PREFERENCE, backend, *args).fn(*args)
