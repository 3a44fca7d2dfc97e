"""Where one FastSIPL loop spends its GPU time: the top kernels by device time.

Runs the engine's loop without CUDA graphs (so the profiler sees each kernel by name), after a
first call with graphs that compiles, autotunes and measures the backends as FastSIPL does
(by device time); prints the backends the measurement chose and the profiler's table of kernels sorted by total device time, and writes the table to
``benchmarks/results/fast_sipl_profile_<device>.md``.
Usage: ``python benchmarks/fast_sipl_profile.py [--sizes 256,512] [--dtype bfloat16] [--quick]``.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _common import RESULTS, environment
from fast_sipl import QUICK_CONFIG, parse_size
from sipl_fast import SIPL, SIPLConfig, FastSIPL, ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30, help="kernels listed per size")
    parser.add_argument("--quick", action="store_true", help="a tiny model (the CPU default)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    torch.manual_seed(0)
    model = SIPL(SIPLConfig(**QUICK_CONFIG) if quick else SIPLConfig()).to(device).eval()
    fast = FastSIPL(model, dtype=getattr(torch, args.dtype))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = f"# fast_sipl_profile\n\n{environment(device)}, dtype {args.dtype}, iterations {args.iterations}\n"
    for size in args.sizes.split(","):
        b, h, w = parse_size(size)
        x = torch.rand(b, 3, h, w, device=device)
        graphs = fast.cuda_graphs  # on a GPU
        fast(x, args.iterations)  # compile, autotune, measure the backends, capture
        if device.type == "cuda":
            torch.cuda.synchronize()
        fast.cuda_graphs = False  # the same choices, run eagerly (a replayed graph hides its kernels' names)
        with profile(activities=activities) as prof:
            fast(x, args.iterations)
            if device.type == "cuda":
                torch.cuda.synchronize()
        fast.cuda_graphs = graphs
        table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=90)
        text += f"\n## {b}x{h}x{w}\n\nmeasured backends: {ops.measured_choices()}\n\n```\n{table}\n```\n"
        print(text.split(f"## {b}x{h}x{w}")[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fast_sipl_profile_{device.type}.md").write_text(text)


if __name__ == "__main__":
    main()
