"""Benchmark sipl_fast.ops.gated_dwconv_gelu on the shapes SIPL meets at a 512x512 input.

Variants in one run: the reference eager in fp32 and bf16 (depthwise conv, chunk, GELU gate),
``torch.compile`` of it in bf16, and every fast backend this install can run (bf16). GB/s
counts reading the 2h input channels and writing the h output channels once. Usage:
``python benchmarks/gated_dwconv_gelu.py [--variants ...] [--quick | --headline]``.
"""
from __future__ import annotations

import sys

import torch

from _common import Case, op_main, op_variants
from sipl_fast.ops.gated_dwconv_gelu import gated_dwconv_gelu_torch

# ((B, 2h, H, W), mode) of every GDFN and dual gate at a 512x512 input, and calls per pass
SHAPES = [((1, 510, 512, 512), "gdfn", 16), ((1, 254, 512, 512), "gdfn", 8), ((1, 510, 256, 256), "gdfn", 24),
          ((1, 1020, 128, 128), "gdfn", 24), ((1, 2042, 64, 64), "gdfn", 16), ((1, 850, 256, 256), "gdfn", 2),
          ((1, 1702, 128, 128), "gdfn", 2), ((1, 3744, 64, 64), "gdfn", 2), ((1, 384, 256, 256), "dual", 2),
          ((1, 768, 128, 128), "dual", 2), ((1, 1536, 64, 64), "dual", 2)]
QUICK = [((1, 510, 32, 32), "gdfn", 1), ((2, 192, 17, 23), "dual", 1)]
_compiled = torch.compile(gated_dwconv_gelu_torch)


def cases(device: torch.device, wanted, shapes):
    for (b, c2, h, w), mode, count in shapes:
        x = torch.randn(b, c2, h, w, device=device)
        weight = torch.randn(c2, 1, 3, 3, device=device) / 3
        yield Case("gated_dwconv_gelu", f"{b}x{c2}x{h}x{w} {mode}", 3 * x.numel() // 2, count,
                   op_variants("gated_dwconv_gelu", gated_dwconv_gelu_torch, (x, weight, mode), wanted, device,
                               _compiled))


if __name__ == "__main__":
    op_main("gated_dwconv_gelu", sys.modules[__name__], __doc__)
