"""sipl_fast.ops.channel_attention (MDTA): the reference against an independent float64 formula,
the Triton kernels (in the interpreter on a CPU) against it, the folded ``project_out``, backend
choice, errors, torch.compile and CUDA-graph capture (on a GPU).

Tolerances: fp32 within 1e-5 of float64 (or 2x the naive fp32 error where temperatures make
that larger); fp16/bf16 within 2x the error of the naive computation in that dtype (both
against float64 on the same inputs; the kernels' outputs head by head, ``heads_past_twice_naive``).
"""
import importlib

import numpy
import pytest
import torch

from sipl_fast.ops import BackendError, _layout, _triton, channel_attention
from sipl_fast.ops._backend import choose

from conftest import cosine_attention_f64 as independent  # channels are the tokens, pixels the features
from conftest import every_offered_tile, heads_past_twice_naive, interpreter_tiles

module = importlib.import_module("sipl_fast.ops.channel_attention")  # the package attribute is the function
reference = module.channel_attention_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")
# bf16 dots are wrong in Triton's interpreter: bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]


def inputs(b, h, c, n, temperatures, seed=0):
    """float64 q, k, v (B, H, C, N) with varied row norms, and a (H, 1, 1) temperature."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, c, n, generator=g, dtype=torch.float64) * (0.5 + torch.rand(b, h, c, 1, generator=g))
               for _ in range(3))
    return q, k, v, torch.tensor(temperatures, dtype=torch.float64).view(h, 1, 1)


def to(dtype, *xs):
    return [None if x is None else x.to(DEVICE, dtype) for x in xs]


def max_err(x, ref):
    return (x.double().cpu() - ref.double().cpu()).abs().max().item()


def tolerance(dtype, args, ref):
    """fp32: 1e-5 or 2x the naive fp32 error; fp16/bf16: 2x the naive error in that dtype."""
    naive = max_err(reference(*to(dtype, *args)), ref)
    return max(1e-5, 2 * naive) if dtype == torch.float32 else 2 * naive


# ------------------------------------------------------------------ reference
def test_reference_matches_an_independent_formula():
    q, k, v, t = inputs(2, 3, 7, 29, [0.3, 4.0, -2.0])
    q[1, 2, 3] = 0  # a zero row normalises to zero (clamped norm)
    torch.testing.assert_close(channel_attention(q, k, v, t, backend="torch"), independent(q, k, v, t), rtol=0, atol=1e-12)
    w, bias = torch.randn(5, 21, 1, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    folded = torch.einsum("oc,bcn->bon", w.view(5, 21), independent(q, k, v, t).reshape(2, 21, 29)) + bias.view(5, 1)
    torch.testing.assert_close(channel_attention(q, k, v, t, w, bias, backend="torch"), folded, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ Triton kernels
CASES = [  # (B, H, C, N, temperatures): the model's head widths, odd N, a split Gram pass
    (2, 2, 40, 37 * 53, [0.1, 5.0]),
    (1, 1, 176, 37 * 53, [1.0]),
    (2, 3, 24, 4099, [50.0, 1.0, -3.0]),  # N > 2 x 2048: the Gram pass splits N
    (1, 2, 8, 5, [2.0, 0.5]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_triton_matches_the_reference(case, dtype):
    *shape, temps = case
    q, k, v, t = inputs(*shape, temps)
    ref = independent(q, k, v, t)
    out = channel_attention(*to(dtype, q, k, v), t.float().to(DEVICE), backend="triton")
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    if dtype == torch.float32:
        assert max_err(out, ref) <= tolerance(dtype, (q, k, v, t), ref)
    else:
        assert not heads_past_twice_naive(out, reference(*to(dtype, q, k, v, t)), ref)


@pytest.mark.parametrize("tile", [256, 1024])
def test_softmax_sums_many_gram_partials_several_at_a_time(tile, monkeypatch):
    """Many slices of N (here 31), summed by the softmax kernel one (tile 256) or four at a
    time (1024: seven full loads, then one of three slices masked): the same maps."""
    monkeypatch.setattr(module, "_MIN_SLICE", 63)  # slices of 64 pixels (the Gram tile), the last 59
    monkeypatch.setattr(module._triton, "sm_count", lambda device: 64)
    monkeypatch.setattr(module, "_SOFTMAX_TILE", tile)
    launches = []
    launch = module._triton.launch
    monkeypatch.setattr(module._triton, "launch", lambda kernel, grid, *a, **kw: (
        kernel is module._softmax_kernel and launches.append((a[6], kw)), launch(kernel, grid, *a, **kw)))
    q, k, v, t = inputs(1, 1, 40, 31 * 64 - 5, [4.0])
    out = channel_attention(*to(torch.float32, q, k, v), t.float().to(DEVICE), backend="triton")
    assert launches == [(31, dict(BLOCK_S=tile // 256, BLOCK_R=4, BLOCK_CC=64))]
    assert max_err(out, independent(q, k, v, t)) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_triton_folds_project_out(dtype, bias):
    q, k, v, t = inputs(2, 2, 40, 97, [0.7, 3.0])
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 80, 1, 1, generator=g, dtype=torch.float64) / 9
    b = torch.randn(48, generator=g, dtype=torch.float64) if bias else None
    ref = reference(q, k, v, t, w, b)
    out = channel_attention(*to(dtype, q, k, v), t.float().to(DEVICE), *to(dtype, w, b), backend="triton")
    assert out.shape == (2, 48, 97) and out.dtype == dtype
    assert max_err(out, ref) <= tolerance(dtype, (q, k, v, t, w, b), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("project", [False, True])
def test_triton_adds_the_residual(dtype, project):
    """The block's skip connection in the same pass: ``residual + attention`` (projected or not)."""
    q, k, v, t = inputs(2, 2, 40, 97, [0.7, 3.0])
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 80, 1, 1, generator=g, dtype=torch.float64) / 9 if project else None
    res = torch.randn((2, 48, 97) if project else (2, 2, 40, 97), generator=g, dtype=torch.float64) * 3
    ref = reference(q, k, v, t, w, None, res)
    out = channel_attention(*to(dtype, q, k, v), t.float().to(DEVICE), *to(dtype, w), None, *to(dtype, res),
                            backend="triton")
    assert out.shape == ref.shape and out.dtype == dtype
    assert max_err(out, ref) <= tolerance(dtype, (q, k, v, t, w, None, res), ref)
    promoted = channel_attention(*to(torch.float16, q, k, v), t.float().to(DEVICE), *to(torch.float16, w), None,
                                 *to(torch.float32, res), backend="triton")
    assert promoted.dtype == torch.float32  # as residual + attention promotes


def test_triton_folds_project_out_in_fp32_under_autocast():
    """W_o blockdiag(A) is computed in fp32 inside autocast too (FastSIPL's loop), not in
    autocast's dtype: the same result as outside it."""
    q, k, v, t = inputs(2, 2, 40, 97, [0.7, 3.0])
    w = torch.randn(48, 80, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 9
    args = (*to(torch.float16, q, k, v), t.float().to(DEVICE), *to(torch.float32, w))
    outside = channel_attention(*args, backend="triton")
    with torch.autocast(DEVICE, dtype=torch.float16):
        inside = channel_attention(*args, backend="triton")
    assert torch.equal(inside, outside)


def dwconv_inputs(b, heads, c, height, width, seed=3):
    """The unconvolved q, k, v (channel chunks of one qkv image, as MDTA's) and MDTA's depthwise weights."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 3 * heads * c, height, width, generator=g, dtype=torch.float64)
    q, k, v = (x.reshape(b, heads, c, height * width) for x in qkv.chunk(3, dim=1))
    w = torch.randn(3 * heads * c, 1, 3, 3, generator=g, dtype=torch.float64) / 3
    return q, k, v, w, torch.randn(3 * heads * c, generator=g, dtype=torch.float64)


def dwconv_independent(q, k, v, w, bias, width):
    """Each of q, k, v convolved as an image by 9 shifted, zero-padded copies, in float64."""
    b, heads, c, n = q.shape
    out = []
    for x, wx, bx in zip((q, k, v), w.chunk(3), bias.chunk(3) if bias is not None else (None,) * 3):
        img = torch.nn.functional.pad(x.reshape(b, heads * c, n // width, width), (1, 1, 1, 1))
        y = sum(img[:, :, i:i + n // width, j:j + width] * wx[:, 0, i, j].view(1, -1, 1, 1)
                for i in range(3) for j in range(3))
        out.append((y if bx is None else y + bx.view(1, -1, 1, 1)).reshape(b, heads, c, n))
    return out


def test_reference_convolves_q_k_v_first():
    q, k, v, w, bias = dwconv_inputs(2, 2, 5, 4, 7)
    t = torch.tensor([1.5, -0.4], dtype=torch.float64)
    ref = independent(*dwconv_independent(q, k, v, w, bias, 7), t)
    torch.testing.assert_close(channel_attention(q, k, v, t, None, None, None, w, bias, 7, backend="torch"), ref,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(2, 2, 40, 7, 9, True, True), (1, 1, 96, 5, 37, True, False),
                                  (2, 3, 24, 33, 3, False, True), (1, 2, 8, 1, 45, False, False)],
                         ids=lambda c: "x".join(map(str, c[:5])) + ("p" if c[5] else "") + ("b" if c[6] else ""))
def test_triton_convolves_q_k_v_on_the_fly(case, dtype):
    """MDTA from the unconvolved qkv: depthwise conv (image borders, several heads), project_out
    and residual folded in; against the float64 reference of the same."""
    b, heads, c, height, width, project, bias = case
    q, k, v, w, dw_bias = dwconv_inputs(b, heads, c, height, width)
    dw_bias = dw_bias if bias else None
    g = torch.Generator().manual_seed(4)
    t = torch.rand(heads, generator=g, dtype=torch.float64) * 4
    proj = torch.randn(16, heads * c, generator=g, dtype=torch.float64) / c if project else None
    res = torch.randn((b, 16, height * width) if project else (b, heads, c, height * width), generator=g,
                      dtype=torch.float64)
    args = (q, k, v, t, proj, None, res, w, dw_bias)
    ref = reference(*args, width)
    out = channel_attention(*to(dtype, q, k, v), t.float().to(DEVICE), *to(dtype, proj), None, *to(dtype, res),
                            *to(torch.float32, w, dw_bias), width, backend="triton")
    assert out.shape == ref.shape and out.dtype == dtype
    naive = max_err(reference(*to(dtype, *args), width), ref)
    assert max_err(out, ref) <= (max(1e-5, 2 * naive) if dtype == torch.float32 else 2 * naive)


def test_triton_int64_offsets_for_huge_images(monkeypatch):
    """Images whose offsets reach 2**31 take int64 pixel offsets (``WIDE``): forced here on small
    ones, convolving with project_out and the residual, and plain."""
    monkeypatch.setattr(_layout, "INT32_OFFSETS", 1)
    q, k, v, w, dw_bias = dwconv_inputs(2, 2, 40, 7, 9)
    t = torch.tensor([0.5, 3.0], dtype=torch.float64)
    proj = torch.randn(16, 80, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 40
    res = torch.randn(2, 16, 63, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    args = (q, k, v, t, proj, None, res, w, dw_bias)
    ref = reference(*args, 9)
    out = channel_attention(*to(torch.float32, q, k, v, t, proj), None, *to(torch.float32, res, w, dw_bias), 9,
                            backend="triton")
    assert max_err(out, ref) <= max(1e-5, 2 * max_err(reference(*to(torch.float32, *args), 9), ref))
    q, k, v, t = inputs(2, 2, 37, 53, [0.5, 3.0])
    out = channel_attention(*to(torch.float32, q, k, v, t), backend="triton")
    assert max_err(out, reference(q, k, v, t)) <= tolerance(torch.float32, (q, k, v, t), reference(q, k, v, t))


def channel_chunks(dtype, fmt, *qkv):
    """q, k, v (B, H, C, N) as MDTA views them: channel chunks of one image in memory format
    ``fmt`` (channels-last: pixel stride 3*H*C)."""
    b, heads, c, n = qkv[0].shape
    image = torch.cat([t.reshape(b, heads * c, 1, n) for t in qkv], dim=1)
    image = image.to(DEVICE, dtype).contiguous(memory_format=fmt)
    return [t.reshape(b, heads, c, n) for t in image.chunk(3, dim=1)]


def convolving_case(b, c, height, width, nchw):
    """MDTA with its depthwise convolution on one head of C channels, t = 2.5: q, k, v as fp16
    channel chunks of one image in the layout, (t, w, dw_bias) as the kernels take them, the
    float64 reference and the bound (2x the naive fp16 error)."""
    q, k, v, w, dw_bias = dwconv_inputs(b, 1, c, height, width)
    t = torch.tensor([2.5], dtype=torch.float64)
    args = (q, k, v, t, None, None, None, w, dw_bias)
    ref = reference(*args, width)
    bound = 2 * max_err(reference(*to(torch.float16, *args), width), ref)
    chunks = channel_chunks(torch.float16, torch.contiguous_format if nchw else torch.channels_last, q, k, v)
    assert (chunks[0].stride(3) == 1) == nchw
    return chunks, (t.float(), *to(torch.float32, w, dw_bias)), ref, bound


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
def test_every_gpu_tile_of_the_gram_pass_in_the_interpreter(monkeypatch):
    """Each pixel block the GPU's launcher may take for the Gram pass of q and k as given (not
    convolved), run by the interpreter in fp16: C = 40 and N = 37 * 53 in two slices, the second
    ending inside a pixel block of every width."""
    q, k, v, t = inputs(2, 2, 40, 37 * 53, [0.1, 5.0])
    ref = independent(q, k, v, t)
    naive = reference(*to(torch.float16, q, k, v, t))
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_GRAM", module._GRAM_CONFIGS):
        out = channel_attention(*to(torch.float16, q, k, v), t.float(), backend="triton")
        assert not heads_past_twice_naive(out, naive, ref), cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("nchw", [True, False], ids=["nchw", "channels_last"])
def test_every_gpu_tile_of_the_convolving_gram_pass_in_the_interpreter(nchw, monkeypatch):
    """Each (channel block, pixel block, tap unrolling) the GPU's autotuner may choose for the
    Gram pass that convolves q and k, in its layout, run by the interpreter in fp16 (C = 96:
    one or two channel blocks)."""
    chunks, (t, w, dw_bias), ref, bound = convolving_case(2, 96, 5, 11, nchw)
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_DW_GRAM", module._dw_gram_configs(nchw, False)):
        out = channel_attention(*chunks, t, None, None, None, w, dw_bias, 11, backend="triton")
        assert max_err(out, ref) <= bound, cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("nchw", [True, False], ids=["nchw", "channels_last"])
def test_every_gpu_tile_of_the_convolving_passes_inside_the_image(nchw, monkeypatch):
    """The stencil's unmasked path (``_triton.interior``) in each tile of the Gram pass and of
    the product that convolve q, k and v, beside the masked one: an image 3 x 192 (row
    segments of up to 64 pixels inside row 1, and at its ends just outside) with C = 129 (full
    and partial blocks of 16 to 128 rows), fp16."""
    chunks, (t, w, dw_bias), ref, bound = convolving_case(1, 129, 3, 192, nchw)
    grams = module._dw_gram_configs(nchw, False)
    products = module._apply_configs(module._block(129, 256), True, False)
    assert max(c.kwargs["BLOCK_N"] for c in grams + products) <= 64
    for i in range(max(len(grams), len(products))):
        monkeypatch.setattr(module, "_INTERPRETER_DW_GRAM", [grams[i % len(grams)]])
        monkeypatch.setattr(module, "_INTERPRETER_APPLY", [products[i % len(products)]])
        monkeypatch.setattr(_triton, "_fitting", {})
        out = channel_attention(*chunks, t, None, None, None, w, dw_bias, 192, backend="triton")
        assert max_err(out, ref) <= bound, (grams[i % len(grams)], products[i % len(products)])


def test_fp32_convolving_gram_pass_is_offered_no_spilling_tile():
    """The 128-row tiles of the convolving Gram pass spill registers in fp32 (sm_90a): the
    autotuner is not offered them there; 16-bit calls keep every tile."""
    for nchw in (True, False):
        assert module._dw_gram_configs(nchw, False) == module._DW_GRAM_CONFIGS[nchw]
        fp32 = module._dw_gram_configs(nchw, True)
        assert fp32 and all(c.kwargs["BLOCK_C"] <= 64 for c in fp32)
        assert any(c.kwargs["BLOCK_C"] > 64 for c in module._DW_GRAM_CONFIGS[nchw])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("c", [96, 176], ids=["R96", "R176"])
def test_every_gpu_tile_of_the_product_in_the_interpreter(c, monkeypatch):
    """Each tile the GPU's autotuner may choose for the product with v (channel blocks of 128
    and 256 rows), convolving v and adding the residual, run by the interpreter in fp16."""
    q, k, v, w, dw_bias = dwconv_inputs(1, 1, c, 3, 13)
    t = torch.tensor([1.5], dtype=torch.float64)
    res = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    args = (q, k, v, t, None, None, res, w, dw_bias)
    ref = reference(*args, 13)
    bound = 2 * max_err(reference(*to(torch.float16, *args), 13), ref)
    tiles = module._apply_configs(module._block(c, 256), True, False)
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_APPLY", tiles):
        out = channel_attention(*to(torch.float16, q, k, v), t.float(), None, None, *to(torch.float16, res),
                                *to(torch.float32, w, dw_bias), 13, backend="triton")
        assert max_err(out, ref) <= bound, cfg


@needs_cuda
@pytest.mark.parametrize("nchw", [True, False], ids=["nchw", "channels_last"])
def test_every_autotuned_tile_on_the_gpu(nchw, monkeypatch):
    """bf16 MDTA as FastSIPL calls it (q, k, v convolved on the fly, project_out and the residual
    folded in) through every tile of the convolving Gram pass and of the product, in either
    layout, against float64; the image 192 wide, so that the stencil's unmasked path
    (``_triton.interior``) runs too (not in the 128-row Gram tiles: C = 96)."""
    q, k, v, w, dw_bias = dwconv_inputs(2, 1, 96, 13, 192)
    g = torch.Generator().manual_seed(6)
    t = torch.tensor([2.5], dtype=torch.float64)
    proj = torch.randn(96, 96, generator=g, dtype=torch.float64) / 96 ** 0.5
    res = torch.randn(2, 96, 13 * 192, generator=g, dtype=torch.float64)
    args = (q, k, v, t, proj, None, res, w, dw_bias)
    ref = reference(*args, 192)
    bound = 2 * max_err(reference(*to(torch.bfloat16, *args), 192), ref)
    chunks = channel_chunks(torch.bfloat16, torch.contiguous_format if nchw else torch.channels_last, q, k, v)
    outs = every_offered_tile(monkeypatch, lambda: channel_attention(
        *chunks, t.float().to(DEVICE), *to(torch.bfloat16, proj), None, *to(torch.bfloat16, res),
        *to(torch.float32, w, dw_bias), 192, backend="triton"))
    assert len(outs) == max(len(module._dw_gram_configs(nchw, False)), len(module._apply_configs(128, True, False)))
    for i, out in enumerate(outs):
        assert max_err(out, ref) <= bound, i


def test_triton_reads_strided_views_and_zero_rows():
    """The model's q, k, v are channel chunks of one qkv tensor: no copies needed."""
    qkv = torch.randn(2, 3 * 2 * 24, 7, 11, dtype=torch.float64)
    qkv[0, 5] = 0  # a zero row of q
    q, k, v = (x.reshape(2, 2, 24, 77) for x in qkv.chunk(3, dim=1))
    t = torch.tensor([1.5, 0.2], dtype=torch.float64)
    out = channel_attention(*to(torch.float32, q, k, v, t), backend="triton")
    assert max_err(out, independent(q, k, v, t)) <= 1e-5
    empty = channel_attention(*to(torch.float32, q[..., :0], k[..., :0], v[..., :0], t), backend="triton")
    assert empty.shape == (2, 2, 24, 0)


@pytest.mark.parametrize("project", [False, True])
def test_triton_output_keeps_channels_last(project):
    """q, k, v chunked from a channels-last qkv image give a channels-innermost output (what
    FastSIPL views as an NHWC image again), equal to the NCHW one; NCHW gives NCHW."""
    b, heads, c, height, width = 2, 2, 24, 5, 7
    q, k, v, w, dw_bias = dwconv_inputs(b, heads, c, height, width)
    qkv = torch.cat([t.reshape(b, heads * c, height, width) for t in (q, k, v)], dim=1).float().to(DEVICE)
    t = torch.tensor([1.5, 0.2], device=DEVICE)
    proj = torch.randn(16, heads * c, device=DEVICE) / c if project else None
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        chunks = (x.reshape(b, heads, c, -1) for x in qkv.contiguous(memory_format=fmt).chunk(3, dim=1))
        outs.append(channel_attention(*chunks, t, proj, None, None, *to(torch.float32, w, dw_bias), width,
                                      backend="triton"))
    nchw, nhwc = outs
    assert nchw.is_contiguous() and nhwc.stride(-2 if project else 2) == 1 and not nhwc.is_contiguous()
    if project:
        assert nhwc.view(b, 16, height, width).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ choice and errors
def test_auto_uses_torch_on_cpu_and_triton_refuses_gradients_and_interpreter_bf16():
    q, k, v, t = to(torch.float32, *inputs(1, 1, 16, 20, [1.0]))
    if DEVICE == "cpu":
        assert choose("channel_attention", module.BACKENDS, module.PREFERENCE, None, q, k, v, t, None, None).name == "torch"
        with pytest.raises(BackendError, match="bf16"):
            channel_attention(*(x.bfloat16() for x in (q, k, v)), t, backend="triton")
    with pytest.raises(BackendError, match="forward-only"):
        channel_attention(q.requires_grad_(), k, v, t, backend="triton")
    out = channel_attention(q, k, v, t)  # gradients: the automatic choice takes the reference
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("args, match", [
    (((1, 1, 4, 9), (1, 1, 4, 8), (1, 1, 4, 9), (1,)), "one shape"),
    (((1, 2, 4, 9), (1, 2, 4, 9), (1, 2, 4, 9), (3,)), "temperature"),
    (((4, 9), (4, 9), (4, 9), (1,)), r"\(B, H, C, N\)"),
    (((1, 1, 0, 6), (1, 1, 0, 6), (1, 1, 0, 6), (1,)), "one channel a head"),
])
def test_bad_shapes_raise_value_error(args, match):
    tensors = [torch.randn(s) for s in args]
    with pytest.raises(ValueError, match=match):
        channel_attention(*tensors)


def test_reference_takes_a_projection_in_a_wider_dtype():
    """An fp32 project_out with 16-bit q, k, v (outside autocast): cast to their dtype, as
    autocast casts it, rather than failing in F.conv1d."""
    q, k, v, t = inputs(1, 2, 4, 9, [1.0, 2.0])
    w, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    half = [x.half() for x in (q, k, v)]
    out = reference(*half, t.float(), w.float(), b.float())
    assert out.dtype == torch.float16
    assert torch.equal(out, reference(*half, t.float(), w.half(), b.half()))


def test_bad_projection_raises_value_error():
    q, k, v, t = to(torch.float32, *inputs(1, 2, 4, 9, [1.0, 1.0]))
    with pytest.raises(ValueError, match="proj_weight"):
        channel_attention(q, k, v, t, torch.randn(3, 7))
    with pytest.raises(ValueError, match="proj_weight as a tensor or None, got list"):
        channel_attention(q, k, v, t, [[1.0] * 8] * 3)
    with pytest.raises(ValueError, match="proj_bias"):
        channel_attention(q, k, v, t, torch.randn(3, 8), torch.randn(4))
    with pytest.raises(ValueError, match="needs proj_weight"):
        channel_attention(q, k, v, t, None, torch.randn(4))
    with pytest.raises(ValueError, match=r"residual of the output's shape \(1, 3, 9\)"):
        channel_attention(q, k, v, t, torch.randn(3, 8), None, torch.randn(1, 2, 4, 9))
    with pytest.raises(ValueError, match="temperature as a real floating-point tensor"):
        channel_attention(q, k, v, t.bool())
    with pytest.raises(ValueError, match="proj_weight as a real floating-point tensor"):
        channel_attention(q, k, v, t, torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dw_weight of shape \(24, 1, 3, 3\)"):
        channel_attention(q, k, v, t, dw_weight=torch.randn(8, 1, 3, 3), width=3)
    for width in (2, True, 3.0, "3"):
        with pytest.raises(ValueError, match="an integer dividing N = 9"):
            channel_attention(q, k, v, t, dw_weight=torch.randn(24, 1, 3, 3), width=width)
    with pytest.raises(ValueError, match="an integer dividing N = 0"):  # no pixel to convolve
        channel_attention(*(x[..., :0] for x in (q, k, v)), t, dw_weight=torch.randn(24, 1, 3, 3), width=3)
    with pytest.raises(ValueError, match="need dw_weight"):
        channel_attention(q, k, v, t, dw_bias=torch.randn(24))
    with pytest.raises(ValueError, match="need dw_weight"):
        channel_attention(q, k, v, t, width=3)
    out = channel_attention(q, k, v, t, dw_weight=torch.randn(24, 1, 3, 3, device=q.device),
                            width=numpy.int64(3))  # any integer
    assert out.shape == q.shape


def test_opcheck_and_compile_without_graph_breaks():
    q, k, v, t = to(torch.float32, *inputs(2, 2, 16, 37, [1.5, 4.0]))
    w = torch.randn(8, 32, device=DEVICE)
    torch.library.opcheck(module.channel_attention_triton, (q, k, v, t, None, None))
    torch.library.opcheck(module.channel_attention_triton, (q, k, v, t, w, torch.randn(8, device=DEVICE)))
    dw = torch.randn(96, 1, 3, 3, device=DEVICE)
    torch.library.opcheck(module.channel_attention_triton, (q, k, v, t, w, None, torch.randn(2, 8, 37, device=DEVICE),
                                                            dw, torch.randn(96, device=DEVICE), 37))
    fn = torch.compile(lambda *a: channel_attention(*a, backend="triton"), fullgraph=True,
                       backend="inductor" if DEVICE == "cuda" else "aot_eager")
    assert max_err(fn(q, k, v, t, w), reference(q, k, v, t, w)) <= 1e-5


# ------------------------------------------------------------------ GPU: compile and graphs
@needs_cuda
def test_triton_under_compile_and_graph_capture():
    q, k, v, t = to(torch.bfloat16, *inputs(2, 2, 48, 4096, [1.0, 2.0]))
    t = t.float()
    eager = channel_attention(q, k, v, t, backend="triton")
    compiled = torch.compile(lambda *a: torch.ops.sipl_fast.channel_attention_triton(*a), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, t, None, None), eager, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = channel_attention(q, k, v, t, backend="triton")
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(captured, channel_attention(q, k, v, t, backend="triton"), rtol=0, atol=0)


# one head and several images: einsum's own result is transposed there
@pytest.mark.parametrize("batch,heads,c_out", [(1, 1, 5), (3, 1, 5), (3, 2, 8)])
def test_projected_maps_is_project_out_times_the_block_diagonal_maps(batch, heads, c_out):
    """M = W_o blockdiag(A_h), per image, contiguous (the apply kernel reads it so)."""
    g = torch.Generator().manual_seed(batch)
    c = 4
    w, maps = torch.randn(c_out, heads * c, generator=g), torch.randn(batch, heads, c, c, generator=g)
    m = module.projected_maps(w, maps)
    assert m.is_contiguous() and m.dtype == torch.float32
    expected = torch.stack([w @ torch.block_diag(*maps[i]) for i in range(batch)])
    assert (m - expected).abs().max() <= 1e-5
