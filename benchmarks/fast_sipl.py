"""End-to-end benchmark of the SIPL refinement loop: the reference against FastSIPL.

One run, the same model and inputs, variants:

- ``eager-fp32``, ``eager-bf16``: ``sipl_fast.restore`` on the reference model in fp32 and
  under bf16 autocast (what running the published code costs: with PyTorch's default
  precision settings, so TF32 convolutions, where ``restore`` alone computes in IEEE fp32);
- ``compile-bf16``: ``torch.compile`` of the reference model, bf16 autocast;
- ``fast-fp32``, ``fast-bf16``: FastSIPL with CUDA graphs and NCHW memory; ``fast-fp32-cl``,
  ``fast-bf16-cl`` with channels-last memory (FastSIPL's default on a CPU), ``fast-bf16-eager``
  without graphs.

Per cell: median ms of the whole loop (``--iterations``, default 2), effective TFLOP/s (the
published model costs 7.18 TFLOP per 2-iteration loop at 512x512, scaled with pixels, batch and
iterations; the published loop's count, so FastSIPL's saved encoder passes count as speed),
peak memory above the model and input, and the one-time seconds of the first call
(compilation, autotuning, measuring the backends, graph capture); also which backend
FastSIPL's measurement chose for each op. JSON, markdown and a plot of latency and memory
against pixels under ``benchmarks/results/fast_sipl*``.
Usage: ``python benchmarks/fast_sipl.py [--sizes 256,512,1024,2048,3840x2160] [--variants ...]``; on a
CPU the tiny model unless ``--published`` (e.g. ``--device cpu --published --sizes 128,256
--variants eager-fp32,eager-bf16,fast-fp32,fast-fp32-cl,fast-bf16-cl``).
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, List, Tuple
from unittest import mock

import torch

from _common import environment, report, time_ms
from sipl_fast import SIPL, SIPLConfig, FastSIPL, loops, ops, restore

VARIANTS = ("eager-fp32", "eager-bf16", "compile-bf16", "fast-fp32", "fast-bf16", "fast-fp32-cl", "fast-bf16-cl",
            "fast-bf16-eager")
GPU_SIZES = "256,256b4,512,1024,2048,3840x2160"
# Published model, one 512x512 image, as the published loop computes it: 7.18 TFLOP for 2
# iterations, each a dictionary pass, an encoder pass and a privileged pass (2 x 1.59 + 0.41).
TFLOP_ITERATION_512, TFLOP_PASS_512 = 3.59, 1.59
QUICK_CONFIG = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 2, 4), prompt_len=3,
                    prompt_dims=(4, 8, 12), prompt_sizes=(8, 4, 4), dictionary_sizes=(4, 4, 2))


def parse_size(text: str) -> Tuple[int, int, int]:
    """"512" -> (1, 512, 512); "256b4" -> (4, 256, 256); "3840x2160" -> (1, 2160, 3840)."""
    size, _, batch = text.partition("b")
    w, _, h = size.partition("x")
    return int(batch or 1), int(h or w), int(w)


def variant(name: str, model: SIPL, iterations: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if name.startswith("eager") or name.startswith("compile"):
        net = torch.compile(model) if name.startswith("compile") else model
        bf16 = name.endswith("bf16")

        def run(x):
            published_precision = mock.patch.object(loops, "ieee_fp32", contextlib.nullcontext)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), published_precision:
                return restore(net, x, iterations)
        return run
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    fast = FastSIPL(model, dtype=dtype, cuda_graphs=not name.endswith("eager"), channels_last=name.endswith("-cl"))
    return lambda x: fast(x, iterations)


def measure(fn, x, device) -> dict:
    """First-call seconds, median ms and peak extra MiB of ``fn(x)``; "OOM" when it does not fit."""
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        ms = time_ms(lambda: fn(x), device, warmup=1, min_time_s=0.5)
        row = {"ms": ms, "first call s": first}
        if device.type == "cuda":
            row["peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return row
    except torch.cuda.OutOfMemoryError:
        return {"ms": "OOM"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help=f"comma list, e.g. {GPU_SIZES} (the GPU default; 'b4' = batch 4)")
    parser.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: all on a GPU; "
                                           "eager-fp32,fast-fp32 with --quick or on the CPU)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model and small images (the CPU default)")
    parser.add_argument("--published", action="store_true",
                        help="the published configuration on the CPU too (name --sizes and --variants)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tag", default="", help="suffix of the result files' names (runs that must not overwrite)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.published)
    sizes = [parse_size(s) for s in (args.sizes or ("32,40x24b2" if quick else GPU_SIZES)).split(",")]
    names = [v.strip() for v in (args.variants or ("eager-fp32,fast-fp32" if quick else ",".join(VARIANTS))).split(",")]
    if set(names) - set(VARIANTS):
        parser.error(f"--variants: expected some of {VARIANTS}, got {names}")
    torch.manual_seed(0)
    model = SIPL(SIPLConfig(**QUICK_CONFIG) if quick else SIPLConfig()).to(device).eval()
    rows: List[dict] = []
    columns = (["size"] + [f"{n} ms" for n in names] + [f"{n} speedup" for n in names[1:]]
               + [f"{n} TFLOP/s" for n in names] + [f"{n} peak MiB" for n in names] + [f"{n} first call s" for n in names])
    env = environment(device)

    def save() -> None:
        """The table so far (a run stopped by a time limit keeps the sizes it finished)."""
        env.update({"model": "tiny (quick)" if quick else "published configuration, random weights",
                    "iterations": str(args.iterations), "speedup": f"{names[0]} ms / variant ms",
                    "FastSIPL's measured backends (op: backend: call signatures)": str(ops.measured_choices()),
                    "backends left out, their results disagreeing with the reference's": str(ops.rejected_backends())})
        report(f"fast_sipl{'_quick' if quick else ''}_{device.type}{args.tag}", rows, columns, env, plot)

    def plot(plt):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for n in names:
            pts = [(r["pixels"], r[f"{n} ms"], r.get(f"{n} peak MiB")) for r in rows if isinstance(r.get(f"{n} ms"), float)]
            if pts:
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
                if pts[0][2] is not None:
                    ax2.plot([p[0] for p in pts], [p[2] / 1024 for p in pts], marker="o", label=n)
        for ax, label in ((ax1, "ms per loop"), (ax2, "peak GiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("pixels (batch x H x W)")
            ax.set_ylabel(label)
            if ax.lines:  # no memory curve without a GPU
                ax.legend(fontsize=8)
        ax1.set_title(f"SIPL loop, {args.iterations} iterations, {env['device']}")
        return fig

    for b, h, w in sizes:
        x = torch.rand(b, 3, h, w, device=device)
        pixels = b * h * w
        row = {"size": f"{b}x{h}x{w}", "pixels": pixels}
        tflop = (TFLOP_ITERATION_512 * args.iterations or TFLOP_PASS_512) * pixels / 512**2
        for name in names:
            result = measure(variant(name, model, args.iterations, device), x, device)
            for key, value in result.items():
                row[f"{name} {key}"] = value
            if isinstance(result["ms"], float) and not quick:
                row[f"{name} TFLOP/s"] = tflop / (result["ms"] / 1e3)
            print(f"[{row['size']}] {name}: {result}", flush=True)
        for name in names[1:]:
            a, base = row.get(f"{name} ms"), row.get(f"{names[0]} ms")
            if isinstance(a, float) and isinstance(base, float):
                row[f"{name} speedup"] = base / a
        rows.append(row)
        del x
        save()


if __name__ == "__main__":
    main()
