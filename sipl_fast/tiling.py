"""Restore large images in overlapping tiles with blended seams.

Tiling approximates: SIPL's attention is global (MDTA mixes every pixel of a
channel, Proxy Fusion attends to the whole feature map), so a tile sees less
context than the whole image. Use it only where the whole image does not fit.
Overlapping tiles are blended with weights that ramp linearly across the
overlap, so seams do not show.
"""
from __future__ import annotations

from typing import Callable, List

import torch

__all__ = ["tile_starts", "tiled"]


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap`` shared."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile - overlap))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, device, dtype) -> torch.Tensor:
    """1 in the middle, rising linearly over ``overlap`` samples at both ends (never 0)."""
    i = torch.arange(length, device=device, dtype=dtype)
    edge = float(overlap + 1)
    return torch.minimum(torch.ones_like(i), torch.minimum((i + 1) / edge, (length - i) / edge))


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int = 32) -> torch.Tensor:
    """``fn`` applied to overlapping ``tile`` x ``tile`` crops of x (B, C, H, W), blended; same shape as ``fn(x)``.

    ``fn`` must map a (B, C, h, w) crop to (B, C', h, w) (e.g. ``lambda t: restore(model, t)``).
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile >= 1 and 0 <= tile_overlap < tile, got tile={tile}, tile_overlap={overlap}")
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    out = weight = None
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile])
            th, tw = y.shape[-2:]
            acc = torch.promote_types(y.dtype, torch.float32)  # blend in at least fp32
            wgt = _ramp(th, overlap, y.device, acc)[:, None] * _ramp(tw, overlap, y.device, acc)[None, :]
            if out is None:
                out = torch.zeros(*y.shape[:-2], h, w, device=y.device, dtype=acc)
                weight = torch.zeros(h, w, device=y.device, dtype=acc)
            out[..., top:top + th, left:left + tw] += y.to(acc) * wgt
            weight[top:top + th, left:left + tw] += wgt
    return (out / weight).to(x.dtype)
