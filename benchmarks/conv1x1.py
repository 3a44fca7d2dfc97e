"""Benchmark sipl_fast.ops.conv1x1 on the shapes SIPL meets at a 512x512 input.

The 1x1 convolutions of every Restormer block with what surrounds them: ``qkv`` and
``project_in`` after their LayerNorm (normalize), ``project_out`` before the residual add.
Variants in one run: the reference (``conv1x1_torch``: LayerNorm, convolution, add, op by op,
as the published code) eager in fp32 and bf16, ``torch.compile`` of it in bf16, and every fast
backend this install can run (bf16). GB/s counts reading x (and the residual) and writing the
output once. Usage:
``python benchmarks/conv1x1.py [--variants ...] [--quick | --headline]``.
"""
from __future__ import annotations

import sys

import torch

from _common import Case, op_main, op_variants
from sipl_fast.ops.conv1x1 import conv1x1_torch

# ((B, Cin, H, W), Cout, normalize, residual) at a 512x512 input, and calls per pass
SHAPES = [((1, 96, 512, 512), 510, True, False, 16), ((1, 96, 512, 512), 288, True, False, 16),
          ((1, 255, 512, 512), 96, False, True, 16), ((1, 48, 512, 512), 254, True, False, 8),
          ((1, 127, 512, 512), 48, False, True, 8), ((1, 96, 256, 256), 510, True, False, 24),
          ((1, 192, 128, 128), 1020, True, False, 24), ((1, 1021, 64, 64), 384, False, True, 16)]
QUICK = [((1, 48, 64, 64), 144, True, False, 1), ((2, 127, 17, 23), 48, False, True, 1)]
_compiled = torch.compile(conv1x1_torch)


def cases(device: torch.device, wanted, shapes):
    for (b, cin, h, w), cout, normalize, residual, count in shapes:
        x = torch.randn(b, cin, h, w, device=device)
        weight = torch.randn(cout, cin, 1, 1, device=device) / cin ** 0.5
        bias = torch.randn(cout, device=device)
        r = torch.randn(b, cout, h, w, device=device) if residual else None
        elements = x.numel() + (2 if residual else 1) * b * cout * h * w
        name = f"{b}x{cin}x{h}x{w}->{cout}" + (" norm" if normalize else "") + (" +res" if residual else "")
        yield Case("conv1x1", name, elements, count,
                   op_variants("conv1x1", conv1x1_torch, (x, weight, bias, r, normalize), wanted, device, _compiled))


if __name__ == "__main__":
    op_main("conv1x1", sys.modules[__name__], __doc__)
