"""Benchmark sipl_fast.ops.cosine_attention against naive PyTorch and scaled_dot_product_attention.

The op is ``softmax((normalize(q) @ normalize(k)^T) * t_h) @ v`` (L2 normalisation over D,
a per-head temperature t). Baselines timed in the same run, on the same inputs:

- ``naive``: the published computation in the dtype; it materialises the (Nq, Nk) scores,
  so a cell that runs out of memory says ``OOM``;
- ``sdpa``: what a user would write with ``F.scaled_dot_product_attention`` (normalise q and
  k, fold t into q, ``scale=1.0``) on its fastest backend for the shape (FLASH, CUDNN and
  EFFICIENT tried one at a time; the winner is named in ``sdpa backend``);
- ``triton``, ``cuda`` (and ``torch``, the op's reference, with ``--variants``): the op's
  backends; one that raises ``BackendError`` is reported ``n/a``, not a failure.

Per cell: median ms (device time of CUDA-graph replays on a GPU, no launch overhead; autograd's
backward is captured with its forward, and a call that cannot be captured is timed by wall
time, which the run prints), TFLOP/s (4*B*H*Nq*Nk*D per forward; fwd+bwd counts 3.5 times that, the
FlashAttention convention), peak extra memory on a GPU (above inputs and outputs), and before
timing a correctness check (``max|diff|`` against naive, or against sdpa where naive is out
of memory) so a wrong kernel shows in the table; for the op's backends on a GPU, the device
time of each kernel of one call (``kernels``: the main kernel against its preparation and
combine passes). A ``fwd+bwd`` row per shape times autograd
(grads of q, k, v and t; SDPA's backends picked again for it) and reports the largest relative
grad error against naive. Results: ``benchmarks/results/cosine_attention[_fp16|_fp32|_cpu].*``.
Usage: ``python benchmarks/cosine_attention.py [--dtype bf16] [--shapes 0,2|quick] [--no-backward]``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import re
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from _common import environment, kernel_breakdown, report, time_ms
from sipl_fast import ops

OP_MODULE = importlib.import_module("sipl_fast.ops.cosine_attention")  # ops.cosine_attention is the function

#: (Nq, Nk, D, H) with B = 1; --shapes picks them by index (0-6)
SHAPES = [(65536, 4096, 96, 1), (4096, 65536, 96, 1), (16384, 1024, 96, 2), (256, 4096, 384, 1),
          (1048576, 4096, 96, 1), (4096, 1048576, 96, 1), (256, 65536, 384, 1)]
#: a quick look (and the CPU default): odd sizes that leave partial tiles everywhere, and D=96
QUICK = [(77, 45, 24, 2), (300, 1000, 96, 1)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("torch", "triton", "triton-online", "cuda")  # the op's backends (triton-online: no fixed-shift softmax)
VARIANTS = ("naive", "sdpa") + KERNELS
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
ShapeT = Tuple[int, int, int, int]


# --- the computations ----------------------------------------------------------------
def naive(q, k, v, t):
    """The published computation in the input dtype; materialises the (Nq, Nk) scores."""
    scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * t.reshape(1, -1, 1, 1)
    return scores.softmax(dim=-1) @ v


def sdpa(q, k, v, t):
    """The same attention through F.scaled_dot_product_attention: t folded into normalised q, scale 1."""
    qn = F.normalize(q, dim=-1) * t.reshape(1, -1, 1, 1)
    return F.scaled_dot_product_attention(qn, F.normalize(k, dim=-1), v, scale=1.0)


def kernel(name: str) -> Callable:
    """``ops.cosine_attention(..., backend=name)``; ``triton-online``: the Triton kernel with the
    running-max softmax only (GPU)."""
    if name != "triton-online":
        return lambda q, k, v, t: ops.cosine_attention(q, k, v, t, backend=name)

    def run(q, k, v, t):
        if not q.is_cuda:
            raise ops.BackendError("triton-online is timed on a GPU only")
        return OP_MODULE._triton_forward(q, k, v, t.float().contiguous(), online_only=True)[0]
    return run


def sdpa_candidates(device: torch.device) -> Dict[str, Callable]:
    """``{backend name: context}``: each SDPA backend pinned alone on a GPU; the default dispatch elsewhere.

    The context wraps a whole cell (check, timing loop, memory), so its own cost is not timed.
    """
    if device.type != "cuda":
        return {"default": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = [(name.split("_")[0].lower(), getattr(SDPBackend, name)) for name in SDPA_BACKENDS if hasattr(SDPBackend, name)]
    return {name: (lambda b=backend: sdpa_kernel([b])) for name, backend in found}


def with_grads(fn: Callable, q, k, v, t, grad_out) -> Callable[[], tuple]:
    """A closure running forward and backward of ``fn`` and returning the grads of q, k, v and t."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, t)]

    def run():
        return torch.autograd.grad(fn(*leaves), leaves, grad_out)
    return run


# --- measuring -----------------------------------------------------------------------
def free(device: torch.device, collect: bool = False) -> None:
    """Give cached blocks back between variants so a big naive run does not starve the next one.

    ``collect`` also runs the garbage collector (slow: only after a failure, whose traceback held tensors).
    """
    if collect:
        gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: the cells after this say so
            pass


def tensors(out) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def attempt(fn: Callable, device: torch.device, notes: Dict[str, str], label: str, expected: tuple = ()):
    """Run ``fn``: ``(result, None)``, or ``(None, why)`` with why "OOM", "n/a" or "error: ...".

    ``BackendError`` and the ``expected`` exceptions (an SDPA backend refusing a shape) are "n/a".
    """
    why = None
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        why = "OOM"
    except (ops.BackendError,) + expected as e:
        why, notes[label] = "n/a", str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    except Exception as e:  # one broken cell must not lose the run: say so and go on
        print(f"{label}: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        why, notes[label] = f"error: {type(e).__name__}", str(e)[:300]
    free(device, collect=True)
    return None, why


def peak_extra_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory of one call above what was allocated before it, less its outputs (MiB; GPU only)."""
    if device.type != "cuda":
        return None
    free(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base - sum(o.numel() * o.element_size() for o in tensors(out))
    del out
    return extra / 2**20


def max_diff(out, ref) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(tensors(out), tensors(ref)))


def rel_err(out, ref) -> float:
    """Largest ``max|a - b| / max|b|`` over the tensors (grads of q, k, v, t differ in scale)."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(tensors(out), tensors(ref)))


class Cell:
    """Times one variant on one shape into ``row``: check, ms, TFLOP/s, extra memory."""

    def __init__(self, row: dict, device: torch.device, flops: float, timing: dict, notes: Dict[str, str],
                 expected: tuple = ()):
        self.row, self.device, self.flops, self.timing, self.notes = row, device, flops, timing, notes
        self.expected = expected

    def run(self, name: str, fn: Callable, ref=None, err_col: Optional[str] = None, err=max_diff, keep=False,
            tag: Optional[str] = None):
        """Returns the output when ``keep`` (the reference), else None; the row says why a cell is empty."""
        label = f"{self.row['pass']} {self.row['shape']} {tag or name}"
        out, why = attempt(fn, self.device, self.notes, label, self.expected)
        if out is None:
            self.row[f"{name} ms"] = why
            return None
        if ref is not None and err_col:
            self.row[err_col] = err(out, ref)
        if not keep:
            del out
            out = None
        ms, why = attempt(lambda: time_ms(fn, self.device, **self.timing), self.device, self.notes, label)
        if ms is None:
            self.row[f"{name} ms"] = why
            return out
        self.row[f"{name} ms"], self.row[f"{name} TFLOP/s"] = ms, self.flops / ms / 1e9
        mem, _ = attempt(lambda: peak_extra_mib(fn, self.device), self.device, self.notes, label + " memory")
        if mem is not None:
            self.row[f"{name} extra MiB"] = mem
        if name in KERNELS:
            parts, _ = attempt(lambda: kernel_breakdown(fn, self.device), self.device, self.notes, label + " kernels")
            if parts is not None:
                self.row[f"{name} kernels"] = parts
        free(self.device)
        return out


# --- one shape -----------------------------------------------------------------------
def shape_name(shape: ShapeT) -> str:
    def n(x):
        return f"{x // 2**20}M" if x % 2**20 == 0 else f"{x // 1024}K" if x % 1024 == 0 and x >= 4096 else str(x)
    nq, nk, d, h = shape
    return f"{n(nq)}x{n(nk)} d{d} h{h}"


def make_inputs(shape: ShapeT, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random q, k, v and a temperature sharp enough (10 down to 5) that a wrong kernel shows."""
    nq, nk, d, h = shape
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=g, device=device, dtype=dtype) for n in (nq, nk, nk))
    t = torch.linspace(10.0, 5.0, h, device=device, dtype=dtype)
    return q, k, v, t


def bench_shape(shape: ShapeT, variants: Sequence[str], dtype, device, timing, backward: bool) -> List[dict]:
    """The forward row (and the fwd+bwd row) of one shape."""
    nq, nk, d, h = shape
    q, k, v, t = make_inputs(shape, dtype, device)
    flops = 4.0 * h * nq * nk * d
    base = {"shape": shape_name(shape), "Nq": nq, "Nk": nk, "D": d, "H": h, "B": 1,
            "dtype": str(dtype).replace("torch.", "")}
    kernels = [n for n in KERNELS if n in variants]
    rows = []

    # forward: naive first (the reference), then every SDPA backend, then the op's backends
    row, notes = {**base, "pass": "forward"}, {}
    timing = {**timing, "graph": True}  # device time (graph replays)
    cell = Cell(row, device, flops, timing, notes)
    ref, row["ref"] = None, "none"
    if "naive" in variants:
        ref = cell.run("naive", lambda: naive(q, k, v, t), keep=True)
        row["ref"] = "naive" if ref is not None else "none"
    if "sdpa" in variants:
        best = fastest_sdpa(row, base, device, flops, timing, notes, lambda: sdpa(q, k, v, t), ref,
                            "sdpa max|diff|")
        if best is not None and ref is None:  # naive ran out of memory: check the kernels against the fastest SDPA
            with sdpa_candidates(device)[best]():
                ref, _ = attempt(lambda: sdpa(q, k, v, t), device, notes, "sdpa ref", (RuntimeError,))
            row["ref"] = f"sdpa ({best})" if ref is not None else "none"
    if ref is not None:
        row["ref max|out|"] = ref.float().abs().max().item()
    for name in kernels:
        cell.run(name, lambda n=name: kernel(n)(q, k, v, t), ref, f"{name} max|diff|")
    del ref
    free(device)
    speedups(row, kernels)
    row["notes"] = notes
    rows.append(row)
    announce(row)

    if backward:
        row, notes = {**base, "pass": "fwd+bwd"}, {}
        cell = Cell(row, device, 3.5 * flops, timing, notes)
        grad_out = torch.randn_like(q)
        ref = None
        if "naive" in variants:
            ref = cell.run("naive", with_grads(naive, q, k, v, t, grad_out), keep=True)
        row["ref"] = "naive" if ref is not None else "none"
        if "sdpa" in variants:
            run_sdpa = with_grads(sdpa, q, k, v, t, grad_out)
            best = fastest_sdpa(row, base, device, 3.5 * flops, timing, notes, run_sdpa, ref, "sdpa grad err", rel_err)
            if best is not None and ref is None:
                with sdpa_candidates(device)[best]():
                    ref, _ = attempt(run_sdpa, device, notes, "sdpa ref", (RuntimeError,))
                row["ref"] = f"sdpa ({best})" if ref is not None else "none"
        for name in (n for n in kernels if n != "triton-online"):  # forward-only variant
            cell.run(name, with_grads(kernel(name), q, k, v, t, grad_out), ref, f"{name} grad err", rel_err)
        del ref, grad_out
        free(device)
        speedups(row, kernels)
        row["notes"] = notes
        rows.append(row)
        announce(row)
    return rows  # the inputs go with this frame; the caller frees the cache


def fastest_sdpa(row, base, device, flops, timing, notes, fn, ref, err_col, err=max_diff) -> Optional[str]:
    """Time ``fn`` under each SDPA backend; the fastest one's cells go into ``row``. Returns its name."""
    best, times = None, []
    for name, pinned in sdpa_candidates(device).items():
        trial = {**base, "pass": row["pass"]}
        with warnings.catch_warnings(), pinned():
            warnings.simplefilter("ignore")  # "flash attention does not support ...": that backend is n/a
            Cell(trial, device, flops, timing, notes, expected=(RuntimeError,)).run(
                "sdpa", fn, ref, err_col, err, tag=f"sdpa {name}")
        ms = trial.get("sdpa ms")
        times.append(f"{name} {ms:.3g}" if isinstance(ms, float) else f"{name} {ms}")
        if isinstance(ms, float) and (best is None or ms < best[1]["sdpa ms"]):
            best = (name, trial)
    row["sdpa backends ms"] = ", ".join(times)
    if best is None:
        row["sdpa ms"], row["sdpa backend"] = "n/a", "none"
        return None
    row["sdpa backend"] = best[0]
    row.update({key: val for key, val in best[1].items() if key.startswith("sdpa ")})
    return best[0]


def speedups(row: dict, kernels: Sequence[str]) -> None:
    """``<kernel> vs <baseline>`` = baseline ms / kernel ms (> 1: the kernel is faster)."""
    for name in kernels:
        for base in ("sdpa", "naive"):
            a, b = row.get(f"{name} ms"), row.get(f"{base} ms")
            if isinstance(a, float) and isinstance(b, float):
                row[f"{name} vs {base}"] = b / a


def announce(row: dict) -> None:
    """One line per row as soon as it is done, so a run cut short still shows what it measured."""
    cells = []
    for name in VARIANTS:
        ms = row.get(f"{name} ms")
        if ms is not None:
            label = f"sdpa ({row.get('sdpa backend')})" if name == "sdpa" else name
            cells.append(f"{label} {ms:.3f} ms" if isinstance(ms, float) else f"{label} {ms}")
    elapsed = time.perf_counter() - _started
    print(f"[{row['pass']} {row['shape']}, {elapsed:.0f} s in] " + ", ".join(cells), flush=True)
    for label, why in row.get("notes", {}).items():
        if why not in _said:  # each reason once per run
            _said.add(why)
            print(f"    {label}: {why}", flush=True)


_said: set = set()
_started = time.perf_counter()


# --- command line --------------------------------------------------------------------
def parse_shapes(text: Optional[str], quick: bool, device: torch.device) -> List[ShapeT]:
    """``None`` (all on a GPU, the quick set elsewhere), ``all``, ``quick``, or a comma list of
    indices into SHAPES and ``NqxNkxDxH`` shapes, e.g. ``0,2,77x45x24x2``."""
    if text is None:
        return list(QUICK if quick or device.type != "cuda" else SHAPES)
    if text.strip().lower() in ("all", "quick"):
        return list(SHAPES if text.strip().lower() == "all" else QUICK)
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.isdigit() and int(item) < len(SHAPES):
            shapes.append(SHAPES[int(item)])
        elif re.fullmatch(r"\d+x\d+x\d+x\d+", item):
            shapes.append(tuple(int(x) for x in item.split("x")))
        else:
            raise argparse.ArgumentTypeError(
                f"--shapes: {item!r} is neither an index 0-{len(SHAPES) - 1} nor NqxNkxDxH (e.g. 77x45x24x2)")
    return shapes


def backends_line() -> str:
    """What ``ops.available_backends()`` says, in one line for the report header."""
    try:
        status = ops.available_backends()
    except Exception as e:  # never lose a finished run over its header
        return f"unknown ({type(e).__name__}: {e})"
    return ", ".join(f"{n} ({s['route']})" if s["available"] else f"{n} (no)" for n, s in status.items())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help="all | quick | indices into SHAPES and NqxNkxDxH, e.g. 0,2,77x45x24x2 "
                                         "(default: all on a GPU, quick on the CPU)")
    parser.add_argument("--quick", action="store_true", help="the quick shapes (what `sipl-fast bench --quick` asks)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="naive,sdpa,triton,cuda",
                        help=f"comma list of {', '.join(VARIANTS)} (torch is the op's reference backend)")
    parser.add_argument("--no-backward", action="store_true", help="skip the fwd+bwd rows")
    parser.add_argument("--backward-shapes", help="fwd+bwd rows only for these shapes (same syntax as --shapes; "
                                                  "default: every shape on a GPU, the first on the CPU)")
    parser.add_argument("--min-time", type=float, help="seconds of repeats per cell (default 0.25 on a GPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    try:
        shapes = parse_shapes(args.shapes, args.quick, device)
        if args.backward_shapes is not None:
            backward_shapes = parse_shapes(args.backward_shapes, False, device)
        else:  # Triton's interpreter takes ~25 s per fwd+bwd at 300 x 1000: on the CPU, the smallest only
            backward_shapes = shapes if device.type == "cuda" else shapes[:1]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gpu = device.type == "cuda"
    timing = {"warmup": 2 if gpu else 1, "min_time_s": args.min_time if args.min_time is not None else 0.25 if gpu else 0.0}

    rows = []
    for shape in shapes:
        try:
            rows += bench_shape(shape, variants, dtype, device, timing,
                                backward=not args.no_backward and shape in backward_shapes)
            free(device)
        except Exception as e:  # e.g. the inputs themselves do not fit: record it, go on
            traceback.print_exc()
            rows.append({"shape": shape_name(shape), "pass": "forward", "ref": f"error: {type(e).__name__}: {e}"[:200]})
            free(device, collect=True)

    names = [n for n in VARIANTS if n in variants]
    kernels = [n for n in KERNELS if n in variants]
    columns = (["shape", "dtype", "pass", "ref", "sdpa backend"] + [f"{n} ms" for n in names]
               + [f"{n} TFLOP/s" for n in names] + [f"{n} vs {b}" for n in kernels for b in ("sdpa", "naive")]
               + ["ref max|out|"] + [f"{n} max|diff|" for n in ["sdpa"] + kernels]
               + [f"{n} grad err" for n in ["sdpa"] + kernels])
    if gpu:
        columns += [f"{n} extra MiB" for n in names] + [f"{n} kernels" for n in kernels]
    columns.append("sdpa backends ms")
    env = environment(device)
    if gpu:
        env["cudnn"] = str(torch.backends.cudnn.version())
    env.update({"backends": backends_line(), "shapes": "Nq x Nk, head dim d, heads h, batch 1",
                "ratios": "'X vs Y' = Y ms / X ms (> 1: X is faster)",
                "timing": "device time of CUDA-graph replays on a GPU (fwd+bwd: autograd's backward captured too)",
                "errors": "max|diff| vs ref (forward); grad err = max over q, k, v, t of max|diff| / max|ref grad|"})

    def plot(plt):
        passes = [p for p in ("forward", "fwd+bwd") if any(r.get("pass") == p for r in rows)]
        fig, axes = plt.subplots(len(passes), 1, figsize=(max(8.0, 1.6 * len(shapes) + 2), 4.2 * len(passes)),
                                 squeeze=False)
        for ax, which in zip(axes[:, 0], passes):
            rs = [r for r in rows if r.get("pass") == which]
            shown = [n for n in names if which == "forward" or n != "cuda" or any(
                isinstance(r.get("cuda ms"), float) for r in rs)]
            width = 0.8 / len(shown)
            for i, n in enumerate(shown):
                xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(rs))]
                vals = [r.get(f"{n} TFLOP/s") for r in rs]
                label = n if n != "sdpa" else "sdpa (fastest backend)"
                ax.bar(xs, [x if isinstance(x, float) else 0.0 for x in vals], width, label=label)
                for x, val, r in zip(xs, vals, rs):
                    if not isinstance(val, float):
                        ax.text(x, 0, str(r.get(f"{n} ms", "n/a")).split(":")[0], rotation=90, ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(rs)))
            ax.set_xticklabels([r["shape"] for r in rs], rotation=20, fontsize=8)
            ax.set_ylabel("TFLOP/s" + (" (fwd + bwd = 3.5x fwd)" if which == "fwd+bwd" else ""))
            ax.set_title(f"cosine_attention {which}, {str(dtype).replace('torch.', '')}, {env['device']}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    suffix = "" if gpu else f"_{device.type}"
    suffix += "" if dtype is torch.bfloat16 or not gpu else f"_{args.dtype}"
    report(f"cosine_attention{suffix}", rows, columns, env, plot)


if __name__ == "__main__":
    main()
