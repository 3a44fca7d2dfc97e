"""CUDA launch routes for sipl_fast ops (imported lazily by the op modules).

The device code in ``kernels/*.cu`` reaches the GPU by one of two routes, and
neither depends on torch's C++ ABI (torch can be upgraded without a rebuild):

* ``"extension"``: the compiled ``sipl_fast._C`` (limited-API CPython module,
  static cudart), built at install time when nvcc is available.
* ``"cupy"``: no build; CuPy compiles the same source with NVRTC on first use.

Both receive raw device pointers and launch on torch's current stream without
synchronizing, so they are usable inside CUDA-graph capture (after a warm-up
call, which loads / JIT-compiles the kernel).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import threading

import torch

ROUTE_ENV = "SIPL_FAST_CUDA_ROUTE"
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_KERNEL_NAMES = ("layer_norm2d_fwd_f32", "layer_norm2d_fwd_f16", "layer_norm2d_fwd_bf16")
_THREADS = 256  # launch geometry; same as csrc/sipl_fast_ext.cpp
_MAX_BLOCKS = 65535

_lock = threading.Lock()
_state: tuple[str | None, str, str] | None = None  # (route, reason if None, forced name)
_cupy_functions: dict[str, object] = {}


# ---------------------------------------------------------------- route choice
def _extension_problem() -> str | None:
    try:
        ext = importlib.import_module("sipl_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name == "sipl_fast._C":
            return "no compiled extension (nvcc absent at install, or SIPL_FAST_SKIP_CUDA=1)"
        return f"compiled extension failed to import ({exc})"
    except Exception as exc:  # noqa: BLE001 - e.g. ImportError on a broken .so
        return f"compiled extension failed to import ({type(exc).__name__}: {exc})"
    problem = ext.runtime_problem()
    return None if problem is None else f"compiled extension cannot run: {problem}"


def _cupy_problem() -> str | None:
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name == "cupy":
            return "CuPy is not installed"
        return f"CuPy failed to import ({exc})"
    except Exception as exc:  # noqa: BLE001
        return f"CuPy failed to import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device, ...
        return f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "CuPy sees no CUDA device"


def _resolve() -> tuple[str | None, str, str]:
    forced = os.environ.get(ROUTE_ENV, "").strip().lower()
    probes = {"extension": _extension_problem, "cupy": _cupy_problem}
    if forced and forced not in probes:
        raise ValueError(f"{ROUTE_ENV}={forced!r}: expected 'extension' or 'cupy'")
    reasons = []
    for name in [forced] if forced else list(probes):
        problem = probes[name]()
        if problem is None:
            return name, "", forced
        reasons.append(problem)
    return None, " and ".join(reasons), forced


def _get_state() -> tuple[str | None, str, str]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _resolve()
    return _state


def route() -> str | None:
    """Active route: "extension", "cupy" or None (cached; see SIPL_FAST_CUDA_ROUTE)."""
    name, reason, forced = _get_state()
    if forced and name is None:
        raise RuntimeError(f"{ROUTE_ENV}={forced} but that route cannot run: {reason}")
    return name


def why_unavailable() -> str:
    """One-line reason why route() is None ("" when a route is available)."""
    name, reason, _ = _get_state()
    return "" if name is not None else reason


def _reset() -> None:
    """Forget the cached route (for tests that change the environment)."""
    global _state
    with _lock:
        _state = None


def kernel_dir() -> pathlib.Path:
    """Directory of the .cu/.cuh sources: the installed copy, else the repo's kernels/."""
    package = pathlib.Path(__file__).resolve().parent.parent
    installed = package / "_kernels"
    if (installed / "layer_norm2d.cu").is_file():
        return installed
    return package.parent / "kernels"


# ---------------------------------------------------------------- launching
def _check(x, weight32, bias32, out) -> tuple[int, int, int, int]:
    """Validate arguments (no device sync); return (dtype code, N, C, HW)."""
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"layer_norm2d: unsupported dtype {x.dtype} (float32/float16/bfloat16)")
    if x.dim() != 4 or not x.is_cuda or not x.is_contiguous():
        raise ValueError("layer_norm2d: x must be a contiguous 4-D (N, C, H, W) CUDA tensor")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError("layer_norm2d: out must be a contiguous tensor like x")
    n, c, h, w = x.shape
    for t in (weight32, bias32):
        if t.dtype != torch.float32 or t.device != x.device or not t.is_contiguous() or t.numel() != c:
            raise ValueError(f"layer_norm2d: weight/bias must be contiguous float32 ({c},) on {x.device}")
    return _DTYPE_CODES[x.dtype], n, c, h * w


def _fwd_extension(x, weight32, bias32, eps, out) -> None:
    from sipl_fast import _C

    code, n, c, hw = _check(x, weight32, bias32, out)
    if x.numel() == 0:
        return
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _C.layer_norm2d_fwd(code, x.data_ptr(), weight32.data_ptr(), bias32.data_ptr(),
                            out.data_ptr(), n, c, hw, float(eps), stream)


def _cupy_function(name: str):
    """RawKernel for `name`; CuPy compiles/loads it on first use on each device."""
    fn = _cupy_functions.get(name)
    if fn is None:
        with _lock:
            if not _cupy_functions:
                import cupy

                kdir = kernel_dir()
                source = (kdir / "layer_norm2d.cu").read_text()
                # CuPy's disk cache keys on this source text, not on included
                # headers: append a digest of the headers so edits to them recompile.
                digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(kdir.glob("*.cuh"))))
                source += f"\n// headers sha256: {digest.hexdigest()}\n"
                module = cupy.RawModule(code=source, options=("-std=c++17", f"-I{kdir}"))
                _cupy_functions.update({k: module.get_function(k) for k in _KERNEL_NAMES})
            fn = _cupy_functions[name]
    return fn


def _fwd_cupy(x, weight32, bias32, eps, out) -> None:
    import cupy
    import numpy as np

    code, n, c, hw = _check(x, weight32, bias32, out)
    if x.numel() == 0:
        return
    blocks = min((n * hw + _THREADS - 1) // _THREADS, _MAX_BLOCKS)
    # Pointers go in as numpy.uint64 scalars: CuPy passes numpy scalars by value,
    # and a 64-bit integer has the size of a device pointer parameter.
    args = (np.uint64(x.data_ptr()), np.uint64(weight32.data_ptr()), np.uint64(bias32.data_ptr()),
            np.uint64(out.data_ptr()), np.int64(n), np.int64(c), np.int64(hw), np.float32(eps))
    dev = x.device.index
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream, dev):
            _cupy_function(_KERNEL_NAMES[code])((blocks,), (_THREADS,), args)


_LAUNCHERS = {"extension": _fwd_extension, "cupy": _fwd_cupy}


def layer_norm2d_fwd(x, weight32, bias32, eps, out) -> None:
    """out = LayerNorm over dim 1 of x (NCHW), fp32 math; launched on torch's current stream.

    x/out: contiguous CUDA float32/float16/bfloat16 tensors of one shape;
    weight32/bias32: contiguous float32 (C,) on the same device.
    """
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"layer_norm2d: unsupported dtype {x.dtype} (float32/float16/bfloat16)")
    name = route()
    if name is None:
        raise RuntimeError(f"sipl_fast CUDA kernels unavailable: {why_unavailable()}")
    _LAUNCHERS[name](x, weight32, bias32, eps, out)
