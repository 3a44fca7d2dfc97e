"""Benchmark sipl_fast.ops.layer_norm2d on the shapes SIPL meets at a 512x512 input.

Variants in one run: the reference formula eager in fp32 and bf16, ``torch.compile`` of it in
bf16, and every fast backend this install can run (bf16). GB/s counts reading x and writing y
once. Usage: ``python benchmarks/layer_norm2d.py [--variants ...] [--quick | --headline]``.
"""
from __future__ import annotations

import sys

import torch

from _common import Case, op_main, op_variants
from sipl_fast.ops.layer_norm2d import layer_norm2d_torch

# (B, C, H, W) of the most frequent LayerNorm2d inputs at a 512x512 input, and calls per pass
SHAPES = [((1, 96, 512, 512), 32), ((1, 48, 512, 512), 16), ((1, 96, 256, 256), 53), ((1, 192, 128, 128), 53),
          ((1, 384, 64, 64), 37), ((1, 160, 256, 256), 4), ((1, 320, 128, 128), 4), ((1, 704, 64, 64), 4)]
QUICK = [((1, 48, 64, 64), 1), ((2, 96, 17, 23), 1)]
_compiled = torch.compile(layer_norm2d_torch)


def cases(device: torch.device, wanted, shapes):
    for (b, c, h, w), count in shapes:
        x = torch.randn(b, c, h, w, device=device)
        weight, bias = torch.randn(c, device=device), torch.randn(c, device=device)
        yield Case("layer_norm2d", f"{b}x{c}x{h}x{w}", 2 * x.numel(), count,
                   op_variants("layer_norm2d", layer_norm2d_torch, (x, weight, bias), wanted, device, _compiled))


if __name__ == "__main__":
    op_main("layer_norm2d", sys.modules[__name__], __doc__)
