"""Shared benchmark plumbing: timing, a printed table, JSON and a plot under benchmarks/results/.

Every benchmark times its baselines in the same run and reports ratios to them;
speed is never asserted in tests.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

#: Where results go; SIPL_FAST_BENCH_RESULTS overrides (tests write to a temporary folder).
RESULTS = Path(os.environ.get("SIPL_FAST_BENCH_RESULTS") or Path(__file__).parent / "results")


def nvidia_tool(name: str) -> str:
    """The path of an NVIDIA command-line tool (ptxas, nvdisasm): Triton's bundled copy, the one
    it compiles with, else the one on PATH."""
    try:
        import triton.backends.nvidia as nvidia

        bundled = Path(nvidia.__file__).parent / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (neither in Triton's NVIDIA backend nor on PATH)")
    return found


def ptxas_report(text: str) -> Dict[str, dict]:
    """Per entry (kernel): registers, spill-store bytes and static shared memory bytes, from
    the report of ``ptxas -v`` (or ``nvcc -Xptxas -v``)."""
    entries, current = {}, None
    for line in text.splitlines():
        found = re.search(r"Compiling entry function '(\w+)'", line)
        if found:
            current = entries.setdefault(found.group(1), {})
        elif current is not None:
            for key, pattern in (("registers", r"Used (\d+) registers"), ("spill B", r"(\d+) bytes spill stores"),
                                 ("shared B", r"(\d+) bytes smem")):
                value = re.search(pattern, line)
                if value:
                    current[key] = int(value.group(1))
    return entries


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, min_time_s: float = 0.2,
            graph: bool = False) -> float:
    """Median time of ``fn`` in milliseconds: wall time per call (CUDA events on a GPU, host
    launch overhead included), or with ``graph`` on a GPU the device time of the calls replayed
    as one CUDA graph (``sipl_fast.ops.graph_ms``, replayed for about ``min_time_s``; kernels
    compared without launch overhead, as a captured model runs them), falling back to wall time
    where ``fn`` cannot be captured."""
    for _ in range(warmup):
        fn()
    graph = graph and device.type == "cuda"
    times: List[float] = []
    start_all = time.perf_counter()
    # with ``graph``, five wall-timed calls size the graph (and stand in where it cannot be captured);
    # without, at least three (a 2048^2 loop takes seconds)
    while len(times) < (5 if graph else 3) or (not graph and time.perf_counter() - start_all < min_time_s
                                               and len(times) < 200):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    wall = times[len(times) // 2]
    if not graph:
        return wall
    from sipl_fast.ops import graph_ms

    calls = max(1, min(100, round(2.0 / wall)))  # about 2 ms of work per replay
    ms = graph_ms(fn, calls=calls, replays=max(5, min(50, round(1e3 * min_time_s / (wall * calls)))))
    if ms is None:
        print(f"(cannot be captured in a CUDA graph: wall time, {fn})", file=sys.stderr)
        return wall
    return ms


def kernel_breakdown(fn: Callable[[], object], device: torch.device, top: int = 4, calls: int = 3) -> Optional[str]:
    """The ``top`` kernels of one call of ``fn`` by device time, "name us; ..." (the mean over
    ``calls`` profiled calls; GPU only, None elsewhere): where a call's time goes, e.g. an op's
    main kernel against its preparation and combine passes."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return "; ".join(f"{e.key[:40]} {e.self_device_time_total / calls:.0f}us" for e in kernels[:top])


def environment(device: torch.device) -> Dict[str, str]:
    info = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda or ""
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def report(name: str, rows: List[dict], columns: List[str], env: Dict[str, str], plot=None) -> None:
    """Print a markdown table and write ``<name>.json``, ``<name>.md`` (and ``<name>.png``); the
    JSON also holds the autotuners' choices where any ran (``sipl_fast.ops.tuned_tiles``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = f"# {name}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for row in rows:
        table += "| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |\n"
    print(header + table)
    (RESULTS / f"{name}.md").write_text(header + table)
    from sipl_fast import ops

    doc = {"environment": env, "rows": rows}
    tiles = ops.tuned_tiles()  # which tile each autotuner chose (on a GPU), to prune the tile lists
    if tiles:
        doc["autotuned tiles"] = tiles
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2))
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib not installed: no plot; pip install -e '.[bench]')")
            return
        fig = plot(plt)
        fig.savefig(RESULTS / f"{name}.png", dpi=120, bbox_inches="tight")
        print(f"wrote {RESULTS / name}.{{json,md,png}}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- op benchmarks
#: Variants of an op benchmark: the reference eager in fp32 and bf16, torch.compile of the
#: reference in bf16, then each fast backend in bf16 (named "<backend>-bf16").
BASE_VARIANTS = ("eager-fp32", "eager-bf16", "compile-bf16")


class Case:
    """One shape of one op: the callables to time and the bytes each must move at least.

    ``variants``: name -> (dtype, fn); ``elements``: tensor elements read + written by the op
    (GB/s = elements x the variant's element size / time); ``count``: calls per model pass.
    """

    def __init__(self, op: str, shape: str, elements: int, count: int, variants: Dict[str, tuple]):
        self.op, self.shape, self.elements, self.count, self.variants = op, shape, elements, count, variants


def op_variants(op: str, reference: Callable, args: tuple, wanted, device: torch.device, compiled: Callable) -> Dict[str, tuple]:
    """Case.variants for ``sipl_fast.ops.<op>``: ``args`` are the fp32 arguments of ``reference``;
    the bf16 variants get floating tensors cast to bf16. Fast backends that cannot run here
    are left out."""
    from sipl_fast import ops

    low = tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    fn = getattr(ops, op)
    table = {"eager-fp32": (torch.float32, lambda: reference(*args)),
             "eager-bf16": (torch.bfloat16, lambda: reference(*low)),
             "compile-bf16": (torch.bfloat16, lambda: compiled(*low))}
    for name, info in ops.available_backends().items():
        if name != "torch" and name in ops.OP_BACKENDS[op] and info["available"]:
            table[f"{name}-bf16"] = (torch.bfloat16, lambda b=name: fn(*low, backend=b))
    return {name: table[name] for name in table if wanted == "all" or name in wanted}


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write): what this device's memory moves."""
    n = (256 << 20) if device.type == "cuda" else (8 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / 1e9 / (time_ms(lambda: dst.copy_(src), device, graph=True) / 1e3)


def run_cases(cases: List[Case], device: torch.device, bandwidth: float) -> List[dict]:
    """Time every variant of every case (device time: the kernels, as a captured model runs
    them): ms, GB/s, % of ``bandwidth``, speedups over eager bf16 and over torch.compile
    (where those ran), and on a GPU each fast variant's ``kernel_breakdown``."""
    rows = []
    for case in cases:
        row = {"op": case.op, "shape": case.shape, "calls/pass": case.count}
        for name, (dtype, fn) in case.variants.items():
            ms = time_ms(fn, device, graph=True)
            gbs = case.elements * torch.finfo(dtype).bits / 8 / 1e9 / (ms / 1e3) if case.elements else None
            row[f"{name} ms"] = ms
            if gbs is not None:
                row[f"{name} GB/s"] = gbs
                row[f"{name} %bw"] = 100 * gbs / bandwidth
        for name, (dtype, fn) in case.variants.items():  # after the timings, which they must not disturb
            if name not in BASE_VARIANTS and device.type == "cuda":
                row[f"{name} kernels"] = kernel_breakdown(fn, device)
        for name in case.variants:
            for base in ("eager-bf16", "compile-bf16"):
                if name not in BASE_VARIANTS and f"{base} ms" in row:
                    row[f"{name} vs {base}"] = row[f"{base} ms"] / row[f"{name} ms"]
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows


def report_cases(name: str, rows: List[dict], device: torch.device, bandwidth: float) -> None:
    """``report`` with the columns the rows have, and a plot of speedups over eager bf16."""
    columns = ["op", "shape", "calls/pass"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    env = {**environment(device), "copy bandwidth": f"{bandwidth:.0f} GB/s",
           "timing": "device time of CUDA-graph replays on a GPU (no launch overhead)"}

    def plot(plt):
        names = [c[: -len(" vs eager-bf16")] for c in columns if c.endswith(" vs eager-bf16")]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            ax.bar([j + i * width for j in range(len(rows))], [r.get(f"{n} vs eager-bf16", 0) for r in rows],
                   width, label=n)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([f"{r['op']}\n{r['shape']}" for r in rows], rotation=60, fontsize=7, ha="right")
        ax.set_ylabel("speedup over eager bf16")
        ax.set_title(f"{name}, {env['device']}")
        if names:
            ax.legend()
        return fig

    report(name, rows, columns, env, plot)


def add_shape_flags(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    group.add_argument("--headline", action="store_true", help="only the first (target) shape of each op")


def shape_set(args, device: torch.device) -> str:
    """"quick", "headline" or "all" from the flags of ``add_shape_flags``."""
    return "quick" if args.quick or device.type == "cpu" else "headline" if args.headline else "all"


def pick_shapes(shapes: list, quick: list, which: str) -> list:
    return quick if which == "quick" else shapes[:1] if which == "headline" else shapes


def setup(parser):
    """Adds ``--variants`` and the shape flags, parses, and measures the copy bandwidth:
    (args, device, wanted variants or "all", "quick" | "headline" | "all", GB/s). Quick runs
    leave torch.compile out unless ``--variants`` names it."""
    parser.add_argument("--variants", default="all", help="comma-separated, e.g. eager-bf16,compile-bf16,triton-bf16")
    add_shape_flags(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    which = shape_set(args, device)
    if args.variants != "all":
        wanted = args.variants.split(",")
    elif which == "quick":  # compiling takes longer than the quick run itself: only when named
        wanted = ["eager-fp32", "eager-bf16", "triton-bf16", "cuda-bf16", "auto-bf16"]
    else:
        wanted = "all"
    return args, device, wanted, which, copy_bandwidth(device)


def op_main(op: str, module, doc: str) -> None:
    """Command line of a one-op benchmark script (``module`` has SHAPES, QUICK and cases)."""
    import argparse

    _, device, wanted, which, bandwidth = setup(argparse.ArgumentParser(description=doc.splitlines()[0]))
    rows = run_cases(list(module.cases(device, wanted, pick_shapes(module.SHAPES, module.QUICK, which))), device,
                     bandwidth)
    report_cases(f"{op}_{device.type}" + ("" if which == "all" else f"_{which}"), rows, device, bandwidth)
