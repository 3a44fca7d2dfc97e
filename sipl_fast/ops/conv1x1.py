"""1x1 convolution with an optional channel LayerNorm before it and a residual add after it.

``out = residual + W @ LN(x) + bias`` at every pixel: x (B, Cin, H, W), W (Cout, Cin), out
(B, Cout, H, W) in x's dtype, or the promoted dtype of x's and the residual's, as ``+`` gives; ``LN`` (``normalize=True``) is the per-pixel LayerNorm over the Cin channels
without affine parameters, ``(x - mean) / sqrt(var + eps)`` (biased variance): a LayerNorm's
scale and shift fold into W and bias, ``W (s * xhat + t) + c = (W diag(s)) xhat + (W t + c)``.

These are the memory-bound ends of every Restormer block: ``qkv(norm1(x))``,
``project_in(norm2(x))``, the cross blocks' ``kv(norm12(x))``, and ``x + project_out(g)``. Op by
op, the norm writes a full copy of x that the convolution reads back, and the residual add
reads the convolution's output and x and writes their sum; fused, x is read once and the
output written once.

Backends (first the reference):

- ``"torch"``: the published order op by op, pure PyTorch: ``layer_norm2d_torch``,
  ``F.conv2d``, the add; in x's dtype (W and bias cast to it), differentiable.
- ``"triton"``: the kernel below, forward only; fp32, fp16, bf16 with fp32 accumulation (W
  rounded to x's dtype, as autocast rounds it; the norm and the residual add in fp32); NCHW
  or channels-last x, or a band of rows of either (other strides are copied to NCHW); the
  output dense in x's layout. With
  ``TRITON_INTERPRET=1`` it also runs CPU tensors when asked for explicitly (tests), except
  bf16, whose dots the interpreter gets wrong.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _layout, _triton
from ._backend import Backend, check_real_floating, choose, forward_only_problem, result_dtype
from .layer_norm2d import layer_norm2d_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None


def conv1x1_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, normalize: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Reference: the norm, the convolution and the add op by op, in x's dtype."""
    cout = weight.shape[0]
    if 0 in x.shape[2:]:  # an image without pixels, which F.conv2d refuses: the empty result
        return x.new_empty((x.shape[0], cout, *x.shape[2:]), dtype=result_dtype(x, residual))
    if normalize:
        c = x.shape[1]
        x = layer_norm2d_torch(x, x.new_ones(c), x.new_zeros(c), eps)
    y = _layout.conv2d(x, weight.reshape(cout, -1, 1, 1), bias)
    return y if residual is None else residual + y


# ----------------------------------------------------------------------------- Triton kernel
if triton is not None:
    from ._triton import shifted, tile

    @triton.jit
    def _finish(acc, rows, pixels, in_image, b, Cout, BIAS, R, O, srb, src, srp, sob, soc, sop,
                HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WIDE: tl.constexpr):
        """Store the [rows, pixels] tile ``acc`` of image b, bias and residual added in fp32."""
        out_mask = (rows < Cout)[:, None] & in_image[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + rows, mask=rows < Cout, other=0.0)[:, None]
        if HAS_RESIDUAL:
            acc += tl.load(tile(R + b * srb, rows, pixels, src, srp, WIDE), mask=out_mask, other=0.0).to(tl.float32)
        tl.store(tile(O + b * sob, rows, pixels, soc, sop, WIDE), acc.to(O.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _shift(x_img, pixels, in_image, sxc, sxp, WIDE: tl.constexpr):
        """[1, BLOCK_N]: channel 0 at ``pixels``, what the normalising sweeps subtract first."""
        return tl.load(tile(x_img, tl.arange(0, 1), pixels, sxc, sxp, WIDE), mask=in_image[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _conv1x1_kernel(X, Wt, BIAS, R, O, Cin, Cout, HW, sxb, sxc, sxp, srb, src, srp, sob, soc, sop, eps,
                        NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        WIDE: tl.constexpr, CIN_P: tl.constexpr, ONE_SWEEP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """Output channels at pixels n.. of image b: all of them with ``ONE_SWEEP``, program
        (n block, b); else channels m.., program (n block * m blocks + m block, b).

        ``ONE_SWEEP`` (a tile choice, for Cin <= CIN_P, Cin padded to a power of two): the
        whole [CIN_P, BLOCK_N] x tile is loaded once, normalised once in registers, and every
        [BLOCK_M, CIN_P] block of W multiplied with it in turn: x is read from memory exactly
        once, whatever Cout (the GDFN's project_in has 2 * 2.66 Cin outputs). Otherwise the
        output-channel blocks of one pixel block are neighbouring programs, so the x tile they
        all read comes from L2 after the first (one grid axis for both: CUDA caps the others at
        65535 blocks, which a 2048x2048 image's pixel blocks pass), and with ``NORMALIZE`` two
        sweeps over the Cin channels give each pixel's mean, then the biased variance of the
        deviations (two-pass, in fp32, as ``layer_norm2d`` computes it), before the product
        sweep (each reads x - x[channel 0], ``_triton.shifted``, so a mean that dwarfs the
        spread costs no digits); each sweep adds its [BLOCK_K, BLOCK_N] tiles elementwise and
        reduces over the channels once at its end (a reduction per tile took 8 barriers and
        40 shuffles a tile, sm_90a SASS: 192 barriers a program at Cin = 384). Either way each normalised
        [Cin, BLOCK_N] tile is rounded to x's dtype (what a separate norm would store) and
        multiplied with the weights on tensor cores, fp32 accumulation; bias and residual are
        added in fp32 before the one store (``_finish``).
        """
        b = tl.program_id(1).to(tl.int64)
        x_img = X + b * sxb
        if ONE_SWEEP:
            pixels = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_image = pixels < HW
            ks = tl.arange(0, CIN_P)
            mask = (ks < Cin)[:, None] & in_image[None, :]
            if NORMALIZE:
                shift = _shift(x_img, pixels, in_image, sxc, sxp, WIDE)
                xf = shifted(tile(x_img, ks, pixels, sxc, sxp, WIDE), mask, shift)
                d = tl.where(mask, xf - (tl.sum(xf, axis=0) / Cin)[None, :], 0.0)
                xt = (d * (1.0 / tl.sqrt(tl.sum(d * d, axis=0) / Cin + eps))[None, :]).to(X.dtype.element_ty)
            else:
                xt = tl.load(tile(x_img, ks, pixels, sxc, sxp, WIDE), mask=mask, other=0.0)
            for m0 in range(0, Cout, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                w = tl.load(Wt + rows[:, None] * Cin + ks[None, :], mask=(rows < Cout)[:, None] & (ks < Cin)[None, :],
                            other=0.0)
                acc = tl.dot(w, xt, input_precision=PRECISION)
                _finish(acc, rows, pixels, in_image, b, Cout, BIAS, R, O, srb, src, srp, sob, soc, sop,
                        HAS_BIAS, HAS_RESIDUAL, WIDE)
        else:
            blocks_m = tl.cdiv(Cout, BLOCK_M)
            rows = (tl.program_id(0) % blocks_m) * BLOCK_M + tl.arange(0, BLOCK_M)
            pixels = (tl.program_id(0) // blocks_m) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_image = pixels < HW
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if NORMALIZE:  # each sweep sums elementwise and reduces over channels once, at its end
                shift = _shift(x_img, pixels, in_image, sxc, sxp, WIDE)
                part = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, Cin, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    mask = (ks < Cin)[:, None] & in_image[None, :]
                    part += shifted(tile(x_img, ks, pixels, sxc, sxp, WIDE), mask, shift)
                mean = (tl.sum(part, axis=0) / Cin)[None, :]  # of x - shift
                part = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, Cin, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    mask = (ks < Cin)[:, None] & in_image[None, :]
                    d = tl.where(mask, shifted(tile(x_img, ks, pixels, sxc, sxp, WIDE), mask, shift) - mean, 0.0)
                    part += d * d
                rstd = 1.0 / tl.sqrt(tl.sum(part, axis=0) / Cin + eps)
            for k0 in range(0, Cin, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask = (ks < Cin)[:, None] & in_image[None, :]
                if NORMALIZE:
                    xt = shifted(tile(x_img, ks, pixels, sxc, sxp, WIDE), mask, shift) - mean
                    xt = tl.where(mask, xt * rstd[None, :], 0.0).to(X.dtype.element_ty)
                else:
                    xt = tl.load(tile(x_img, ks, pixels, sxc, sxp, WIDE), mask=mask, other=0.0)
                w = tl.load(Wt + rows[:, None] * Cin + ks[None, :], mask=(rows < Cout)[:, None] & (ks < Cin)[None, :],
                            other=0.0)
                acc = tl.dot(w, xt, acc, input_precision=PRECISION)
            _finish(acc, rows, pixels, in_image, b, Cout, BIAS, R, O, srb, src, srp, sob, soc, sop,
                    HAS_BIAS, HAS_RESIDUAL, WIDE)


# (BLOCK_N, BLOCK_K, warps, stages) per (BLOCK_M, fp32): pixels along the fast axis of NCHW, one
# accumulator of BLOCK_M x BLOCK_N fp32 values spread over the warps. The kernel is memory-bound;
# on a GPU the autotuner picks per shape (the first without autotuning): the small tiles leave
# room for several programs per SM, the wide ones (up to 256 pixels) make each program's loads
# longer, and the ONE_SWEEP tiles (calls with Cin <= 128 only) read x once. Every one
# compiles for sm_90a without register spills (16-bit: warpgroup MMA); fp32, whose exact
# products run without tensor cores, takes smaller ones.
_WIDE_TILES = (_triton.configs((128, 32, 8, 3), (256, 32, 8, 2), ONE_SWEEP=False)
               + _triton.configs((64, 32, 8, 2), (128, 32, 8, 2), ONE_SWEEP=True)) if triton else []
_CONFIGS = {(64, False): _triton.configs((64, 32, 4, 3), (64, 32, 4, 2), ONE_SWEEP=False) + _WIDE_TILES,
            (128, False): _triton.configs((64, 32, 8, 3), (64, 32, 8, 2), ONE_SWEEP=False) + _WIDE_TILES,
            (64, True): _triton.configs((32, 16, 4, 2), (32, 16, 4, 1), ONE_SWEEP=False),
            (128, True): _triton.configs((32, 16, 8, 2), (32, 16, 8, 1), ONE_SWEEP=False)} if triton else {}
# The interpreter (CPU tensors) runs programs one by one: large tiles, few programs.
_INTERPRETER_CONFIGS = _triton.configs((256, 32, 4, 1), ONE_SWEEP=False) if triton else []
ONE_SWEEP_MAX_CIN = 128  # one-sweep tiles hold [Cin padded to a power of two, BLOCK_N] values


def _configs_for(cin: int, block_m: int, fp32: bool) -> list:
    """The autotuner's candidates for a call: one-sweep tiles only where Cin fits them."""
    return [c for c in _CONFIGS[block_m, fp32] if cin <= ONE_SWEEP_MAX_CIN or not c.kwargs["ONE_SWEEP"]]


if triton is not None:
    _conv1x1_tuned = _triton.autotune(
        _conv1x1_kernel, [c for group in _CONFIGS.values() for c in group],
        ["Cin", "Cout", "HW", "NORMALIZE", "HAS_RESIDUAL"],
        lambda nargs, kw: _configs_for(nargs["Cin"], kw["BLOCK_M"], nargs["X"].dtype == torch.float32))


@torch.library.custom_op("sipl_fast::conv1x1_triton", mutates_args=())
def conv1x1_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], normalize: bool, eps: float) -> torch.Tensor:
    """Triton forward: (B, Cout, H, W) in x's layout (NCHW or channels-last)."""
    x = _layout.pixels(x)
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    out = _layout.empty(x, cout, result_dtype(x, residual))
    if out.numel() == 0:
        return out
    wt = weight.reshape(cout, cin).to(x.dtype).contiguous()
    b32 = None if bias is None else bias.float().contiguous()
    r = None if residual is None else _layout.pixels(residual)
    block_m = 64 if cout <= 64 else 128
    wide = _layout.wide(x, r, out)
    # Cin padded for the one-sweep tiles (a constant 16 where they cannot apply: no extra compiles)
    cin_p = triton.next_power_of_2(max(cin, 16)) if cin <= ONE_SWEEP_MAX_CIN else 16
    flags = dict(NORMALIZE=normalize, BLOCK_M=block_m, CIN_P=cin_p)
    configs = _configs_for(cin, block_m, x.dtype == torch.float32) if x.is_cuda else _INTERPRETER_CONFIGS
    _triton.launch_tuned(_conv1x1_kernel, _conv1x1_tuned, (block_m, x.dtype, wide, x.is_cuda, normalize, cin_p),
                         configs, lambda meta: ((1 if meta["ONE_SWEEP"] else triton.cdiv(cout, block_m))
                                                * triton.cdiv(h * w, meta["BLOCK_N"]), b),
                         x, wt, b32 if b32 is not None else wt, r if r is not None else x, out, cin, cout, h * w,
                         *_layout.strides(x), *_layout.strides(r if r is not None else x), *_layout.strides(out),
                         float(eps), **flags, HAS_BIAS=b32 is not None, HAS_RESIDUAL=r is not None, WIDE=wide,
                         PRECISION=_triton.precision(x.dtype))
    return out


@conv1x1_triton.register_fake
def _(x, weight, bias, residual, normalize, eps):
    return _layout.empty(_layout.pixels(x), weight.shape[0], result_dtype(x, residual))


# ----------------------------------------------------------------------------- backend choice
BACKENDS = {
    "torch": Backend("torch", conv1x1_torch, lambda *a: None),
    "triton": Backend("triton", conv1x1_triton,
                      lambda x, w, b, r, n, e: forward_only_problem("triton", x, w, b, r, dots=True),
                      automatic=lambda x, *a: x.is_cuda),
}
PREFERENCE = ("triton", "torch")  # not yet ranked by measurement on a GPU


def _check(x, weight, bias, residual, eps) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"conv1x1: expected x as a floating-point (B, Cin, H, W) tensor, got "
                         f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    b, cin, h, w = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or weight.shape[1] != cin \
            or weight.shape[2:] not in ((), (1, 1)):
        raise ValueError(f"conv1x1: expected weight of shape (Cout, {cin}) or (Cout, {cin}, 1, 1), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    cout = weight.shape[0]
    if cin < 1 or cout < 1:
        raise ValueError(f"conv1x1: expected Cin, Cout >= 1, got {cin}, {cout}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (cout,)):
        raise ValueError(f"conv1x1: expected bias of shape ({cout},) or None, got {tuple(getattr(bias, 'shape', ()))}")
    check_real_floating("conv1x1", eps, weight=weight, bias=bias)
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != (b, cout, h, w)
                                 or not residual.is_floating_point()):
        raise ValueError(f"conv1x1: expected a floating-point residual of shape ({b}, {cout}, {h}, {w}) or None, "
                         f"got {getattr(residual, 'dtype', type(residual))} of shape "
                         f"{tuple(getattr(residual, 'shape', ()))}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"conv1x1: {name} is on {t.device}, x on {x.device}")


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            residual: Optional[torch.Tensor] = None, normalize: bool = False, eps: float = 1e-5,
            backend: Optional[str] = None) -> torch.Tensor:
    """``residual + conv1x1(LN(x) if normalize else x, weight, bias)``: x (B, Cin, H, W), weight
    (Cout, Cin) or (Cout, Cin, 1, 1), bias (Cout,), residual (B, Cout, H, W); returns (B, Cout, H, W)
    in x's dtype (promoted with the residual's, as ``+`` does). LN: over channels, no affine, ``eps``.

    ``backend``: None/"auto" (triton where it can run, else torch), "torch" or "triton".
    """
    _check(x, weight, bias, residual, eps)
    return choose("conv1x1", BACKENDS, PREFERENCE, backend, x, weight, bias, residual, normalize,
                  eps).fn(x, weight, bias, residual, normalize, eps)
