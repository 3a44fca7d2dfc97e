"""Shared benchmark plumbing: timing, a printed table, JSON and a plot under benchmarks/results/.

Every benchmark times its baselines in the same run and reports ratios to them;
speed is never asserted in tests.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

#: Where results go; SIPL_FAST_BENCH_RESULTS overrides (tests write to a temporary folder).
RESULTS = Path(os.environ.get("SIPL_FAST_BENCH_RESULTS") or Path(__file__).parent / "results")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, min_time_s: float = 0.2) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start_all < min_time_s and len(times) < 200):
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
    return times[len(times) // 2]


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
    """Print a markdown table and write ``<name>.json``, ``<name>.md`` (and ``<name>.png``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = f"# {name}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for row in rows:
        table += "| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |\n"
    print(header + table)
    (RESULTS / f"{name}.md").write_text(header + table)
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
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
