"""sipl_fast.ops.depthwise_conv3x3: the reference against an independent float64 formula, the
Triton kernel (in the interpreter on a CPU) against it in both layouts, on bands of rows, on
every tile the GPU's autotuner may take (masked and unmasked paths), backend choice, errors,
torch.compile and CUDA-graph capture.

Tolerances, against float64 on the same (rounded) inputs: fp32 within 1e-5, or 2x the naive fp32
error where outputs are large enough for that to exceed it; fp16/bf16 within 2x the error of the
naive computation in that dtype (plus, in the interpreter, one ulp of the largest output for
bf16: it truncates fp32 -> bf16 casts where a GPU rounds to nearest).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from sipl_fast import ops
from sipl_fast.ops import BackendError, _layout, depthwise_conv3x3

from conftest import every_offered_tile, interpreter_tiles

module = importlib.import_module("sipl_fast.ops.depthwise_conv3x3")  # the package attribute is the function
stencil = importlib.import_module("sipl_fast.ops.gated_dwconv_gelu")  # whose gate kernel it runs, ungated

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no dots: the interpreter runs bf16 right
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def inputs(b, c, height, width, seed=0):
    """float64 x, weight (C, 1, 3, 3), bias, each rounded to ``dtype`` by ``rounded``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, height, width, generator=g, dtype=torch.float64),
            torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64) / 2,
            torch.randn(c, generator=g, dtype=torch.float64))


def rounded(dtype, *xs):
    return [None if x is None else x.to(dtype).double() for x in xs]


def independent(x, w, bias=None):
    """Sum of the 9 shifted, zero-padded images times the taps, in float64."""
    c, height, width = x.shape[1:]
    padded = F.pad(x, (1, 1, 1, 1))
    y = sum(padded[:, :, i:i + height, j:j + width] * w[:, 0, i, j].view(1, c, 1, 1)
            for i in range(3) for j in range(3))
    return y if bias is None else y + bias.view(1, c, 1, 1)


def max_err(x, ref):
    return (x.double().cpu() - ref.double().cpu()).abs().max().item()


def tolerance(dtype, x, w, bias, ref):
    naive = max_err(module.depthwise_conv3x3_torch(*(None if t is None else t.to(dtype) for t in (x, w, bias))), ref)
    if dtype == torch.float32:
        return max(1e-5, 2 * naive)
    truncation = torch.finfo(dtype).eps * ref.abs().max().item() if dtype == torch.bfloat16 and DEVICE == "cpu" else 0
    return 2 * naive + truncation


def run(x, w, bias, dtype, layout=torch.contiguous_format, backend="triton"):
    xl = x.to(DEVICE, dtype).contiguous(memory_format=layout)
    return depthwise_conv3x3(xl, w.to(DEVICE, dtype), None if bias is None else bias.to(DEVICE, dtype), backend=backend)


def test_reference_matches_an_independent_formula():
    x, w, bias = inputs(2, 5, 6, 4)
    torch.testing.assert_close(depthwise_conv3x3(x, w, bias, backend="torch"), independent(x, w, bias),
                               rtol=0, atol=1e-12)


def test_references_keep_channels_last_views_channels_last():
    """A channels-last image whose size-1 batch stride a view left small ((C, 1, W*C, C): x[0][None])
    reads as NCHW to PyTorch's convolutions (CPU: transposed in, and in bf16 out, 3-25x slower);
    the torch references convolve it as NHWC (_layout.conv_input), with the same values."""
    from sipl_fast.ops import conv1x1, gated_dwconv_gelu

    x, w, bias = inputs(1, 6, 5, 7)
    view = x.contiguous(memory_format=torch.channels_last)[0][None]
    assert view.stride(0) == 6 and not F.conv2d(view, w, padding=1, groups=6).is_contiguous(
        memory_format=torch.channels_last), "PyTorch now reads this view as NHWC: conv_input is not needed"
    fixed = _layout.conv_input(view)
    assert fixed.stride() == (5 * 7 * 6, 1, 7 * 6, 6) and torch.equal(fixed, view)
    assert _layout.conv_input(x) is x  # NCHW as it is
    for op, args in ((depthwise_conv3x3, (w, bias)), (conv1x1, (w.reshape(6, 9)[:, :6], bias)),
                     (gated_dwconv_gelu, (w, "gdfn", bias))):
        out = op(view, *args, backend="torch")
        assert out.is_contiguous(memory_format=torch.channels_last), op.__name__
        torch.testing.assert_close(out, op(x, *args, backend="torch"), rtol=0, atol=1e-12)


def test_the_cuda_kernels_inputs_keep_their_layout():
    """_layout.dense (what the CUDA C++ kernels read): NCHW and NHWC tensors as they are; a band of
    rows (FastSIPL's) copied in its own layout, so the kernel's output keeps it; other strides NCHW."""
    x = inputs(2, 6, 9, 11)[0]
    for fmt in (torch.contiguous_format, torch.channels_last):
        image = x.contiguous(memory_format=fmt)
        assert _layout.dense(image) is image
        band = _layout.dense(image[:, :, 3:])
        assert band.is_contiguous(memory_format=fmt) and torch.equal(band, x[:, :, 3:])
    assert _layout.dense(x.transpose(2, 3)).is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 9, 13), (1, 176, 5, 7), (3, 3, 1, 1), (1, 8, 1, 17), (2, 5, 11, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_the_reference(bias, shape, dtype, layout):
    x, w, b = rounded(dtype, *inputs(*shape))
    b = b if bias else None
    ref = independent(x, w, b)
    out = run(x, w, b, dtype, layout)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=layout)
    assert max_err(out, ref) <= tolerance(dtype, x, w, b, ref)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_kernel_reads_bands_of_rows_and_takes_fp32_weights(layout):
    """FastSIPL's bands of rows read in place (the output dense in the band's layout), with the
    weights in fp32 and tap-major memory (``_layout.as_tap_major``), as FastSIPL stores them."""
    x, w, b = rounded(torch.float16, *inputs(2, 24, 10, 7))
    xs = x.to(DEVICE, torch.float16).contiguous(memory_format=layout)
    band = xs[:, :, 3:8]
    w32 = ops._layout.as_tap_major(w.float().to(DEVICE))
    out = depthwise_conv3x3(band, w32, b.float().to(DEVICE), backend="triton")
    ref = independent(band.double().cpu(), w, b)
    assert out.is_contiguous(memory_format=layout) and out.dtype == torch.float16
    assert max_err(out, ref) <= tolerance(torch.float16, band.double().cpu(), w, b, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_every_gpu_tile_in_the_interpreter(layout, monkeypatch):
    """Each tile the GPU's autotuner may choose (the gate kernel's), in fp16, on an image where
    every tile has programs on the unmasked path (inside the image, a full channel block)
    beside masked ones (borders, the last channel block, the last pixels)."""
    tiles = stencil._GATE_CONFIGS[layout == torch.contiguous_format]
    c = max(t.kwargs["BLOCK_C"] for t in tiles) + 1
    x, w, b = rounded(torch.float16, *inputs(1, c, 3, 3 * max(t.kwargs["BLOCK_P"] for t in tiles) + 1))
    ref = independent(x, w, b)
    bound = tolerance(torch.float16, x, w, b, ref)
    for cfg in interpreter_tiles(monkeypatch, stencil, "_INTERPRETER_GATE", tiles):
        assert max_err(run(x, w, b, torch.float16, layout), ref) <= bound, cfg


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_every_autotuned_tile_on_the_gpu(layout, monkeypatch):
    x, w, b = rounded(torch.bfloat16, *inputs(2, 130, 19, 300))
    ref = independent(x, w, b)
    bound = tolerance(torch.bfloat16, x, w, b, ref)
    outs = every_offered_tile(monkeypatch, lambda: run(x, w, b, torch.bfloat16, layout))
    assert len(outs) == len(stencil._GATE_CONFIGS[layout == torch.contiguous_format])
    for out in outs:
        assert max_err(out, ref) <= bound


def test_auto_uses_torch_on_cpu_and_triton_refuses_gradients():
    x, w, b = (t.float() for t in inputs(1, 4, 5, 5))
    if DEVICE == "cpu":
        torch.testing.assert_close(depthwise_conv3x3(x, w, b), module.depthwise_conv3x3_torch(x, w, b), rtol=0, atol=0)
    w.requires_grad_(True)
    with pytest.raises(BackendError, match="forward-only"):
        depthwise_conv3x3(x.to(DEVICE), w.to(DEVICE), backend="triton")
    depthwise_conv3x3(x.to(DEVICE), w.to(DEVICE)).sum().backward()  # automatic: the reference
    assert w.grad is not None


@pytest.mark.parametrize("shape,wshape,bshape,match", [
    ((2, 4, 5), (4, 1, 3, 3), None, r"\(B, C, H, W\)"),
    ((1, 4, 5, 5), (4, 1, 5, 5), None, r"weight of shape \(4, 1, 3, 3\)"),
    ((1, 4, 5, 5), (2, 1, 3, 3), None, r"weight of shape \(4, 1, 3, 3\)"),
    ((1, 4, 5, 5), (4, 1, 3, 3), (3,), r"bias of shape \(4,\)"),
    ((1, 4, 0, 5), (4, 1, 3, 3), None, "H, W >= 1"),
])
def test_bad_input_raises_value_error(shape, wshape, bshape, match):
    with pytest.raises(ValueError, match=match):
        depthwise_conv3x3(torch.zeros(shape), torch.zeros(wshape), None if bshape is None else torch.zeros(bshape))


def test_integer_input_and_weight_raise_value_error():
    with pytest.raises(ValueError, match="floating-point"):
        depthwise_conv3x3(torch.zeros(1, 2, 3, 3, dtype=torch.int32), torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv3x3(torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 3, 3, dtype=torch.int64))


def test_opcheck_and_compile_without_graph_breaks():
    x, w, b = (t.float().to(DEVICE) for t in inputs(2, 6, 5, 7))
    torch.library.opcheck(module.depthwise_conv3x3_triton, (x, w, b))
    fn = torch.compile(lambda *a: depthwise_conv3x3(*a, backend="triton"), fullgraph=True,
                       backend="inductor" if DEVICE == "cuda" else "aot_eager")
    assert max_err(fn(x, w, b), independent(x.double().cpu(), w.double().cpu(), b.double().cpu())) <= 1e-5


@needs_cuda
def test_graph_replay_equals_eager():
    x, w, b = (t.to(DEVICE, torch.bfloat16) for t in inputs(2, 96, 64, 80))
    eager = depthwise_conv3x3(x, w, b, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = depthwise_conv3x3(x, w, b, backend="triton")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, depthwise_conv3x3(x, w, b, backend="triton"), rtol=0, atol=0)
    assert not torch.equal(out, eager)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    x, w, b = (t.float().to(DEVICE) for t in inputs(2, 4, 5, 5))
    assert depthwise_conv3x3(x[:0], w, b, backend=backend).shape == (0, 4, 5, 5)
