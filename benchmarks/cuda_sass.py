"""Registers, spills, shared memory and machine instructions of every CUDA C++ kernel entry of
``kernels/``, compiled for sm_90a, without a GPU.

Where a kernel is bound by instruction issue (the gated depthwise convolution: a few dozen
arithmetic instructions per output against 2 loads), the instruction count is the first number
to watch, and it can be read without a GPU: each ``kernels/*.cu`` is compiled with nvcc to a
cubin for sm_90a (``ptxas -v`` reports registers, spill stores and static shared memory), and
nvdisasm (``_common.nvidia_tool``) lists its SASS. Per entry: static instruction
count (code size, not executed instructions: loops run their bodies many times), and of them
calls (subroutines such as 64-bit integer division), global loads and stores, FFMA and MUFU;
and the sizes of its innermost loops, what one iteration issues (the gate's row loops: divide by
the outputs an iteration computes, e.g. 8 for NCHW's unrolled pair of rows of 2 columns).
Usage: ``python benchmarks/cuda_sass.py [--arch sm_90a]``; JSON and markdown under
``benchmarks/results/cuda_sass*``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

from _common import nvidia_tool, ptxas_report

ROOT = Path(__file__).resolve().parents[1]
#: Instruction families counted per entry (the opcode before its first "." modifier).
FAMILIES = ("CALL", "LDG", "STG", "LDS", "STS", "FFMA", "MUFU", "BAR")


def sass_counts(cubin: Path) -> Dict[str, collections.Counter]:
    """Per entry (function in the cubin): opcode family -> count of static SASS instructions, and
    under "inner loops" the sizes of its innermost loops (a backward branch's span holding no
    other loop; its instructions are what one iteration issues)."""
    text = subprocess.run([nvidia_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    counts, current, labels, pending, branches = {}, None, {}, [], []

    def close() -> None:
        loops = [(labels[target], at) for at, target in branches if labels.get(target, at) < at]  # not self-loops
        inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
        if current is not None:
            current["inner loops"] = "/".join(str(n) for n in sorted({(b - a) // 16 + 1 for a, b in inner}))

    for line in text.splitlines():
        header = re.match(r"\s*\.section\s+\.text\.(\w+),", line)  # one section per function
        if header:
            close()
            current = counts.setdefault(header.group(1), collections.Counter())
            labels, pending, branches = {}, [], []
            continue
        label = re.match(r"(\.L_x_\d+):", line.strip())
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)", line)
        if instruction and current is not None:
            at = int(instruction.group(1), 16)
            labels.update((name, at) for name in pending)
            pending = []
            current[instruction.group(2)] += 1
            current["total"] += 1
            target = re.search(r"`\((\.L_x_\d+)\)", instruction.group(3))
            if instruction.group(2) == "BRA" and target:
                branches.append((at, target.group(1)))
    close()
    return counts


def measure(arch: str) -> List[dict]:
    """One row per kernel entry; the sources compile side by side, one nvcc per CPU core."""
    rows = []
    nvcc = shutil.which("nvcc")
    if not nvcc:
        raise SystemExit("nvcc not found")
    sources = sorted((ROOT / "kernels").glob("*.cu"))
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(os.cpu_count()) as pool:
        cubins = [Path(folder) / f"{source.stem}.cubin" for source in sources]
        builds = pool.map(lambda source, cubin: subprocess.run(
            [nvcc, f"-arch={arch}", "-O3", "-cubin", "-Xptxas", "-v", f"-I{ROOT / 'kernels'}", str(source),
             "-o", str(cubin)], capture_output=True, text=True), sources, cubins)
        for source, cubin, built in zip(sources, cubins, builds):
            if built.returncode:
                raise SystemExit(f"nvcc failed on {source.name}:\n{built.stderr[-2000:]}")
            report = ptxas_report(built.stderr)
            for entry, counts in sorted(sass_counts(cubin).items()):
                if entry not in report:
                    continue
                rows.append({"source": source.name, "entry": entry, **report[entry], "instructions": counts["total"],
                             **{family: counts[family] for family in FAMILIES},
                             "inner loops": counts["inner loops"]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a")
    args = parser.parse_args(argv)
    rows = measure(args.arch)
    import torch

    from _common import environment, report

    env = environment(torch.device("cpu"))
    env.update({"device": f"none (compiled for {args.arch} with nvcc on this machine, nothing launched)",
                "instructions": "static SASS instructions of the entry (code size; loops count once)"})
    report("cuda_sass", rows, ["source", "entry", "registers", "spill B", "shared B", "instructions", *FAMILIES,
                               "inner loops"], env)


if __name__ == "__main__":
    main()
