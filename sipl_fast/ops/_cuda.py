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
_DTYPE_SUFFIX = ("f32", "f16", "bf16")
_KERNEL_NAMES = ("layer_norm2d_fwd_f32", "layer_norm2d_fwd_f16", "layer_norm2d_fwd_bf16")
# cosine_attention.cu: head-dim buckets (padded D) of the f16/bf16 tensor-core
# kernels; the fp32 kernels use DP = 64 * ceil(D / 64).
_CA_MMA_DPS = (32, 64, 96, 128, 192, 256, 384, 512)
_CA_KERNEL_NAMES = tuple(
    [f"cosine_attention_fwd_{t}_d{dp}" for t in ("f16", "bf16") for dp in _CA_MMA_DPS]
    + [f"cosine_attention_fwd_f32_d{64 * n}" for n in range(1, 9)]
    + [f"cosine_attention_{kind}_{t}" for kind in ("kinv", "combine") for t in _DTYPE_SUFFIX])
# gated_dwconv_gelu.cu: one entry per layout x storage dtype (index [layout][dtype code]).
_GDG_LAYOUTS = ("nchw", "nhwc")
_GDG_KERNEL_NAMES = tuple(f"gated_dwconv_gelu_{lay}_{t}" for lay in _GDG_LAYOUTS for t in _DTYPE_SUFFIX)
# Kernels of each source file in kernels/ (one CuPy RawModule per file).
_KERNEL_FILES = {"layer_norm2d.cu": _KERNEL_NAMES, "cosine_attention.cu": _CA_KERNEL_NAMES,
                 "gated_dwconv_gelu.cu": _GDG_KERNEL_NAMES}
_THREADS = 256  # launch geometry; same as csrc/sipl_fast_ext.cpp
_MAX_BLOCKS = 65535

_lock = threading.Lock()
_state: tuple[str | None, str, str] | None = None  # (route, reason if None, forced name)
_cupy_functions: dict[str, object] = {}
_sm_counts: dict[int, int] = {}


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


def problem() -> str | None:
    """None when a route can launch kernels, else why not (also a forced route that cannot run)."""
    try:
        return None if route() is not None else why_unavailable()
    except (RuntimeError, ValueError) as e:
        return str(e)


def _active_route() -> str:
    """route(), or RuntimeError saying why no route can launch."""
    name = route()
    if name is None:
        raise RuntimeError(f"sipl_fast CUDA kernels unavailable: {why_unavailable()}")
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
    """RawKernel for `name`; CuPy compiles/loads its source file on first use on each device."""
    fn = _cupy_functions.get(name)
    if fn is None:
        with _lock:
            fn = _cupy_functions.get(name)
            if fn is None:
                import cupy

                fname = next((f for f, names in _KERNEL_FILES.items() if name in names), None)
                if fname is None:
                    raise KeyError(f"unknown kernel {name!r}")
                kdir = kernel_dir()
                source = (kdir / fname).read_text()
                # CuPy's disk cache keys on this source text, not on included
                # headers: append a digest of the headers so edits to them recompile.
                digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(kdir.glob("*.cuh"))))
                source += f"\n// headers sha256: {digest.hexdigest()}\n"
                module = cupy.RawModule(code=source, options=("-std=c++17", f"-I{kdir}"))
                _cupy_functions.update({k: module.get_function(k) for k in _KERNEL_FILES[fname]})
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
    name = _active_route()
    _LAUNCHERS[name](x, weight32, bias32, eps, out)


# ---------------------------------------------------------------- cosine attention
_CA_BN = 64  # keys per tile (kernels/cosine_attention.cu)
_AUX_THREADS = 256  # k-norm / combine kernels: 8 rows (warps) per block


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _ca_geometry(code: int, d: int) -> tuple[str, int, int, int, int, int]:
    """(kernel name, padded D, rows per block, threads, dynamic smem bytes, blocks per SM).

    Mirrors kernels/cosine_attention.cu (MmaGeom / F32Geom) and csrc/sipl_fast_ext.cpp.
    """
    if code == 0:
        dp = (d + 63) // 64 * 64
        smem = 4 * (32 * (dp + 1) + _CA_BN * 65 + _CA_BN * 64 + 32 * 65 + _CA_BN + 32)
        return f"cosine_attention_fwd_f32_d{dp}", dp, 32, 256, smem, 2 if dp <= 320 else 1
    dp = next(b for b in _CA_MMA_DPS if d <= b)
    wd, rg, mt = (1, 4, 2) if dp <= 128 else (4, 4, 1)  # warps per row group, row groups, m16 tiles
    bm, srow = 16 * mt * rg, dp + 8
    smem = bm * srow * 2 + 2 * _CA_BN * srow * 2 + _CA_BN * 4
    if wd > 1:
        smem += bm * (_CA_BN + 8) * 2 + rg * wd * 16 * 4
    return f"cosine_attention_fwd_{_DTYPE_SUFFIX[code]}_d{dp}", dp, bm, 32 * wd * rg, smem, 2 if wd == 1 else 1


def _ca_splits(bh: int, nq: int, nk: int, bm: int, per_sm: int, sms: int) -> tuple[int, int]:
    """(n_split, key tiles per split): split the keys only when the (query block x head)
    grid fills less than ~80% of one wave; then aim at ~2 waves, >= 2 key tiles per
    split, every split non-empty."""
    ntiles = (nk + _CA_BN - 1) // _CA_BN
    blocks = bh * ((nq + bm - 1) // bm)
    target = sms * per_sm
    n_split = 1
    if 5 * blocks < 4 * target:
        n_split = max(1, min((2 * target + blocks - 1) // blocks, ntiles // 2, 65535))
    tps = (ntiles + n_split - 1) // n_split
    return (ntiles + tps - 1) // tps, tps


def _aligned_rows(x: torch.Tensor) -> bool:
    """Every row start 16-byte aligned (the kernels load 16-byte chunks)."""
    per = 16 // x.element_size()
    if x.data_ptr() % 16:
        return False
    return all(st % per == 0 for sz, st in zip(x.shape[:-1], x.stride()[:-1]) if sz > 1)


def _ca_check(q, k, v, temperature32, out) -> int:
    """Validate (no device sync); return the dtype code."""
    name = "cosine_attention"
    if q.dtype not in _DTYPE_CODES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype of float32/float16/bfloat16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: expected 4-D q (B, H, Nq, D), k and v (B, H, Nk, D), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"{name}: expected k and v of shape ({b}, {h}, Nk, {d}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    for t in (q, k, v, temperature32, out):
        if not t.is_cuda or t.device != q.device:
            raise ValueError(f"{name}: all tensors must be on one CUDA device (q is on {q.device}, "
                             f"got a tensor on {t.device})")
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: {label} must have a contiguous last dim (stride(-1) == 1), "
                             f"got strides {t.stride()}")
    if (temperature32.dtype != torch.float32 or temperature32.numel() != h or not temperature32.is_contiguous()
            or any(n != 1 for n in temperature32.shape[1:])):
        raise ValueError(f"{name}: temperature32 must be a contiguous float32 tensor of shape ({h},) (or "
                         f"({h}, 1, 1)), got {temperature32.dtype} {tuple(temperature32.shape)}")
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"{name}: out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})")
    if out.numel() and k.shape[2] and (d % 8 or not 8 <= d <= 512):
        raise ValueError(f"{name}: head dim D must be a multiple of 8 in [8, 512], got {d}")
    if b * h > 65535 or nq >= 2**31 or k.shape[2] >= 2**31:
        raise ValueError(f"{name}: expected B*H <= 65535 and Nq, Nk < 2^31, got B*H={b * h}, "
                         f"Nq={nq}, Nk={k.shape[2]}")
    return _DTYPE_CODES[q.dtype]


def _ca_prepare(q, k, v, temperature32, out):
    """Validation, geometry and workspaces shared by both routes (None: nothing to launch)."""
    code = _ca_check(q, k, v, temperature32, out)
    if out.numel() == 0:
        return None
    if k.shape[2] == 0:  # softmax over no keys, then @ (0, D) v: zeros (as torch's matmul)
        out.zero_()
        return None
    # Rows must start 16-byte aligned; otherwise work on an aligned contiguous copy.
    q, k, v = (x if _aligned_rows(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)
               for x in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[2]
    kname, dp, bm, threads, smem, per_sm = _ca_geometry(code, d)
    n_split, tps = _ca_splits(b * h, nq, nk, bm, per_sm, _sm_count(q.device))
    f32 = dict(dtype=torch.float32, device=q.device)
    kinv = torch.empty(b * h * nk, **f32)
    if n_split > 1:
        ws_o = torch.empty(b * h * n_split * nq * d, **f32)
        ws_ml = torch.empty(b * h * n_split * nq * 2, **f32)
    else:
        ws_o = ws_ml = None
    return dict(code=code, q=q, k=k, v=v, t=temperature32, out=out, kinv=kinv, ws_o=ws_o, ws_ml=ws_ml,
                kname=kname, dp=dp, bm=bm, threads=threads, smem=smem, n_split=n_split, tps=tps,
                sizes=(b, h, nq, nk, d))


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _ca_extension(p) -> None:
    from sipl_fast import _C

    q, k, v = p["q"], p["k"], p["v"]
    b, h, nq, nk, d = p["sizes"]
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _C.cosine_attention_fwd(p["code"], p["dp"], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                p["t"].data_ptr(), p["kinv"].data_ptr(), p["out"].data_ptr(),
                                _ptr(p["ws_o"]), _ptr(p["ws_ml"]), b, h, nq, nk, d,
                                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                p["n_split"], p["tps"], stream)


def _ca_cupy(p) -> None:
    import cupy
    import numpy as np

    q, k, v = p["q"], p["k"], p["v"]
    b, h, nq, nk, d = p["sizes"]
    code, n_split = p["code"], p["n_split"]
    u64, i32, i64 = np.uint64, np.int32, np.int64
    krows, orows = b * h * nk, b * h * nq
    aux = lambda rows: (min((rows + 7) // 8, 1 << 20),)  # noqa: E731 - 8 rows per block
    dev = q.device.index
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream, dev):
            sfx = _DTYPE_SUFFIX[code]
            _cupy_function(f"cosine_attention_kinv_{sfx}")(
                aux(krows), (_AUX_THREADS,),
                (u64(k.data_ptr()), u64(p["kinv"].data_ptr()), i32(h), i32(nk), i32(d),
                 *(i64(s) for s in k.stride()[:3]), i64(krows)))
            fn = _cupy_function(p["kname"])
            if fn.max_dynamic_shared_size_bytes < p["smem"]:  # per device; set once
                fn.max_dynamic_shared_size_bytes = p["smem"]
            grid = ((nq + p["bm"] - 1) // p["bm"], n_split, b * h)
            fn(grid, (p["threads"],),
               (u64(q.data_ptr()), u64(k.data_ptr()), u64(v.data_ptr()), u64(p["t"].data_ptr()),
                u64(p["kinv"].data_ptr()), u64(p["out"].data_ptr()), u64(_ptr(p["ws_o"])),
                u64(_ptr(p["ws_ml"])), i32(h), i32(nq), i32(nk), i32(d),
                *(i64(s) for s in q.stride()[:3]), *(i64(s) for s in k.stride()[:3]),
                *(i64(s) for s in v.stride()[:3]), i32(p["tps"]), i32(n_split)),
               shared_mem=p["smem"])
            if n_split > 1:
                _cupy_function(f"cosine_attention_combine_{sfx}")(
                    aux(orows), (_AUX_THREADS,),
                    (u64(p["ws_o"].data_ptr()), u64(p["ws_ml"].data_ptr()), u64(p["out"].data_ptr()),
                     i32(nq), i32(d), i32(n_split), i64(orows)))


_CA_LAUNCHERS = {"extension": _ca_extension, "cupy": _ca_cupy}


def cosine_attention_fwd(q, k, v, temperature32, out) -> None:
    """out = softmax_j(t_h * cos(q_i, k_j)) @ v, fp32 accumulation; on torch's current stream.

    q (B, H, Nq, D), k and v (B, H, Nk, D): CUDA tensors of one dtype (float32 /
    float16 / bfloat16) with stride(-1) == 1 (other strides arbitrary; rows not
    16-byte aligned are copied first); D a multiple of 8 in [8, 512].
    temperature32: contiguous float32 (H,) (or (H, 1, 1)). out: contiguous, q's shape and dtype.
    cos uses F.normalize's rule (norm clamped at 1e-12). Raises ValueError on bad
    arguments; never synchronizes (CUDA-graph capturable after a warm-up call).
    """
    p = _ca_prepare(q, k, v, temperature32, out)
    if p is None:
        return
    name = _active_route()
    _CA_LAUNCHERS[name](p)


# ---------------------------------------------------------------- gated dwconv + gelu
# Geometry of kernels/gated_dwconv_gelu.cu (namespace sipl::gdg), mirrored by
# csrc/sipl_fast_ext.cpp (kGdg*): keep the three in sync
# (tests/test_cuda_build.py::test_gated_dwconv_gelu_geometry_matches_sources).
# The kernels loop over work items with a grid stride, so the grid size only
# affects speed; the block shape is required by their thread mapping.
_GDG_BLOCK = (32, 8)  # threads (x: lane, y: warp; each warp on its own work items)
_GDG_NCHW_TILE = (64, 16)  # NCHW work item: (W, H) output pixels of one (b, c) plane
_GDG_NHWC_TILE = (2, 16, 32)  # NHWC work item: (W, H) output pixels x output channels
_GDG_MAX_GRID = 2**31 - 1


def _gdg_blocks(layout: int, b: int, h: int, hh: int, ww: int) -> int:
    """1-D grid size: a warp per work item, 8 a block, capped at 2^31-1 (as the extension)."""
    if layout == 0:
        tw, th = _GDG_NCHW_TILE
        work = b * h * -(-ww // tw) * -(-hh // th)
    else:
        tw, th, tc = _GDG_NHWC_TILE
        work = b * -(-ww // tw) * -(-hh // th) * -(-h // tc)
    return min(-(-work // _GDG_BLOCK[1]), _GDG_MAX_GRID)


def _gdg_check(x, weight32, bias32, dual, out) -> tuple[int, int, tuple[int, int, int, int]]:
    """Validate (no device sync); return (dtype code, layout 0=NCHW / 1=NHWC, (B, h, H, W))."""
    name = "gated_dwconv_gelu"
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name}: unsupported dtype {x.dtype} (expected float32/float16/bfloat16)")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D x (B, 2h, H, W), got shape {tuple(x.shape)}")
    b, c2, hh, ww = x.shape
    if c2 % 2:
        raise ValueError(f"{name}: x must have an even channel count 2h, got {c2}")
    h = c2 // 2
    if not isinstance(dual, (bool, int)) or dual not in (0, 1):
        raise ValueError(f"{name}: dual must be a bool, got {dual!r}")
    if tuple(out.shape) != (b, h, hh, ww) or out.dtype != x.dtype:
        raise ValueError(f"{name}: out must be a {x.dtype} tensor of shape {(b, h, hh, ww)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if weight32.dtype != torch.float32 or tuple(weight32.shape) != (9, c2) or not weight32.is_contiguous():
        raise ValueError(f"{name}: weight32 must be a contiguous float32 (9, {c2}) tensor (tap-major, "
                         f"_layout.tap_major), got {weight32.dtype} {tuple(weight32.shape)}")
    if bias32 is not None and (bias32.dtype != torch.float32 or bias32.numel() != c2
                               or not bias32.is_contiguous()):
        raise ValueError(f"{name}: bias32 must be None or a contiguous float32 tensor of {c2} elements, "
                         f"got {bias32.dtype} {tuple(bias32.shape)}")
    if hh >= 2**31 or ww >= 2**31:
        raise ValueError(f"{name}: expected H, W < 2^31, got H={hh}, W={ww}")
    # Layout: NCHW first; a tensor contiguous in both formats has one memory order for both.
    if x.is_contiguous():
        layout = 0
    elif x.is_contiguous(memory_format=torch.channels_last):
        layout = 1
    else:
        raise ValueError(f"{name}: x must be contiguous NCHW or channels-last, got strides {x.stride()}")
    if not out.is_contiguous(memory_format=torch.channels_last if layout else torch.contiguous_format):
        raise ValueError(f"{name}: out must be {('NCHW', 'channels-last')[layout]} contiguous like x, got "
                         f"strides {out.stride()}")
    for label, t in (("x", x), ("out", out), ("weight32", weight32), ("bias32", bias32)):
        if t is not None and (not t.is_cuda or t.device != x.device):
            raise ValueError(f"{name}: all tensors must be on one CUDA device (x is on {x.device}, "
                             f"{label} on {t.device})")
    return _DTYPE_CODES[x.dtype], layout, (b, h, hh, ww)


def _gdg_extension(code, layout, dual, x, weight32, bias32, out, sizes) -> None:
    from sipl_fast import _C

    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _C.gated_dwconv_gelu_fwd(code, layout, int(dual), x.data_ptr(), weight32.data_ptr(), _ptr(bias32),
                                 out.data_ptr(), *sizes, stream)


def _gdg_cupy(code, layout, dual, x, weight32, bias32, out, sizes) -> None:
    import cupy
    import numpy as np

    fn = _cupy_function(_GDG_KERNEL_NAMES[3 * layout + code])
    args = (np.uint64(x.data_ptr()), np.uint64(weight32.data_ptr()), np.uint64(_ptr(bias32)),
            np.uint64(out.data_ptr()), *(np.int64(s) for s in sizes), np.int32(int(dual)))
    dev = x.device.index
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream, dev):
            fn((_gdg_blocks(layout, *sizes),), _GDG_BLOCK, args)


_GDG_LAUNCHERS = {"extension": _gdg_extension, "cupy": _gdg_cupy}


def gated_dwconv_gelu_fwd(x, weight32, bias32, dual: bool, out) -> None:
    """out = gate(depthwise 3x3 conv of x), fp32 math; launched on torch's current stream.

    y = F.conv2d(x, weight, bias, padding=1, groups=2h), y1, y2 = y.chunk(2, dim=1);
    out = gelu(y1) * y2, or gelu(y2) * y1 + gelu(y1) * y2 when ``dual`` (exact erf GELU).
    x (B, 2h, H, W): CUDA float32/float16/bfloat16, contiguous NCHW or channels-last;
    out (B, h, H, W): x's dtype, device and layout. weight32: contiguous float32 (9, 2h),
    tap-major (``_layout.tap_major``); bias32: contiguous float32 (2h,) or None.
    Raises ValueError on bad arguments; never synchronizes (CUDA-graph capturable
    after a warm-up call).
    """
    code, layout, sizes = _gdg_check(x, weight32, bias32, dual, out)
    if out.numel() == 0:
        return
    name = _active_route()
    _GDG_LAUNCHERS[name](code, layout, dual, x, weight32, bias32, out, sizes)
