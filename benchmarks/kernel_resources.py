"""Registers, register spills and shared memory of every Triton tile FastSIPL can launch, for
sm_90a, measured without a GPU.

A tile that spills registers runs slowly, and the driver reserves its local memory for every
thread that can be resident on the GPU; a tile that asks for more shared memory than a block may
have (227 KiB on an H100 or H200) cannot launch (the launchers then take the next tile; the
autotuners skip it). So this is worth knowing before a GPU is at hand. The script runs the
published model's 2-iteration loop as ``fast_sipl_compile.py`` does (compile only, backend
triton), plus the attention's backward at D = 96 and 384, records every launch, compiles each
tile its launcher may choose (an autotuner's every config, a fallback list's every entry) and
reads ``ptxas -v`` for sm_90a. ``first``: the tile taken without autotuning
(``SIPL_FAST_TRITON_AUTOTUNE=0``, the interpreter) or the first a fallback list tries.
Usage: ``python benchmarks/kernel_resources.py [--dtypes fp16,bf16,fp32] [--quick] [--tag T]``; JSON
and markdown under ``benchmarks/results/kernel_resources*``. The GPU machine's Triton may be older
than this one's: unpack that Triton's wheel into a folder and put it first on ``PYTHONPATH`` (its
bundled ptxas executable) to compile with it, e.g. ``--tag _triton3.6``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import nvidia_tool, ptxas_report
from cuda_sass import sass_counts
from fast_sipl_compile import in_children

SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may have on sm_90
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def usage(ptx: str, tool: str) -> dict:
    """registers and spill-store bytes per thread that ``ptxas -v`` reports for sm_90a."""
    text = subprocess.run([tool, "-arch=sm_90a", "-v", "-", "-o", os.devnull], input=ptx,
                          capture_output=True, text=True, check=True).stderr
    kernel = next(iter(ptxas_report(text).values()), {})  # the one entry of a Triton kernel's PTX
    return {"registers": kernel.get("registers"), "spill B": kernel.get("spill B", 0)}


def record_launches() -> dict:
    """Make the launchers record (kernel, their key, tiles, arguments) instead of launching;
    a plain launch's one tile is None (its meta-parameters are among the arguments)."""
    from sipl_fast.ops import _triton

    calls = {}

    def fitting(kernel, key, configs, grid, *args, **constants):
        calls.setdefault((kernel.fn.__name__, key if isinstance(key, str) else repr(key)),
                         (kernel, configs, args, constants))

    def plain(kernel, grid, *args, **kwargs):
        dtypes = ",".join(str(a.dtype).replace("torch.", "") for a in args[:2])
        flags = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if not k.startswith("BLOCK"))
        fitting(kernel, f"{dtypes} {flags}".strip(), [None], grid, *args, **kwargs)

    _triton.launch = plain
    _triton.launch_fitting = fitting
    _triton.launch_tuned = lambda kernel, tuned, key, configs, grid, *args, **constants: fitting(
        kernel, key, configs, grid, *args, **constants)
    return calls


def attention_backward(dtype) -> None:
    """The attention's backward launchers at D = 96 and 384 (training; the loop has none)."""
    import torch

    from sipl_fast import ops

    module = sys.modules["sipl_fast.ops.cosine_attention"]
    for d in (96, 384):
        q, k, v = (torch.randn(1, 1, n, d, dtype=dtype) for n in (256, 1024, 1024))
        t = torch.ones(1)
        with ops.compiling_only():
            out, lse = module._triton_forward(q, k, v, t)
            module._triton_backward(q, k, v, t, out, lse, torch.randn_like(out))


def measure(dtype_name: str, quick: bool, side: int) -> list:
    """Rows for one dtype, in this (fresh) process."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sipl_fast_resources_")
    from fast_sipl_compile import compile_only_loop

    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    loop = compile_only_loop(quick, side, dtype)
    calls = record_launches()
    loop()
    attention_backward(dtype)
    return compile_tiles(calls, dtype_name)


def sass(cubin: bytes) -> dict:
    """Static SASS instructions of a Triton kernel's one entry and the sizes of its innermost
    loops (what one iteration issues; ``cuda_sass.sass_counts``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        counts = next(iter(sass_counts(Path(f.name)).values()))
    return {"instructions": counts["total"], "inner loops": counts["inner loops"]}


def compile_tiles(calls: dict, dtype_name: str) -> list:
    """One row per recorded launch and tile: compiled for sm_90a, with ptxas's report and the
    SASS's size."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile the recorded tiles for real
    tool, rows = nvidia_tool("ptxas"), []
    for (name, key), (kernel, configs, args, constants) in calls.items():
        for i, cfg in enumerate(configs):
            compiled = kernel.warmup(*args, grid=(1,), **constants, **(cfg.all_kwargs() if cfg else {}))
            meta = cfg.kwargs if cfg else {k: v for k, v in constants.items() if k.startswith("BLOCK")}
            shared = compiled.metadata.shared
            rows.append({"dtype": dtype_name, "kernel": name, "key": key, "first": i == 0,
                         "tile": " ".join(f"{k}={v}" for k, v in meta.items()),
                         "warps": compiled.metadata.num_warps, "stages": compiled.metadata.num_stages,
                         "shared KiB": shared / 1024, "fits": shared <= SHARED_LIMIT,
                         **usage(compiled.asm["ptx"], tool), **sass(compiled.asm["cubin"])})
    return rows


def main(argv=None) -> None:
    got = in_children(__file__, argv, "dtypes", tuple(DTYPES), "the tiny model (other channel counts)", measure)
    if got is None:
        return
    args, _, per_dtype = got
    rows = [row for rows in per_dtype for row in rows]
    import torch

    from _common import environment, report

    env = environment(torch.device("cpu"))
    env.update({"device": "none (compiled for sm_90a on this machine's CPUs, nothing launched)",
                "model": "tiny (quick)" if args.quick else "published configuration",
                "spilling tiles": str(sum(r["spill B"] > 0 for r in rows)),
                "first tiles that spill": str(sum(r["spill B"] > 0 and r["first"] for r in rows)),
                "tiles that do not fit": str(sum(not r["fits"] for r in rows))})
    report("kernel_resources" + ("_quick" if args.quick else "") + args.tag, rows,
           ["dtype", "kernel", "key", "tile", "warps", "stages", "first", "shared KiB", "fits", "registers",
            "spill B", "instructions", "inner loops"], env)


if __name__ == "__main__":
    main()
