"""Benchmark sipl_fast.ops.depthwise_conv3x3 on the shapes SIPL meets at a 512x512 input.

The cross blocks' ``q_dwconv`` and ``kv_dwconv``, the depthwise convolutions that no other op
fuses. Variants in one run: the reference (``F.conv2d``, groups = C) eager in fp32 and bf16,
``torch.compile`` of it in bf16, and every fast backend this install can run (bf16). GB/s counts
reading x and writing y once. Usage:
``python benchmarks/depthwise_conv3x3.py [--variants ...] [--quick | --headline]``.
"""
from __future__ import annotations

import sys

import torch

from _common import Case, op_main, op_variants
from sipl_fast.ops.depthwise_conv3x3 import depthwise_conv3x3_torch

# (B, C, H, W) at a 512x512 input and calls per pass: q_dwconv once per decoder pass, kv_dwconv
# once per privileged pass (the dictionary-only pass's keys and values are computed once)
SHAPES = [((1, 96, 256, 256), 1), ((1, 192, 128, 128), 1), ((1, 384, 64, 64), 1),
          ((1, 192, 512, 512), 1), ((1, 96, 512, 512), 1), ((1, 384, 256, 256), 1), ((1, 192, 256, 256), 1),
          ((1, 768, 128, 128), 1), ((1, 384, 128, 128), 1), ((1, 768, 64, 64), 1)]
QUICK = [((1, 48, 64, 64), 1), ((2, 96, 17, 23), 1)]
_compiled = torch.compile(depthwise_conv3x3_torch)


def cases(device: torch.device, wanted, shapes):
    for (b, c, h, w), count in shapes:
        x = torch.randn(b, c, h, w, device=device)
        weight, bias = torch.randn(c, 1, 3, 3, device=device), torch.randn(c, device=device)
        yield Case("depthwise_conv3x3", f"{b}x{c}x{h}x{w}", 2 * x.numel(), count,
                   op_variants("depthwise_conv3x3", depthwise_conv3x3_torch, (x, weight, bias), wanted, device,
                               _compiled))


if __name__ == "__main__":
    op_main("depthwise_conv3x3", sys.modules[__name__], __doc__)
