"""What every Triton backend in ``sipl_fast.ops`` checks before it runs a call, and how it launches.

Triton runs CUDA tensors on a GPU and, with ``TRITON_INTERPRET=1``, CPU tensors in its
interpreter (tests). The interpreter computes ``tl.dot`` on bf16 operands wrongly, so ops
whose kernels multiply matrices refuse bf16 there.

Every launch goes through :func:`launch` or :func:`launch_fitting`, so that inside
:func:`compiling_only` a dry pass of a whole loop compiles its kernels at once instead of
running them (FastSIPL's warm-up).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with Linux torch wheels only
    triton = None


if triton is not None:

    @triton.jit
    def tile(base, rows, cols, s_row, s_col, WIDE: tl.constexpr):
        """Pointers of the [rows, cols] tile at ``base``: int32 offsets (fewer registers) unless
        the tensor's offsets within one image may pass 2**31 (``WIDE``, ``_layout.wide``)."""
        if WIDE:
            return base + rows.to(tl.int64)[:, None] * s_row + cols.to(tl.int64)[None, :] * s_col
        return base + (rows[:, None] * s_row + cols[None, :] * s_col)

    @triton.jit
    def shifted(ptrs, mask, shift):
        """The tile at ``ptrs`` in fp32 minus ``shift`` (each pixel's channel 0), 0 where masked:
        what a LayerNorm sums. x - x[0] is exact where the channels lie within a factor 2 of
        each other, so a mean that dwarfs the spread costs no digits (x - mean would)."""
        return tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)

    @triton.jit
    def interior(first, count, H, W):
        """Whether the pixels first .. first + count - 1 (linear, y * W + x) lie in one row of an
        H x W image with every 3x3 neighbourhood inside it (a scalar): ``dwconv3x3``'s
        unmasked path."""
        y = first // W
        x = first % W
        return (y >= 1) & (y < H - 1) & (x >= 1) & (x + count < W)

    @triton.jit
    def dwconv3x3(rows, rows_ok, pix, pix_ok, sp, Wt, w_tap, channels, H, W, inside, TAP_UNROLL: tl.constexpr):
        """[R, P] fp32: the depthwise 3x3 convolution (zero padding) of R channels of an H x W
        image at P pixels ``pix`` (linear, y * W + x): ``rows`` are [R, 1] pointers to each
        channel's pixel 0 (pixel p at + p * sp), weights tap-major, Wt[tap * w_tap + channel]
        (``_layout.tap_major``: a tap's weights of neighbouring channels are neighbours, vector
        loads). Neighbouring taps re-read the same lines, which the caches serve.

        ``inside`` (a scalar: every row valid, ``pix`` consecutive and ``interior``; most
        tiles of a large image) runs the 9 taps unrolled and without masks: no bounds
        arithmetic, no zero-filling move before each masked load, vector loads where aligned.
        sm_90a SASS, bf16, default tiles, instructions a loop iteration on that path against
        the masked one before: the GDFN tail 1541 -> 913 (NCHW), 1184 -> 824 (channels-last);
        MDTA's convolving Gram pass 721 -> 323 (NCHW), the product 450 -> 296. The masked path
        (borders, partial blocks) unrolls as ``TAP_UNROLL`` (1, 3 or 9) says, a tile choice:
        unrolled, 3 or 9 taps' loads are in flight together, but their addresses and values
        take registers."""
        acc = tl.zeros([rows.shape[0], pix.shape[0]], dtype=tl.float32)
        if inside:
            for tap in tl.static_range(9):
                w = tl.load(Wt + tap * w_tap + channels)
                t = tl.load(rows + ((pix + (tap // 3 - 1) * W + (tap % 3 - 1)) * sp)[None, :])
                acc += w[:, None] * t.to(tl.float32)
        else:
            y = pix // W
            x = pix % W
            for tap in tl.range(0, 9, loop_unroll_factor=TAP_UNROLL):
                dy = tap // 3 - 1
                dx = tap % 3 - 1
                ok = pix_ok & (y + dy >= 0) & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
                w = tl.load(Wt + tap * w_tap + channels, mask=rows_ok, other=0.0)
                t = tl.load(rows + ((pix + dy * W + dx) * sp)[None, :], mask=rows_ok[:, None] & ok[None, :],
                            other=0.0)
                acc += w[:, None] * t.to(tl.float32)
        return acc


def problem(x: torch.Tensor, dots: bool = False) -> Optional[str]:
    """None when Triton can run a kernel on ``x``'s device and dtype, else why not.

    ``dots``: the kernel uses ``tl.dot`` (refused for bf16 in the interpreter).
    """
    if triton is None:
        return "Triton is not installed"
    if not x.is_cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "input is not on a CUDA device (CPU tensors need TRITON_INTERPRET=1)"
        if dots and x.dtype == torch.bfloat16:
            return "Triton's CPU interpreter computes bf16 dot products wrongly; use float32 or float16 on the CPU"
    return None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 in the interpreter, so CPU tests exercise
    the split paths that small grids take on a GPU."""
    if device.type != "cuda":
        return 4
    from . import _cuda

    return _cuda._sm_count(device)


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: exact fp32 products for fp32 inputs (no TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def per_load(values: int, per_item: int, items: int) -> int:
    """How many of ``items`` partials (slices, splits) of ``per_item`` values each a reduction
    kernel loads at once: a power of two, about ``values`` values a load, no more than the items
    need, at least one. One partial a load left every iteration waiting on the caches."""
    return max(1, min(values // per_item, triton.next_power_of_2(items)))


def configs(*shapes, names=("BLOCK_N", "BLOCK_K"), **meta) -> list:
    """triton.Config list from (size, [size,] warps, stages) tuples, the sizes named by ``names``,
    each with the fixed meta-parameters ``meta`` too; first choice first (the image ops'
    launchers list later ones that need less shared memory)."""
    return [triton.Config({**dict(zip(names, sizes)), **meta}, num_warps=w, num_stages=s) for *sizes, w, s in shapes]


#: CUDA's largest grid: 2**31 - 1 programs along axis 0, 65535 along axes 1 and 2.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel, grid) -> None:
    """ValueError when ``grid`` passes CUDA's limits (the launch would fail with an opaque
    error): kernels put the axes that grow with the image on axis 0."""
    if any(n > limit for n, limit in zip(grid, GRID_LIMITS)):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        raise ValueError(f"{name}: grid {tuple(grid)} passes CUDA's limits {GRID_LIMITS}")


_dry: contextvars.ContextVar[bool] = contextvars.ContextVar("sipl_fast_triton_dry", default=False)


def compiling() -> bool:
    """Whether this is a dry pass (inside :func:`compiling_only`)."""
    return _dry.get()


def _async_mode(pool, ignore_errors: bool = True):
    """Triton's asynchronous compilation on ``pool`` (compile errors left to the launches, or
    with ``ignore_errors=False`` the first raised when the block ends), or None where this
    Triton has none (or one is already active)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return None
    if active_mode.get() is not None:
        return None
    try:
        return AsyncCompileMode(pool, ignore_errors=ignore_errors)
    except TypeError:  # older Triton: errors raise when the block ends
        return AsyncCompileMode(pool)


@contextlib.contextmanager
def compiling_only():
    """Inside the block, launches compile their kernels instead of running (outputs stay
    uninitialised), in a pool of threads, all at once; leaving the block waits for the compiles.

    A cold start of FastSIPL meets about 70 kernel specialisations, which Triton compiles one
    after another, a second or more each, as the first launches reach them; a dry pass of the
    loop in this block compiles them side by side on every CPU core first. Where this Triton
    cannot compile asynchronously, the kernels compile one by one (still without running).
    """
    token = _dry.set(True)
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            mode = _async_mode(pool) if triton is not None else None
            with mode if mode is not None else contextlib.nullcontext():
                yield
    finally:
        _dry.reset(token)


def made_current(device: torch.device):
    """``device`` made the current GPU for the block; a no-op for a CPU, or where there is no
    GPU (fake CUDA tensors: tracing, the memory estimates, which patch ``is_available``)."""
    if device.type == "cuda" and torch.cuda.device_count() > 0:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_device(args):
    """The device of the first CUDA tensor among ``args`` made current for the block
    (:func:`made_current`): Triton launches, compiles for and times on the current device, so
    a tensor on another GPU (``cuda:1`` while ``cuda:0`` is current) would fail to launch with
    "Pointer argument cannot be accessed from Triton"."""
    x = next((a for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
    return made_current(x.device) if x is not None else contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` (a JIT function or an autotuner) on the tensors' GPU
    (:func:`on_device`); inside :func:`compiling_only`, its compilation instead (an autotuner's
    every config)."""
    with on_device(args):
        if _dry.get():
            kernel.warmup(*args, grid=grid, **kwargs)
        else:
            kernel[grid](*args, **kwargs)


_fitting: dict = {}  # (kernel, key) -> index of the first config that fits this GPU


def launch_fitting(kernel, key, configs, grid, *args, **constants) -> None:
    """Launch ``kernel`` with the first of ``configs`` (triton.Config) that fits the device.

    Shared-memory needs differ across Triton versions and GPUs: a config that does not
    fit raises OutOfResources when loaded, before anything runs, so the next is tried.
    The choice is remembered per ``key``, so later calls (and CUDA-graph capture) launch
    directly. ``grid(meta)`` gives the grid for a config's meta-parameters.
    """
    start = _fitting.get((kernel, key), 0)
    for i in range(start, len(configs)):
        cfg = configs[i]
        size = grid(cfg.kwargs)
        check_grid(kernel, size)
        try:
            launch(kernel, size, *args, **constants, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        except triton.runtime.errors.OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _fitting[(kernel, key)] = i
        return


def launch_tuned(kernel, tuned, key, configs, grid, *args, **constants) -> None:
    """Launch ``kernel`` with the fastest of ``configs``: on a GPU through ``tuned`` (``kernel``
    under ``triton.autotune``, pruned to ``configs``), which times them at its first call per
    autotune key, all compiled at once before (:func:`compile_configs`); in the interpreter or
    with ``SIPL_FAST_TRITON_AUTOTUNE=0``, the first that fits (:func:`launch_fitting`). Every
    config's grid is checked against CUDA's limits first."""
    x = next(a for a in args if isinstance(a, torch.Tensor))
    if not x.is_cuda or os.environ.get("SIPL_FAST_TRITON_AUTOTUNE", "1") == "0":
        launch_fitting(kernel, key, configs, grid, *args, **constants)
        return
    for cfg in configs:
        check_grid(kernel, grid(cfg.kwargs))
    compile_configs(kernel, key, configs, *args, **constants)
    launch(tuned, grid, *args, **constants)


_tuners: list = []  # every autotuner made by autotune()


def autotune(kernel, configs, key, prune):
    """``triton.autotune`` of ``kernel`` over ``configs`` per ``key``, pruned per call to
    ``prune(nargs, kw)`` (the tiles for the call's dtype, layout, ...), timed by
    :func:`autotune_bench`; remembered for :func:`tuned_tiles`."""
    pruning = {"early_config_prune": lambda configs, nargs, **kw: prune(nargs, kw)}
    tuner = triton.autotune(configs=configs, key=key, do_bench=autotune_bench, prune_configs_by=pruning)(kernel)
    _tuners.append(tuner)
    return tuner


def tuned_tiles() -> dict:
    """What the autotuners chose so far: ``{kernel: {autotune key: tile}}`` (benchmarks record
    it, so that tile lists can be pruned to the winners)."""
    return {tuner.base_fn.__name__: {str(key): str(cfg) for key, cfg in tuner.cache.items()}
            for tuner in _tuners if tuner.cache}


def autotune_bench(fn, quantiles=None):
    """The autotuners' timing of one tile: 3 ms of warm-up and 10 ms of repeats. Triton's default
    (25 + 100 ms) for the 3 to 7 tiles of each of the loop's ~70 autotuned shapes (at 512^2,
    about 300 tiles) would take much of the warm-up FastSIPL aims to keep under 30 s; a kernel of
    the loop runs in well under a millisecond, so 10 ms still times it dozens of times."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=3, rep=10, quantiles=quantiles)


_compiled: set = set()  # (kernel, key) already compiled by compile_configs


def compile_configs(kernel, key, configs, *args, **constants) -> None:
    """Compile ``kernel`` for every one of ``configs`` at once, in threads (Triton's asynchronous
    compilation), before an autotuner times them: otherwise the first call of a new shape
    compiles them one after another (seconds each). Once per ``key``; where this Triton cannot
    compile asynchronously, a warning, and the autotuner compiles as usual. Inside
    :func:`compiling_only`, nothing: the autotuner's dry launch compiles its configs there."""
    if (kernel, key) in _compiled or _dry.get():
        return
    _compiled.add((kernel, key))
    try:
        with on_device(args), ThreadPoolExecutor(max_workers=min(len(configs), os.cpu_count() or 1)) as pool:
            mode = _async_mode(pool)
            if mode is None:
                raise RuntimeError("no asynchronous compilation in this Triton")
            with mode:  # a config that fails is the autotuner's to skip
                for cfg in configs:
                    kernel.warmup(*args, grid=(1,), **constants, **cfg.all_kwargs())
    except Exception as e:  # noqa: BLE001 - an optimisation only
        warnings.warn(f"sipl_fast: Triton configurations compile one at a time here ({type(e).__name__}: {e})",
                      RuntimeWarning, stacklevel=2)
