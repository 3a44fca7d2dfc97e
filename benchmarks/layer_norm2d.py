"""Benchmark sipl_fast.ops.layer_norm2d on the shapes SIPL meets at a 512x512 input.

Baselines in the same run: the eager reference (the published formula) and
``torch.compile`` of it; then every backend this install can run. Reports ms,
GB/s (read x + write y) and speedups over eager. Usage:
``python benchmarks/layer_norm2d.py [--dtype bf16] [--quick]``.
"""
from __future__ import annotations

import argparse

import torch

from _common import environment, report, time_ms
from sipl_fast import ops
from sipl_fast.ops.layer_norm2d import layer_norm2d_torch

# (channels, side) of the LayerNorm2d inputs at a 512x512 image: levels 1-4, noise levels
SHAPES = [(48, 512), (96, 512), (96, 256), (192, 128), (384, 64), (704, 64), (320, 128), (160, 256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    shapes = [(c, s // 4) for c, s in SHAPES[:3]] if args.quick or device.type == "cpu" else SHAPES
    backends = [name for name, info in ops.available_backends().items() if info["available"] and name != "torch"]
    compiled = torch.compile(layer_norm2d_torch)
    rows = []
    for c, side in shapes:
        x = torch.randn(1, c, side, side, device=device, dtype=dtype)
        w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
        gbytes = 2 * x.numel() * x.element_size() / 1e9
        row = {"shape": f"1x{c}x{side}x{side}", "dtype": str(dtype).replace("torch.", "")}
        candidates = {"eager": lambda: layer_norm2d_torch(x, w, b), "compile": lambda: compiled(x, w, b)}
        candidates.update({name: (lambda n=name: ops.layer_norm2d(x, w, b, backend=n)) for name in backends})
        for name, fn in candidates.items():
            ms = time_ms(fn, device)
            row[f"{name} ms"] = ms
            row[f"{name} GB/s"] = gbytes / (ms / 1e3)
        for name in candidates:
            row[f"{name} speedup"] = row["eager ms"] / row[f"{name} ms"]
        rows.append(row)
    names = ["eager", "compile"] + backends
    columns = ["shape", "dtype"] + [f"{n} ms" for n in names] + [f"{n} GB/s" for n in names] + [f"{n} speedup" for n in names[1:]]

    def plot(plt):
        fig, ax = plt.subplots(figsize=(8, 4))
        for n in names:
            ax.plot([r["shape"] for r in rows], [r[f"{n} GB/s"] for r in rows], marker="o", label=n)
        ax.set_ylabel("GB/s (read x + write y)")
        ax.set_title(f"layer_norm2d, {rows[0]['dtype']}, {environment(device)['device']}")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
        return fig

    report(f"layer_norm2d_{device.type}", rows, columns, environment(device), plot)


if __name__ == "__main__":
    main()
