"""Checks for the CUDA kernels, the compiled extension and both launch routes.

On CPU-only CI these still prove something: nvcc compiles every kernel for
sm_90a, NVRTC (what CuPy uses) compiles the same sources and emits the
expected entry points, and a built ``sipl_fast._C`` imports and validates its
arguments. The numerical and CUDA-graph tests of each route are in test_layer_norm2d.py.
"""

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "kernels"
CU_FILES = sorted(KERNEL_DIR.glob("*.cu"))
EXPECTED_KERNELS = {
    "layer_norm2d.cu": ["layer_norm2d_fwd_f32", "layer_norm2d_fwd_f16", "layer_norm2d_fwd_bf16"],
    "cosine_attention.cu": (
        [f"cosine_attention_fwd_{t}_d{dp}" for t in ("f16", "bf16") for dp in (32, 64, 96, 128, 192, 256, 384, 512)]
        + [f"cosine_attention_fwd_f32_d{64 * n}" for n in range(1, 9)]
        + [f"cosine_attention_{kind}_{t}" for kind in ("kinv", "combine") for t in ("f32", "f16", "bf16")]
    ),
    "gated_dwconv_gelu.cu": [f"gated_dwconv_gelu_{lay}_{t}" for lay in ("nchw", "nhwc") for t in ("f32", "f16", "bf16")],
}


def _load_setup_module():
    """setup.py's helpers (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("_sipl_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_setup_module()
HAS_EXT = importlib.util.find_spec("sipl_fast._C") is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="sipl_fast._C not built (nvcc absent at install)")


# ------------------------------------------------------------- sources / setup
def test_kernel_sources_present_and_self_contained():
    assert set(EXPECTED_KERNELS) <= {p.name for p in CU_FILES}
    for path in sorted(KERNEL_DIR.glob("*.cu*")):
        for inc in re.findall(r"^\s*#\s*include\s*(\S+)", path.read_text(), re.M):
            # NVRTC has no host/system headers: only local "..." includes allowed.
            assert inc.startswith('"'), f"{path.name}: system include {inc}"
            assert (KERNEL_DIR / inc.strip('"')).is_file(), f"{path.name}: missing {inc}"


def test_arch_list_parsing():
    flags, names = SETUP.parse_arch_list("80;86 89,90a+PTX")
    assert names == ["sm_80", "sm_86", "sm_89", "sm_90a", "compute_90"]
    assert "arch=compute_90a,code=sm_90a" in flags
    assert "arch=compute_90,code=compute_90" in flags  # portable PTX, not 90a
    assert SETUP.parse_arch_list("8.6+PTX")[1] == ["sm_86", "compute_86"]
    assert SETUP.parse_arch_list(SETUP.DEFAULT_ARCH_LIST)[1][-1] == "compute_90"
    for bad in ("", "sm_xx", "90b"):
        with pytest.raises(ValueError):
            SETUP.parse_arch_list(bad)


# ------------------------------------------------------------- compile-only
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm90a(cu, tmp_path):
    nvcc = SETUP.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    obj = tmp_path / f"{cu.stem}.o"
    cmd = [nvcc, "-c", str(cu), "-o", str(obj), "-I", str(KERNEL_DIR), *SETUP.NVCC_FLAGS,
           "-gencode", "arch=compute_90a,code=sm_90a"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = obj.read_bytes()
    for name in EXPECTED_KERNELS.get(cu.name, []):  # unmangled (extern "C") symbol name
        found = b"\0" + name.encode() + b"\0" in data
        assert found, f"host stub {name} missing from {obj.name}"


def _nvrtc_candidates():
    try:
        import nvidia  # pip CUDA packages (torch dependency)

        for base in nvidia.__path__:
            yield from sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    nvcc = SETUP.find_nvcc()
    if nvcc:
        try:
            lib_dir = os.path.dirname(SETUP.cuda_paths(nvcc)[1])
            yield from sorted(glob.glob(os.path.join(lib_dir, "libnvrtc.so*")))
        except RuntimeError:
            pass
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def _load_nvrtc():
    for path in _nvrtc_candidates():
        if re.fullmatch(r"libnvrtc\.so(\.\d+)*", os.path.basename(path)):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _nvrtc_ptx(lib, path, arch):
    """Compile `path` with NVRTC like CuPy does; return PTX text (assert on failure)."""
    vp = ctypes.c_void_p
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p, ctypes.c_char_p,
                                       ctypes.c_int, vp, vp]
    lib.nvrtcCompileProgram.argtypes = [vp, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    for fn in ("nvrtcGetProgramLogSize", "nvrtcGetPTXSize"):
        getattr(lib, fn).argtypes = [vp, ctypes.POINTER(ctypes.c_size_t)]
    for fn in ("nvrtcGetProgramLog", "nvrtcGetPTX"):
        getattr(lib, fn).argtypes = [vp, ctypes.c_char_p]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(vp)]

    prog = vp()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), path.read_bytes(), path.name.encode(),
                                  0, None, None) == 0
    try:
        opts = [f"--gpu-architecture={arch}", "-std=c++17", f"-I{KERNEL_DIR}"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*map(str.encode, opts)))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC failed on {path.name}:\n{log.value.decode(errors='replace')}"
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvrtc_compiles_for_compute80(cu):
    lib = _load_nvrtc()
    if lib is None:
        pytest.skip("NVRTC library not found")
    ptx = _nvrtc_ptx(lib, cu, "compute_80")
    entries = re.findall(r"\.entry\s+(\w+)\s*\(", ptx)
    assert entries, f"no kernels in {cu.name}"
    for name in EXPECTED_KERNELS.get(cu.name, []):
        assert name in entries


# ------------------------------------------------------------- extension
@needs_ext
def test_extension_imports_and_validates():
    from sipl_fast import _C

    assert "sm_" in _C.cuda_arch_list()
    problem = _C.runtime_problem()
    assert (problem is None) == torch.cuda.is_available(), problem
    with pytest.raises(ValueError, match="dtype code"):
        _C.layer_norm2d_fwd(3, 0, 0, 0, 0, 1, 1, 1, 1e-6, 0)
    with pytest.raises(ValueError, match="sizes"):
        _C.layer_norm2d_fwd(0, 0, 0, 0, 0, 1, 0, 1, 1e-6, 0)
    with pytest.raises(OverflowError):
        _C.layer_norm2d_fwd(0, -1, 0, 0, 0, 1, 1, 1, 1e-6, 0)


def _ca_args(code=2, dp=96, sizes=(1, 1, 4, 4, 96), n_split=1, tps=1):
    # (code, dp, q, k, v, t, kinv, out, ws_o, ws_ml, B, H, Nq, Nk, D, 9 strides, n_split, tps, stream)
    return (code, dp, 0, 0, 0, 0, 0, 0, 0, 0, *sizes, *([0] * 9), n_split, tps, 0)


@needs_ext
def test_extension_cosine_attention_validates():
    from sipl_fast import _C

    with pytest.raises(ValueError, match="dtype code"):
        _C.cosine_attention_fwd(*_ca_args(code=3))
    for sizes in ((1, 1, 4, 4, 12), (1, 1, 4, 4, 520), (1, 1, 0, 4, 96), (1, 70000, 4, 4, 96)):
        with pytest.raises(ValueError, match="sizes"):
            _C.cosine_attention_fwd(*_ca_args(sizes=sizes))
    with pytest.raises(ValueError, match="bucket"):
        _C.cosine_attention_fwd(*_ca_args(dp=128))  # D=96 belongs to the 96 bucket
    with pytest.raises(ValueError, match="bucket"):
        _C.cosine_attention_fwd(*_ca_args(code=0, dp=96))  # fp32: 64-column chunks
    with pytest.raises(ValueError, match="split"):  # 2 splits of 1 tile for 1 key tile
        _C.cosine_attention_fwd(*_ca_args(n_split=2, tps=1))
    with pytest.raises(ValueError, match="split"):  # workspace missing
        _C.cosine_attention_fwd(*_ca_args(sizes=(1, 1, 4, 128, 96), n_split=2, tps=1))
    with pytest.raises(OverflowError):
        _C.cosine_attention_fwd(*_ca_args()[:2], -1, *_ca_args()[3:])


def test_cosine_attention_geometry_matches_extension():
    """_cuda's geometry mirrors the kernels' buckets and shared-memory sizes."""
    from sipl_fast.ops import _cuda

    src = (KERNEL_DIR / "cosine_attention.cu").read_text()
    for code in (0, 1, 2):
        for d in range(8, 513, 8):
            name, dp, bm, threads, smem, _ = _cuda._ca_geometry(code, d)
            assert d <= dp and name in _cuda._CA_KERNEL_NAMES and name.endswith(f"_d{dp}")
            assert f"{name}," in src  # instantiated
            assert smem <= 227 * 1024 and threads % 32 == 0 and bm % 16 == 0
    for args in ((1, 256, 65536, 64, 1, 132), (1, 4096, 65536, 128, 2, 132), (3, 5, 200, 128, 2, 132),
                 (1, 1048576, 4096, 128, 2, 132), (1, 7, 1, 128, 2, 132)):
        n_split, tps = _cuda._ca_splits(*args)
        ntiles = (args[2] + 63) // 64
        assert 1 <= n_split <= 65535 and n_split * tps >= ntiles > (n_split - 1) * tps


def test_cosine_attention_validates_without_gpu():
    from sipl_fast.ops import _cuda

    q = torch.zeros(1, 2, 4, 96)
    t = torch.ones(2)
    with pytest.raises(ValueError, match="dtype"):
        _cuda.cosine_attention_fwd(q.double(), q.double(), q.double(), t, q.double())
    with pytest.raises(ValueError, match="CUDA"):
        _cuda.cosine_attention_fwd(q, q, q, t, torch.empty_like(q))
    with pytest.raises(ValueError, match="shape"):
        _cuda.cosine_attention_fwd(q, q[:, :1], q, t, torch.empty_like(q))


def _gdg_args(code=0, layout=0, dual=0, sizes=(1, 2, 3, 4)):
    # (code, layout, dual, x, w, b, out, B, h, H, W, stream)
    return (code, layout, dual, 0, 0, 0, 0, *sizes, 0)


@needs_ext
def test_extension_gated_dwconv_gelu_validates():
    from sipl_fast import _C

    with pytest.raises(ValueError, match="dtype code"):
        _C.gated_dwconv_gelu_fwd(*_gdg_args(code=3))
    with pytest.raises(ValueError, match="layout"):
        _C.gated_dwconv_gelu_fwd(*_gdg_args(layout=2))
    with pytest.raises(ValueError, match="dual"):
        _C.gated_dwconv_gelu_fwd(*_gdg_args(dual=2))
    for sizes in ((0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, -1), (1, 2, 2**31, 4),
                  (2**40, 2**10, 2**10, 2**10)):
        with pytest.raises(ValueError, match="sizes"):
            _C.gated_dwconv_gelu_fwd(*_gdg_args(sizes=sizes))
    with pytest.raises(OverflowError):
        _C.gated_dwconv_gelu_fwd(*_gdg_args()[:3], -1, *_gdg_args()[4:])
    with pytest.raises(TypeError):
        _C.gated_dwconv_gelu_fwd(*_gdg_args()[:-1])


def test_gated_dwconv_gelu_geometry_matches_sources():
    """_cuda's block / tile geometry is the one of the kernels and of the extension."""
    from sipl_fast.ops import _cuda

    cu = (KERNEL_DIR / "gated_dwconv_gelu.cu").read_text()
    cpp = (ROOT / "csrc" / "sipl_fast_ext.cpp").read_text()

    def const(src, name):
        values = re.findall(rf"constexpr\s+(?:unsigned|int|long long)\s+{name}\s*=\s*(\d+)\s*;", src)
        assert len(values) == 1, f"{name}: {values}"
        return int(values[0])

    expected = {"ThreadsX": _cuda._GDG_BLOCK[0], "ThreadsY": _cuda._GDG_BLOCK[1],
                "NchwTileW": _cuda._GDG_NCHW_TILE[0], "NchwTileH": _cuda._GDG_NCHW_TILE[1],
                "NhwcTileW": _cuda._GDG_NHWC_TILE[0], "NhwcTileH": _cuda._GDG_NHWC_TILE[1],
                "NhwcChunk": _cuda._GDG_NHWC_TILE[2]}
    for key, value in expected.items():
        assert const(cu, f"k{key}") == value, key
        assert const(cpp, f"kGdg{key}") == value, key
    assert re.search(r"kGdgMaxGrid\s*=\s*0x7fffffffLL", cpp) and _cuda._GDG_MAX_GRID == 0x7FFFFFFF
    assert _cuda._KERNEL_FILES["gated_dwconv_gelu.cu"] == tuple(EXPECTED_KERNELS["gated_dwconv_gelu.cu"])
    # a warp per work item, 8 a block; every output lies in exactly one item
    assert _cuda._gdg_blocks(0, 2, 3, 65, 33) == -(-2 * 3 * 5 * 1 // 8)
    assert _cuda._gdg_blocks(1, 2, 33, 17, 9) == -(-2 * 5 * 2 * 2 // 8)
    assert _cuda._gdg_blocks(0, 1, 1, 1, 1) == _cuda._gdg_blocks(1, 1, 1, 1, 1) == 1
    assert _cuda._gdg_blocks(0, 65536, 4096, 1024, 128) == 2**31 - 1  # capped: the kernels grid-stride


def test_gated_dwconv_gelu_validates_without_gpu():
    from sipl_fast.ops import _cuda

    x = torch.zeros(2, 6, 5, 7)
    w = torch.ones(9, 6)  # tap-major
    b = torch.zeros(6)
    out = torch.empty(2, 3, 5, 7)
    fwd = _cuda.gated_dwconv_gelu_fwd
    with pytest.raises(ValueError, match="dtype"):
        fwd(x.double(), w, b, False, out.double())
    with pytest.raises(ValueError, match="4-D"):
        fwd(x[0], w, b, False, out[0])
    with pytest.raises(ValueError, match="even"):
        fwd(x[:, :5], w[:5], b[:5], False, out)
    with pytest.raises(ValueError, match="shape"):
        fwd(x, w, b, False, out[:, :2])
    with pytest.raises(ValueError, match="shape"):
        fwd(x, w, b, True, out.half())
    with pytest.raises(ValueError, match="weight32"):
        fwd(x, w[:3], b, False, out)
    with pytest.raises(ValueError, match="weight32"):
        fwd(x, w.t().contiguous(), b, False, out)  # channel-major
    with pytest.raises(ValueError, match="weight32"):
        fwd(x, w.double(), b, False, out)
    with pytest.raises(ValueError, match="bias32"):
        fwd(x, w, b[:3], False, out)
    with pytest.raises(ValueError, match="dual"):
        fwd(x, w, b, 2, out)
    with pytest.raises(ValueError, match="channels-last"):
        fwd(x.transpose(2, 3).contiguous().transpose(2, 3), w, b, False, out)
    with pytest.raises(ValueError, match="out must be NCHW"):
        fwd(x, w, b, False, out.contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="out must be channels-last"):
        fwd(x.contiguous(memory_format=torch.channels_last), w, None, False, out)
    with pytest.raises(ValueError, match="CUDA"):
        fwd(x, w, b, False, out)
    with pytest.raises(ValueError, match="CUDA"):
        fwd(x.contiguous(memory_format=torch.channels_last), w, None, True,
            out.contiguous(memory_format=torch.channels_last))


def _cuda_driver_present():
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available() or _cuda_driver_present(),
                    reason="only safe to launch on null pointers without a CUDA driver")
def test_extension_launch_error_is_runtime_error():
    from sipl_fast import _C

    with pytest.raises(RuntimeError, match="CUDA launch failed"):
        _C.layer_norm2d_fwd(0, 0, 0, 0, 0, 1, 1, 1, 1e-6, 0)
    for layout in (0, 1):
        with pytest.raises(RuntimeError, match="CUDA launch failed"):
            _C.gated_dwconv_gelu_fwd(*_gdg_args(layout=layout))


@needs_ext
def test_extension_is_torch_and_cudart_independent():
    from sipl_fast import _C

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    dyn = subprocess.run([readelf, "-dW", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", dyn)
    assert needed and not [n for n in needed if re.search(r"cudart|torch|c10|python", n)], needed
    syms = subprocess.run([readelf, "--dyn-syms", "-W", _C.__file__], capture_output=True, text=True,
                          check=True).stdout
    exported = [line.split()[-1] for line in syms.splitlines() if " UND " not in line and "GLOBAL" in line]
    assert "PyInit__C" in exported
    assert {"layer_norm2d_fwd", "cosine_attention_fwd", "gated_dwconv_gelu_fwd", "runtime_problem"} <= set(dir(_C))
    assert not [s for s in exported if s.startswith(("cuda", "__cuda"))], "static cudart symbols leak"


# ------------------------------------------------------------- route selection
def test_route_and_kernel_dir(monkeypatch):
    from sipl_fast.ops import _cuda

    assert (_cuda.kernel_dir() / "layer_norm2d.cu").is_file()
    _cuda._reset()
    try:
        name = _cuda.route()
        assert name in (None, "extension", "cupy")
        assert (name is None) == bool(_cuda.why_unavailable())
        monkeypatch.setenv(_cuda.ROUTE_ENV, "bogus")
        _cuda._reset()
        with pytest.raises(ValueError):
            _cuda.route()
    finally:
        monkeypatch.delenv(_cuda.ROUTE_ENV, raising=False)
        _cuda._reset()


def test_unsupported_dtype_is_value_error():
    from sipl_fast.ops import _cuda

    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    w = torch.ones(2)
    with pytest.raises(ValueError):
        _cuda.layer_norm2d_fwd(x, w, w, 1e-6, torch.empty_like(x))
