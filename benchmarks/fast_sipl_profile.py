"""Where one FastSIPL loop spends its GPU time: the top kernels by device time, per backend.

For each ``--layouts`` entry (``nchw``, ``channels-last``: ``FastSIPL(channels_last=True)``) and
``--backends`` entry (``auto``: FastSIPL's measured choice; or one backend for every op), runs
the engine's loop without CUDA graphs (so the profiler sees each kernel by name),
after a first call with graphs that compiles, autotunes and measures the backends as FastSIPL
does (by device time). Prints and writes, per size and backend, the backends the measurement
chose, the profiler's table of kernels sorted by total device time, the ops' calls by input
shapes (which shapes of which op take the time), and a summary of the
loop's total device time per size, layout and backend, to
``benchmarks/results/fast_sipl_profile_<device>.md``.
Usage: ``python benchmarks/fast_sipl_profile.py [--sizes 256,512] [--backends auto,torch]
[--layouts nchw,channels-last] [--dtype bfloat16] [--quick]``.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _common import RESULTS, environment
from fast_sipl import QUICK_CONFIG, parse_size
from sipl_fast import SIPL, SIPLConfig, FastSIPL, ops


#: The ops listed per input shape: ours and the library convolutions FastSIPL may choose instead.
SHAPE_OPS = ("sipl_fast::", "aten::_conv_depthwise2d", "aten::cudnn_convolution", "aten::convolution", "aten::bmm")


def by_shape(prof, device: torch.device, rows: int) -> str:
    """Markdown table of the ``SHAPE_OPS`` calls grouped by op and input shapes, the most device
    (CPU) time first: which shapes of which op the loop's time goes to."""
    timed = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith(SHAPE_OPS)]
    events.sort(key=lambda e: getattr(e, timed), reverse=True)
    lines = ["| op | input shapes | calls | total ms | per call us |", "|---|---|---|---|---|"]
    for e in events[:rows]:
        shapes = ", ".join(str(tuple(s)) for s in e.input_shapes if s)
        total = getattr(e, timed)
        lines.append(f"| {e.key} | {shapes[:120]} | {e.count} | {total / 1e3:.3f} | {total / e.count:.1f} |")
    return "\n".join(lines)


def profiled_ms(fast: FastSIPL, x: torch.Tensor, iterations: int, rows: int):
    """(the loop's total self device ms (CPU ms on the CPU), the profiler's table of ``rows``
    kernels, the ``by_shape`` table)."""
    device = x.device
    graphs = fast.cuda_graphs  # on a GPU
    fast(x, iterations)  # compile, autotune, measure the backends, capture
    fast.cuda_graphs = False  # the same choices, run eagerly (a replayed graph hides its kernels' names)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            fast(x, iterations)
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        fast.cuda_graphs = graphs
    events = prof.key_averages()
    if device.type == "cuda":
        sort = "self_cuda_time_total"
        total = sum(getattr(e, "self_device_time_total", None) or e.self_cuda_time_total for e in events)
    else:
        sort, total = "self_cpu_time_total", sum(e.self_cpu_time_total for e in events)
    table = events.table(sort_by=sort, row_limit=rows, max_name_column_width=90)
    return total / 1e3, table, by_shape(prof, device, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--backends", default="auto", help="comma list of auto, torch, triton, cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--layouts", default="nchw", help="comma list of nchw, channels-last")
    parser.add_argument("--rows", type=int, default=30, help="kernels listed per size and backend")
    parser.add_argument("--quick", action="store_true", help="a tiny model (the CPU default)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    torch.manual_seed(0)
    model = SIPL(SIPLConfig(**QUICK_CONFIG) if quick else SIPLConfig()).to(device).eval()
    unit = "device" if device.type == "cuda" else "CPU"
    backends, layouts = args.backends.split(","), args.layouts.split(",")
    if not set(layouts) <= {"nchw", "channels-last"}:
        parser.error(f"--layouts takes nchw and channels-last, got {args.layouts}")
    text = f"# fast_sipl_profile\n\n{environment(device)}, dtype {args.dtype}, iterations {args.iterations}\n"
    summary = f"\n## Total self {unit} ms of one loop\n\n| size | layout | " + " | ".join(backends) + " |\n"
    summary += "|---" * (2 + len(backends)) + "|\n"
    for size in args.sizes.split(","):
        b, h, w = parse_size(size)
        x = torch.rand(b, 3, h, w, device=device)
        for layout in layouts:
            totals = []
            for backend in backends:
                fast = FastSIPL(model, dtype=getattr(torch, args.dtype), backend=backend,
                                channels_last=layout == "channels-last")
                ms, table, shapes = profiled_ms(fast, x, args.iterations, args.rows)
                totals.append(f"{ms:.2f}")
                section = (f"\n## {b}x{h}x{w}, {layout}, backend {backend}: {ms:.2f} ms\n\n"
                           f"measured backends: {ops.measured_choices()}; left out, disagreeing with the "
                           f"reference: {ops.rejected_backends()}\n\n```\n{table}\n```\n\n"
                           f"By op and input shapes:\n\n{shapes}\n")
                print(section, flush=True)
                text += section
                del fast
            summary += f"| {b}x{h}x{w} | {layout} | " + " | ".join(totals) + " |\n"
    print(summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fast_sipl_profile_{device.type}.md").write_text(text + summary)


if __name__ == "__main__":
    main()
