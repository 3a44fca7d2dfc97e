"""Channel attention: MDTA, Restormer's transposed self-attention, fused.

``out = softmax((normalize(q) @ normalize(k)^T) * t_h) @ v`` with q, k, v (B, H, C, N): the
C channels of a head are the tokens, the N = H*W pixels their features, ``normalize`` the L2
norm over N with ``F.normalize``'s rule ``x / max(|x|, 1e-12)``. The attention map is only
C x C (C = 40..176), but every step of the eager expression streams C x N tensors through
memory: two normalised copies, then the map, then the product.

Backends (first the reference):

- ``"torch"``: the published expression op by op (``cosine_attention_torch``, whose tokens
  are here the channels), any float dtype, differentiable.
- ``"triton"``: the three kernels below, forward only; fp32, fp16, bf16 with fp32
  accumulation; q, k, v with any strides. q and k are read once, v once, out written once.
  With ``TRITON_INTERPRET=1`` it also runs CPU tensors when asked for explicitly (tests),
  except bf16, whose dots the interpreter gets wrong.

``proj_weight``/``proj_bias`` fold the 1x1 convolution that follows MDTA (``project_out``)
into the product: ``W_o @ blockdiag_h(A_h) @ v`` is one (C_out x H*C) matrix per image
applied to v, so the (B, H*C, N) attention output never reaches memory. ``dw_weight`` folds
the depthwise 3x3 convolution that precedes it (``qkv_dwconv``) into the reads: each tile of
q, k or v is convolved from 9 shifted loads of the unconvolved rows (neighbouring tiles share
them in cache), so the convolved q, k, v never reach memory either. ``residual`` adds the
block's skip connection before the one store.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _layout, _triton
from ._backend import Backend, check_real_floating, choose, forward_only_problem, result_dtype
from .conv1x1 import conv1x1_torch
from .cosine_attention import EPS, cosine_attention_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None


def channel_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                            proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                            residual: Optional[torch.Tensor] = None, dw_weight: Optional[torch.Tensor] = None,
                            dw_bias: Optional[torch.Tensor] = None, width: int = 0) -> torch.Tensor:
    """Reference: ``qkv_dwconv`` if given, the published expression in the inputs' dtype, then
    ``project_out`` if given, then ``residual +``."""
    if dw_weight is not None:
        b, h, c, n = q.shape
        biases = (None,) * 3 if dw_bias is None else dw_bias.chunk(3)
        q, k, v = (_layout.conv2d(t.reshape(b, h * c, n // width, width), w, bias, groups=h * c).reshape(b, h, c, n)
                   for t, w, bias in zip((q, k, v), dw_weight.chunk(3), biases))
    out = cosine_attention_torch(q, k, v, temperature)
    if proj_weight is not None:
        b, h, c, n = out.shape
        out = conv1x1_torch(out.reshape(b, h * c, n, 1), proj_weight, proj_bias).reshape(b, -1, n)
    return out if residual is None else residual + out


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:
    from ._triton import dwconv3x3, interior

    @triton.jit
    def _rows_tile(rows_ptr, rows_ok, cols, cols_ok, sn, DW, DB, channels, dw_channels, width, N, inside,
                   DWCONV: tl.constexpr, HAS_DW_BIAS: tl.constexpr, TAP_UNROLL: tl.constexpr):
        """The [rows, cols] tile of q, k or v (``rows_ptr`` [R, 1] pointers, pixels ``cols``): a
        load, or with ``DWCONV`` the depthwise 3x3 convolution (zero padding) of those rows as
        images ``width`` pixels wide, weights DW[tap * dw_channels + channel] (tap-major,
        ``_triton.dwconv3x3``; unmasked where ``inside``), in fp32 and rounded to the rows'
        dtype, as a separate convolution would store it."""
        if DWCONV:
            acc = dwconv3x3(rows_ptr, rows_ok, cols, cols_ok, sn, DW, dw_channels, channels, N // width, width, inside,
                            TAP_UNROLL)
            if HAS_DW_BIAS:
                acc += tl.where(cols_ok[None, :], tl.load(DB + channels, mask=rows_ok, other=0.0)[:, None], 0.0)
            return acc.to(rows_ptr.dtype.element_ty)
        return tl.load(rows_ptr + cols[None, :] * sn, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)

    @triton.jit
    def _gram_kernel(Q, K, G, SQ, SK, WQ, WK, BQ, BK, C, N, per_split, H, width,
                     sqb, sqh, sqc, sqn, skb, skh, skc, skn,
                     DWCONV: tl.constexpr, HAS_DW_BIAS: tl.constexpr, WIDE: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TAP_UNROLL: tl.constexpr = 1):
        """Partial Gram matrix and squared norms over one slice of N.

        Program (i * tiles + j, s, b * H + h) reads q rows i*BLOCK_C.. and k rows j*BLOCK_C..
        over pixels [s * per_split, (s + 1) * per_split) in [BLOCK_C, BLOCK_N] tiles and
        accumulates ``q k^T`` (fp32, on tensor cores) together with ``sum q^2`` and ``sum k^2``
        of the same tiles: normalize(q) normalize(k)^T = (q k^T) / (|q| |k|^T), so q and k are
        read once and never normalised in memory (with ``DWCONV`` they are convolved on
        the fly, ``_rows_tile``). The squares are summed elementwise and over the pixels
        once, at the end (a sum over each tile's pixels took shuffles every iteration). Each slice s writes its own partials (G[bh, s], SQ[bh, s],
        SK[bh, s]); a fixed-order sum over s follows, so the result is deterministic.
        Pixel indices are int32 unless an image's offsets need int64 (``WIDE``,
        ``_layout.wide``): in int64, the stencil's per-tap offsets and the pixel rows and
        columns took a fifth of the convolving loop's instructions (sm_90a SASS).
        """
        tiles = tl.cdiv(C, BLOCK_C)
        ti = tl.program_id(0) // tiles
        tj = tl.program_id(0) % tiles
        s = tl.program_id(1)
        bh = tl.program_id(2)
        b = bh // H
        h = bh % H
        ri = ti * BLOCK_C + tl.arange(0, BLOCK_C)
        rj = tj * BLOCK_C + tl.arange(0, BLOCK_C)
        q_rows = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + ri.to(tl.int64)[:, None] * sqc
        k_rows = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rj.to(tl.int64)[:, None] * skc
        acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
        sq = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)  # summed over the pixels at the end
        sk = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        lo = s * per_split
        hi = tl.minimum(lo + per_split, N)
        rows_inside = ((ti + 1) * BLOCK_C <= C) & ((tj + 1) * BLOCK_C <= C)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            if WIDE:
                cols = cols.to(tl.int64)
            in_slice = cols < hi
            inside = rows_inside & (n0 + BLOCK_N <= hi) & interior(n0, BLOCK_N, N // width, width)
            qt = _rows_tile(q_rows, ri < C, cols, in_slice, sqn, WQ, BQ, h * C + ri, 3 * H * C, width, N, inside,
                            DWCONV, HAS_DW_BIAS, TAP_UNROLL)
            kt = _rows_tile(k_rows, rj < C, cols, in_slice, skn, WK, BK, h * C + rj, 3 * H * C, width, N, inside,
                            DWCONV, HAS_DW_BIAS, TAP_UNROLL)
            acc = tl.dot(qt, tl.trans(kt), acc, input_precision=PRECISION)
            qf = qt.to(tl.float32)
            kf = kt.to(tl.float32)
            sq += qf * qf
            sk += kf * kf
        part = bh.to(tl.int64) * tl.num_programs(1) + s
        tl.store(G + part * C * C + ri[:, None] * C + rj[None, :], acc, mask=(ri < C)[:, None] & (rj < C)[None, :])
        if tj == 0:
            tl.store(SQ + part * C + ri, tl.sum(sq, axis=1), mask=ri < C)
        if ti == 0:
            tl.store(SK + part * C + rj, tl.sum(sk, axis=1), mask=rj < C)

    @triton.jit
    def _softmax_kernel(G, SQ, SK, T, A, C, S, H, eps, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_CC: tl.constexpr):
        """Rows r.. of the attention map of head (b, h): ``A = softmax(t_h * G / (|q| |k|^T))``.

        Sums the S partials of the Gram matrix and the norms BLOCK_S slices a load (a
        [BLOCK_S, rows, columns] tile summed over the slices in registers; one slice a load
        left every iteration waiting on the caches, S = 256 of them at a 512x512 input's first
        level) in a fixed order, so the result is deterministic; divides by the norms (each
        clamped at eps, as F.normalize does), scales by the temperature and takes the softmax
        over the C columns; A is fp32 (B*H, C, C).
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_CC)
        bh = tl.program_id(1)
        mask = (rows < C)[:, None] & (cols < C)[None, :]
        g = tl.zeros([BLOCK_R, BLOCK_CC], dtype=tl.float32)
        sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        sk = tl.zeros([BLOCK_CC], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            slices = s0 + tl.arange(0, BLOCK_S)
            part = bh.to(tl.int64) * S + slices
            ok = slices < S
            g += tl.sum(tl.load(G + part[:, None, None] * C * C + (rows[:, None] * C + cols[None, :])[None, :, :],
                                mask=ok[:, None, None] & mask[None, :, :], other=0.0), axis=0)
            sq += tl.sum(tl.load(SQ + part[:, None] * C + rows[None, :], mask=ok[:, None] & (rows < C)[None, :],
                                 other=0.0), axis=0)
            sk += tl.sum(tl.load(SK + part[:, None] * C + cols[None, :], mask=ok[:, None] & (cols < C)[None, :],
                                 other=0.0), axis=0)
        nq = tl.maximum(tl.sqrt(sq), eps)
        nk = tl.maximum(tl.sqrt(sk), eps)
        t = tl.load(T + bh % H)
        # padded columns drop out of the softmax; padded rows stay finite (g = 0) and are not stored
        logits = tl.where((cols < C)[None, :], g / nq[:, None] / nk[None, :] * t, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        tl.store(A + bh.to(tl.int64) * C * C + rows[:, None] * C + cols[None, :], p, mask=mask)

    @triton.jit
    def _apply_kernel(M, V, BIAS, RES, O, WV, BV, R, K, N, HG, width,
                      svb, svh, svk, svn, srb, srh, srr, srn, sob, soh, sor, son,
                      HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DWCONV: tl.constexpr,
                      HAS_DW_BIAS: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TAP_UNROLL: tl.constexpr = 1):
        """``O[g, r, n] = sum_k M[g, r, k] V[g, k, n] (+ bias[r]) (+ RES[g, r, n])`` for g = (b, h)
        of HG heads.

        M is fp32 (B*HG, R, K): the attention maps (R = K = C), or the folded ``W_o
        blockdiag(A)`` (HG = 1, R = C_out, K = H*C). Program (n block, r block, g) streams v
        once through [BLOCK_K, BLOCK_N] tiles (convolved on the fly with ``DWCONV``, channel
        h*K + k, ``_rows_tile``); M is rounded to v's dtype before the product,
        as the eager expression rounds the map, and accumulated in fp32; bias and residual are
        added in fp32 before the one store.
        """
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if WIDE:  # int64 pixel offsets only where an image's need them, as in ``_gram_kernel``
            cols = cols.to(tl.int64)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        g = tl.program_id(2)
        b = g // HG
        h = g % HG
        v_head = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        m_rows = M + g.to(tl.int64) * R * K + rows[:, None] * K
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        cols_inside = interior(tl.program_id(0) * BLOCK_N, BLOCK_N, N // width, width)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = tl.load(m_rows + ks[None, :], mask=(rows < R)[:, None] & (ks < K)[None, :], other=0.0)
            vt = _rows_tile(v_head + ks.to(tl.int64)[:, None] * svk, ks < K, cols, cols < N, svn, WV, BV, h * K + ks,
                            3 * HG * K, width, N, cols_inside & (k0 + BLOCK_K <= K), DWCONV, HAS_DW_BIAS, TAP_UNROLL)
            acc = tl.dot(m.to(vt.dtype), vt, acc, input_precision=PRECISION)
        out_mask = (rows < R)[:, None] & (cols < N)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + rows, mask=rows < R, other=0.0)[:, None]
        if HAS_RESIDUAL:
            res = RES + b.to(tl.int64) * srb + h.to(tl.int64) * srh + rows.to(tl.int64)[:, None] * srr + cols[None, :] * srn
            acc += tl.load(res, mask=out_mask, other=0.0).to(tl.float32)
        out = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * sor + cols[None, :] * son
        tl.store(out, acc.to(O.dtype.element_ty), mask=out_mask)


_GRAM_BLOCK_N = 64  # slices of N are multiples of this (and so of every BLOCK_N below)
_MIN_SLICE = 512  # pixels per slice of the Gram pass: bounds the partials at C*C*N/512 floats
_GRAM_WAVES = 2  # Gram programs per SM (of the widest channel block): the pass is latency-bound
_SOFTMAX_TILE = 4096  # partials the softmax kernel loads at once (32 fp32 registers a thread)


# (BLOCK_N, [BLOCK_K,] warps, stages), chosen to compile without register spills for sm_90a.
# Gram: BLOCK_C = 128 (C = 96, 176) with BLOCK_N = 64 spills ~600 bytes per thread, 32 does not.
# Apply: with the residual add, 128-wide tiles spill; 64 (R <= 128) and 32 (R = 256) do not,
# convolving or not.
_GRAM_CONFIGS = _triton.configs((32, 8, 3), (32, 8, 2), (32, 8, 1), (16, 4, 1)) if triton else []
_APPLY_CONFIGS = {False: _triton.configs((64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 1)),
                  True: _triton.configs((32, 32, 8, 2), (32, 16, 8, 1))} if triton else {}
# Convolving 16-bit v (R <= 128), the product may also take tiles whose stencil loop at the
# borders is unrolled (``TAP_UNROLL``, ``_triton.dwconv3x3``; in fp32 they spill).
_APPLY_UNROLLED = _triton.configs((64, 16, 8, 2), (32, 32, 8, 2), TAP_UNROLL=9) if triton else []
# The Gram pass that convolves q and k on the fly (``dw``) picks its channel block too, on a GPU
# by the autotuner (the first without autotuning): every program convolves BLOCK_C rows of q and
# of k, so for C = 96 a 64-row block convolves each row twice (and 32 padding rows), a 128-row
# one once, with one program a slice. Inside the image the stencil runs its 9 taps unrolled and
# unmasked (``_triton.dwconv3x3``); at the borders its masked loop waits on the caches tap after
# tap, where the unrolled tiles issue the loads of 3 or 9 taps together. (BLOCK_C, BLOCK_N, warps,
# stages) per layout (NCHW: True); for sm_90a in 16 bits 144 to 255 registers a thread, spill-free
# but NCHW's 128-row tile (8 bytes in fp16, 36 in bf16; 128-row tiles with the border loop rolled
# spill more); in fp32 the 128-row ones spill and are not offered (``_dw_gram_configs``), and the
# 64 x 64 tile spills 16 bytes (``benchmarks/results/kernel_resources.md``).
def _dw_gram_tiles(*shapes, **meta) -> list:
    return _triton.configs(*shapes, names=("BLOCK_C", "BLOCK_N"), **meta)


_DW_GRAM_CONFIGS = {
    True: _dw_gram_tiles((64, 16, 8, 2), (64, 64, 8, 2)) + _dw_gram_tiles((64, 16, 8, 2), (128, 16, 8, 2), TAP_UNROLL=9),
    False: _dw_gram_tiles((64, 16, 8, 2), (64, 64, 8, 2)) + _dw_gram_tiles((64, 16, 8, 2), (128, 16, 8, 2), TAP_UNROLL=3),
} if triton else {}
# The interpreter (CPU tensors) runs programs one by one: large tiles, few programs.
_INTERPRETER_GRAM, _INTERPRETER_APPLY = (_triton.configs((64, 4, 1)), _triton.configs((128, 32, 4, 1))) if triton else ([], [])
_INTERPRETER_DW_GRAM = _dw_gram_tiles((64, 64, 4, 1)) if triton else []


def _dw_gram_configs(nchw: bool, fp32: bool) -> list:
    """The convolving Gram pass's tiles for a layout and whether q is fp32."""
    return [c for c in _DW_GRAM_CONFIGS[nchw] if not (fp32 and c.kwargs["BLOCK_C"] > 64)]


def _apply_configs(block_r: int, dwconv: bool, fp32: bool) -> list:
    """The product's tiles for a channel block, whether it convolves v and v's dtype."""
    return _APPLY_CONFIGS[block_r > 128] + (_APPLY_UNROLLED if dwconv and block_r <= 128 and not fp32 else [])


if triton is not None:  # on a GPU, the convolving Gram pass and the product are autotuned per shape
    _dw_gram_tuned = _triton.autotune(_gram_kernel, [c for group in _DW_GRAM_CONFIGS.values() for c in group],
                                      ["C", "N", "H", "sqn", "WIDE"],
                                      lambda nargs, kw: _dw_gram_configs(nargs["sqn"] == 1,
                                                                         nargs["Q"].dtype == torch.float32))
    _apply_tuned = _triton.autotune(_apply_kernel, _APPLY_CONFIGS[False] + _APPLY_CONFIGS[True] + _APPLY_UNROLLED,
                                    ["R", "K", "N", "HG", "DWCONV", "svn", "WIDE"],
                                    lambda nargs, kw: _apply_configs(kw["BLOCK_R"], kw["DWCONV"],
                                                                     nargs["V"].dtype == torch.float32))


def _block(n: int, cap: int) -> int:
    """Power-of-two tile >= 16 (tl.dot's minimum) covering n, at most cap."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def _attention_maps(q: torch.Tensor, k: torch.Tensor, t32: torch.Tensor, dw: Optional[tuple]) -> torch.Tensor:
    """A (B*H, C, C) fp32: the softmax of the scaled cosine similarities of q's and k's rows
    (convolved first with ``dw = (q's, k's, v's weights as (9, H*C) column blocks of one
    tap-major (9, 3*H*C), biases (3, H*C) or None, width)``)."""
    b, h, c, n = q.shape
    # Slices of N: enough programs for _GRAM_WAVES per SM (counting the channel tiles of one
    # slice, with dw those of the widest channel block), each slice >= _MIN_SLICE pixels.
    block_c = _block(c, 128)
    tiles = triton.cdiv(c, block_c)
    slices = max(1, min(triton.cdiv(_GRAM_WAVES * _triton.sm_count(q.device), tiles * tiles * b * h),
                        n // _MIN_SLICE))
    per_split = triton.cdiv(triton.cdiv(n, slices), _GRAM_BLOCK_N) * _GRAM_BLOCK_N
    slices = max(1, triton.cdiv(n, per_split))
    f32 = dict(device=q.device, dtype=torch.float32)
    g = torch.empty((b * h, slices, c, c), **f32)
    sq = torch.empty((b * h, slices, c), **f32)
    sk = torch.empty_like(sq)
    w, bias, width = dw or (g, None, 1)
    bias = bias if bias is not None else w
    args = (q, k, g, sq, sk, w[0], w[1 if dw else 0], bias[0], bias[1 if dw else 0], c, n, per_split, h, width,
            *q.stride(), *k.stride())
    flags = dict(DWCONV=dw is not None, HAS_DW_BIAS=dw is not None and dw[1] is not None,
                 WIDE=_layout.wide(q, k), PRECISION=_triton.precision(q.dtype))
    if dw is None:
        _triton.launch_fitting(_gram_kernel, (block_c, q.dtype, False, q.is_cuda, flags["WIDE"]),
                               _GRAM_CONFIGS if q.is_cuda else _INTERPRETER_GRAM,
                               lambda meta: (tiles * tiles, slices, b * h), *args, **flags, BLOCK_C=block_c)
    else:
        nchw = q.stride(3) == 1
        _triton.launch_tuned(_gram_kernel, _dw_gram_tuned, (q.dtype, True, q.is_cuda, nchw, flags["WIDE"]),
                             _dw_gram_configs(nchw, q.dtype == torch.float32) if q.is_cuda else _INTERPRETER_DW_GRAM,
                             lambda meta: (triton.cdiv(c, meta["BLOCK_C"]) ** 2, slices, b * h), *args, **flags)
    a = torch.empty((b * h, c, c), **f32)
    block_cc = max(16, triton.next_power_of_2(c))
    block_r = max(1, min(4, 4096 // block_cc))  # few rows a program: many programs sum the partials
    block_s = _triton.per_load(_SOFTMAX_TILE, block_r * block_cc, slices)
    _triton.launch(_softmax_kernel, (triton.cdiv(c, block_r), b * h), g, sq, sk, t32, a, c, slices, h, EPS,
                   BLOCK_S=block_s, BLOCK_R=block_r, BLOCK_CC=block_cc)
    return a


def _apply(m: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
           out: torch.Tensor, dw: Optional[tuple]) -> None:
    """out (B, HG, R, N) = m (B*HG, R, K) @ v (B, HG, K, N) (+ bias (R,)) (+ residual (B, HG, R, N));
    any strides of v, residual, out; v convolved first with ``dw`` (see ``_attention_maps``)."""
    b, hg, r, n = out.shape
    kk = v.shape[2]
    block_r = _block(r, 256)
    res = residual if residual is not None else out
    w, dw_bias, width = dw or (m, None, 1)
    wide = _layout.wide(v, residual, out)
    _triton.launch_tuned(_apply_kernel, _apply_tuned, (block_r, v.dtype, bias is not None, residual is not None,
                                                       dw is not None, v.is_cuda, v.stride(3) == 1, wide),
                         _apply_configs(block_r, dw is not None, v.dtype == torch.float32) if v.is_cuda
                         else _INTERPRETER_APPLY,
                         lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(r, block_r), b * hg),
                         m, v, bias if bias is not None else m, res, out, w[2 if dw else 0],
                         dw_bias[2] if dw_bias is not None else m, r, kk, n, hg, width, *v.stride(), *res.stride(),
                         *out.stride(), HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                         DWCONV=dw is not None, HAS_DW_BIAS=dw_bias is not None, WIDE=wide, BLOCK_R=block_r,
                         PRECISION=_triton.precision(v.dtype))


def _output_shape(q: torch.Tensor, proj_weight: Optional[torch.Tensor]):
    b, h, c, n = q.shape
    return (b, h, c, n) if proj_weight is None else (b, proj_weight.shape[0], n)


def _empty_output(q: torch.Tensor, v: torch.Tensor, proj_weight: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The uninitialised output, dense in v's layout: channels innermost where v's are (the
    channel chunks of a channels-last qkv image, so that the block's output stays NHWC), else
    pixels innermost."""
    shape, dtype = _output_shape(q, proj_weight), result_dtype(v, residual)
    if not (v.shape[2] > 1 and v.shape[3] > 1 and v.stride(2) == 1):
        return v.new_empty(shape, dtype=dtype)
    if proj_weight is None:  # (B, H, C, N) stored as (B, N, H, C)
        b, h, c, n = shape
        return v.new_empty((b, n, h, c), dtype=dtype).permute(0, 2, 3, 1)
    b, c_out, n = shape  # (B, C_out, N) stored as (B, N, C_out)
    return v.new_empty((b, n, c_out), dtype=dtype).transpose(1, 2)


def projected_maps(proj_weight: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``project_out`` times the block-diagonal attention maps, one matrix per image: W_o
    (C_out, H*C) and maps A (B, H, C, C) -> M (B, C_out, H*C), column block h of M[b] being
    W_o[:, h] A[b, h], so that ``project_out(A v) = M v``; contiguous (``_apply_kernel`` reads
    it so; einsum's result is transposed for one head and several images), in the maps' dtype
    (fp32 or wider, not autocast's)."""
    b, h, c, _ = maps.shape
    with torch.autocast(maps.device.type, enabled=False):
        w = proj_weight.to(maps.dtype).reshape(-1, h, c)
        return torch.einsum("ohi,bhij->bohj", w, maps).reshape(b, -1, h * c).contiguous()


@torch.library.custom_op("sipl_fast::channel_attention_triton", mutates_args=())
def channel_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                             proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                             residual: Optional[torch.Tensor] = None, dw_weight: Optional[torch.Tensor] = None,
                             dw_bias: Optional[torch.Tensor] = None, width: int = 0) -> torch.Tensor:
    """Triton forward: (B, H, C, N), or (B, C_out, N) with ``project_out`` folded in; dense in v's
    layout (``_empty_output``)."""
    b, h, c, n = q.shape
    out = _empty_output(q, v, proj_weight, residual)
    if out.numel() == 0:
        return out
    dw = None
    if dw_weight is not None:
        dw = (_layout.tap_major(dw_weight).chunk(3, dim=1),
              None if dw_bias is None else dw_bias.float().reshape(3, h * c).contiguous(), width)
    a = _attention_maps(q, k, temperature.float().reshape(-1).contiguous(), dw)
    if proj_weight is None:
        _apply(a, v, None, residual, out, dw)
        return out
    m = projected_maps(proj_weight, a.view(b, h, c, c))
    bias = None if proj_bias is None else proj_bias.float().contiguous()
    _apply(m, v.reshape(b, 1, h * c, n), bias, None if residual is None else residual.unsqueeze(1), out.view(b, 1, -1, n),
           dw)
    return out


@channel_attention_triton.register_fake
def _(q, k, v, temperature, proj_weight=None, proj_bias=None, residual=None, dw_weight=None, dw_bias=None, width=0):
    return _empty_output(q, v, proj_weight, residual)


# ----------------------------------------------------------------------------- backend choice
BACKENDS = {
    "torch": Backend("torch", channel_attention_torch, lambda *a, **kw: None),
    "triton": Backend("triton", channel_attention_triton,
                      lambda q, *args: forward_only_problem("triton", q, *args[:-1], dots=True),  # args[-1]: width
                      automatic=lambda q, *a, **kw: q.is_cuda),
}
PREFERENCE = ("triton", "torch")  # not yet ranked by measurement on a GPU


def _check(q, k, v, temperature, proj_weight, proj_bias, residual, dw_weight, dw_bias, width) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"channel_attention: expected {name} as a floating-point (B, H, C, N) tensor, "
                             f"got {getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"channel_attention: expected q, k, v of one shape (B, H, C, N), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"channel_attention: expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, c, n = q.shape
    if h < 1 or c < 1:
        raise ValueError(f"channel_attention: expected at least one head and one channel a head, got q of shape "
                         f"{tuple(q.shape)}")
    if not isinstance(temperature, torch.Tensor) or temperature.shape not in ((h,), (h, 1, 1)):
        raise ValueError(f"channel_attention: expected temperature of shape ({h},) or ({h}, 1, 1), "
                         f"got {tuple(getattr(temperature, 'shape', ()))}")
    extra = [("temperature", temperature)]
    for name, t in (("proj_weight", proj_weight), ("proj_bias", proj_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"channel_attention: expected {name} as a tensor or None, got {type(t).__name__}")
    if proj_weight is not None:
        if proj_weight.dim() not in (2, 4) or proj_weight.shape[1] != h * c or proj_weight.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"channel_attention: expected proj_weight of shape (C_out, {h * c}) or "
                             f"(C_out, {h * c}, 1, 1), got {tuple(proj_weight.shape)}")
        if proj_bias is not None and proj_bias.shape != proj_weight.shape[:1]:
            raise ValueError(f"channel_attention: expected proj_bias of shape ({proj_weight.shape[0]},), "
                             f"got {tuple(proj_bias.shape)}")
        extra += [("proj_weight", proj_weight), ("proj_bias", proj_bias)]
    elif proj_bias is not None:
        raise ValueError("channel_attention: proj_bias needs proj_weight")
    if residual is not None:
        shape = _output_shape(q, proj_weight)
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != shape or not residual.is_floating_point():
            raise ValueError(f"channel_attention: expected a floating-point residual of the output's shape {shape}, "
                             f"got {getattr(residual, 'dtype', type(residual))} of shape "
                             f"{tuple(getattr(residual, 'shape', ()))}")
        extra.append(("residual", residual))
    if dw_weight is not None:
        if not isinstance(dw_weight, torch.Tensor) or tuple(dw_weight.shape) != (3 * h * c, 1, 3, 3):
            raise ValueError(f"channel_attention: expected dw_weight of shape ({3 * h * c}, 1, 3, 3) (q's, k's, v's "
                             f"channels), got {tuple(getattr(dw_weight, 'shape', ()))}")
        if dw_bias is not None and (not isinstance(dw_bias, torch.Tensor) or tuple(dw_bias.shape) != (3 * h * c,)):
            raise ValueError(f"channel_attention: expected dw_bias of shape ({3 * h * c},), "
                             f"got {tuple(getattr(dw_bias, 'shape', ()))}")
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1 or n % width or n < 1:
            raise ValueError(f"channel_attention: with dw_weight, width must be the image width, an integer dividing "
                             f"N = {n}, got {width!r}")
        extra += [("dw_weight", dw_weight), ("dw_bias", dw_bias)]
    elif dw_bias is not None or width != 0:
        raise ValueError(f"channel_attention: dw_bias and width (the image width) need dw_weight, got "
                         f"dw_bias {'None' if dw_bias is None else 'given'}, width {width!r}")
    check_real_floating("channel_attention", **{name: t for name, t in extra if name != "residual"})
    for name, x in [("k", k), ("v", v)] + extra:
        if x is not None and x.device != q.device:
            raise ValueError(f"channel_attention: {name} is on {x.device}, q on {q.device}")


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                      proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                      residual: Optional[torch.Tensor] = None, dw_weight: Optional[torch.Tensor] = None,
                      dw_bias: Optional[torch.Tensor] = None, width: int = 0,
                      backend: Optional[str] = None) -> torch.Tensor:
    """``softmax((normalize(q) @ normalize(k)^T) * t_h) @ v`` over the channels of each head.

    q, k, v (B, H, C, N), temperature (H,) or (H, 1, 1); returns (B, H, C, N). With
    ``proj_weight`` (C_out, H*C) or (C_out, H*C, 1, 1) and optional ``proj_bias`` (C_out,),
    returns ``project_out`` of the heads merged: (B, C_out, N). ``residual`` (the output's
    shape) is added to the result (the block's skip connection, in the same pass; the result's
    dtype is then promoted with the residual's, as ``+`` does). With ``dw_weight`` (3*H*C, 1,
    3, 3) (MDTA's ``qkv_dwconv``: q's channels, then k's, then v's), optional ``dw_bias``
    (3*H*C,) and the image ``width``, q, k, v are first convolved depthwise 3x3 (zero padding)
    as (B, H*C, N / width, width) images.
    ``backend``: None/"auto" (triton where it can run, else torch), "torch" or "triton".
    """
    _check(q, k, v, temperature, proj_weight, proj_bias, residual, dw_weight, dw_bias, width)
    args = (q, k, v, temperature, proj_weight, proj_bias, residual, dw_weight, dw_bias, int(width))
    return choose("channel_attention", BACKENDS, PREFERENCE, backend, *args).fn(*args)
