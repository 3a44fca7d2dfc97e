"""Benchmark the backbone's fused ops and a whole Restormer TransformerBlock, in one run.

Sections, each on the shapes SIPL meets at a 512x512 input:

- ``layer_norm2d``, ``conv1x1``, ``channel_attention``, ``gated_dwconv_gelu``: the cases of the one-op
  scripts of those names (eager fp32 / bf16, ``torch.compile`` bf16, every fast backend);
- ``transformer_block``: ``x + MDTA(LN(x))``, then ``+ GDFN(LN(x))``, as the reference block
  eager in fp32 and bf16 and ``torch.compile``'d in bf16 (all on the torch backend), and the
  engine's block (the norms inside the 1x1 convolutions, ``project_out`` and the residual adds
  folded in) with every op on Triton (``triton-bf16``),
  with the CUDA C++ kernels where they exist (``cuda-bf16``), with the automatic order
  (``auto-bf16``) and with the measured choice per op (``fastest-bf16``, as FastSIPL runs).

Reports ms, GB/s and the share of the copy bandwidth measured in the same run, and speedups
over eager bf16 and over torch.compile: JSON, markdown and a plot under benchmarks/results/.
Usage: ``python benchmarks/backbone.py [--ops ...] [--variants ...] [--quick | --headline]``
(``--headline``: only the first shape of each section, the one the issue's targets name).
"""
from __future__ import annotations

import argparse
import copy

import torch

import channel_attention
import conv1x1
import gated_dwconv_gelu
import layer_norm2d
from _common import Case, pick_shapes, report_cases, run_cases, setup
from sipl_fast import ops
from sipl_fast.engine import engine_blocks
from sipl_fast.model import TransformerBlock

# (dim, heads, side) of the TransformerBlocks at a 512x512 input, and blocks per pass:
# decoder level 1 + refinement, encoder level 1, levels 2 and 3, the latent
BLOCKS = [((96, 1, 512), 16), ((48, 1, 512), 8), ((96, 2, 256), 24), ((192, 4, 128), 24), ((384, 8, 64), 16)]
QUICK_BLOCKS = [((16, 2, 24), 1)]
OP_SCRIPTS = {"layer_norm2d": layer_norm2d, "conv1x1": conv1x1, "channel_attention": channel_attention,
              "gated_dwconv_gelu": gated_dwconv_gelu}
# Backends per op of the fast block variants (ops not named choose automatically)
# (cuda-bf16: the CUDA C++ gate; the engine's block has no separate LayerNorm left)
FAST_BLOCKS = {"triton-bf16": "triton", "cuda-bf16": {"gated_dwconv_gelu": "cuda", "channel_attention": "triton",
                                                      "conv1x1": "triton"},
               "auto-bf16": "auto",
               "fastest-bf16": ops.FASTEST}


def _in_scope(fn, backend):
    def run():
        with torch.no_grad(), ops.backend_scope(backend):
            return fn()
    return run


def block_cases(device: torch.device, wanted, shapes):
    """Case per block shape; the fast variants that cannot run here are left out."""
    available = {n for n, info in ops.available_backends().items() if info["available"]}
    for (dim, heads, side), count in shapes:
        block = TransformerBlock(dim, heads, 2.66, False).to(device).eval()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.1 * torch.randn_like(p))
        low = copy.deepcopy(block).to(torch.bfloat16)
        fast = engine_blocks(copy.deepcopy(low), torch.bfloat16)
        x = torch.randn(1, dim, side, side, device=device)
        xb = x.to(torch.bfloat16)
        compiled = torch.compile(low)
        table = {"eager-fp32": (torch.float32, _in_scope(lambda: block(x), "torch")),
                 "eager-bf16": (torch.bfloat16, _in_scope(lambda: low(xb), "torch")),
                 "compile-bf16": (torch.bfloat16, _in_scope(lambda: compiled(xb), "torch"))}
        for name, backend in FAST_BLOCKS.items():
            needs = {backend} if isinstance(backend, str) else set(backend.values())
            if needs - {"auto", ops.FASTEST} <= available:
                table[name] = (torch.bfloat16, _in_scope(lambda b=backend: fast(xb), backend))
        variants = {n: table[n] for n in table if wanted == "all" or n in wanted}
        yield Case("transformer_block", f"1x{dim}x{side}x{side} h{heads}", 0, count, variants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="layer_norm2d,conv1x1,channel_attention,gated_dwconv_gelu,transformer_block")
    args, device, wanted, which, bandwidth = setup(parser)
    cases = []
    for op in args.ops.split(","):
        if op == "transformer_block":
            cases += list(block_cases(device, wanted, pick_shapes(BLOCKS, QUICK_BLOCKS, which)))
        else:
            script = OP_SCRIPTS[op]
            cases += list(script.cases(device, wanted, pick_shapes(script.SHAPES, script.QUICK, which)))
    rows = run_cases(cases, device, bandwidth)
    report_cases(f"backbone_{device.type}" + ("" if which == "all" else f"_{which}"), rows, device, bandwidth)


if __name__ == "__main__":
    main()
