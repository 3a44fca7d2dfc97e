"""Benchmark sipl_fast.ops.channel_attention (MDTA) on the shapes SIPL meets at a 512x512 input.

Variants in one run: the reference expression eager in fp32 and bf16 (normalize, matmul,
softmax, matmul), ``torch.compile`` of it in bf16, and every fast backend this install can run
(bf16). GB/s counts reading q, k, v and writing the output once. Usage:
``python benchmarks/channel_attention.py [--variants ...] [--quick | --headline]``.
"""
from __future__ import annotations

import sys

import torch

from _common import Case, op_main, op_variants
from sipl_fast.ops.channel_attention import channel_attention_torch

# (B, heads, C per head, N = H*W) of every MDTA at a 512x512 input, and calls per model pass
# (one restoration pass of the 2-iteration loop: encoder, decoders with and without privilege)
SHAPES = [((1, 1, 96, 262144), 16), ((1, 1, 48, 262144), 8), ((1, 2, 48, 65536), 24), ((1, 4, 48, 16384), 24),
          ((1, 8, 48, 4096), 16), ((1, 4, 40, 65536), 2), ((1, 4, 80, 16384), 2), ((1, 4, 176, 4096), 2)]
QUICK = [((1, 1, 96, 4096), 1), ((2, 4, 40, 1024), 1)]
_compiled = torch.compile(channel_attention_torch)


def cases(device: torch.device, wanted, shapes):
    for (b, h, c, n), count in shapes:
        q, k, v = (torch.randn(b, h, c, n, device=device) for _ in range(3))
        t = torch.rand(h, 1, 1, device=device) + 0.5
        yield Case("channel_attention", f"{b}x{h}x{c}x{n}", 4 * q.numel(), count,
                   op_variants("channel_attention", channel_attention_torch, (q, k, v, t), wanted, device, _compiled))


if __name__ == "__main__":
    op_main("channel_attention", sys.modules[__name__], __doc__)
