"""sipl_fast.ops.gated_dwconv_gelu: the reference against an independent float64 formula, the
Triton kernel (in the interpreter on a CPU) and the CUDA C++ kernel (on a GPU) against it in
both layouts and both gates, the Triton kernel with the projection and residual epilogue,
backend choice, errors, torch.compile and CUDA-graph capture.

Tolerances, against float64 on the same (rounded) inputs: fp32 within 1e-5, or 2x the naive fp32
error where outputs are large enough for that to exceed it; fp16/bf16 within 2x the error of the
naive computation in that dtype. Triton's CPU interpreter truncates fp32 -> bf16 casts where a
GPU rounds to nearest, so there bf16 may be off by one more ulp of the largest output.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from sipl_fast.ops import BackendError, _layout, _triton, gated_dwconv_gelu
from sipl_fast.ops._backend import choose

from conftest import every_offered_tile, interpreter_tiles

module = importlib.import_module("sipl_fast.ops.gated_dwconv_gelu")  # the package attribute is the function
reference = module.gated_dwconv_gelu_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")
KERNELS = ["triton", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no dots: the interpreter runs bf16 right
# The projection multiplies matrices: bf16 dots are wrong in Triton's interpreter, so GPU only.
PROJECT_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]


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


def projection(b, h, cout, height, width, seed=1):
    """float64 proj_weight (Cout, h), proj_bias (Cout,), residual (B, Cout, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(cout, h, generator=g, dtype=torch.float64) / h ** 0.5,
            torch.randn(cout, generator=g, dtype=torch.float64),
            torch.randn(b, cout, height, width, generator=g, dtype=torch.float64))


def projected(gate, pw, pb=None, res=None):
    """``res + pw @ gate + pb`` at every pixel, in float64 (an einsum)."""
    y = torch.einsum("oc,bchw->bohw", pw.reshape(pw.shape[0], -1), gate)
    if pb is not None:
        y = y + pb.view(1, -1, 1, 1)
    return y if res is None else y + res


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


def test_reference_projects_and_adds_the_residual():
    x, w, bias = inputs(2, 3, 5, 4, bias=True)
    pw, pb, res = projection(2, 3, 7, 5, 4)
    torch.testing.assert_close(gated_dwconv_gelu(x, w, "dual", bias, pw, pb, res, backend="torch"),
                               projected(independent(x, w, "dual", bias), pw, pb, res), rtol=0, atol=1e-12)
    torch.testing.assert_close(gated_dwconv_gelu(x, w, "gdfn", None, pw.view(7, 3, 1, 1), backend="torch"),
                               projected(independent(x, w, "gdfn"), pw), rtol=0, atol=1e-12)


def test_reference_takes_weights_in_a_wider_dtype():
    """fp32 weights with 16-bit x (the model's parameters outside autocast): cast to x's dtype,
    as autocast casts them, rather than failing in F.conv2d."""
    x, w, bias = inputs(2, 3, 5, 4, bias=True)
    x16 = x.half()
    out = gated_dwconv_gelu(x16, w.float(), "gdfn", bias.float(), backend="torch")
    assert out.dtype == torch.float16
    assert torch.equal(out, gated_dwconv_gelu(x16, w.half(), "gdfn", bias.half(), backend="torch"))


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_gpu_tile_of_the_gate_in_the_interpreter(layout, monkeypatch):
    """Each tile the GPU's autotuner may choose for the gate alone, in its layout, run by the
    interpreter in fp16 on partial tiles of channels and pixels, with bias, dual mode."""
    x, w, bias = rounded(torch.float16, *inputs(2, 37, 9, 11, bias=True))
    ref = independent(x, w, "dual", bias)
    bound = tolerance(torch.float16, x, w, "dual", bias, ref)
    xl = x.to(DEVICE, torch.float16).contiguous(memory_format=layout)
    tiles = module._GATE_CONFIGS[layout == torch.contiguous_format]
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_GATE", tiles):
        out = gated_dwconv_gelu(xl, *to(torch.float16, w), "dual", *to(torch.float16, bias), backend="triton")
        assert max_err(out, ref) <= bound, cfg


def inside_shape(tiles, pixels: str, channels: str):
    """(h, H, W) on which each of ``tiles`` has programs on the stencil's unmasked path
    (``_triton.interior``: a row segment of pixels with x >= 1 and its right neighbours inside,
    in row 1 of 3, a full block of channels) and on the masked one, some just outside the
    interior: segments at x = 0 and ending at x = W - 1 (W three times the widest pixel block),
    rows 0 and 2, the last channel block (h one past the widest channel block)."""
    return (max(c.kwargs[channels] for c in tiles) + 1, 3, 3 * max(c.kwargs[pixels] for c in tiles))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_gpu_tile_of_the_gate_inside_the_image(layout, monkeypatch):
    """The unmasked path of each tile the GPU's autotuner may choose for the gate alone,
    beside the masked one (``inside_shape``), fp16."""
    tiles = module._GATE_CONFIGS[layout == torch.contiguous_format]
    x, w, bias = rounded(torch.float16, *inputs(1, *inside_shape(tiles, "BLOCK_P", "BLOCK_C"), bias=True))
    ref = independent(x, w, "gdfn", bias)
    bound = tolerance(torch.float16, x, w, "gdfn", bias, ref)
    xl = x.to(DEVICE, torch.float16).contiguous(memory_format=layout)
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_GATE", tiles):
        out = gated_dwconv_gelu(xl, *to(torch.float16, w), "gdfn", *to(torch.float16, bias), backend="triton")
        assert max_err(out, ref) <= bound, cfg


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


PROJECT_CASES = [  # (B, h, Cout, H, W, bias, residual): the 96-wide GDFN; two output blocks; odd; edges
    (2, 255, 96, 7, 9, False, True),
    (1, 20, 192, 5, 7, True, True),
    (2, 7, 53, 4, 5, True, False),
    (3, 5, 3, 1, 1, False, False),
    (1, 9, 40, 6, 1, True, True),
]


def project_tolerance(dtype, args, mode, ref):
    naive = max_err(reference(*to(dtype, *args[:2]), mode, *to(dtype, *args[2:])), ref)
    return max(1e-5 * ref.abs().max().item(), 2 * naive) if dtype == torch.float32 else 2 * naive


@pytest.mark.parametrize("backend", KERNELS)  # cuda: its gate, then conv1x1
@pytest.mark.parametrize("dtype", PROJECT_DTYPES)
@pytest.mark.parametrize("mode", ["gdfn", "dual"])
@pytest.mark.parametrize("case", PROJECT_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "b" * c[5] + "r" * c[6])
def test_kernel_projects_and_adds_the_residual(case, mode, dtype, backend):
    b, h, cout, height, width, has_bias, has_residual = case
    x, w, bias = rounded(dtype, *inputs(b, h, height, width, bias=has_bias))
    pw, pb, res = rounded(dtype, *projection(b, h, cout, height, width))
    pb, res = (pb if has_bias else None), (res if has_residual else None)
    args = (x, w, bias, pw, pb, res)
    ref = projected(independent(x, w, mode, bias), pw, pb, res)
    out = gated_dwconv_gelu(*to(dtype, x, w), mode, *to(dtype, bias, pw, pb, res), backend=backend)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert max_err(out, ref) <= project_tolerance(dtype, args, mode, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_gpu_tile_of_the_projection_in_the_interpreter(layout, dtype, monkeypatch):
    """Each tile the GPU's autotuner may choose for the gate with its projection (16-bit: tap
    loops rolled and unrolled; fp32), run by the interpreter on partial tiles: dual mode,
    biases, residual."""
    x, w, bias = rounded(dtype, *inputs(2, 37, 9, 11, bias=True))
    pw, pb, res = rounded(dtype, *projection(2, 37, 70, 9, 11))
    args = (x, w, bias, pw, pb, res)
    ref = projected(independent(x, w, "dual", bias), pw, pb, res)
    bound = project_tolerance(dtype, args, "dual", ref)
    xl, rl = (t.to(DEVICE, dtype).contiguous(memory_format=layout) for t in (x, res))
    tiles = module._PROJECT_CONFIGS[dtype == torch.float32]
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_PROJECT", tiles):
        out = gated_dwconv_gelu(xl, *to(dtype, w), "dual", *to(dtype, bias, pw, pb), rl, backend="triton")
        assert max_err(out, ref) <= bound, cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_gpu_tile_of_the_projection_inside_the_image(layout, dtype, monkeypatch):
    """The unmasked path of each projection tile, beside the masked one (``inside_shape``)."""
    tiles = module._PROJECT_CONFIGS[dtype == torch.float32]
    h, height, width = inside_shape(tiles, "BLOCK_N", "BLOCK_K")
    x, w, bias = rounded(dtype, *inputs(1, h, height, width, bias=True))
    pw, pb, res = rounded(dtype, *projection(1, h, 24, height, width))
    args = (x, w, bias, pw, pb, res)
    ref = projected(independent(x, w, "gdfn", bias), pw, pb, res)
    bound = project_tolerance(dtype, args, "gdfn", ref)
    xl, rl = (t.to(DEVICE, dtype).contiguous(memory_format=layout) for t in (x, res))
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_PROJECT", tiles):
        out = gated_dwconv_gelu(xl, *to(dtype, w), "gdfn", *to(dtype, bias, pw, pb), rl, backend="triton")
        assert max_err(out, ref) <= bound, cfg


@needs_cuda
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("project", [False, True])
def test_every_autotuned_tile_on_the_gpu(project, layout, monkeypatch):
    """bf16 through every tile the autotuners may choose for the gate alone (per layout) and for
    the gate with its projection (its dots: what the interpreter cannot check), unrolled tap
    loops included, dual mode with biases and residual, against float64; the image 1030 wide,
    so that every tile also runs the stencil's unmasked path (``_triton.interior``)."""
    h = 64
    x, w, bias = rounded(torch.bfloat16, *inputs(2, h, 5, 1030, bias=True))
    xl = x.to(DEVICE, torch.bfloat16).contiguous(memory_format=layout)
    nchw = layout == torch.contiguous_format
    if project:
        pw, pb, res = rounded(torch.bfloat16, *projection(2, h, 96, 5, 1030))
        args = (x, w, bias, pw, pb, res)
        ref = projected(independent(x, w, "dual", bias), pw, pb, res)
        bound = project_tolerance(torch.bfloat16, args, "dual", ref)
        rl = res.to(DEVICE, torch.bfloat16).contiguous(memory_format=layout)
        call = lambda: gated_dwconv_gelu(xl, *to(torch.bfloat16, w), "dual",  # noqa: E731
                                         *to(torch.bfloat16, bias, pw, pb), rl, backend="triton")
        count = len(module._PROJECT_CONFIGS[False])
    else:
        ref = independent(x, w, "dual", bias)
        bound = tolerance(torch.bfloat16, x, w, "dual", bias, ref)
        call = lambda: gated_dwconv_gelu(xl, *to(torch.bfloat16, w), "dual", *to(torch.bfloat16, bias),  # noqa: E731
                                         backend="triton")
        count = len(module._GATE_CONFIGS[nchw])
    outs = every_offered_tile(monkeypatch, call)
    assert len(outs) == count
    for i, out in enumerate(outs):
        assert max_err(out, ref) <= bound, i


@pytest.mark.parametrize("dtype", PROJECT_DTYPES)
def test_triton_projection_keeps_channels_last_reads_bands_and_promotes(dtype):
    x, w, bias = rounded(dtype, *inputs(2, 24, 9, 7, bias=True))
    pw, pb, res = rounded(dtype, *projection(2, 24, 80, 9, 7))
    args = (x, w, bias, pw, pb, res)
    ref = projected(independent(x, w, "gdfn", bias), pw, pb, res)
    tol = project_tolerance(dtype, args, "gdfn", ref)
    xd, wd, bd, pwd, pbd, rd = to(dtype, *args)
    xc, rc = (t.contiguous(memory_format=torch.channels_last) for t in (xd, rd))
    out = gated_dwconv_gelu(xc, wd, "gdfn", bd, pwd, pbd, rc, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last) and max_err(out, ref) <= tol
    for xs, rs in ((xd, rd), (xc, rc)):  # rows 2..6 of either layout, as FastSIPL's bands pass them
        band = gated_dwconv_gelu(xs[:, :, 2:7], wd, "gdfn", bd, pwd, pbd, rs[:, :, 2:7], backend="triton")
        band_ref = projected(independent(x[:, :, 2:7], w, "gdfn", bias), pw, pb, res[:, :, 2:7])
        assert max_err(band, band_ref) <= tol
    out = gated_dwconv_gelu(xd, wd, "gdfn", bd, pwd, pbd, res.float().to(DEVICE), backend="triton")
    assert out.dtype == torch.float32 and max_err(out, ref) <= tol  # residual + y promotes, as ``+`` does


def test_triton_projection_int64_offsets_and_grid_limits(monkeypatch):
    """Forced int64 offsets give the same result; a 4096x2048 image's grid fits CUDA's limits
    for every GPU tile (the launch is recorded, not run)."""
    x, w, bias = inputs(2, 7, 4, 5, bias=True)
    pw, pb, res = projection(2, 7, 53, 4, 5)
    args = (x, w, bias, pw, pb, res)
    ref = projected(independent(x, w, "dual", bias), pw, pb, res)
    with monkeypatch.context() as m:
        m.setattr(_layout, "INT32_OFFSETS", 1)
        out = gated_dwconv_gelu(*to(torch.float32, x, w), "dual", *to(torch.float32, bias, pw, pb, res),
                                backend="triton")
    assert max_err(out, ref) <= project_tolerance(torch.float32, args, "dual", ref)
    grids = []
    monkeypatch.setattr(_triton, "launch_fitting", lambda kernel, key, configs, grid, *a, **k: grids.append(grid))
    monkeypatch.setattr(_triton, "launch_tuned", lambda kernel, tuned, key, configs, grid, *a, **k: grids.append(grid))
    gated_dwconv_gelu(torch.empty(1, 16, 4096, 2048, dtype=torch.float16, device=DEVICE),
                      torch.empty(16, 1, 3, 3, device=DEVICE), "gdfn", None, torch.empty(96, 8, device=DEVICE),
                      backend="triton")
    assert len(grids) == 1
    for cfg in (cfg for configs in module._PROJECT_CONFIGS.values() for cfg in configs):
        _triton.check_grid(module._gated_project_kernel, grids[0](cfg.kwargs))


def test_empty_batch_and_empty_images():
    """An empty batch is an empty result; an image without pixels is a ValueError for every
    backend (the reference's padded convolution cannot take one)."""
    x, w, _ = to(torch.float32, *inputs(2, 3, 5, 4))
    for backend in ("torch", "triton"):
        assert gated_dwconv_gelu(x[:0], w, backend=backend).shape == (0, 3, 5, 4)
        with pytest.raises(ValueError, match="H, W >= 1"):
            gated_dwconv_gelu(x[:, :, :0], w, backend=backend)


# ------------------------------------------------------------------ choice and errors
def test_auto_uses_torch_on_cpu_and_kernels_refuse_gradients():
    x, w, _ = to(torch.float32, *inputs(1, 2, 3, 3))
    if DEVICE == "cpu":
        assert choose("gated_dwconv_gelu", module.BACKENDS, module.PREFERENCE, None, x, w, "gdfn", None, None, None,
                      None).name == "torch"
        with pytest.raises(BackendError, match="CUDA device"):
            gated_dwconv_gelu(x, w, backend="cuda")
    with pytest.raises(BackendError, match="forward-only"):
        gated_dwconv_gelu(x, w.requires_grad_(), backend="triton")
    gated_dwconv_gelu(x, w).sum().backward()  # gradients: the automatic choice takes the reference
    assert w.grad is not None
    if DEVICE == "cpu":
        with pytest.raises(BackendError, match="bf16"):
            gated_dwconv_gelu(x.bfloat16(), w.detach(), proj_weight=torch.randn(3, 2), backend="triton")


@pytest.mark.parametrize("shape, wshape, mode, match", [
    ((1, 5, 4, 4), (5, 1, 3, 3), "gdfn", "even"),
    ((1, 0, 4, 4), (0, 1, 3, 3), "gdfn", ">= 2"),
    ((1, 4, 4, 4), (4, 1, 5, 5), "gdfn", "weight"),
    ((1, 4, 4, 4), (4, 1, 3, 3), "gelu", "mode"),
    ((4, 4, 4), (4, 1, 3, 3), "gdfn", r"\(B, 2h, H, W\)"),
])
def test_bad_input_raises_value_error(shape, wshape, mode, match):
    with pytest.raises(ValueError, match=match):
        gated_dwconv_gelu(torch.randn(shape), torch.randn(wshape), mode)
    with pytest.raises(ValueError, match="bias"):
        gated_dwconv_gelu(torch.randn(1, 4, 4, 4), torch.randn(4, 1, 3, 3), bias=torch.randn(3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(proj_weight=torch.randn(5, 3)), r"proj_weight of shape \(Cout, 2\)"),
    (dict(proj_weight=torch.randn(5, 2, 3, 3)), "proj_weight of shape"),
    (dict(proj_weight=torch.randn(5, 2), proj_bias=torch.randn(4)), r"proj_bias of shape \(5,\)"),
    (dict(proj_weight=torch.randn(5, 2), residual=torch.randn(1, 4, 3, 3)), r"residual of shape \(1, 5, 3, 3\)"),
    (dict(proj_weight=torch.randn(5, 2), residual=torch.ones(1, 5, 3, 3, dtype=torch.int32)), "floating-point"),
    (dict(residual=torch.randn(1, 5, 3, 3)), "need proj_weight"),
    (dict(proj_bias=torch.randn(5)), "need proj_weight"),
    (dict(proj_weight=torch.ones(5, 2, dtype=torch.int32)), "proj_weight as a real floating-point tensor"),
    (dict(weight=torch.ones(4, 1, 3, 3, dtype=torch.int32)), "weight as a real floating-point tensor"),
    (dict(x=torch.randn(1, 4, 3, 0)), "H, W >= 1"),
])
def test_bad_projection_raises_value_error(kwargs, match):
    args = dict(dict(x=torch.randn(1, 4, 3, 3), weight=torch.randn(4, 1, 3, 3)), **kwargs)
    with pytest.raises(ValueError, match=match):
        gated_dwconv_gelu(**args)


def test_opcheck_and_compile_without_graph_breaks():
    x, w, bias = to(torch.float32, *inputs(2, 5, 6, 7, bias=True))
    pw, pb, res = to(torch.float32, *projection(2, 5, 9, 6, 7))
    xc = x.contiguous(memory_format=torch.channels_last)
    for args in ((x, w, bias, True), (x, w, None, False), (xc, w, None, False), (x, w, bias, True, pw, pb, res),
                 (x, w, None, False, pw, None, None)):
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


@needs_cuda
def test_triton_projection_under_graph_capture():
    x, w, bias = to(torch.bfloat16, *inputs(2, 255, 33, 65, bias=True))
    pw, pb, res = to(torch.bfloat16, *projection(2, 255, 96, 33, 65))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gated_dwconv_gelu(x, w, "gdfn", bias, pw, pb, res, backend="triton")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, gated_dwconv_gelu(x, w, "gdfn", bias, pw, pb, res, backend="triton"),
                               rtol=0, atol=0)
