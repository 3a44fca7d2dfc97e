"""sipl_fast.ops.layer_norm2d: the reference against an independent computation, backend
choice, errors, and (on a GPU) the CUDA C++ kernel against the reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from sipl_fast import ops
from sipl_fast.ops import BackendError, layer_norm2d
from sipl_fast.ops._backend import choose

SHAPES = [(2, 37, 7, 9), (3, 96, 13, 11), (1, 1, 1, 1), (2, 704, 5, 3), (1, 48, 16, 16)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def independent(x, weight, bias, eps=1e-5):
    """F.layer_norm over a channels-last view, in float64."""
    y = F.layer_norm(x.double().permute(0, 2, 3, 1), (x.shape[1],), weight.double(), bias.double(), eps)
    return y.permute(0, 3, 1, 2)


def inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(c, generator=g)).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_reference_matches_an_independent_layer_norm(shape, dtype, tol):
    x, w, b = inputs(shape, dtype)
    y = layer_norm2d(x, w, b, backend="torch")
    assert y.dtype == dtype and y.shape == x.shape
    if shape[1] == 1:  # a single channel normalises to zero: only the bias is left
        torch.testing.assert_close(y, b.view(1, 1, 1, 1).expand_as(x), rtol=0, atol=tol)
    torch.testing.assert_close(y.double(), independent(x, w, b), rtol=0, atol=tol)


def test_reference_is_differentiable():
    x, w, b = inputs((2, 5, 3, 4), torch.float64)
    for t in (x, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: layer_norm2d(*a, backend="torch"), (x, w, b))


def test_auto_falls_back_to_torch_on_cpu():
    x, w, b = inputs((2, 8, 3, 3))
    torch.testing.assert_close(layer_norm2d(x, w, b), layer_norm2d(x, w, b, backend="torch"), rtol=0, atol=0)


def test_explicit_cuda_on_cpu_tensors_is_a_clear_error():
    x, w, b = inputs((2, 8, 3, 3))
    with pytest.raises(BackendError, match="'cuda' cannot run this call: input is not on a CUDA device"):
        layer_norm2d(x, w, b, backend="cuda")


def test_unknown_backend_and_environment_choice(monkeypatch):
    x, w, b = inputs((1, 4, 2, 2))
    with pytest.raises(BackendError, match="unknown backend 'quickest'"):
        layer_norm2d(x, w, b, backend="quickest")
    monkeypatch.setenv("SIPL_FAST_BACKEND_LAYER_NORM2D", "cuda")
    with pytest.raises(BackendError, match="not on a CUDA device"):
        layer_norm2d(x, w, b)
    monkeypatch.setenv("SIPL_FAST_BACKEND", "nope")
    monkeypatch.setenv("SIPL_FAST_BACKEND_LAYER_NORM2D", "auto")  # the op's own variable wins
    assert layer_norm2d(x, w, b).shape == x.shape
    monkeypatch.delenv("SIPL_FAST_BACKEND_LAYER_NORM2D")
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        layer_norm2d(x, w, b)
    assert layer_norm2d(x, w, b, backend="torch").shape == x.shape  # the argument wins over the environment


@pytest.mark.parametrize("args", [
    (torch.randn(3, 4, 5), torch.ones(3), torch.zeros(3)),
    (torch.randn(1, 4, 2, 2), torch.ones(3), torch.zeros(4)),
    (torch.randn(1, 4, 2, 2), torch.ones(4), torch.zeros(4, 1)),
    (torch.ones(1, 4, 2, 2, dtype=torch.int32), torch.ones(4), torch.zeros(4)),
    (torch.randn(1, 4, 2, 2), None, None),
    (torch.randn(1, 4, 2, 2), [1.0] * 4, torch.zeros(4)),
    (torch.randn(1, 0, 2, 3), torch.ones(0), torch.zeros(0)),  # no channel (Triton's kernel read channel 0)
])
def test_bad_shapes_and_dtypes_raise_value_error(args):
    with pytest.raises(ValueError, match="layer_norm2d: expected"):
        layer_norm2d(*args)


def test_bad_parameters_raise_value_error():
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="weight as a real floating-point tensor"):
        layer_norm2d(x, torch.ones(4, dtype=torch.int64), torch.zeros(4))
    for eps in (-1.0, float("nan"), "1e-5", True):
        with pytest.raises(ValueError, match="eps as a real number >= 0"):
            layer_norm2d(x, torch.ones(4), torch.zeros(4), eps=eps)


def test_every_backend_returns_the_input_dtype_with_wider_weights():
    """A 16-bit x with fp32 weights (autocast's case): x's dtype from every backend, the
    reference being the published formula's fp32 result rounded once."""
    x, w, b = inputs((2, 6, 3, 5), torch.float64)
    exact = layer_norm2d(x, w, b, backend="torch")
    half = x.half()
    ref = layer_norm2d(half, w.float(), b.float(), backend="torch")
    assert ref.dtype == torch.float16
    mu = half.mean(1, keepdim=True)
    y = (half - mu) / ((half - mu).pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    promoted = w.float().view(1, -1, 1, 1) * y + b.float().view(1, -1, 1, 1)
    assert promoted.dtype == torch.float32 and torch.equal(ref, promoted.half())
    if OP_MODULE.triton is not None:
        out = layer_norm2d(half.to(TRITON_DEVICE), w.float().to(TRITON_DEVICE), b.float().to(TRITON_DEVICE),
                           backend="triton")
        assert out.dtype == torch.float16
        assert (out.double().cpu() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max()


def test_available_backends_reports_torch_and_cuda():
    info = ops.available_backends()
    assert info["torch"]["available"] is True
    assert set(info["cuda"]) == {"available", "route", "reason"}
    if not torch.cuda.is_available():
        assert info["cuda"]["available"] is False and info["cuda"]["reason"]


# --- Triton: on a GPU, or in the interpreter on a CPU --------------------------------
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP_MODULE = importlib.import_module("sipl_fast.ops.layer_norm2d")  # the attribute of that name is the function
needs_triton = pytest.mark.skipif(OP_MODULE.triton is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_matches_the_reference(shape, dtype):
    x, w, b = inputs(shape, dtype, TRITON_DEVICE)
    y = layer_norm2d(x, w, b, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.double() - independent(x, w, b)).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else error_bound(shape, dtype, TRITON_DEVICE))


@needs_triton
@pytest.mark.parametrize("shape", [(2, 40, 9, 7), (3, 96, 5, 13), (2, 176, 1, 3)])
def test_triton_keeps_channels_last_reads_bands_and_refuses_gradients(shape):
    x, w, b = inputs(shape, torch.float32, TRITON_DEVICE)
    y = layer_norm2d(x.to(memory_format=torch.channels_last), w, b, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - independent(x, w, b)).abs().max().item() <= 1e-5
    for xs in (x, x.to(memory_format=torch.channels_last)):  # a band of rows (FastSIPL's bands), read in place
        band = xs[:, :, shape[2] // 3:]
        y = layer_norm2d(band, w, b, backend="triton")
        assert y.is_contiguous(memory_format=torch.channels_last if xs is not x else torch.contiguous_format)
        assert (y.double() - independent(band, w, b)).abs().max().item() <= 1e-5
    strided = layer_norm2d(x.transpose(2, 3), w, b, backend="triton")  # neither layout: copied to NCHW
    assert strided.is_contiguous() and (strided.double() - independent(x.transpose(2, 3), w, b)).abs().max() <= 1e-5
    with pytest.raises(BackendError, match="forward-only"):
        layer_norm2d(x.requires_grad_(True), w, b, backend="triton")


@needs_triton
@pytest.mark.parametrize("c, offset, spread", [(48, 100.0, 1e-3), (176, -300.0, 1e-2), (96, 1e4, 1.0)])
def test_triton_keeps_its_digits_where_the_mean_dwarfs_the_spread(c, offset, spread):
    """fp32 pixels whose mean is 1e4-1e5 times their spread: PyTorch's own fp32 error is 3e-3 to
    1e-2 there (x - mean after the mean's rounding); the kernel's shifted sums stay within 1e-5."""
    x, w, b = inputs((2, c, 7, 9), device=TRITON_DEVICE)
    x = offset + spread * x
    y = layer_norm2d(x, w, b, backend="triton")
    ref = independent(x, w, b)
    torch_err = (layer_norm2d(x, w, b, backend="torch").double() - ref).abs().max().item()
    assert (y.double() - ref).abs().max().item() <= min(1e-5, torch_err / 100)


def test_auto_never_picks_the_triton_interpreter():
    x, w, b = inputs((1, 6, 4, 4))
    chosen = choose("layer_norm2d", OP_MODULE.BACKENDS, OP_MODULE.PREFERENCE, None, x, w, b, 1e-5)
    assert chosen.name == "torch"


# --- GPU: the CUDA C++ kernel, through each route that can run here ----------------
@pytest.fixture(params=["extension", "cupy"])
def route(request, monkeypatch):
    from sipl_fast.ops import _cuda

    problem = {"extension": _cuda._extension_problem, "cupy": _cuda._cupy_problem}[request.param]()
    if problem:
        pytest.skip(f"{request.param} route unavailable: {problem}")
    monkeypatch.setenv(_cuda.ROUTE_ENV, request.param)
    _cuda._reset()
    yield request.param
    monkeypatch.delenv(_cuda.ROUTE_ENV)
    _cuda._reset()


def error_bound(shape, dtype, device="cuda"):
    """Twice PyTorch's own error in ``dtype`` (the reference run in that dtype), plus a floor."""
    x, w, b = inputs(shape, dtype, device)
    own = (layer_norm2d(x, w, b, backend="torch").double() - independent(x, w, b)).abs().max().item()
    return 2 * own + (1e-5 if dtype == torch.float32 else 1e-3)


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_the_reference(route, shape, dtype):
    x, w, b = inputs(shape, dtype, "cuda")
    y = layer_norm2d(x, w, b, backend="cuda")
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.double() - independent(x, w, b)).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5
    else:
        assert err <= error_bound(shape, dtype)


@needs_cuda
def test_cuda_kernel_takes_channels_last_and_fp32_affine_with_half_input(route):
    x, w, b = inputs((2, 40, 9, 7), torch.float16, "cuda")
    y = layer_norm2d(x.to(memory_format=torch.channels_last), w.float(), b.float(), backend="cuda")
    assert (y.double() - independent(x, w, b)).abs().max().item() <= error_bound((2, 40, 9, 7), torch.float16)


@needs_cuda
def test_cuda_kernel_under_graph_capture_and_compile(route):
    x, w, b = inputs((2, 96, 17, 5), torch.float32, "cuda")
    expected = layer_norm2d(x, w, b, backend="cuda")
    static_x = x.clone()
    layer_norm2d(static_x, w, b, backend="cuda")  # warm-up (JIT compile on the CuPy route)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer_norm2d(static_x, w, b, backend="cuda")
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, expected, rtol=0, atol=0)
    compiled = torch.compile(lambda t: torch.ops.sipl_fast.layer_norm2d_cuda(t, w, b, 1e-5), fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
