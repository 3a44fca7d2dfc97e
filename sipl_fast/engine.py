"""FastSIPL: the published SIPL inference loop, computed faster and with less memory.

``FastSIPL(model)(lq, iterations)`` returns what ``sipl_fast.restore(model, lq, iterations)``
returns. Every change is an exact rewrite of the published computation:

- **the encoder once per iteration**: the published loop runs ``net(img)`` and then
  ``net(img, privileged=F)``, two encoder passes over the same image; here one encoder pass
  feeds both decoders (the 2-iteration loop at 512x512 drops from 7.18 to 6.37 TFLOP);
- **LayerNorms inside the 1x1 convolutions**: where a LayerNorm feeds only a 1x1 convolution
  (``qkv`` and ``project_in`` of every block, the cross blocks' ``kv``), its per-channel scale
  and shift move into that convolution's weight and bias, once, and the normalisation runs
  inside the convolution (``ops.conv1x1``): the normalised copy never reaches memory;
- **MDTA's convolutions folded**: the depthwise 3x3 convolution of q, k, v is computed inside
  the attention's reads, and ``project_out`` (a 1x1 convolution) times the block-diagonal
  attention maps is one matrix per image, applied to v in one product; on a CPU, MDTA runs
  by rows instead (``_attention_by_rows``: the maps from Gram matrices summed band by band,
  then the product band by band), so q, k and v never exist for the whole image (the CPU
  loop's peak memory: about 0.6x, and 1.4x faster, bundled model at 512x512);
- **the GDFN in two passes**: its LayerNorm inside ``project_in`` (above); the depthwise
  convolution, gate, ``project_out`` and residual add in one (``ops.gated_dwconv_gelu`` with
  its projection): neither the gate nor the convolution's output reaches memory; its hidden
  width (255, 127, 425, ...) padded with zero channels to a multiple of 16, for aligned
  (vector) memory accesses;
- **the cross blocks' depthwise convolutions** (``q_dwconv``, ``kv_dwconv``) as
  ``ops.depthwise_conv3x3`` (the stencil of the gate kernel, or PyTorch's where that measures
  faster);
- **residual adds inside the products before them**: MDTA's (in that product), the GDFN's
  (above) and the cross attention's (in ``project_out``, ``ops.conv1x1``);
- **dictionary keys/values once**: in the dictionary-only pass, Proxy Fusion attends to the
  learned dictionaries, so the key/value side of ``cross_p1..3`` (LayerNorm, 1x1 and depthwise
  convolutions of the dictionary) depends on the weights alone: computed at construction;
- **local stages by rows**: the 1x1 and depthwise 3x3 convolutions, norms and gates around each
  attention (the GDFN with its residual; the cross blocks' q and k, v) run in
  bands of rows with one row of halo (``BAND_BYTES`` of intermediates per band), so their wide
  intermediates never exist for the whole image: at 2048x2048 the bf16 loop's peak is about a
  fifth of the published fp32 loop's (``benchmarks/fast_sipl_memory.py``); on a CPU the bands
  are small enough (``CPU_BAND_BYTES``) to stay in the caches;
- **weights stored as the loop reads them** (``engine_blocks``): in the loop's dtype where
  autocast would cast them on every call, tap-major where the fused stencils read them, so no
  call casts or copies a weight (each copy would be one more kernel in the replayed graph);
- **reduced precision**: ``dtype=torch.bfloat16`` (or float16) runs the loop under autocast,
  PyTorch's mixed precision (convolutions and matrix products in the dtype with fp32
  accumulation; the fused kernels accumulate in fp32 too); ``torch.float32`` keeps
  everything in fp32;
- **the fastest kernels** of ``sipl_fast.ops`` (``backend="auto"``): on a GPU the first run of
  a shape times every backend of each op call and keeps the fastest (``ops.measured_choices()``
  reports the choices): with CUDA graphs by the device time of the calls replayed as a graph,
  since a fused kernel's single launch saves nothing there; a kernel whose result disagrees
  with the reference's on this device is left out (``ops.rejected_backends()``); or one named
  backend;
- **warm-up**: a shape's first run on a GPU starts with a dry pass of the loop in which the
  Triton kernels compile side by side on every CPU core instead of running
  (``ops.compiling_only``), not one after another as the first launches reach them;
- **CUDA graphs**: on a GPU the whole loop for one (input shape, dtype, iterations) is captured
  once, after two warm-up runs that settle autotuning and lazy compilation, and replayed; a
  small LRU cache keeps ``max_graphs`` of them. A capture that fails falls back to eager
  execution with a warning.

Images of any size are reflect-padded to a multiple of 16 and cropped back, as ``restore``
does. ``tile=`` (default off) restores overlapping tiles of that size with blended seams for
inputs beyond memory; this approximates, since the model's attention is global.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange

from . import ops
from .ops import _layout, _triton
from .ops.channel_attention import projected_maps
from .ops.cosine_attention import BACKENDS as ATTENTION_BACKENDS, EPS
from .checkpoint import load_model
from .loops import _check_images, _check_iterations, ieee_fp32, pad_to_multiple
from .model import SIPL, Attention, CrossBlock, FeedForward, LayerNorm, TransformerBlock
from .tiling import tiled

__all__ = ["FastSIPL"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "torch", "triton", "cuda")


#: The most bytes one band's intermediates may take in the banded stages below: on a GPU, a
#: bound on memory; on a CPU, less, so that a band's intermediates stay in the caches (the
#: published model's fp32 loop on a 2-core CPU: 1.3x faster at 128^2 and 256^2 with 16 MiB
#: bands than unbanded, and 8 MiB or 4 MiB bands slower again, as halo rows add up).
BAND_BYTES = 512 * 2**20
CPU_BAND_BYTES = 16 * 2**20


def _band_rows(x: torch.Tensor) -> int:
    """Rows per band of x (B, C, H, W) for ``_by_rows``: the GDFN's intermediates are 5.3 C wide."""
    budget = min(BAND_BYTES, CPU_BAND_BYTES) if x.device.type == "cpu" else BAND_BYTES
    b, c, _, w = x.shape
    return max(1, budget // max(1, 8 * c * b * w * x.element_size()))


def _bands(x: torch.Tensor):
    """The bands of rows of x (B, C, H, W), ``_band_rows(x)`` rows each: (r0, r1, lo, hi), rows
    r0..r1 and with one row of halo on either side lo..hi."""
    h, rows = x.shape[2], _band_rows(x)
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        yield r0, r1, max(r0 - 1, 0), min(r1 + 1, h)


def _by_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an ``fn`` whose output row r reads input rows r-1..r+1 only (1x1 and
    depthwise 3x3 convolutions, per-pixel norms, gates and residual adds): computed in bands of
    rows, each with one row of halo on either side, so that fn's wide intermediates (the GDFN's
    2*hidden channels, the cross blocks' k, v before their depthwise convolution) exist one
    band at a time. Images whose intermediates fit a band (``_band_rows``) run whole."""
    b, c, h, w = x.shape
    if _band_rows(x) >= h:
        return fn(x)
    out = None
    for r0, r1, lo, hi in _bands(x):
        y = fn(x[:, :, lo:hi])[:, :, r0 - lo:r1 - lo]
        if out is None:  # the whole image, in the bands' layout
            fmt = torch.channels_last if _layout.channels_last(y) else torch.contiguous_format
            out = torch.empty((b, y.shape[1], h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
        out[:, :, r0:r1] = y
    return out


def _normed_conv(norm: LayerNorm, conv: nn.Conv2d, x: torch.Tensor, outputs: slice = slice(None)) -> torch.Tensor:
    """``conv(norm(x))`` (its output channels ``outputs``) for a 1x1 ``conv`` into which
    ``norm``'s affine was folded (``_fold_norm_affine``): one pass over x (``ops.conv1x1``)."""
    bias = None if conv.bias is None else conv.bias[outputs]
    return ops.conv1x1(x, conv.weight[outputs], bias, normalize=True, eps=norm.body.eps)


def _dwconv(conv: nn.Conv2d, x: torch.Tensor, outputs: slice = slice(None)) -> torch.Tensor:
    """``conv(x)`` (x being its channels ``outputs``) for a depthwise 3x3 ``conv``
    (``ops.depthwise_conv3x3``), x first cast to autocast's dtype where autocast is on, as it
    casts a convolution's input."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    bias = None if conv.bias is None else conv.bias[outputs]
    return ops.depthwise_conv3x3(x, conv.weight[outputs], bias)


def _feed_forward(norm: LayerNorm, ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """``x + ffn(norm(x))`` by rows in two passes: the norm inside ``project_in``
    (``ops.conv1x1``); the depthwise convolution, gate, ``project_out`` and residual add in
    ``ops.gated_dwconv_gelu`` (a band's halo rows come out wrong and are cropped)."""
    gate = "dual" if ffn.dual_gate else "gdfn"
    return _by_rows(lambda t: ops.gated_dwconv_gelu(_normed_conv(norm, ffn.project_in, t), ffn.dwconv.weight, gate,
                                                    ffn.dwconv.bias, ffn.project_out.weight, ffn.project_out.bias,
                                                    residual=t), x)


def _pixels_last(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): a view where t is channels-last."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])


def _attention_by_rows(norm: LayerNorm, attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``x + MDTA(norm(x))`` in two sweeps over bands of rows (``_bands``), so that neither
    q, k, v nor any copy of them exists for the whole image: on a CPU, where the reference's
    op-by-op MDTA held nine full-resolution C-channel tensors at once (the engine's peak).

    MDTA's map needs all pixels before any output, but only through sums over the pixels: the
    first sweep convolves each band's q and k (``qkv``'s first 2C outputs, then their depthwise
    convolution, halo rows cropped) and adds up, in fp32 (or x's wider dtype), the heads' Gram
    matrices q k^T and the channels' squared norms; the cosines are then
    ``(q k^T) / (|q| |k|^T)``, norms clamped at ``F.normalize``'s eps as it clamps them.
    ``project_out`` times the block-diagonal maps is one C x C matrix M per image
    (``ops.channel_attention.projected_maps``); the second sweep convolves each band's v and
    writes ``x + M v + bias``. Each 1x1 output channel is computed once (halo rows aside)."""
    b, c, h, w = x.shape
    heads, cout = attn.num_heads, attn.project_out.out_channels
    qk, v = slice(0, 2 * c), slice(2 * c, 3 * c)
    acc = torch.promote_types(x.dtype, torch.float32)  # the sums' dtype

    def convolved(part: slice, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        t = _normed_conv(norm, attn.qkv, x[:, :, lo:hi], part)
        return _dwconv(attn.qkv_dwconv, t, part)[:, :, r0 - lo:r1 - lo]

    gram = x.new_zeros((b, heads, c // heads, c // heads), dtype=acc)
    squares = x.new_zeros((b, 2 * c), dtype=acc)
    for band in _bands(x):
        rows = _pixels_last(convolved(qk, *band)).to(acc)  # (B, pixels, 2C): q's channels, then k's
        with torch.autocast(x.device.type, enabled=False):
            q, k = rows.view(b, -1, 2, heads, c // heads).unbind(2)
            gram += torch.einsum("bphi,bphj->bhij", q, k)
            squares += rows.square().sum(1)
    norms = squares.sqrt().clamp_min(EPS).view(b, 2, heads, c // heads)
    maps = (gram / (norms[:, 0, :, :, None] * norms[:, 1, :, None, :]) * attn.temperature.to(acc)).softmax(-1)
    m = projected_maps(attn.project_out.weight, maps)  # (B, Cout, C)
    out = None
    for r0, r1, lo, hi in _bands(x):
        y = _pixels_last(convolved(v, r0, r1, lo, hi))
        y = torch.matmul(y, m.transpose(1, 2).to(y.dtype))  # (B, pixels, Cout)
        y = y.view(b, r1 - r0, w, cout).permute(0, 3, 1, 2)
        if attn.project_out.bias is not None:
            y = y + attn.project_out.bias.view(-1, 1, 1).to(y.dtype)
        y = x[:, :, r0:r1] + y
        if out is None:
            out = _layout.empty(x, cout, y.dtype)
        out[:, :, r0:r1] = y
    return out


class _EngineTransformerBlock(TransformerBlock):
    """``x + MDTA(LN1(x))`` then ``+ GDFN(LN2(.))``: each LayerNorm inside the 1x1 convolution
    after it; MDTA's depthwise convolution, ``project_out`` and residual add inside the attention
    (``ops.channel_attention``'s ``dw_weight``, ``proj_weight``, ``residual``), or with
    ``attention_by_rows`` (FastSIPL's choice on a CPU) MDTA by rows (``_attention_by_rows``); the
    GDFN by rows (``_feed_forward``). Neither the normalised x, the convolved q, k, v (by rows:
    one band at a time) nor the merged heads reach memory whole."""

    attention_by_rows = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention_by_rows:
            return _feed_forward(self.norm2, self.ffn, _attention_by_rows(self.norm1, self.attn, x))
        attn = self.attn
        b, _, h, w = x.shape
        qkv = _normed_conv(self.norm1, attn.qkv, x)
        q, k, v = (t.reshape(b, attn.num_heads, -1, h * w) for t in qkv.chunk(3, dim=1))
        x = ops.channel_attention(q, k, v, attn.temperature, attn.project_out.weight, attn.project_out.bias,
                                  residual=x.reshape(b, -1, h * w), dw_weight=attn.qkv_dwconv.weight,
                                  dw_bias=attn.qkv_dwconv.bias, width=w).view(b, -1, h, w)
        del qkv, q, k, v  # free before the FFN
        return _feed_forward(self.norm2, self.ffn, x)


class _EngineCrossBlock(CrossBlock):
    """The cross block with its local stages by rows (``_by_rows``), LN12 and LN2 inside the 1x1
    convolutions after them, and the residual adds inside the output projections."""

    def keys_values(self, x_kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        attn = self.attn
        k, v = _by_rows(lambda t: _dwconv(attn.kv_dwconv, _normed_conv(self.norm12, attn.kv, t)), x_kv).chunk(2, dim=1)
        return tuple(rearrange(t, "b (head c) h w -> b head (h w) c", head=attn.num_heads) for t in (k, v))

    def forward(self, x_q: torch.Tensor, x_kv: Optional[torch.Tensor] = None,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        attn = self.attn
        h, w = x_q.shape[-2:]
        a = self.norm11(x_q)
        q = rearrange(_by_rows(lambda t: _dwconv(attn.q_dwconv, attn.q(t)), a), "b (head c) h w -> b head (h w) c",
                      head=attn.num_heads)
        k, v = self.keys_values(x_kv) if kv is None else kv
        out = ops.cosine_attention(q, k, v, attn.temperature)
        if _layout.channels_last(a):  # the heads merged channels-last (a view for one head), as a is
            out = rearrange(out, "b head (h w) c -> b h w (head c)", h=h).permute(0, 3, 1, 2)
        else:
            out = rearrange(out, "b head (h w) c -> b (head c) h w", h=h)
        y = ops.conv1x1(out, attn.project_out.weight, attn.project_out.bias, residual=a)
        del q, k, v, a, out  # free before the FFN
        return _feed_forward(self.norm2, self.ffn, y)


def _fold_norm_affine(norm: LayerNorm, conv: nn.Conv2d) -> None:
    """``conv(LN(x))`` with LN's per-channel affine moved into the 1x1 ``conv``:
    ``W (w * xhat + b) + c = (W diag(w)) xhat + (W b + c)``, computed in float64; LN keeps
    weight 1, bias 0."""
    w, b = (p.detach().double() for p in (norm.body.weight, norm.body.bias))
    weight = conv.weight.detach().double()
    bias = weight[:, :, 0, 0] @ b
    if conv.bias is not None:
        bias += conv.bias.detach().double()
    conv.weight = nn.Parameter((weight * w.view(1, -1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    norm.body.weight.fill_(1.0)
    norm.body.bias.zero_()


def _sdpa_runs(net: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``cosine_attention``'s sdpa backend takes every cross block's head dim in
    ``dtype`` (its own check, on shape-only tensors). On a CPU FastSIPL then runs Proxy Fusion
    through PyTorch's fused attention: 3.5x the reference's speed at D = 96 on a 2-core x86
    CPU, and memory linear in the tokens where the reference stores the scores (the
    reference model keeps the published expression)."""
    sdpa = ATTENTION_BACKENDS["sdpa"]
    attns = [m.attn for m in net.modules() if isinstance(m, CrossBlock)]
    qs = [torch.empty(1, a.num_heads, 1, a.q.out_channels // a.num_heads, dtype=dtype, device="meta") for a in attns]
    return all(sdpa.why_not(q, q, q, torch.empty(q.shape[1], device="meta")) is None for q in qs)


#: The GDFN's hidden channels are padded to a multiple of this (see ``_pad_hidden``).
HIDDEN_MULTIPLE = 16


def _pad_hidden(ffn: FeedForward) -> None:
    """Pad the GDFN's hidden width h (e.g. 255, 127, 425) to a multiple of ``HIDDEN_MULTIPLE``
    with channels whose weights and biases are zero: they come out of ``project_in`` and the
    depthwise convolution as exact zeros, gate to ``gelu(0) * 0 = 0`` and meet zero columns
    of ``project_out``, so the result is unchanged. What it buys is alignment: channels-last,
    a pixel's 2h channels then start on a 32-byte boundary (16-byte vector loads and stores
    instead of one 2-byte access per value), and ``project_out``'s weight rows too."""
    h = ffn.project_out.in_channels
    pad = -h % HIDDEN_MULTIPLE
    if not pad:
        return

    def halves(t: torch.Tensor) -> torch.Tensor:  # (2h, ...) -> (2(h + pad), ...), each half padded
        zeros = t.new_zeros((pad, *t.shape[1:]))
        return torch.cat([t[:h], zeros, t[h:], zeros])

    for conv in (ffn.project_in, ffn.dwconv):
        conv.weight = nn.Parameter(halves(conv.weight.data), requires_grad=False)
        if conv.bias is not None:
            conv.bias = nn.Parameter(halves(conv.bias.data), requires_grad=False)
        conv.out_channels = 2 * (h + pad)
    ffn.dwconv.in_channels = ffn.dwconv.groups = 2 * (h + pad)
    w = ffn.project_out.weight.data
    ffn.project_out.weight = nn.Parameter(torch.cat([w, w.new_zeros((w.shape[0], pad, *w.shape[2:]))], 1),
                                          requires_grad=False)
    ffn.project_out.in_channels = h + pad


@torch.no_grad()
def engine_blocks(net: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Turn ``net``'s TransformerBlocks and CrossBlocks (in place) into the engine's: LayerNorm
    affines folded into the 1x1 convolutions after them, the GDFNs' hidden widths padded
    (``_pad_hidden``), and the forward passes above; then store every weight as the loop
    reads it, so that no call copies one: the weights of the 1x1 convolutions that run as
    ``ops.conv1x1`` and of every convolution and linear layer that runs under autocast in
    ``dtype`` (autocast rounds them to the same values on every call; the loop's graph would
    replay each cast), the depthwise weights that the fused ops read tap-major in fp32
    (``_layout.as_tap_major``; on a GPU: on a CPU the ops run PyTorch's convolutions, and
    oneDNN's fp32 NHWC depthwise convolution took 5x longer with tap-major weights), MDTA's
    ``project_out`` in fp32 (its fold into the product)."""
    fused, tap_major = set(), []  # modules whose weights the fused ops read
    for module in net.modules():
        convs = []
        if isinstance(module, TransformerBlock):
            _fold_norm_affine(module.norm1, module.attn.qkv)
            convs = [module.attn.qkv]
            fused.add(module.attn.project_out)
            tap_major.append(module.attn.qkv_dwconv)
        if isinstance(module, CrossBlock):
            _fold_norm_affine(module.norm12, module.attn.kv)  # norm11's output is also the residual
            convs = [module.attn.kv, module.attn.project_out]
            tap_major += [module.attn.q_dwconv, module.attn.kv_dwconv]
        if isinstance(module, (TransformerBlock, CrossBlock)):
            _fold_norm_affine(module.norm2, module.ffn.project_in)
            _pad_hidden(module.ffn)
            tap_major.append(module.ffn.dwconv)
            for conv in convs + [module.ffn.project_in, module.ffn.project_out]:
                conv.weight.data = conv.weight.data.to(dtype)
                fused.add(conv)
        if type(module) is TransformerBlock:
            module.__class__ = _EngineTransformerBlock
        if type(module) is CrossBlock:
            module.__class__ = _EngineCrossBlock
    if next(net.parameters()).is_cuda:
        for conv in tap_major:
            conv.weight.data = _layout.as_tap_major(conv.weight.data)
    fused.update(tap_major)
    if dtype != torch.float32:
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module not in fused:
                for p in (module.weight, module.bias):
                    if p is not None:
                        p.data = p.data.to(dtype)
    return net


class _EngineSIPL(SIPL):
    """The engine's private copy of the model: the dictionary-only pass reads cached keys/values."""

    dictionary_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]]

    def inject(self, stage, feature, privileged):
        if privileged is None and self.config.proxy_fusion:
            b = feature.shape[0]
            k, v = (t.expand(b, -1, -1, -1) for t in self.dictionary_kv[stage])
            return getattr(self, f"cross_p{stage}")(feature, kv=(k, v))
        return super().inject(stage, feature, privileged)


class FastSIPL:
    """The fast inference engine for a ``SIPL`` (or plain PromptIR) model.

    ``model`` is copied, not changed. ``dtype``: torch.bfloat16 (default), torch.float16 or
    torch.float32; ``backend``: "auto" (on a GPU, measured per op call and shape at the first
    run) or one of "torch", "triton", "cuda" for every op that has it (the others as "auto":
    conv1x1 and channel_attention have no CUDA C++ kernel); or ``{op: backend}`` for some ops
    (``sipl_fast.ops.OP_BACKENDS``; the others choose automatically); on a CPU "auto" is the
    automatic choice, with PyTorch's fused attention (``sdpa``) for Proxy Fusion wherever its
    head dims allow (``_sdpa_runs``);
    ``cuda_graphs``: capture and replay on a GPU; ``max_graphs``: graphs kept (least recently
    used dropped); ``tile``/``tile_overlap``: tiled restoration in pixels (None: whole image);
    ``channels_last``: convolution weights and the input in channels-last memory (cuDNN's
    NHWC kernels, e.g. for the depthwise convolutions; the fused ops take either layout);
    None (default): on a CPU, whose convolutions run NHWC several times faster (oneDNN), else
    off until measured on a GPU.
    """

    def __init__(self, model: SIPL, dtype: torch.dtype = torch.bfloat16, backend: Union[str, Mapping[str, str]] = "auto",
                 cuda_graphs: bool = True, max_graphs: int = 4, tile: Optional[int] = None,
                 tile_overlap: int = 32, channels_last: Optional[bool] = None):
        if not isinstance(model, SIPL):
            raise ValueError(f"FastSIPL: expected a sipl_fast.SIPL model, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"FastSIPL: dtype must be one of {DTYPES}, got {dtype}")
        if isinstance(backend, Mapping):
            bad = {op: name for op, name in backend.items()
                   if op not in ops.OPS or (name != "auto" and name not in ops.OP_BACKENDS[op])}
            if bad:
                raise ValueError(f"FastSIPL: a backend mapping takes ops to 'auto' or one of their backends "
                                 f"{ops.OP_BACKENDS}, got {bad}")
            backend = dict(backend)
        elif backend not in BACKENDS:
            raise ValueError(f"FastSIPL: backend must be one of {BACKENDS} or a mapping {{op: backend}}, "
                             f"got {backend!r}")
        ints = (tile, tile_overlap) if tile is not None else (tile_overlap,)
        if any(isinstance(n, bool) or not isinstance(n, int) for n in ints):
            raise ValueError(f"FastSIPL: tile and tile_overlap must be integers (pixels), got tile={tile!r}, "
                             f"tile_overlap={tile_overlap!r}")
        if tile is not None and (tile < 16 or tile % 16 or not 0 <= tile_overlap < tile):
            raise ValueError(f"FastSIPL: tile must be a multiple of 16 and tile_overlap in [0, tile), "
                             f"got tile={tile}, tile_overlap={tile_overlap}")
        if max_graphs < 1:
            raise ValueError(f"FastSIPL: max_graphs must be >= 1, got {max_graphs}")
        param = next(model.parameters())
        self.device = param.device
        self.dtype, self.backend, self.tile, self.tile_overlap = dtype, backend, tile, tile_overlap
        # "auto" measures on a GPU: each op call's fastest backend, at the first run of a shape
        measure = ops.FASTEST if self.device.type == "cuda" else "auto"
        # a name for every op: the ops that have that backend (conv1x1 and channel_attention have
        # no CUDA C++ kernel), the others as "auto"
        per_op = backend if isinstance(backend, dict) else {op: backend for op in ops.OPS
                                                             if backend in ops.OP_BACKENDS[op]}
        self._scope = {op: measure if per_op.get(op, "auto") == "auto" else per_op[op] for op in ops.OPS}
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._device_time = self.cuda_graphs  # how "auto" measures (see _context)
        self.max_graphs = max_graphs
        self.model = net = copy.deepcopy(model).eval().requires_grad_(False)
        if param.dtype != torch.float32:  # weights in fp32 (the fused 1x1 convolutions: see engine_blocks)
            net.float()
        net.__class__ = _EngineSIPL
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=self.memory_format)
        engine_blocks(net, dtype)
        if self.device.type == "cpu" and self._scope["cosine_attention"] == "auto" and _sdpa_runs(net, dtype):
            self._scope["cosine_attention"] = "sdpa"
        if self.device.type == "cpu" and self._scope["channel_attention"] == "auto":
            for block in net.modules():
                if isinstance(block, _EngineTransformerBlock):
                    block.attention_by_rows = True
        for name, param in net.named_parameters():  # the dictionaries are images too
            if name.startswith("privileged_dictionary"):
                param.data = param.data.contiguous(memory_format=self.memory_format)
        net.dictionary_kv = {}
        if net.config.proxy_fusion:
            with self._context():
                for stage in (1, 2, 3):
                    dictionary = getattr(net, f"privileged_dictionary{stage}")
                    net.dictionary_kv[stage] = getattr(net, f"cross_p{stage}").keys_values(dictionary)
        self._graphs: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._failed: set = set()
        self._compiled: set = set()  # keys whose kernels the dry pass compiled

    @classmethod
    def from_checkpoint(cls, path, device=None, **kwargs) -> "FastSIPL":
        """Load a checkpoint (any format ``sipl_fast.load_model`` reads) and build the engine on ``device``."""
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_model(path, device=device), **kwargs)

    # -- the loop ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self):
        """no_grad, the backend (measured by device time where graphs replay the loop: launch
        overhead then costs nothing), and autocast in the engine's dtype (for float32 instead
        IEEE fp32, as ``restore`` computes). Autocast's weight-cast cache stays off: a CUDA
        graph must not keep casts made outside it."""
        fp32 = self.dtype == torch.float32
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=not fp32, cache_enabled=False)
        exact = ieee_fp32() if fp32 else contextlib.nullcontext()
        with torch.no_grad(), ops.backend_scope(self._scope), ops.measuring_device_time(self._device_time), \
                autocast, exact:
            yield

    def _loop(self, img: torch.Tensor, iterations: int) -> torch.Tensor:
        """The published loop on a padded batch, one encoder pass per image."""
        net = self.model
        encoded = net.encoder(img)
        out = net.decode(img, encoded)
        if not net.config.proxy_fusion:
            return out
        for k in range(iterations):
            if k:
                encoded = net.encoder(img)
                out = net.decode(img, encoded)
            privileged = net.encode(out)
            img = net.decode(img, encoded, privileged)
            out = img
        return out

    def _run(self, img: torch.Tensor, iterations: int) -> torch.Tensor:
        """The loop on one padded batch: a replayed CUDA graph where possible, else eager. A
        shape's first run on a GPU starts with a dry pass that compiles every Triton kernel
        of the loop at once (``ops.compiling_only``)."""
        img = img.contiguous(memory_format=self.memory_format)
        key = (tuple(img.shape), img.dtype, iterations)
        if self.device.type == "cuda" and key not in self._compiled:
            self._compiled.add(key)
            try:
                with self._context(), ops.compiling_only():
                    self._loop(img, iterations)
            except Exception as e:  # noqa: BLE001 - an optimisation only: the kernels compile as they run
                warnings.warn(f"FastSIPL: compiling ahead failed for input {key[0]} ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=3)
        entry = None
        if self.cuda_graphs and key not in self._failed:
            entry = self._graphs.get(key) or self._capture(img, iterations, key)
        if entry is None:
            with self._context():
                return self._loop(img, iterations)
        self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(img)
        graph.replay()
        return static_out.clone()

    def _capture(self, img: torch.Tensor, iterations: int, key: tuple):
        """Warm up twice on a side stream, capture, cache (dropping the least recently used).
        The graph's input buffer is a normal tensor even under ``torch.inference_mode`` (an
        inference tensor could not be refilled by a later call outside it)."""
        with torch.inference_mode(False):
            static_in = img.clone()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), self._context():
                for _ in range(2):
                    self._loop(static_in, iterations)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with self._context(), torch.cuda.graph(graph):
                static_out = self._loop(static_in, iterations)
        except Exception as e:  # noqa: BLE001 - any capture problem: run eagerly instead
            warnings.warn(f"FastSIPL: CUDA-graph capture failed for input {key[0]} ({type(e).__name__}: {e}); "
                          "running this shape eagerly", RuntimeWarning, stacklevel=3)
            self._failed.add(key)
            torch.cuda.synchronize(self.device)
            return None
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[key] = (graph, static_in, static_out)
        return self._graphs[key]

    def __call__(self, lq: torch.Tensor, iterations: int = 2) -> torch.Tensor:
        """Restore ``lq`` (B, C, H, W), any H and W; the result of ``restore(model, lq, iterations)``."""
        _check_iterations(iterations)
        _check_images("FastSIPL", lq, self.model.config.inp_channels)
        x = lq.to(self.device, torch.float32)

        def run(part: torch.Tensor) -> torch.Tensor:
            ph, pw = part.shape[-2:]
            return self._run(pad_to_multiple(part), iterations)[..., :ph, :pw]

        # the model's GPU current throughout: CUDA-graph capture and measuring use the current
        # device's streams (a model on cuda:1 while cuda:0 is current)
        with _triton.made_current(self.device):
            out = run(x) if self.tile is None else tiled(run, x, self.tile, self.tile_overlap)
        return out.to(lq.device, lq.dtype).contiguous()
