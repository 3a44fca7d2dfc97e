"""The CUDA C++ device code of ``kernels/`` run on the host (``tests/cuda_on_cpu/cuda_on_cpu.h``:
each block's threads are real threads meeting at real barriers), against the PyTorch reference.

Without a GPU this is the only run the device code gets: halos, bounds, the grid-stride loop
over work items, the NCHW and channels-last mappings and the storage conversions are all
checked on odd shapes, with the launchers' own grid (``sipl_fast.ops._cuda``) and with a
smaller one. Needs a host C++20 compiler (g++ or clang++); speed is not emulated.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sipl_fast.ops import _cuda, _layout
from sipl_fast.ops.gated_dwconv_gelu import gated_dwconv_gelu_torch
from sipl_fast.ops.layer_norm2d import layer_norm2d_torch

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")

# run_<entry>(grid, x, weight, bias, out, B, h, H, W, dual): the entry on a 1-D grid of (32, 8) blocks
GATED_RUNNER = """
template <typename T>
void run(void (*entry)(const T*, const float*, const float*, T*, i64, i64, i64, i64, int), unsigned grid,
         const void* x, const float* w, const float* b, void* out, i64 B, i64 h, i64 H, i64 W, int dual) {
  launch(entry, grid, dim3{32, 8, 1}, (const T*)x, w, b, (T*)out, B, h, H, W, dual);
}
"""


GATED_SIGNATURE = ("unsigned grid, const void* x, const float* w, const float* b, void* out, i64 B, i64 h, i64 H, "
                   "i64 W, int dual", "grid, x, w, b, out, B, h, H, W, dual")


def build(folder: Path, source: str, runner: str, entries, defines=(), signature=GATED_SIGNATURE) -> ctypes.CDLL:
    """``source`` from kernels/ compiled for the host, with ``extern "C" run_<entry>(params)`` calling
    ``run(entry, args)`` for each entry, ``signature`` = (params, args) (and the macro definitions
    ``defines``, "NAME=VALUE")."""
    params, args = signature
    wrappers = "".join(f'extern "C" void run_{e}({params}) {{ run({e}, {args}); }}\n' for e in entries)
    (folder / "harness.cpp").write_text(f'#include "cuda_on_cpu.h"\n#include "{source}"\n{runner}{wrappers}')
    lib = folder / "harness.so"
    proc = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-DSIPL_CUDA_ON_CPU",
                           "-Wno-unknown-pragmas", *(f"-D{d}" for d in defines),
                           f"-I{ROOT / 'tests' / 'cuda_on_cpu'}", f"-I{ROOT / 'kernels'}",
                           str(folder / "harness.cpp"), "-o", str(lib)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module", params=["32-bit", "64-bit"])
def gated(request, tmp_path_factory):
    """The gate's entries built for the host; "64-bit": with every launch on the kernels' 64-bit
    index path (on a GPU only for inputs of 2^31 elements or more)."""
    defines = ("SIPL_GDG_NARROW_LIMIT=0",) if request.param == "64-bit" else ()
    lib = build(tmp_path_factory.mktemp("gated"), "gated_dwconv_gelu.cu", GATED_RUNNER, _cuda._GDG_KERNEL_NAMES,
                defines)
    for name in _cuda._GDG_KERNEL_NAMES:
        getattr(lib, f"run_{name}").argtypes = [ctypes.c_uint, *[ctypes.c_void_p] * 4, *[ctypes.c_longlong] * 4,
                                                ctypes.c_int]
    return lib


def run_gated(lib, x, weight, bias, dual, grid=None):
    """The CUDA entry for x's layout and dtype, as ``_cuda.gated_dwconv_gelu_fwd`` would launch it."""
    b, c2, hh, ww = x.shape
    layout = 0 if x.is_contiguous() else 1
    out = torch.empty((b, c2 // 2, hh, ww), dtype=x.dtype,
                      memory_format=torch.channels_last if layout else torch.contiguous_format)
    w32 = _layout.tap_major(weight)
    b32 = None if bias is None else bias.float().contiguous()
    sizes = (b, c2 // 2, hh, ww)
    grid = grid or _cuda._gdg_blocks(layout, *sizes)
    entry = getattr(lib, "run_" + _cuda._GDG_KERNEL_NAMES[3 * layout + _cuda._DTYPE_CODES[x.dtype]])
    entry(grid, x.data_ptr(), w32.data_ptr(), 0 if b32 is None else b32.data_ptr(), out.data_ptr(), *sizes, int(dual))
    return out


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape, mode, has_bias, grid", [
    ((2, 10, 19, 37), "gdfn", True, None),   # h = 5: partial tiles in every direction, B > 1
    ((1, 70, 9, 40), "dual", False, None),   # h = 35: a partial 32-channel chunk
    ((3, 6, 1, 1), "dual", True, None),      # one pixel: the halo is all padding
    ((2, 66, 17, 33), "gdfn", False, 3),     # 3 blocks walk many work items (the grid-stride loop)
    ((1, 4, 131, 35), "dual", True, None),   # NCHW strips 16 rows tall: 9 rows of strips, a partial one
    ((2, 6, 5, 130), "gdfn", True, None),    # NCHW strips 64 wide: two whole and a partial one a row
    ((1, 4, 50, 150), "dual", True, None),   # NCHW strips inside the image (unchecked path) and around
    ((2, 64, 40, 9), "gdfn", True, None),    # NHWC strips inside the image (32 whole channels) and around
], ids=["odd", "dual-chunk", "1x1", "grid3", "tall", "wide", "interior", "interior-cl"])
def test_gated_dwconv_gelu_device_code(gated, dtype, layout, shape, mode, has_bias, grid):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], 1, 3, 3, generator=gen) / 3
    bias = torch.randn(shape[1], generator=gen) if has_bias else None
    out = run_gated(gated, x, weight, bias, mode == "dual", grid)
    ref = gated_dwconv_gelu_torch(x.double(), weight.double(), mode, None if bias is None else bias.double())
    if dtype == torch.float32:
        assert err(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    else:  # PyTorch's own error in that dtype, its weights rounded too (the kernel keeps them fp32)
        low = gated_dwconv_gelu_torch(x, weight.to(dtype), mode, None if bias is None else bias.to(dtype))
        torch_err = err(low, ref)
        assert err(out, ref) <= 2 * torch_err
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


GELU_RUNNER = """
extern "C" void gelu_many(const float* v, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = sipl::gdg::gelu(v[i]);
}
"""


def test_gelu_keeps_relative_accuracy_in_the_tails(tmp_path):
    """The gate's GELU (erfc form) against float64: relative error <= 1e-5 wherever |v| < 6, also
    in the negative tail, where PyTorch's fp32 0.5 v (1 + erf(v / sqrt 2)) cancels (checked to
    fail the same bound); absolute <= 2 ulp of max(1, |v|) everywhere. On the host the reciprocal
    and 2^x are exact; the GPU's MUFU versions add ~3e-7 relative."""
    lib = build(tmp_path, "gated_dwconv_gelu.cu", GELU_RUNNER, ())
    v = torch.cat([torch.linspace(-14, 14, 200_001), torch.logspace(-8, 1, 2001), -torch.logspace(-8, 1, 2001)])
    out = torch.empty_like(v)
    lib.gelu_many(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(v.numel()))
    vd = v.double()
    ref = vd * 0.5 * torch.special.erfc(-vd / 2**0.5)
    err = (out.double() - ref).abs()
    assert (err <= 2 * 2**-23 * vd.abs().clamp_min(1)).all()
    core = (vd.abs() < 6) & (ref.abs() > 1e-30)
    assert (err[core] / ref[core].abs()).max() <= 1e-5
    naive = (torch.nn.functional.gelu(v).double() - ref).abs()
    assert (naive[core] / ref[core].abs()).max() > 1e-5


# run_<entry>(grid, threads, x, weight, bias, out, N, C, HW, eps): the entry on a 1-D grid of 1-D blocks
LAYER_NORM_RUNNER = """
template <typename T>
void run(void (*entry)(const T*, const float*, const float*, T*, i64, i64, i64, float), unsigned grid,
         unsigned threads, const void* x, const float* w, const float* b, void* out, i64 N, i64 C, i64 HW, float eps) {
  launch(entry, grid, dim3{threads, 1, 1}, (const T*)x, w, b, (T*)out, N, C, HW, eps);
}
"""
LAYER_NORM_SIGNATURE = ("unsigned grid, unsigned threads, const void* x, const float* w, const float* b, void* out, "
                        "i64 N, i64 C, i64 HW, float eps", "grid, threads, x, w, b, out, N, C, HW, eps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, grid, offset, spread", [
    ((2, 13, 7, 5), None, 0.0, 1.0),     # C not a multiple of the 4 partial sums, B > 1
    ((1, 48, 3, 11), 2, 100.0, 1e-3),    # 2 blocks of 32 walk 33 pixels; a mean 1e5 times the spread
    ((3, 176, 2, 3), None, -300.0, 1e-2),
], ids=["odd", "grid2-offset", "wide-offset"])
def test_layer_norm2d_device_code(tmp_path, dtype, shape, grid, offset, spread):
    """The CUDA LayerNorm on the host with the launcher's geometry (or a grid walking many pixels):
    fp32 within 1e-5 of float64, or within 1/100 of PyTorch's own fp32 error where that is larger
    (ill-conditioned pixels: the test fails for x - mean); 16-bit within 2x PyTorch's own error."""
    lib = build(tmp_path, "layer_norm2d.cu", LAYER_NORM_RUNNER, _cuda._KERNEL_NAMES, signature=LAYER_NORM_SIGNATURE)
    gen = torch.Generator().manual_seed(0)
    x = (offset + spread * torch.randn(shape, generator=gen)).to(dtype)
    weight, bias = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    out = torch.empty_like(x)
    n, c, hh, ww = shape
    threads = 32 if grid else _cuda._THREADS
    grid = grid or min(-(-n * hh * ww // threads), _cuda._MAX_BLOCKS)
    entry = getattr(lib, "run_" + _cuda._KERNEL_NAMES[_cuda._DTYPE_CODES[dtype]])
    entry.argtypes = [ctypes.c_uint, ctypes.c_uint, *[ctypes.c_void_p] * 4, *[ctypes.c_longlong] * 3, ctypes.c_float]
    entry(grid, threads, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), n, c, hh * ww, 1e-5)
    ref = layer_norm2d_torch(x.double(), weight.double(), bias.double())
    torch_err = err(layer_norm2d_torch(x, weight.to(dtype), bias.to(dtype)), ref)
    if dtype == torch.float32:
        assert err(out, ref) <= max(1e-5, torch_err / 100)
    else:
        assert err(out, ref) <= 2 * torch_err
