"""Peak memory and memory traffic of the SIPL loop, estimated without a GPU: the reference
against FastSIPL.

The published model runs on a fake CUDA device (PyTorch's FakeTensorMode: shapes, dtypes and
strides, no data), and every tensor an op creates is counted while it lives (its storage's
bytes, until the storage is freed). The peak is the largest sum: what a GPU's caching
allocator reports as ``max_memory_allocated`` less its rounding and fragmentation, and less
library workspaces (checked against a measured peak: 36.9 GiB estimated for the reference in
fp32 at 2048x2048, 38.6 GiB measured on an H200). The fused kernels count through their fake
implementations, which allocate what the kernels return; FastSIPL runs on the Triton backend.
"GB moved" adds up, over every op that is not a view, the bytes of its tensor arguments and
results: what the loop reads and writes at least if each op streams its operands once (most of
the loop is memory-bound, so this over the device's bandwidth is a floor for its time).

Variants: ``eager-fp32``/``eager-bf16`` (``sipl_fast.restore`` on the torch backend: the
published computation) and ``fast-fp32``/``fast-bf16`` (FastSIPL). Usage:
``python benchmarks/fast_sipl_memory.py [--sizes 512,2048,3840x2160] [--variants ...]``; JSON and
markdown under ``benchmarks/results/fast_sipl_memory*``.
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
import weakref
from typing import Callable, List, Optional, Tuple
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from _common import environment, report
from fast_sipl import QUICK_CONFIG, parse_size
from sipl_fast import SIPL, SIPLConfig, FastSIPL, ops, restore
from sipl_fast.ops import _triton

VARIANTS = ("eager-fp32", "eager-bf16", "fast-fp32", "fast-bf16")


_NO_TRAFFIC = {"empty", "empty_like", "new_empty", "empty_strided"}  # allocate only


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, until the storage is freed; ``peak`` is
    the largest total, ``at_peak`` the largest tensors alive then (bytes, shape, dtype, op);
    ``moved`` the bytes each op that is not a view reads and writes (its tensor arguments and
    results), summed, and ``moved_by_op`` the same per op. Ops of FastSIPL's dry pass (its
    one-time warm-up, ``ops.compiling_only``) are not the loop's and go uncounted."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.at_peak, self.moved = {}, 0, 0, [], 0
        self.moved_by_op: dict = {}

    def _count(self, tensor: torch.Tensor, op: str) -> None:
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self.live:
            return

        def freed(_, key=key, size=size):
            self.live.pop(key, None)
            self.now -= size
        self.live[key] = (weakref.ref(storage, freed), size, tuple(tensor.shape), tensor.dtype, op)
        self.now += size
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = sorted((v[1:] for v in self.live.values()), key=lambda v: -v[0])[:5]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _triton.compiling():
            return out
        results = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not func.is_view and not func._schema.is_mutable:  # else its results are storages it did not create
            for t in results:
                self._count(t, str(func))
        if not func.is_view and func.namespace != "prim" and func.overloadpacket.__name__ not in _NO_TRAFFIC:
            operands = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() * t.element_size() for t in operands + results)
            self.moved += moved
            self.moved_by_op[str(func)] = self.moved_by_op.get(str(func), 0) + moved
        return out


@contextlib.contextmanager
def cuda_autocast_allowed():
    """Autocast for CUDA checks for a GPU: tell it there is one (the tensors are fake)."""
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True):
        yield


def runner(name: str, model: SIPL, iterations: int) -> Callable[[torch.Tensor], torch.Tensor]:
    bf16 = name.endswith("bf16")
    if name.startswith("eager"):
        def run(x):
            with torch.no_grad(), ops.backend_scope("torch"), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                return restore(model, x, iterations)
        return run
    fast = FastSIPL(model, dtype=torch.bfloat16 if bf16 else torch.float32, backend="triton", cuda_graphs=False)
    return lambda x: fast(x, iterations)


def estimate(name: str, size: Tuple[int, int, int], iterations: int = 2,
             config: Optional[SIPLConfig] = None) -> LiveBytes:
    """The live-bytes record of one loop of ``name`` at ``size`` (batch, H, W), above the model and input."""
    b, h, w = size
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # deepcopy asks
        with torch.device("cuda"):
            model = SIPL(config or SIPLConfig()).eval()
            x = torch.empty(b, 3, h, w)
        with cuda_autocast_allowed():
            run = runner(name, model, iterations)
            with tracker:
                run(x)
    return tracker


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="comma list ('b4' suffix: batch 4); default 512,2048,3840x2160")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model and small images")
    args = parser.parse_args(argv)
    config = SIPLConfig(**QUICK_CONFIG) if args.quick else SIPLConfig()
    names = [v.strip() for v in args.variants.split(",")]
    if set(names) - set(VARIANTS):
        parser.error(f"--variants: expected some of {VARIANTS}, got {names}")
    rows: List[dict] = []
    for text in (args.sizes or ("32,40x24b2" if args.quick else "512,2048,3840x2160")).split(","):
        size = parse_size(text)
        row = {"size": "x".join(map(str, size)), "pixels": size[0] * size[1] * size[2]}
        for name in names:
            tracker = estimate(name, size, args.iterations, config)
            row[f"{name} GiB"] = tracker.peak / 2**30
            row[f"{name} GB moved"] = tracker.moved / 1e9
            print(f"[{row['size']}] {name}: {tracker.peak / 2**30:.2f} GiB, {tracker.moved / 1e9:.1f} GB moved; largest then: "
                  + ", ".join(f"{n / 2**30:.2f} GiB {list(s)} {str(d)[6:]} ({op})" for n, s, d, op in tracker.at_peak[:3])
                  + "; most traffic: " + ", ".join(f"{op} {n / 1e9:.1f} GB" for op, n in sorted(
                      tracker.moved_by_op.items(), key=lambda kv: -kv[1])[:8]), flush=True)
        for name in names[1:]:
            row[f"{name} / {names[0]}"] = row[f"{name} GiB"] / row[f"{names[0]} GiB"]
        rows.append(row)
    columns = (["size"] + [f"{n} GiB" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
               + [f"{n} GB moved" for n in names])
    env = environment(torch.device("cpu"))
    env.update({"device": "none (FakeTensorMode, a fake CUDA device)",
                "model": "tiny (quick)" if args.quick else "published configuration",
                "iterations": str(args.iterations), "peak": "estimated live tensor bytes, above the model and input"})
    report("fast_sipl_memory" + ("_quick" if args.quick else ""), rows, columns, env)


if __name__ == "__main__":
    main()
