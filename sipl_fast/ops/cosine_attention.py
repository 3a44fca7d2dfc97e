"""Cosine attention: SIPL's Proxy Fusion cross-attention, fused.

``out = softmax((normalize(q) @ normalize(k)^T) * t_h) @ v`` with q (B, H, Nq, D),
k and v (B, H, Nk, D), a temperature per head t (H,) or (H, 1, 1), and
``normalize`` the L2 norm over D with ``F.normalize``'s rule ``x / max(|x|, 1e-12)``.
At a 2048x2048 input, stage 1 attends 1,048,576 query pixels to a 4,096-entry
dictionary: the published code materialises that score matrix several times.

Backends (first the reference):

- ``"torch"``: the published expression op by op, any float dtype, differentiable.
- ``"triton"``: the Triton kernels below; forward and backward (autograd), fp32,
  fp16, bf16 with fp32 accumulation (fp32 inputs: cosines in fp64, so the error is
  about that of the inputs' own rounding), D a multiple of 8 up to 512. No Nq x Nk
  matrix is ever stored: memory is linear in Nq + Nk. With ``TRITON_INTERPRET=1``
  it also runs on CPU tensors when asked for explicitly (tests), except bf16,
  whose dots the interpreter gets wrong.
- ``"cuda"``: the CUDA C++ forward ``kernels/cosine_attention.cu`` (through the
  compiled extension or CuPy), inference only.
- ``"sdpa"``: PyTorch's fused attention (flash, cuDNN or memory-efficient: never its
  math fallback, which would store the scores) on ``normalize(q) * t_h`` and
  ``normalize(k)``, differentiable. Not ours, but where it is faster (bf16 at D = 96 on
  Hopper) FastSIPL's measured choice takes it; the automatic choice takes it on a GPU only
  after the kernels above, and never on a CPU (the reference stays the reference).

Each fast backend is a ``torch.library`` custom op with a fake implementation,
so it traces under ``torch.compile`` without graph breaks, and launches without
host syncs or host-side allocations outside PyTorch's allocator, so it can be
captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _triton
from ._backend import KERNEL_DTYPES, Backend, check_real_floating, choose, cuda_problem, needs_grad

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None

EPS = 1e-12  # F.normalize's default
MAX_D = 512

# Forward tiles by head dim: the fp32 accumulator is BLOCK_M x D registers, so large D takes
# fewer rows; fp32 operands take twice the shared memory. On a GPU the autotuner picks among
# these (per D and dtype, at the first call, all compiled at once in threads;
# SIPL_FAST_TRITON_AUTOTUNE=0 skips it and takes the first, as the interpreter does).
# Compiled for sm_90a, BLOCK_M = 128 with 4 warps spills hundreds of bytes of registers per
# thread: those tiles take 8 warps. The first tile of each list (the one taken without
# autotuning) spills nothing at D = 96 and 384 (Triton 3.6 and 3.8).
def _configs(block_m, *shapes):
    return [triton.Config(dict(BLOCK_M=block_m, BLOCK_N=bn), num_warps=w, num_stages=s) for bn, w, s in shapes]


_FWD_CONFIGS = {
    (False, False): _configs(128, (64, 8, 3), (128, 8, 3), (128, 8, 2), (64, 8, 4), (32, 8, 3))
    + _configs(64, (64, 4, 3)),  # 16-bit, D <= 128
    (False, True): _configs(64, (32, 8, 2), (64, 8, 2), (32, 8, 1), (16, 4, 3))
    + _configs(32, (32, 4, 1)),  # 16-bit, D > 128
    (True, False): _configs(64, (32, 8, 2), (32, 8, 1)) + _configs(32, (32, 4, 1), (32, 4, 2)),  # fp32, D <= 128
    (True, True): _configs(16, (16, 4, 1), (32, 8, 1), (32, 4, 1)) + _configs(32, (16, 8, 1)),  # fp32, D > 128
} if triton else {}
# Backward tiles (BLOCK_M, BLOCK_N, warps, stages) of the dk/dv and the dq kernel: four BLOCK x D
# operands and two fp32 accumulators per program, D in the forward's two column blocks (96 =
# 64 + 32, 384 = 256 + 128: no padding). The first of each list is the default (no autotuning);
# on a GPU the autotuner picks among them, as for the forward. For 16-bit D <= 128 the lists mix
# tiles whose dots compile to Hopper's warpgroup MMA (the dk/dv kernel's dots have BLOCK_N rows,
# the dq kernel's BLOCK_M: 64 or more) and tiles with the older mma.sync (fewer rows, fewer
# registers). For sm_90a, every tile spills nothing, but the 16-bit (32, 32) dk/dv tile at
# D = 384 (16 bytes per thread).
_BWD_CONFIGS = {
    (False, False): ([(64, 64, 8, 2), (32, 32, 8, 2), (16, 128, 8, 2), (64, 16, 8, 2)],
                     [(32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                      (128, 16, 8, 2)]),
    (False, True): ([(32, 32, 8, 1), (16, 16, 4, 1)], [(32, 32, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)]),
    (True, False): ([(16, 32, 4, 1), (16, 16, 4, 1), (32, 32, 4, 1)], [(16, 16, 4, 1), (16, 32, 4, 1), (32, 32, 4, 1)]),
    (True, True): ([(16, 16, 4, 1)],) * 2,
}


# Whole-D fp32 operands of the forward's dot products spilled every fp32 tile on sm_90a (1.7-5.7 KB
# per thread at D = 96, 27-53 KB at D = 384: local memory the driver reserves for every resident
# thread). In fp32 the dot products instead sum over D in slices of this width, loaded in the key
# loop (and taken in fp64: ``_attend_block``).
_FP32_CHUNK = 32


def _bwd_configs_for(d: int, dtype: torch.dtype, which: int):
    """triton.Config list of the dk/dv (which=0) or dq (which=1) kernel."""
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)
            for bm, bn, w, st in _BWD_CONFIGS[dtype == torch.float32, d > 128][which]]


def _fwd_configs_for(d: int, dtype: torch.dtype):
    return _FWD_CONFIGS[dtype == torch.float32, d > 128]


def cosine_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Reference: the published expression, op by op, in the inputs' dtype (also MDTA's)."""
    t = temperature.reshape(-1, 1, 1)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    # a temperature in a wider dtype promotes the map (as under autocast, which then casts it
    # for the product with v; cast here too, so that it also runs without autocast)
    return ((q @ k.transpose(-2, -1)) * t).softmax(dim=-1).to(v.dtype) @ v


#: PyTorch's fused attention kernels that ``"sdpa"`` may use (not the math fallback).
_SDPA_KERNELS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def cosine_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(normalize(q) * t_h, normalize(k), v, scale=1)``. The
    norms are reduced in fp32 and each row is multiplied by ``t_h / max(|x|, eps)`` in fp32,
    rounded once to the inputs' dtype on store (no fp32 copy of q unless autograd records);
    the fused kernels need a unit stride along D and 16-byte aligned rows, so v is copied where
    it lacks them (q and k are fresh, D a multiple of 8)."""
    def scaled(x, t):
        factor = t / torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(EPS)
        if needs_grad(x, factor):
            return (x * factor).to(x.dtype).contiguous()
        return torch.mul(x, factor, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))

    if v.stride(-1) != 1 or any(n % 8 for n in (v.storage_offset(), *v.stride()[:-1])):
        v = v.clone(memory_format=torch.contiguous_format)
    with sdpa_kernel(list(_SDPA_KERNELS)):
        return F.scaled_dot_product_attention(scaled(q, temperature.reshape(1, -1, 1, 1).float()), scaled(k, 1.0), v,
                                              scale=1.0)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _program_head(T, H):
        """(bh, b, h, t_h) of this program: axis 1 runs over b * H + h; b is int64 for offsets."""
        bh = tl.program_id(1)
        h = bh % H
        return bh, (bh // H).to(tl.int64), h, tl.load(T + h).to(tl.float32)

    @triton.jit
    def _logit_scale(t):
        """(t log2 e, sign(t)): the logits c t in exp2 units are c t2; sign(t) orients the cosines
        (u = c sign(t) grows with the logit)."""
        t2 = t * 1.4426950408889634
        return t2, tl.where(t2 > 0, 1.0, tl.where(t2 < 0, -1.0, 0.0))

    @triton.jit
    def _load_cols(X, rows, ok, sn, sd, D, DA: tl.constexpr, DB: tl.constexpr):
        """Rows ``rows`` of the (N, D) matrix at X as the column blocks [rows, DA] and
        [rows, DB] (``_column_blocks``; zeros where not ``ok`` or past D); with DB = 0 the
        second is the first again (unused)."""
        x = X + rows.to(tl.int64)[:, None] * sn
        da = tl.arange(0, DA)
        x_a = tl.load(x + da[None, :] * sd, mask=ok[:, None] & (da < D)[None, :], other=0.0)
        if DB > 0:
            x_b = tl.load(x + (DA + tl.arange(0, DB))[None, :] * sd, mask=ok[:, None], other=0.0)
        else:
            x_b = x_a
        return x_a, x_b

    @triton.jit
    def _store_cols(X, rows, ok, sn, sd, D, x_a, x_b, DA: tl.constexpr, DB: tl.constexpr):
        """Store the column blocks x_a, x_b (as from ``_load_cols``) to rows ``rows`` of the
        (N, D) matrix at X, in X's dtype."""
        x = X + rows.to(tl.int64)[:, None] * sn
        da = tl.arange(0, DA)
        tl.store(x + da[None, :] * sd, x_a.to(X.dtype.element_ty), mask=ok[:, None] & (da < D)[None, :])
        if DB > 0:
            tl.store(x + (DA + tl.arange(0, DB))[None, :] * sd, x_b.to(X.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _dot_d(a_a, a_b, b_a, b_b, PRECISION: tl.constexpr, DB: tl.constexpr):
        """a @ b^T over D for a and b in column blocks: [rows of a, rows of b] fp32."""
        c = tl.dot(a_a, tl.trans(b_a), input_precision=PRECISION)
        if DB > 0:
            c = tl.dot(a_b, tl.trans(b_b), c, input_precision=PRECISION)
        return c

    @triton.jit
    def _inverse_norms_kernel(X, COPY, NORMED, R, N, D, H, sxb, sxh, sxn, sxd, eps, COPIES: tl.constexpr,
                              NORMALISES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """R[bh, n] = 1 / max(|X[b, h, n, :]|, eps), computed in R's dtype (fp64 for fp32 X,
        else fp32), for a block of BLOCK_N rows; COPIES: also COPY[bh, n, :] = X[b, h, n, :]
        (contiguous, the values unchanged); NORMALISES: also NORMED[bh, n, :] = X[b, h, n, :] r
        rounded to X's dtype (contiguous). The forward and the backward take their inverse
        norms from this one kernel, so they scale the same dot products by the same factors."""
        bh = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        base = X + (bh // H).to(tl.int64) * sxb + (bh % H).to(tl.int64) * sxh + rows.to(tl.int64)[:, None] * sxn
        out = COPY + (bh.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D
        total = tl.zeros([BLOCK_N], dtype=R.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = (rows[:, None] < N) & (cols[None, :] < D)
            x = tl.load(base + cols[None, :] * sxd, mask=mask, other=0.0)
            if COPIES:
                tl.store(out + cols[None, :], x, mask=mask)
            x = x.to(R.dtype.element_ty)
            total += tl.sum(x * x, axis=1)
        r = 1.0 / tl.maximum(tl.sqrt(total), eps)
        tl.store(R + bh.to(tl.int64) * N + rows, r, mask=rows < N)
        if NORMALISES:
            normed = NORMED + (bh.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                mask = (rows[:, None] < N) & (cols[None, :] < D)
                x = tl.load(base + cols[None, :] * sxd, mask=mask, other=0.0)
                tl.store(normed + cols[None, :], (x.to(R.dtype.element_ty) * r[:, None]).to(NORMED.dtype.element_ty),
                         mask=mask)

    @triton.jit
    def _fp64_slice(acc, a_rows, a_ok, sad, b_rows, b_ok, sbd, dc, D):
        """acc + a @ b^T over the columns ``dc`` (a slice of D) in fp64, for fp32 a, b given as row
        pointers [rows, 1] (column strides sad, sbd) and row masks [rows, 1]: exact products."""
        a = tl.load(a_rows + dc[None, :] * sad, mask=a_ok & (dc < D)[None, :], other=0.0)
        b = tl.load(b_rows + dc[None, :] * sbd, mask=b_ok & (dc < D)[None, :], other=0.0)
        return tl.dot(a.to(tl.float64), tl.trans(b.to(tl.float64)), acc, input_precision="ieee", out_dtype=tl.float64)

    @triton.jit
    def _fp64_dots(a_rows, a_ok, sad, b_rows, b_ok, sbd, D, CHUNK: tl.constexpr):
        """a @ b^T in fp64 (``_fp64_slice``), summed over D in CHUNK-wide slices loaded here
        (whole-D operands in registers spilled on sm_90a; the tensor cores take fp64 there)."""
        s = tl.zeros([a_rows.shape[0], b_rows.shape[0]], dtype=tl.float64)
        for c0 in tl.range(0, D, CHUNK, loop_unroll_factor=1):
            s = _fp64_slice(s, a_rows, a_ok, sad, b_rows, b_ok, sbd, c0 + tl.arange(0, CHUNK), D)
        return s

    @triton.jit
    def _backward_dots(q_a, q_b, q, q_ok, k_a, k_b, k, k_ok, do_a, do_b, do, sdo, v_a, v_b, v, sv,
                       PRECISION: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr, DB: tl.constexpr):
        """The backward's two products over D: q @ k^T (the raw dots behind the cosines) and
        dO @ v^T (dp), [rows of q, rows of k] each; the dk/dv kernel passes keys as q and
        queries as k (both products transposed). 16-bit: from the rows' column blocks in
        registers (x_a, x_b; ``_dot_d``). fp32: in fp64, from the row pointers q, k (contiguous
        rows), do and v (column strides sdo, sv) [rows, 1] with their masks q_ok (do's too),
        k_ok (v's too) [rows, 1], in CHUNK-wide slices, both products in one loop (two loops
        spilled every register of the dk/dv kernel at D = 384 for sm_90a): the cosines as the
        forward's, and dp exact enough that ds = p (dp - delta) cancels where a softmax is
        one-hot."""
        if q.dtype.element_ty == tl.float32:  # decided at compile time: one branch, one return type
            s = tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float64)
            dp = tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float64)
            for c0 in tl.range(0, D, CHUNK, loop_unroll_factor=1):
                dc = c0 + tl.arange(0, CHUNK)
                s = _fp64_slice(s, q, q_ok, 1, k, k_ok, 1, dc, D)
                dp = _fp64_slice(dp, do, q_ok, sdo, v, k_ok, sv, dc, D)
        else:
            s = _dot_d(q_a, q_b, k_a, k_b, PRECISION, DB)
            dp = _dot_d(do_a, do_b, v_a, v_b, PRECISION, DB)
        return s, dp

    @triton.jit
    def _cosines(s, r_rows, r_cols):
        """Cosines from raw dot products s [rows, cols] and the inverse norms of the rows'
        and the columns' vectors: (s r_cols) r_rows, in that order in every kernel (the
        forward's key loop inlines it), so that the backward recomputes the forward's
        values exactly (multiplication commutes)."""
        return (s * r_cols[None, :]) * r_rows[:, None]

    @triton.jit
    def _attend_block(q_a, q_b, rq, Kb, RKb, Vb, t2, sgn, cols, hi, acc_a, acc_b, l_i, m_i, sqd, svn, svd,
                      FIXED: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, CHUNK: tl.constexpr,
                      P_TOP: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
        """One key block of ``_fwd_kernel``: keys ``cols`` (masked against ``hi`` if MASKED).

        CHUNK > 0 (fp32): q_a points to q's rows [BLOCK_M, 1] (q_b is their mask), and the
        dot products sum over D in CHUNK-wide slices (``_fp64_dots``).

        The dot products s = q @ k^T are of the raw vectors; the normalisation is the
        factors rq (queries) and rk (keys), applied in fp32 (``_cosines``): normalised
        vectors rounded to 16 bits would put their rounding (2^-11 of each cosine in fp16,
        2^-8 in bf16) in every logit, times |t|. fp32 inputs take the products, the inverse
        norms and the cosines in fp64, rounded to fp32 once in the shifted logit: in fp32
        each operation's rounding (~1e-7 of the cosine, times |t| = 50) was 5x the error that
        the inputs' own rounding leaves.

        The shifted logits c t2 - m are formed as (c - m / t2) t2, m / t2 in cosine units:
        near the top the difference is exact, where c t2 rounded at |t2| would lose the
        low digits (about 1e-5 of p at |t| = 200 in fp32). Where p is rounded to 16 bits
        for the product (16-bit v), the fixed shift is instead (s rk) (rq t2) + (P_TOP -
        sign(t) t2), a multiply and a fused multiply-add a score: its error (a few 1e-6 of
        p) is far below that rounding, and the softmax's elementwise work is what the
        tensor cores wait for at D = 96 (sm_90a SASS).

        l sums the weights as rounded for the product, so that they sum to exactly 1: with
        few keys, normalising by the fp32 sum instead leaves p's rounding in the output
        (3x the naive fp16 error at Nk = 1).
        """
        da = tl.arange(0, DA)
        db = DA + tl.arange(0, DB if DB > 0 else 16)
        k_ptrs = Kb + cols.to(tl.int64)[:, None] * D
        v_ptrs = Vb + cols.to(tl.int64)[:, None] * svn
        if MASKED:
            rk = tl.load(RKb + cols, mask=cols < hi, other=0.0)
        else:
            rk = tl.load(RKb + cols)
        if CHUNK > 0:  # fp32: the dot products in fp64
            s = _fp64_dots(q_a, q_b, sqd, k_ptrs, (cols < hi)[:, None], 1, D, CHUNK)
        else:
            if MASKED or DA > D:
                k_a = tl.load(k_ptrs + da[None, :], mask=(cols < hi)[:, None] & (da < D)[None, :], other=0.0)
            else:
                k_a = tl.load(k_ptrs + da[None, :])
            s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        if DB > 0 and CHUNK == 0:
            if MASKED:
                k_b = tl.load(k_ptrs + db[None, :], mask=(cols < hi)[:, None], other=0.0)
            else:
                k_b = tl.load(k_ptrs + db[None, :])
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
        w = s * rk[None, :]  # times rq: the cosines (``_cosines``)
        if FIXED:  # the shift: the largest logit there can be, |t2| (cosine sign(t)), less P_TOP
            if Vb.dtype.element_ty == tl.float32:
                p = tl.math.exp2(((w * rq[:, None] - sgn) * t2).to(tl.float32) + P_TOP)
            else:  # p is rounded to 16 bits for p @ v: a multiply and a fused multiply-add a score
                p = tl.math.exp2(w * (rq * t2)[:, None] + (P_TOP - sgn * t2))
            if MASKED:
                p = tl.where((cols < hi)[None, :], p, 0.0)
        else:  # m_i: the running maximum of the cosines times sign(t) (sign flips are exact)
            u = w * (rq * sgn)[:, None]
            if MASKED:
                u = tl.where((cols < hi)[None, :], u, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(u, axis=1).to(tl.float32))
            at2 = t2 * sgn
            alpha = tl.math.exp2((m_i - m_new) * at2)
            if Vb.dtype.element_ty == tl.float32:
                p = tl.math.exp2(((u - m_new[:, None]) * at2).to(tl.float32))
            else:  # as above: one fused multiply-add a score
                p = tl.math.exp2(u * at2 - (m_new * at2)[:, None])
            l_i = l_i * alpha
            acc_a = acc_a * alpha[:, None]
            if DB > 0:
                acc_b = acc_b * alpha[:, None]
            m_i = m_new
        p = p.to(Vb.dtype.element_ty)
        l_i += tl.sum(p.to(tl.float32), axis=1)  # the rounded weights: they sum to exactly 1
        if MASKED or DA > D:
            v_a = tl.load(v_ptrs + da[None, :] * svd, mask=(cols < hi)[:, None] & (da < D)[None, :], other=0.0)
        else:
            v_a = tl.load(v_ptrs + da[None, :] * svd)
        acc_a = tl.dot(p, v_a, acc_a, input_precision=PRECISION)
        if DB > 0:
            if MASKED:
                v_b = tl.load(v_ptrs + db[None, :] * svd, mask=(cols < hi)[:, None], other=0.0)
            else:
                v_b = tl.load(v_ptrs + db[None, :] * svd)
            acc_b = tl.dot(p, v_b, acc_b, input_precision=PRECISION)
        return acc_a, acc_b, l_i, m_i

    @triton.jit
    def _attend(q_a, q_b, rq, Kb, RKb, Vb, t2, sgn, lo, hi, sqd, svn, svd, FIXED: tl.constexpr,
                PRECISION: tl.constexpr, CHUNK: tl.constexpr, P_TOP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
        """The key loop of ``_fwd_kernel`` over keys lo..hi: (acc_a, acc_b, l, m) with
        p = exp2((u - m) |t2|) for u = c sign(t), the cosines signed so that the logits
        c t2 = u |t2| grow with u, and m in the same units.

        Whole blocks run without masks; a last partial block, if any, with them.
        FIXED: m = 1 throughout (the bounded-logit shift; in fp16 p is lifted by
        2^P_TOP while it is rounded for the p @ v product); else the online softmax's
        running max.
        """
        acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        whole = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for start in range(lo, whole, BLOCK_N):
            acc_a, acc_b, l_i, m_i = _attend_block(q_a, q_b, rq, Kb, RKb, Vb, t2, sgn, start + tl.arange(0, BLOCK_N),
                                                   hi, acc_a, acc_b, l_i, m_i, sqd, svn, svd, FIXED, False, PRECISION,
                                                   CHUNK, P_TOP, D, DA, DB)
        if whole < hi:
            acc_a, acc_b, l_i, m_i = _attend_block(q_a, q_b, rq, Kb, RKb, Vb, t2, sgn, whole + tl.arange(0, BLOCK_N),
                                                   hi, acc_a, acc_b, l_i, m_i, sqd, svn, svd, FIXED, True, PRECISION,
                                                   CHUNK, P_TOP, D, DA, DB)
        if FIXED:
            if P_TOP > 0:  # drop the lift: acc and l as if p = exp2((u - 1) |t2|)
                acc_a = acc_a * tl.math.exp2(-P_TOP)
                acc_b = acc_b * tl.math.exp2(-P_TOP)
                l_i = l_i * tl.math.exp2(-P_TOP)
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        return acc_a, acc_b, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, T, RQ, RK, O, LSE, PO, PL, PM,
                    Nq, Nk, H, keys_per_split,
                    sqb, sqh, sqn, sqd, svb, svh, svn, svd, sob, soh, son, sod,
                    P_RANGE: tl.constexpr, P_TOP: tl.constexpr, PRECISION: tl.constexpr,
                    CHUNK: tl.constexpr, SPLIT: tl.constexpr,
                    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: BLOCK_M queries of one (b, h) against one split of the keys.

        D is covered by two power-of-two column blocks DA + DB (96 = 64 + 32,
        384 = 256 + 128), so no tensor-core work is wasted on padding; other D
        pad DA with masked columns and have DB = 0.

        q and k enter the dot products as they are (k as a contiguous copy, ``K``), and
        the inverse norms ``RQ`` and ``RK`` (``_inverse_norms_kernel``) turn a key block's
        products into cosines c in fp32 (``_cosines``; the backward recomputes them from
        the same operands and factors); the logits in exp2 units are s = c t log2 e. Then
        p = exp2(s - m), rounded to v's dtype, and acc += p @ v, l += rowsum(p). The
        logits are cosines times t, so they lie in [-|t|, |t|] and the shift
        m = |t| log2 e - P_TOP is fixed: no running max and no rescaling of acc. That is
        exact unless exp2(-2 |t| log2 e) would leave the range where p and its products
        with v stay normal (``P_RANGE`` octaves; fp16 also lifts p by 2^P_TOP): then this
        program runs the usual online softmax instead.
        The choice reads t on the device, so no host sync is needed. In fp32 (CHUNK > 0)
        the dot products sum over D in slices of q and k loaded in the key loop, in fp64.

        With SPLIT, programs along axis 2 take consecutive key ranges and write
        un-normalised (acc, l, m) in fp32 to PO/PL/PM for ``_combine_kernel``;
        otherwise they write O = acc / l (at O's strides) and LSE (2, B*H, Nq):
        the rows' m and log2 l, so that p = exp2((c sign(t) - m) |t| log2 e - log2 l)
        is the softmax; kept apart, the shifted logits stay accurate in fp32 at any
        temperature (one log2-sum-exp at |t| log2 e would round at that size), and
        the backward forms its p as the forward did.
        """
        pid_m = tl.program_id(0)
        split = tl.program_id(2)
        bh, b, h, t = _program_head(T, H)
        t2, sgn = _logit_scale(t)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        row_offsets = bh.to(tl.int64) * Nq + rows
        rq = tl.load(RQ + row_offsets, mask=row_ok, other=0.0)
        Qb = Q + b * sqb + h.to(tl.int64) * sqh
        if CHUNK > 0:  # _attend_block loads q slice by slice
            q_a = Qb + rows.to(tl.int64)[:, None] * sqn
            q_b = row_ok[:, None]
        else:
            q_a, q_b = _load_cols(Qb, rows, row_ok, sqn, sqd, D, DA, DB)

        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, Nk)
        Kb = K + bh.to(tl.int64) * Nk * D
        RKb = RK + bh.to(tl.int64) * Nk
        Vb = V + b * svb + h.to(tl.int64) * svh
        if 2.0 * tl.abs(t2) <= P_RANGE:
            acc_a, acc_b, l_i, m_i = _attend(q_a, q_b, rq, Kb, RKb, Vb, t2, sgn, lo, hi, sqd, svn, svd,
                                             True, PRECISION, CHUNK, P_TOP, BLOCK_M, BLOCK_N, D, DA, DB)
        else:
            acc_a, acc_b, l_i, m_i = _attend(q_a, q_b, rq, Kb, RKb, Vb, t2, sgn, lo, hi, sqd, svn, svd,
                                             False, PRECISION, CHUNK, P_TOP, BLOCK_M, BLOCK_N, D, DA, DB)

        l_i = tl.where(row_ok, l_i, 1.0)  # rows past Nq: keep their unstored math finite
        if SPLIT:
            stat = split.to(tl.int64) * tl.num_programs(1) * Nq + row_offsets
            tl.store(PL + stat, l_i, mask=row_ok)
            tl.store(PM + stat, m_i, mask=row_ok)
            _store_cols(PO, stat, row_ok, D, 1, D, acc_a, acc_b, DA, DB)
        else:
            tl.store(LSE + row_offsets, m_i, mask=row_ok)
            tl.store(LSE + tl.num_programs(1).to(tl.int64) * Nq + row_offsets, tl.math.log2(l_i), mask=row_ok)
            inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)
            _store_cols(O + b * sob + h.to(tl.int64) * soh, rows, row_ok, son, sod, D,
                        acc_a * inv_l[:, None], acc_b * inv_l[:, None], DA, DB)


    @triton.jit
    def _combine_kernel(PO, PL, PM, T, O, LSE, Nq, D, H, SPLITS, sob, soh, son, sod,
                        BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Merge the key splits of ``_fwd_kernel`` for BLOCK_M rows and BLOCK_D columns (program
        (row block, b * H + h, column block)): with w_s = 2^((m_s - M) |t| log2 e) and M the
        largest m_s, O = sum_s w_s acc_s / sum_s w_s l_s; LSE as ``_fwd_kernel`` writes it
        (column block 0).

        The splits are read BLOCK_S at a time ([BLOCK_S, rows(, columns)] tiles summed over the
        splits in registers; one split a load left every iteration waiting on the caches, and
        few queries over many keys, e.g. 256 x 65536 at D = 384, make 66 splits and 8 programs)
        in a fixed order, so the result does not depend on scheduling.
        """
        bh = tl.program_id(1)
        BH = tl.num_programs(1)
        t2, sgn = _logit_scale(tl.load(T + bh % H).to(tl.float32))
        at2 = t2 * sgn
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        row_offsets = bh.to(tl.int64) * Nq + rows
        m = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        for s0 in range(0, SPLITS, BLOCK_S):
            splits = s0 + tl.arange(0, BLOCK_S)
            ok = (splits < SPLITS)[:, None] & row_ok[None, :]
            pm = tl.load(PM + splits.to(tl.int64)[:, None] * BH * Nq + row_offsets[None, :], mask=ok, other=0.0)
            m = tl.maximum(m, tl.max(tl.where(ok, pm, float("-inf")), axis=0))
        m = tl.where(row_ok, m, 0.0)
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            splits = s0 + tl.arange(0, BLOCK_S)
            ok = (splits < SPLITS)[:, None] & row_ok[None, :]
            stat = splits.to(tl.int64)[:, None] * BH * Nq + row_offsets[None, :]
            w = tl.where(ok, tl.math.exp2((tl.load(PM + stat, mask=ok, other=0.0) - m[None, :]) * at2), 0.0)
            l_sum += tl.sum(tl.load(PL + stat, mask=ok, other=0.0) * w, axis=0)
            po = tl.load(PO + stat[:, :, None] * D + cols[None, None, :], mask=ok[:, :, None] & (cols < D)[None, None, :],
                         other=0.0)
            acc += tl.sum(po * w[:, :, None], axis=0)
        l_sum = tl.where(row_ok, l_sum, 1.0)
        if tl.program_id(2) == 0:
            tl.store(LSE + row_offsets, m, mask=row_ok)
            tl.store(LSE + BH.to(tl.int64) * Nq + row_offsets, tl.math.log2(l_sum), mask=row_ok)
        Ob = O + (bh // H).to(tl.int64) * sob + (bh % H).to(tl.int64) * soh + rows.to(tl.int64)[:, None] * son
        tl.store(Ob + cols[None, :] * sod, (acc / l_sum[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < D)[None, :])

    @triton.jit
    def _unnormalize_grad(x_a, x_b, g_a, g_b, r, DB: tl.constexpr):
        """Gradient through ``x * r`` with r = 1 / max(|x|, eps), x and the gradient g in column
        blocks (fp32): (g - xn (xn . g)) r, or g r where the norm was clamped."""
        xn_a = x_a * r[:, None]
        squares = tl.sum(x_a * x_a, axis=1)
        radial = tl.sum(xn_a * g_a, axis=1)
        if DB > 0:
            xn_b = x_b * r[:, None]
            squares += tl.sum(x_b * x_b, axis=1)
            radial += tl.sum(xn_b * g_b, axis=1)
        radial = tl.where(tl.sqrt(squares) > 1e-12, radial, 0.0)
        out_a = (g_a - xn_a * radial[:, None]) * r[:, None]
        if DB > 0:
            out_b = (g_b - xn_b * radial[:, None]) * r[:, None]
        else:
            out_b = out_a
        return out_a, out_b

    @triton.jit
    def _dt_rows(sum_p, sum_pc, sum_pdp, sum_pdpc, row_ok):
        """Each row's share of dt from its sums of p, p c, p dp and p dp c (``_bwd_dq_kernel``)."""
        sum_p = tl.where(row_ok, sum_p, 1.0)
        return tl.where(row_ok, (sum_pdpc - sum_pdp * sum_pc / sum_p) / sum_p, 0.0)

    @triton.jit
    def _bwd_finish_kernel(P, X, R, OUT, STATS, DT, N, D, H, SPLITS, sxb, sxh, sxn, sxd,
                           UNNORMALISE: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """Sum the backward kernels' split partials P (SPLITS, B*H, N, D) fp32, in split order
        (deterministic), for BLOCK_N rows of one (b, h) into OUT (B, H, N, D) contiguous:
        UNNORMALISE maps the sum through the normalisation of X (B, H, N, D) with inverse norms
        R (B*H, N) first (dk, dq; dv is the plain sum); ROW_SUMS also sums the dq kernel's row
        sums STATS (SPLITS, 4, B*H, N) (fp64 for fp32 inputs) into the rows' dt shares DT (B*H, N).
        """
        bh = tl.program_id(1)
        bhn = tl.num_programs(1).to(tl.int64) * N
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        stats = bh.to(tl.int64) * N + rows
        total = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for s in range(0, SPLITS):
            total += _load_cols(P + s * bhn * D, stats, row_ok, D, 1, D, BLOCK_D, 0)[0]
        if UNNORMALISE:
            x = _load_cols(X + (bh // H).to(tl.int64) * sxb + (bh % H).to(tl.int64) * sxh, rows, row_ok,
                           sxn, sxd, D, BLOCK_D, 0)[0]
            r = tl.load(R + stats, mask=row_ok, other=0.0).to(tl.float32)
            total = _unnormalize_grad(x.to(tl.float32), x, total, total, r, 0)[0]
        _store_cols(OUT, stats, row_ok, D, 1, D, total, total, BLOCK_D, 0)
        if ROW_SUMS:
            sum_p = tl.zeros([BLOCK_N], dtype=STATS.dtype.element_ty)
            sum_pc = tl.zeros([BLOCK_N], dtype=STATS.dtype.element_ty)
            sum_pdp = tl.zeros([BLOCK_N], dtype=STATS.dtype.element_ty)
            sum_pdpc = tl.zeros([BLOCK_N], dtype=STATS.dtype.element_ty)
            for s in range(0, SPLITS):
                part = STATS + 4 * s * bhn + stats
                sum_p += tl.load(part, mask=row_ok, other=0.0)
                sum_pc += tl.load(part + bhn, mask=row_ok, other=0.0)
                sum_pdp += tl.load(part + 2 * bhn, mask=row_ok, other=0.0)
                sum_pdpc += tl.load(part + 3 * bhn, mask=row_ok, other=0.0)
            tl.store(DT + stats, _dt_rows(sum_p, sum_pc, sum_pdp, sum_pdpc, row_ok), mask=row_ok)

    @triton.jit
    def _softmax_p(c, top, log2_l, t2, EXACT: tl.constexpr):
        """The forward's softmax weights p = exp2((c - top) t2 - log2 l) of cosines c, from the
        rows' LSE (top = m sign(t) and log2 l, broadcast against c). EXACT (fp32, c in fp64):
        (c - top) t2 rounded to fp32 as the forward rounds it. Otherwise one fused multiply-add
        a score, c t2 - (top t2 + log2 l), as in the forward (``_attend_block``): its error (a
        few 1e-6 of p) is far below that of the 16-bit products p feeds."""
        if EXACT:  # one branch compiled, one return type (c is fp64 here)
            p = tl.math.exp2(((c - top) * t2).to(tl.float32) - log2_l)
        else:
            p = tl.math.exp2(c * t2 - (top * t2 + log2_l))
        return p

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, QN, V, T, RQ, RK, DO, LSE, DELTA, DK, DV, Nq, Nk, H, rows_per_split,
                         svb, svh, svn, svd,
                         PRECISION: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                         DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dk, dv for BLOCK_N keys of one (b, h), looping over the query blocks of its split.

        Recomputes the cosines c^T = (k @ q^T) rk rq (``_backward_dots``) from the forward's
        operands (Q and K, q and k contiguous, with their inverse norms RQ and RK: ``_cosines``), so that
        p^T = exp2((c^T - m sign(t)) t log2 e - log2 l) with the forward's LSE (m, log2 l)
        is the forward's softmax, then dv += p^T dO, ds^T = p^T (dO v^T - delta) (``_deltas``),
        dkn += t ds^T qn (the gradient of the normalised k; QN: q normalised and rounded to its
        dtype, bounded operands: scaling ds by rq instead overflowed 16 bits for rows of tiny
        or zero norm, where rq reaches 1 / eps), and finally maps dkn through k's
        normalisation. dO is contiguous (B, H, Nq, D). Every D-wide operand is held as two
        column blocks DA + DB, as in the forward.

        With SPLIT, programs along axis 2 take consecutive query ranges of
        ``rows_per_split`` and write their fp32 sums t dkn and dv to DK and DV,
        (splits, B*H, Nk, D), for ``_bwd_finish_kernel``.
        """
        bh, b, h, t = _program_head(T, H)
        split = tl.program_id(2)
        lo = split * rows_per_split
        hi = tl.minimum(lo + rows_per_split, Nq)
        t2, sgn = _logit_scale(t)
        BHN = tl.num_programs(1).to(tl.int64) * Nq
        keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < Nk
        Kb = K + bh.to(tl.int64) * Nk * D
        k_a, k_b = _load_cols(Kb, keys, key_ok, D, 1, D, DA, DB)
        rk = tl.load(RK + bh.to(tl.int64) * Nk + keys, mask=key_ok, other=0.0)  # fp64 for fp32 k
        Vb = V + b * svb + h.to(tl.int64) * svh
        v_a, v_b = _load_cols(Vb, keys, key_ok, svn, svd, D, DA, DB)
        k_rows = Kb + keys.to(tl.int64)[:, None] * D  # (fp32: the backward's products load their slices)
        v_rows = Vb + keys.to(tl.int64)[:, None] * svn
        dv_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
        dkn_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, DB if DB > 0 else 16], dtype=tl.float32)
        dkn_b = tl.zeros([BLOCK_N, DB if DB > 0 else 16], dtype=tl.float32)
        Qb = Q + bh.to(tl.int64) * Nq * D
        DOb = DO + bh.to(tl.int64) * Nq * D
        for start in range(lo, hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < hi
            stats = bh.to(tl.int64) * Nq + rows
            q_a, q_b = _load_cols(Qb, rows, row_ok, D, 1, D, DA, DB)
            rq = tl.load(RQ + stats, mask=row_ok, other=0.0)
            top = tl.load(LSE + stats, mask=row_ok, other=0.0) * sgn
            log2_l = tl.load(LSE + BHN + stats, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
            do_a, do_b = _load_cols(DOb, rows, row_ok, D, 1, D, DA, DB)
            q_rows = Qb + rows.to(tl.int64)[:, None] * D
            s, dp = _backward_dots(k_a, k_b, k_rows, key_ok[:, None], q_a, q_b, q_rows, row_ok[:, None],
                                   v_a, v_b, v_rows, svd, do_a, do_b, DOb + rows.to(tl.int64)[:, None] * D, 1,
                                   PRECISION, CHUNK, D, DB)  # transposed: [keys, queries]
            c = _cosines(s, rk, rq)
            p = _softmax_p(c, top[None, :], log2_l[None, :], t2, Q.dtype.element_ty == tl.float32)
            p16 = p.to(DO.dtype.element_ty)
            dv_a = tl.dot(p16, do_a, dv_a, input_precision=PRECISION)
            if DB > 0:
                dv_b = tl.dot(p16, do_b, dv_b, input_precision=PRECISION)
            ds = (p * (dp - delta[None, :])).to(Q.dtype.element_ty)
            qn_a, qn_b = _load_cols(QN + bh.to(tl.int64) * Nq * D, rows, row_ok, D, 1, D, DA, DB)
            dkn_a = tl.dot(ds, qn_a, dkn_a, input_precision=PRECISION)
            if DB > 0:
                dkn_b = tl.dot(ds, qn_b, dkn_b, input_precision=PRECISION)
        out = (split.to(tl.int64) * tl.num_programs(1) + bh) * Nk + keys
        if SPLIT:
            _store_cols(DK, out, key_ok, D, 1, D, dkn_a * t, dkn_b * t, DA, DB)
        else:
            dk_a, dk_b = _unnormalize_grad(k_a.to(tl.float32), k_b.to(tl.float32), dkn_a * t, dkn_b * t,
                                           rk.to(tl.float32), DB)
            _store_cols(DK, out, key_ok, D, 1, D, dk_a, dk_b, DA, DB)
        _store_cols(DV, out, key_ok, D, 1, D, dv_a, dv_b, DA, DB)

    @triton.jit
    def _bwd_dq_kernel(Q, K, KN, V, T, RQ, RK, DO, LSE, DELTA, DQ, DT, Nq, Nk, H, keys_per_split,
                       svb, svh, svn, svd,
                       PRECISION: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                       DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DELTA_PASS: tl.constexpr = False):
        """dq and the rows' shares of dt for BLOCK_M queries of one (b, h), looping over the
        key blocks of its split.

        The cosines c = (q @ k^T) rq rk come from the forward's operands, as in
        ``_bwd_dkdv_kernel``; ds = p (dp - delta), dp = dO v^T, is the gradient of the logits
        t c; dqn = t ds kn (KN: k normalised, as QN in ``_bwd_dkdv_kernel``) goes through q's
        normalisation. dt = sum_ij ds c is a sum over all rows, so
        its per-row error must not be biased: it is formed from row sums of p, p c,
        p dp and p dp c as E[dp c] - E[dp] E[c] under p / sum(p). That takes neither
        delta (from the rounded output) nor the exact scale of p (from the fp32 LSE).
        The dt shares are written per row (DT, (B*H, Nq)) and summed by the caller
        (deterministic, no atomics, and the same whatever BLOCK_M the autotuner takes).
        The row sums are fp64 for fp32 inputs (c and dp are fp64 there), else fp32.

        With SPLIT, programs along axis 2 take consecutive key ranges of
        ``keys_per_split`` and write their fp32 sums t dqn to DQ, (splits, B*H, Nq, D),
        and the four row sums to DT, (splits, 4, B*H, Nq), for ``_bwd_finish_kernel``.

        DELTA_PASS (``_deltas``) only sums p and p dp of each row, to DT as (splits, 2, B*H, Nq).
        """
        bh, b, h, t = _program_head(T, H)
        split = tl.program_id(2)
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, Nk)
        t2, sgn = _logit_scale(t)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        stats = bh.to(tl.int64) * Nq + rows
        bhn = tl.num_programs(1).to(tl.int64) * Nq
        Qb = Q + bh.to(tl.int64) * Nq * D
        q_a, q_b = _load_cols(Qb, rows, row_ok, D, 1, D, DA, DB)
        rq = tl.load(RQ + stats, mask=row_ok, other=0.0)
        DOb = DO + bh.to(tl.int64) * Nq * D
        do_a, do_b = _load_cols(DOb, rows, row_ok, D, 1, D, DA, DB)
        q_rows = Qb + rows.to(tl.int64)[:, None] * D  # (fp32: the backward's products load their slices)
        do_rows = DOb + rows.to(tl.int64)[:, None] * D
        top = tl.load(LSE + stats, mask=row_ok, other=0.0) * sgn
        log2_l = tl.load(LSE + bhn + stats, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        dqn_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
        dqn_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], dtype=tl.float32)
        sums = DELTA.dtype.element_ty
        sum_p = tl.zeros([BLOCK_M], dtype=sums)
        sum_pc = tl.zeros([BLOCK_M], dtype=sums)
        sum_pdp = tl.zeros([BLOCK_M], dtype=sums)
        sum_pdpc = tl.zeros([BLOCK_M], dtype=sums)
        Kb = K + bh.to(tl.int64) * Nk * D
        RKb = RK + bh.to(tl.int64) * Nk
        Vb = V + b * svb + h.to(tl.int64) * svh
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            k_a, k_b = _load_cols(Kb, cols, col_ok, D, 1, D, DA, DB)
            rk = tl.load(RKb + cols, mask=col_ok, other=0.0)
            v_a, v_b = _load_cols(Vb, cols, col_ok, svn, svd, D, DA, DB)
            s, dp = _backward_dots(q_a, q_b, q_rows, row_ok[:, None], k_a, k_b, Kb + cols.to(tl.int64)[:, None] * D,
                                   col_ok[:, None], do_a, do_b, do_rows, 1, v_a, v_b,
                                   Vb + cols.to(tl.int64)[:, None] * svn, svd, PRECISION, CHUNK, D, DB)
            c = _cosines(s, rq, rk)
            p = tl.where(col_ok[None, :], _softmax_p(c, top[:, None], log2_l[:, None], t2,
                                                     K.dtype.element_ty == tl.float32), 0.0)
            sum_p += tl.sum(p, axis=1)
            sum_pdp += tl.sum(p * dp, axis=1)
            if not DELTA_PASS:
                pc = p * c
                sum_pc += tl.sum(pc, axis=1)
                sum_pdpc += tl.sum(pc * dp, axis=1)
                ds16 = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
                kn_a, kn_b = _load_cols(KN + bh.to(tl.int64) * Nk * D, cols, col_ok, D, 1, D, DA, DB)
                dqn_a = tl.dot(ds16, kn_a, dqn_a, input_precision=PRECISION)
                if DB > 0:
                    dqn_b = tl.dot(ds16, kn_b, dqn_b, input_precision=PRECISION)
        if DELTA_PASS:
            part = 2 * split * bhn + stats
            tl.store(DT + part, sum_p, mask=row_ok)
            tl.store(DT + part + bhn, sum_pdp, mask=row_ok)
        elif SPLIT:
            _store_cols(DQ, split * bhn + stats, row_ok, D, 1, D, dqn_a * t, dqn_b * t, DA, DB)
            part = 4 * split * bhn + stats
            tl.store(DT + part, sum_p, mask=row_ok)
            tl.store(DT + part + bhn, sum_pc, mask=row_ok)
            tl.store(DT + part + 2 * bhn, sum_pdp, mask=row_ok)
            tl.store(DT + part + 3 * bhn, sum_pdpc, mask=row_ok)
        else:
            dq_a, dq_b = _unnormalize_grad(q_a.to(tl.float32), q_b.to(tl.float32), dqn_a * t, dqn_b * t,
                                           rq.to(tl.float32), DB)
            _store_cols(DQ, stats, row_ok, D, 1, D, dq_a, dq_b, DA, DB)
            tl.store(DT + stats, _dt_rows(sum_p, sum_pc, sum_pdp, sum_pdpc, row_ok), mask=row_ok)


if triton is not None:
    # Autotuned launches (on a GPU; the configs that apply to the call's D and dtype only), per
    # shape: the H200 measured one D = 96 tile for 64K x 4K and reused it for 1M x 4K and 4K x 1M
    _fwd_kernel_tuned = _triton.autotune(
        _fwd_kernel, [c for group in _FWD_CONFIGS.values() for c in group], ["D", "Nq", "Nk"],
        lambda nargs, kw: _fwd_configs_for(kw["D"], nargs["Q"].dtype))
    _bwd_dkdv_tuned, _bwd_dq_tuned = (
        _triton.autotune(kernel, [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)
                                  for lists in _BWD_CONFIGS.values() for bm, bn, w, st in lists[which]],
                         ["D", "Nq", "Nk"],
                         lambda nargs, kw, which=which: _bwd_configs_for(kw["D"], nargs["V"].dtype, which))
        for which, kernel in ((0, _bwd_dkdv_kernel), (1, _bwd_dq_kernel)))


# ----------------------------------------------------------------------------- Triton launchers
def _column_blocks(d: int) -> Tuple[int, int]:
    """(DA, DB): D = DA + DB with both powers of two >= 16 where possible, else (next pow2, 0) masked."""
    if d >= 16 and d & (d - 1) == 0:
        return d, 0
    high = 1 << (d.bit_length() - 1)
    if high >= 16 and d - high >= 16 and (d - high) & (d - high - 1) == 0:
        return high, d - high
    return max(16, triton.next_power_of_2(d)), 0


# The fixed shift's range: octaves below p's maximum that p may fall (else the online softmax
# runs), and the lift of p's maximum. Not just p, but its products with v, must stay normal:
# with all keys near the least logit, p at 2^-118 times |v| < 2^-8 left fp32's normal range and
# the output lost its digits (zero at |v| = 1e-10, one key, t = 41); 60 octaves keep the
# products normal for |v| >= 2^-66. fp16's range is its exponent's (p lifted by 2^15).
_P_RANGE = {torch.float32: 60.0, torch.bfloat16: 60.0, torch.float16: 28.0}
_P_TOP = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 15.0}


_SPLIT_ALIGN = 128  # loop items per split: a multiple of every tile's BLOCK_M and BLOCK_N
_COMBINE_TILE = 8192  # partial outputs the combining kernel loads at once (64 fp32 registers a thread)


def _split_range(programs: int, n: int, device: torch.device, splits: Optional[int] = None) -> Tuple[int, int]:
    """(splits, items per split) of a kernel's loop over ``n`` keys or queries: enough
    splits that ``programs`` x splits cover about two waves of the GPU, each of at least
    2 x 128 items (``splits`` forces a number), and the last one not empty."""
    if splits is None:
        want = math.ceil(2 * _triton.sm_count(device) / programs)
        splits = max(1, min(want, n // (2 * _SPLIT_ALIGN)))
    per_split = triton.cdiv(triton.cdiv(n, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(n, per_split), per_split


def _inverse_norms(x: torch.Tensor, copy: bool = False, normalised: bool = False):
    """(x, or with ``copy`` a (B, H, N, D) contiguous copy of it where x is not; the rows'
    inverse norms 1 / max(|x|, eps), (B, H, N), fp64 for fp32 x (the cosines' precision, see
    ``_attend_block``), else fp32), in one pass over x; with ``normalised`` also x's rows
    normalised, (B, H, N, D) contiguous in x's dtype, third."""
    b, h, n, d = x.shape
    copy = copy and not x.is_contiguous()
    out = torch.empty((b, h, n, d), device=x.device, dtype=x.dtype) if copy else x
    normed = torch.empty((b, h, n, d), device=x.device, dtype=x.dtype) if normalised else out
    r = torch.empty((b, h, n), device=x.device, dtype=torch.float64 if x.dtype == torch.float32 else torch.float32)
    if r.numel():
        _triton.launch(_inverse_norms_kernel, (triton.cdiv(n, 64), b * h), x, out, normed, r, n, d, h, *x.stride(),
                       EPS, COPIES=copy, NORMALISES=normalised, BLOCK_N=64,
                       BLOCK_D=min(64, max(16, triton.next_power_of_2(d))))
    return (out, r, normed) if normalised else (out, r)


def _like(q: torch.Tensor) -> torch.Tensor:
    """The output for q: q's layout where that is dense (the model's NCHW views, so the
    rearrange back to NCHW is free), else contiguous."""
    return torch.empty_like(q)


def _triton_forward(q, k, v, t32, splits: Optional[int] = None, online_only: bool = False):
    """(out, lse): out (B, H, Nq, D) in q's dtype and layout (``_like``), lse (2, B, H, Nq) fp32,
    each row's softmax as ``_fwd_kernel`` writes it.

    ``splits`` forces the number of key splits; ``online_only`` disables the fixed-shift
    softmax (both for tests and benchmarks).
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = _like(q)
    lse = torch.empty((2, b, h, nq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    da, db = _column_blocks(d)
    configs = _fwd_configs_for(d, q.dtype)
    block_m = configs[0].kwargs["BLOCK_M"]
    splits, per_split = _split_range(triton.cdiv(nq, block_m) * b * h, nk, q.device, splits)
    rq = _inverse_norms(q)[1]
    k, rk = _inverse_norms(k, copy=True)
    if splits > 1:
        po = torch.empty((splits, b * h, nq, d), device=q.device, dtype=torch.float32)
        pl = torch.empty((splits, b * h, nq), device=q.device, dtype=torch.float32)
        pm = torch.empty_like(pl)
    else:
        po = pl = pm = lse  # unused
    args = (q, k, v, t32, rq, rk, out, lse, po, pl, pm, nq, nk, h, per_split, *q.stride(), *v.stride(),
            *out.stride())
    constants = dict(P_RANGE=-1.0 if online_only else _P_RANGE[q.dtype], P_TOP=_P_TOP[q.dtype],
                     PRECISION=_triton.precision(q.dtype), CHUNK=_FP32_CHUNK if q.dtype == torch.float32 else 0,
                     SPLIT=splits > 1, D=d, DA=da, DB=db)
    _triton.launch_tuned(_fwd_kernel, _fwd_kernel_tuned, (d, q.dtype, splits > 1, online_only), configs,
                         lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h, splits), *args, **constants)
    if splits > 1:
        block_m, block_d = 16, min(64, max(16, triton.next_power_of_2(d)))
        block_s = _triton.per_load(_COMBINE_TILE, block_m * block_d, splits)
        _triton.launch(_combine_kernel, (triton.cdiv(nq, block_m), b * h, triton.cdiv(d, block_d)), po, pl, pm, t32,
                       out, lse, nq, d, h, splits, *out.stride(), BLOCK_S=block_s, BLOCK_M=block_m, BLOCK_D=block_d)
    return out, lse


def _deltas(args: tuple, out: torch.Tensor, split: Tuple[int, int], constants: dict) -> torch.Tensor:
    """Each row's delta = sum_j p_j dp_j (dp = dO v^T), (B*H, Nq), the backward kernels' shift of
    dp in ds = p (dp - delta). 16-bit: dO . out in fp32, FlashAttention's identity (out's
    rounding enters every ds, as the 16-bit p of autograd's softmax backward does). fp32: in
    fp64, sum p dp / sum p from the backward's own p and fp64 dp (``_bwd_dq_kernel``'s
    DELTA_PASS, one more pass over the keys), so that where a softmax is one-hot ds cancels as
    autograd's does: dO . out, rounded to fp32, left t eps |dO| |v| in dq and dk (1000 times
    autograd's error at t = 1000, 18 times at t = 200, one query, three keys).
    ``args``: (q, k, kn, v, t32, rq, rk, dout, lse) as ``_triton_backward`` passes them to
    the kernels; ``split``: the dq kernel's (splits, keys per split)."""
    q, k, kn, v, t32, rq, rk, dout, lse = args
    b, h, nq, d = q.shape
    if q.dtype != torch.float32:
        return (dout.float() * out.float()).sum(-1)
    parts, per_split = split
    sums = torch.empty((parts, 2, b * h, nq), device=q.device, dtype=torch.float64)
    configs = _bwd_configs_for(d, q.dtype, 1)
    _triton.launch_fitting(_bwd_dq_kernel, (d, "delta"), configs,  # (DELTA_PASS always writes partials)
                           lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * h, parts), *args, sums, sums, sums,
                           nq, k.shape[2], h, per_split, *v.stride(), SPLIT=False, DELTA_PASS=True, **constants)
    return sums[:, 1].sum(0) / sums[:, 0].sum(0)


def _triton_backward(q, k, v, t32, out, lse, dout, splits: Optional[Tuple[int, int]] = None):
    """(dq, dk, dv, dt) in the inputs' dtypes (dt fp32, shape (H,)).

    The dk/dv kernel runs one program per key block and the dq kernel one per query block;
    where that leaves the GPU idle (few keys, or few queries), each also splits its loop
    into ranges (``splits``: (dk/dv's, dq's), for tests) whose fp32 partial sums
    ``_bwd_finish_kernel`` adds up.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dout = dout.contiguous()
    dq = torch.empty((b, h, nq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, h, nk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, h, nk, d), device=q.device, dtype=v.dtype)
    dt = torch.zeros((b * h, nq), device=q.device, dtype=torch.float32)
    if not (q.numel() and k.numel()):
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, dt.view(b, h, nq).sum((0, 2))
    if nk == 1:  # every softmax is exactly 1 and out = v: dq, dk, dt are exactly 0 (the kernels'
        # dp - delta would leave rounding noise, which a zero key's 1 / eps scales up to ~1e7)
        dv.copy_(dout.float().sum(2, keepdim=True))
        return dq.zero_(), dk.zero_(), dv, dt.view(b, h, nq).sum((0, 2))
    # raw (for the cosines, as the forward's) and normalised (bounded operands of the gradient products)
    (q, rq, qn), (k, rk, kn) = (_inverse_norms(x, copy=True, normalised=True) for x in (q, k))
    da, db = _column_blocks(d)
    constants = dict(PRECISION=_triton.precision(q.dtype), CHUNK=_FP32_CHUNK, D=d, DA=da, DB=db)
    block_d = max(16, triton.next_power_of_2(d))

    def split(which: int, n_out: int, n_loop: int, block: str) -> Tuple[int, int]:
        widest = max(cfg.kwargs[block] for cfg in _bwd_configs_for(d, q.dtype, which))  # the fewest programs
        return _split_range(triton.cdiv(n_out, widest) * b * h, n_loop, q.device, None if splits is None else splits[which])

    args = (q, k, kn, v, t32, rq, rk, dout, lse)
    delta = _deltas(args, out, split(1, nq, nk, "BLOCK_M"), constants)
    for which, kernel, tuned, (n_out, n_loop, block), x, r, (grad, *more) in (
            (0, _bwd_dkdv_kernel, _bwd_dkdv_tuned, (nk, nq, "BLOCK_N"), k, rk, (dk, dv)),
            (1, _bwd_dq_kernel, _bwd_dq_tuned, (nq, nk, "BLOCK_M"), q, rq, (dq, dt))):
        configs = _bwd_configs_for(d, q.dtype, which)
        parts, per_split = split(which, n_out, n_loop, block)
        outputs = (grad, *more)
        # partials: the dk/dv kernel's t dkn and dv (fp32), the dq kernel's t dqn (fp32) and row
        # sums (in delta's dtype, as the kernel sums them)
        if parts > 1:
            shapes = ((b * h, n_out, d), (4, b * h, n_out) if which else (b * h, n_out, d))
            outputs = [torch.empty((parts, *shape), device=q.device, dtype=dtype)
                       for shape, dtype in zip(shapes, (torch.float32, delta.dtype if which else torch.float32))]
        _triton.launch_tuned(kernel, tuned, (d, q.dtype, parts > 1), configs,
                             lambda meta: (triton.cdiv(n_out, meta[block]), b * h, parts), q, k, (kn, qn)[which == 0], v,
                             *args[4:], delta, *outputs, nq, nk, h, per_split, *v.stride(), SPLIT=parts > 1, **constants)
        if parts > 1:
            grid = (triton.cdiv(n_out, 16), b * h)
            _triton.launch(_bwd_finish_kernel, grid, outputs[0], x, r, grad, outputs[1], dt, n_out, d, h, parts,
                           *x.stride(), UNNORMALISE=True, ROW_SUMS=bool(which), BLOCK_N=16, BLOCK_D=block_d)
            if not which:  # dv: the plain sum
                _triton.launch(_bwd_finish_kernel, grid, outputs[1], x, r, dv, outputs[1], dt, n_out, d, h, parts,
                               *x.stride(), UNNORMALISE=False, ROW_SUMS=False, BLOCK_N=16, BLOCK_D=block_d)
    return dq, dk, dv, dt.view(b, h, nq).sum((0, 2))


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sipl_fast::cosine_attention_triton", mutates_args=())
def cosine_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            temperature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (out (B, H, Nq, D) in q's layout, lse (2, B, H, Nq) fp32, ``_fwd_kernel``'s
    LSE); temperature (H,)."""
    return _triton_forward(q, k, v, temperature.float().contiguous())


@cosine_attention_triton.register_fake
def _(q, k, v, temperature):
    b, h, nq, d = q.shape
    return _like(q), q.new_empty((2, b, h, nq), dtype=torch.float32)


@torch.library.custom_op("sipl_fast::cosine_attention_triton_bwd", mutates_args=())
def cosine_attention_triton_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor,
                                dout: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk, dv, dtemperature) for the forward's (out, lse)."""
    dq, dk, dv, dt = _triton_backward(q, k, v, temperature.float().contiguous(), out, lse, dout)
    return dq, dk, dv, dt.to(temperature.dtype)


@cosine_attention_triton_bwd.register_fake
def _(q, k, v, temperature, out, lse, dout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), temperature.new_empty(temperature.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout, dlse):
    q, k, v, temperature, out, lse = ctx.saved_tensors
    return cosine_attention_triton_bwd(q, k, v, temperature, out, lse, dout)


cosine_attention_triton.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sipl_fast::cosine_attention_cuda", mutates_args=(), device_types="cuda")
def cosine_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """CUDA C++ forward: out (B, H, Nq, D) contiguous; q, k, v need a unit stride along D."""
    from . import _cuda

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _cuda.cosine_attention_fwd(q, k, v, temperature.float().contiguous(), out)
    return out


@cosine_attention_cuda.register_fake
def _(q, k, v, temperature):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- backend choice
def _kernel_why_not(q, k, v) -> Optional[str]:
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not one of float32, float16, bfloat16"
    d = q.shape[-1]
    if d < 8 or d % 8 or d > MAX_D:
        return f"head dim D={d} is not a multiple of 8 between 8 and {MAX_D}"
    return None


def _triton_why_not(q, k, v, temperature) -> Optional[str]:
    return _triton.problem(q, dots=True) or _kernel_why_not(q, k, v)


def _cuda_why_not(q, k, v, temperature) -> Optional[str]:
    reason = cuda_problem(q) or _kernel_why_not(q, k, v)
    if reason is None and needs_grad(q, k, v, temperature):
        reason = "the CUDA kernel is forward-only and this call needs gradients (use 'triton' or 'torch')"
    return reason


def _run_triton(q, k, v, temperature):
    return cosine_attention_triton(q, k, v, temperature.reshape(-1))[0]


#: The reference materialises the (B, H, Nq, Nk) scores: above this many bytes of them, the
#: automatic choice and measuring skip it where a kernel can run (at a 2048^2 input measuring
#: it would add 8 GiB to the loop's peak, at 3840x2160 16 GiB, and it is never the fastest).
NAIVE_SCORE_BYTES = 2**30


def _naive_fits(q, k, *args) -> bool:
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.element_size() <= NAIVE_SCORE_BYTES


BACKENDS = {
    "torch": Backend("torch", cosine_attention_torch, lambda *a: None, automatic=_naive_fits),
    "triton": Backend("triton", _run_triton, _triton_why_not, automatic=lambda q, *a: q.is_cuda),
    "cuda": Backend("cuda", lambda q, k, v, t: cosine_attention_cuda(q, k, v, t.reshape(-1)), _cuda_why_not),
    "sdpa": Backend("sdpa", cosine_attention_sdpa, lambda q, k, v, t: _kernel_why_not(q, k, v),
                    automatic=lambda q, *a: q.is_cuda),
}
# Automatic choice, from benchmarks/results/cosine_attention.md (H200, bf16): the CUDA C++
# forward beat the Triton one on every shape (1.2-1.6x); with gradients the CUDA kernel
# refuses, so training takes Triton, whose memory stays linear (naive autograd needs 2.5 GiB
# at 65536 x 4096 and ~40 GiB at a 2048^2 input). SDPA (cuDNN or flash) beat both at D = 96
# (1.0-2.5x) and lost at D = 384 (mem-efficient, 10x slower): it comes after our kernels,
# and "fastest" (FastSIPL) takes it where it measures faster.
PREFERENCE = ("cuda", "triton", "sdpa", "torch")


def _check(q, k, v, temperature) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"cosine_attention: expected {name} as a floating-point (B, H, N, D) tensor, "
                             f"got {getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"cosine_attention: expected k and v of shape ({b}, {h}, Nk, {d}) like q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] < 1 or d < 1:
        raise ValueError(f"cosine_attention: expected at least one key (Nk >= 1) and D >= 1, got Nk = {k.shape[2]}, "
                         f"D = {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"cosine_attention: expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(temperature, torch.Tensor) or temperature.numel() != h or temperature.shape not in ((h,), (h, 1, 1)):
        raise ValueError(f"cosine_attention: expected temperature of shape ({h},) or ({h}, 1, 1), "
                         f"got {tuple(getattr(temperature, 'shape', ()))}")
    check_real_floating("cosine_attention", temperature=temperature)
    for name, x in (("k", k), ("v", v), ("temperature", temperature)):
        if x.device != q.device:
            raise ValueError(f"cosine_attention: {name} is on {x.device}, q on {q.device}")


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                     backend: Optional[str] = None) -> torch.Tensor:
    """``softmax((normalize(q) @ normalize(k)^T) * t_h) @ v``: (B, H, Nq, D) from q (B, H, Nq, D),
    k and v (B, H, Nk, D), temperature (H,) or (H, 1, 1).

    ``backend``: None/"auto" (the first of cuda, triton, sdpa (GPU only), torch that can run), "torch",
    "triton", "cuda" or "sdpa" (PyTorch's fused attention on the normalised, scaled q and k).
    """
    _check(q, k, v, temperature)
    return choose("cosine_attention", BACKENDS, PREFERENCE, backend, q, k, v, temperature).fn(q, k, v, temperature)
