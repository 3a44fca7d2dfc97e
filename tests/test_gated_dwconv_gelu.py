"""sipl_fast.ops.gated_dwconv_gelu: the reference against an independent float64 formula, the
Triton kernel (in the interpreter on a CPU) and the CUDA C++ kernel (on a GPU) against it in
both layouts and both gates, backend choice, errors, torch.compile and CUDA-graph capture.

Tolerances, against float64 on the same (rounded) inputs: fp32 within 1e-5, or 2x the naive fp32
error where outputs are large enough for that to exceed it; fp16/bf16 within 2x the error of the
naive computation in that dtype. Triton's CPU interpreter truncates fp32 -> bf16 casts where a
GPU rounds to nearest, so there bf16 may be off by one more ulp of the largest output.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from sipl_fast.ops import BackendError, gated_dwconv_gelu
from sipl_fast.ops._backend import choose

module = importlib.import_module("sipl_fast.ops.gated_dwconv_gelu")  # the package attribute is the function
reference = module.gated_dwconv_gelu_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")
KERNELS = ["triton", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no dots: the interpreter runs bf16 right


def inputs(b, h, height, width, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2 * h, height, width, generator=g, dtype=torch.float64)
    w = torch.randn(2 * h, 1, 3, 3, generator=g, dtype=torch.float64) / 2
    return x, w, torch.randn(2 * h, generator=g, dtype=torch.float64) if bias else None


def independent(x, w, mode, bias=None):
    """Sum of the 9 shifted, zero-padded images times the taps, then the gate, in float64."""
    b, c2, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    y = sum(padded[:, :, i:i + height, j:j + width] * w[:, 0, i, j].view(1, c2, 1, 1) for i in range(3) for j in range(3))
    if bias is not None:
        y = y + bias.view(1, c2, 1, 1)
    y1, y2 = y[:, : c2 // 2], y[:, c2 // 2:]
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / 2 ** 0.5))  # noqa: E731
    return gelu(y2) * y1 + gelu(y1) * y2 if mode == "dual" else gelu(y1) * y2


def to(dtype, *xs):
    return [None if x is None else x.to(DEVICE, dtype) for x in xs]


def max_err(x, ref):
    return (x.double().cpu() - ref.double().cpu()).abs().max().item()


def rounded(dtype, *xs):
    """The inputs as the kernel sees them, back in float64."""
    return [None if x is None else x.to(dtype).double() for x in xs]


def tolerance(dtype, x, w, mode, bias, ref):
    naive = max_err(reference(*to(dtype, x, w), mode, *to(dtype, bias)), ref)
    if dtype == torch.float32:
        return max(1e-5, 2 * naive)
    truncation = torch.finfo(dtype).eps * ref.abs().max().item() if dtype == torch.bfloat16 and DEVICE == "cpu" else 0
    return 2 * naive + truncation


# ------------------------------------------------------------------ reference
@pytest.mark.parametrize("mode", ["gdfn", "dual"])
def test_reference_matches_an_independent_formula(mode):
    x, w, bias = inputs(2, 3, 5, 4, bias=True)
    torch.testing.assert_close(gated_dwconv_gelu(x, w, mode, bias, backend="torch"), independent(x, w, mode, bias),
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------------ kernels
CASES = [  # (B, h, H, W, bias): a GDFN width at an odd size; edges: 1x1, one column, one row
    (2, 255, 37, 53, False),
    (3, 5, 1, 1, True),
    (1, 7, 4, 1, False),
    (2, 3, 1, 9, True),
    (2, 20, 9, 11, True),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["gdfn", "dual"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("b" if c[4] else ""))
def test_kernel_matches_the_reference(case, mode, dtype, backend):
    *shape, has_bias = case
    x, w, bias = rounded(dtype, *inputs(*shape, bias=has_bias))
    ref = independent(x, w, mode, bias)
    out = gated_dwconv_gelu(*to(dtype, x, w), mode, *to(dtype, bias), backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert max_err(out, ref) <= tolerance(dtype, x, w, mode, bias, ref)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 20, 9, 11), (3, 5, 1, 1), (1, 33, 6, 1)])
def test_kernel_keeps_channels_last_and_reads_bands(shape, dtype, backend):
    x, w, bias = rounded(dtype, *inputs(*shape, bias=True))
    ref = independent(x, w, "dual", bias)
    xc = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    out = gated_dwconv_gelu(xc, *to(dtype, w), "dual", *to(dtype, bias), backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert max_err(out, ref) <= tolerance(dtype, x, w, "dual", bias, ref)
    for xs in (x.to(DEVICE, dtype), xc):  # a band of rows of either layout (FastSIPL's bands), read in place
        band = xs[:, :, shape[2] // 3:]
        out = gated_dwconv_gelu(band, *to(dtype, w), "dual", *to(dtype, bias), backend=backend)
        ref = independent(band.double().cpu(), w, "dual", bias)
        assert out.is_contiguous(memory_format=torch.channels_last if xs is xc else torch.contiguous_format)
        assert max_err(out, ref) <= tolerance(dtype, band.double().cpu(), w, "dual", bias, ref)
    strided = x.transpose(2, 3)  # neither layout: copied to NCHW
    out = gated_dwconv_gelu(*to(dtype, strided, w), "gdfn", backend=backend)
    assert max_err(out, independent(strided, w, "gdfn")) <= tolerance(dtype, strided, w, "gdfn", None,
                                                                       independent(strided, w, "gdfn"))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_takes_fp32_weights_with_half_input(backend):
    """Under autocast the model's weights stay fp32 while activations are bf16."""
    x, w, bias = inputs(2, 6, 5, 7, bias=True)
    out = gated_dwconv_gelu(x.to(DEVICE, torch.bfloat16), *to(torch.float32, w), "gdfn", *to(torch.float32, bias),
                            backend=backend)
    ref = independent(x.bfloat16().double(), w.float().double(), "gdfn", bias.float().double())
    assert max_err(out, ref) <= torch.finfo(torch.bfloat16).eps * ref.abs().max().item()  # the output's rounding (or truncation)


def test_empty_input():
    x, w, _ = to(torch.float32, *inputs(2, 3, 0, 4))
    assert gated_dwconv_gelu(x, w, backend="triton").shape == (2, 3, 0, 4)


# ------------------------------------------------------------------ choice and errors
def test_auto_uses_torch_on_cpu_and_kernels_refuse_gradients():
    x, w, _ = to(torch.float32, *inputs(1, 2, 3, 3))
    if DEVICE == "cpu":
        assert choose("gated_dwconv_gelu", module.BACKENDS, module.PREFERENCE, None, x, w, "gdfn", None).name == "torch"
        with pytest.raises(BackendError, match="CUDA device"):
            gated_dwconv_gelu(x, w, backend="cuda")
    with pytest.raises(BackendError, match="forward-only"):
        gated_dwconv_gelu(x, w.requires_grad_(), backend="triton")
    gated_dwconv_gelu(x, w).sum().backward()  # gradients: the automatic choice takes the reference
    assert w.grad is not None


@pytest.mark.parametrize("shape, wshape, mode, match", [
    ((1, 5, 4, 4), (5, 1, 3, 3), "gdfn", "even"),
    ((1, 4, 4, 4), (4, 1, 5, 5), "gdfn", "weight"),
    ((1, 4, 4, 4), (4, 1, 3, 3), "gelu", "mode"),
    ((4, 4, 4), (4, 1, 3, 3), "gdfn", r"\(B, 2h, H, W\)"),
])
def test_bad_input_raises_value_error(shape, wshape, mode, match):
    with pytest.raises(ValueError, match=match):
        gated_dwconv_gelu(torch.randn(shape), torch.randn(wshape), mode)
    with pytest.raises(ValueError, match="bias"):
        gated_dwconv_gelu(torch.randn(1, 4, 4, 4), torch.randn(4, 1, 3, 3), bias=torch.randn(3))


def test_opcheck_and_compile_without_graph_breaks():
    x, w, bias = to(torch.float32, *inputs(2, 5, 6, 7, bias=True))
    for args in ((x, w, bias, True), (x, w, None, False), (x.contiguous(memory_format=torch.channels_last), w, None, False)):
        torch.library.opcheck(module.gated_dwconv_gelu_triton, args)
    fn = torch.compile(lambda *a: gated_dwconv_gelu(*a, backend="triton"), fullgraph=True,
                       backend="inductor" if DEVICE == "cuda" else "aot_eager")
    assert max_err(fn(x, w, "dual", bias), reference(x, w, "dual", bias)) <= 1e-5


# ------------------------------------------------------------------ GPU: compile and graphs
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_under_compile_and_graph_capture(backend):
    x, w, bias = to(torch.bfloat16, *inputs(2, 96, 33, 65, bias=True))
    op = getattr(torch.ops.sipl_fast, f"gated_dwconv_gelu_{backend}")
    eager = op(x, w, bias, True)
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, bias, True), eager, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gated_dwconv_gelu(x, w, "dual", bias, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, gated_dwconv_gelu(x, w, "dual", bias, backend=backend), rtol=0, atol=0)
