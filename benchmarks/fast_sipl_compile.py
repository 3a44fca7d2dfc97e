"""Cold-start compile time of FastSIPL's Triton kernels, measured without a GPU.

A GPU's first run of FastSIPL compiles every Triton kernel specialisation of the loop (about
70 of the published model, counting the autotuners' tiles). Without help, Triton
compiles each when its first launch reaches it, one after another; FastSIPL's dry pass
(``ops.compiling_only``) compiles them all first, side by side on every CPU core. This script
measures both on this machine's CPUs, for sm_90a, each mode in a fresh process with an empty
Triton cache:

- ``serial``: the kernels compile one after another (what the loop's first launches cost);
- ``threads``: the dry pass, one thread per CPU core (what FastSIPL's warm-up costs).

No GPU is needed: Triton is given just enough of a driver to compile for sm_90a (nothing is
launched), and tensors say they are on CUDA so that the launchers pick their GPU tiles (they
stay on the CPU). The loop runs in fp16 (the same kernels as bf16) on a small image, whose
kernels are the same as at any size whose sides are multiples of 16 (no bands). Seconds
include the loop's PyTorch ops on the CPU (``loop s``, measured once everything is compiled).
Usage: ``python benchmarks/fast_sipl_compile.py [--modes serial,threads] [--quick]``; JSON
and markdown under ``benchmarks/results/fast_sipl_compile*``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("serial", "threads")


def compile_only_driver() -> None:
    """Give Triton a driver that compiles for sm_90a and launches nothing (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class CompileOnly:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(CompileOnly())


def compile_only_loop(quick: bool, side: int, dtype=None):
    """A function that runs FastSIPL's dry pass (``ops.compiling_only``) of the 2-iteration loop,
    backend triton, on a ``side`` x ``side`` image, compiling its Triton kernels for sm_90a on
    this machine's CPUs; ``dtype`` float16 (default: the same kernels as bfloat16) or float32.
    Call it in a fresh process: it gives Triton the compile-only driver and makes every tensor
    say it is on CUDA."""
    os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, compiled for sm_90a
    import torch

    compile_only_driver()
    from fast_sipl import QUICK_CONFIG
    from sipl_fast import SIPL, SIPLConfig, FastSIPL, ops

    fast = FastSIPL(SIPL(SIPLConfig(**QUICK_CONFIG) if quick else SIPLConfig()), dtype=dtype or torch.float16,
                    backend="torch")
    os.environ["TRITON_INTERPRET"] = "1"  # the ops' checks take CPU tensors...
    torch.Tensor.is_cuda = property(lambda self: True)  # ...and their launchers the GPU tiles
    fast._scope = "triton"
    x = torch.rand(1, 3, side, side)

    def dry_pass() -> None:
        with fast._context(), ops.compiling_only():
            fast._loop(x, 2)
    return dry_pass


def child(mode: str, quick: bool, side: int) -> dict:
    """One mode in this (fresh) process: seconds of the dry pass with an empty cache, the
    kernels it compiled, and the seconds of the same pass once they are compiled."""
    cache = Path(tempfile.mkdtemp(prefix="sipl_fast_compile_"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    loop = compile_only_loop(quick, side)
    from sipl_fast.ops import _triton

    if mode == "serial":
        _triton._async_mode = lambda pool: None

    def dry_pass() -> float:
        begin = time.perf_counter()
        loop()
        return time.perf_counter() - begin

    cold = dry_pass()
    warm = dry_pass()
    kernels = len(list(cache.rglob("__grp__*.json")))
    return {"mode": mode, "threads": os.cpu_count() if mode == "threads" else 1, "kernels": kernels,
            "seconds": cold, "loop s": warm, "compile s": cold - warm}


def in_children(script: str, argv, option: str, choices, quick_help: str, measure):
    """The command line of the compile-only scripts: ``--<option>`` a comma list of ``choices``,
    ``--quick`` (the tiny model), ``--side``, ``--tag`` (appended to the results' file name, e.g.
    ``_triton3.6`` for a run with another Triton on ``PYTHONPATH``). Each chosen name runs ``measure(name, quick, side)``
    in a fresh process (the compile-only driver and its patches stay there), whose JSON result
    comes back. Returns (args, names, results), or None in such a child."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or script).splitlines()[0])
    parser.add_argument(f"--{option}", default=",".join(choices), help=f"comma list of {', '.join(choices)}")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--tag", default="", help="appended to the results' file name")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.quick, args.side)))
        return None
    names = [n.strip() for n in getattr(args, option).split(",")]
    if set(names) - set(choices):
        parser.error(f"--{option}: expected some of {tuple(choices)}, got {names}")
    results = []
    for name in names:
        cmd = [sys.executable, script, "--child", name, "--side", str(args.side)] + ["--quick"] * args.quick
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(script).parent)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(name, "done", flush=True)
    return args, names, results


def main(argv=None) -> None:
    got = in_children(__file__, argv, "modes", MODES, "the tiny model (fewer specialisations)", child)
    if got is None:
        return
    args, modes, rows = got
    if "serial" in modes and "threads" in modes:
        rows[modes.index("threads")]["compile speedup"] = (rows[modes.index("serial")]["compile s"]
                                                           / rows[modes.index("threads")]["compile s"])
    import torch
    from _common import environment, report

    env = environment(torch.device("cpu"))
    env.update({"device": "none (compiled for sm_90a on this machine's CPUs, nothing launched)",
                "cpus": str(os.cpu_count()), "model": "tiny (quick)" if args.quick else "published configuration",
                "image": f"{args.side}x{args.side}, fp16, 2 iterations, backend triton"})
    report("fast_sipl_compile" + ("_quick" if args.quick else "") + args.tag, rows,
           ["mode", "threads", "kernels", "seconds", "loop s", "compile s", "compile speedup"], env)


if __name__ == "__main__":
    main()
