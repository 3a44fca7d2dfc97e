"""Benchmark sipl_fast.ops.gated_dwconv_gelu on the shapes SIPL meets at a 512x512 input.

Variants in one run: the reference eager in fp32 and bf16 (depthwise conv, chunk, GELU gate),
``torch.compile`` of it in bf16, and every fast backend this install can run (bf16). GB/s
counts reading the 2h input channels and writing the h output channels once.

The GDFN tails (``-> Cout +res``: the gate, then ``project_out`` and the residual add, as
FastSIPL calls the op) add ``triton-2pass-bf16``: the Triton gate, then the Triton ``conv1x1``
with the residual (what the fused kernel saves: writing and reading the h-channel gate; the
``cuda`` backend runs these two passes with its own gate). GB/s counts reading 2h channels and
the residual and writing Cout once. Usage:
``python benchmarks/gated_dwconv_gelu.py [--variants ...] [--quick | --headline]``.
"""
from __future__ import annotations

import sys

import torch

from _common import Case, op_main, op_variants
from sipl_fast import ops
from sipl_fast.ops.gated_dwconv_gelu import gated_dwconv_gelu_torch

# ((B, 2h, H, W), mode, Cout of the projection or None) of every GDFN and dual gate at a 512x512
# input, and calls per pass; then the GDFN tails that FastSIPL fuses
SHAPES = [((1, 510, 512, 512), "gdfn", None, 16), ((1, 254, 512, 512), "gdfn", None, 8),
          ((1, 510, 256, 256), "gdfn", None, 24), ((1, 1020, 128, 128), "gdfn", None, 24),
          ((1, 2042, 64, 64), "gdfn", None, 16), ((1, 850, 256, 256), "gdfn", None, 2),
          ((1, 1702, 128, 128), "gdfn", None, 2), ((1, 3744, 64, 64), "gdfn", None, 2),
          ((1, 384, 256, 256), "dual", None, 2), ((1, 768, 128, 128), "dual", None, 2),
          ((1, 1536, 64, 64), "dual", None, 2),
          ((1, 510, 512, 512), "gdfn", 96, 16), ((1, 254, 512, 512), "gdfn", 48, 8),
          ((1, 510, 256, 256), "gdfn", 96, 24), ((1, 1020, 128, 128), "gdfn", 192, 24),
          ((1, 2042, 64, 64), "gdfn", 384, 16)]
QUICK = [((1, 510, 32, 32), "gdfn", None, 1), ((2, 192, 17, 23), "dual", None, 1), ((1, 510, 32, 32), "gdfn", 96, 1)]
_compiled = torch.compile(gated_dwconv_gelu_torch)


def cases(device: torch.device, wanted, shapes):
    for (b, c2, h, w), mode, cout, count in shapes:
        x = torch.randn(b, c2, h, w, device=device)
        weight = torch.randn(c2, 1, 3, 3, device=device) / 3
        if cout is None:
            yield Case("gated_dwconv_gelu", f"{b}x{c2}x{h}x{w} {mode}", 3 * x.numel() // 2, count,
                       op_variants("gated_dwconv_gelu", gated_dwconv_gelu_torch, (x, weight, mode), wanted, device,
                                   _compiled))
            continue
        pw = torch.randn(cout, c2 // 2, device=device) / (c2 // 2) ** 0.5
        r = torch.randn(b, cout, h, w, device=device)
        args = (x, weight, mode, None, pw, None, r)
        variants = op_variants("gated_dwconv_gelu", gated_dwconv_gelu_torch, args, wanted, device, _compiled)
        xl, wl, pwl, rl = (t.bfloat16() for t in (x, weight, pw, r))
        if ops.available_backends()["triton"]["available"] and (wanted == "all" or "triton-2pass-bf16" in wanted):
            variants["triton-2pass-bf16"] = (torch.bfloat16, lambda: ops.conv1x1(
                ops.gated_dwconv_gelu(xl, wl, mode, backend="triton"), pwl, None, rl, backend="triton"))
        yield Case("gated_dwconv_gelu", f"{b}x{c2}x{h}x{w} {mode} -> {cout} +res", x.numel() + 2 * r.numel(), count,
                   variants)


if __name__ == "__main__":
    op_main("gated_dwconv_gelu", sys.modules[__name__], __doc__)
