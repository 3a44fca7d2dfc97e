"""sipl_fast.ops.conv1x1 (the LayerNorm, 1x1 convolution and residual add of Restormer blocks):
the reference against an independent float64 formula, the Triton kernel (in the interpreter on a
CPU) against it in both layouts and on bands of rows, backend choice, errors, torch.compile and
CUDA-graph capture (on a GPU).

Tolerances, against float64 on the same inputs: fp32 within 1e-5 of the output's scale, or 2x
the naive fp32 error; fp16/bf16 within 2x the error of the naive computation in that dtype.
"""
import importlib

import pytest
import torch

from sipl_fast.ops import BackendError, conv1x1
from sipl_fast.ops import _layout, _triton
from sipl_fast.ops._backend import choose

from conftest import every_offered_tile, interpreter_tiles

module = importlib.import_module("sipl_fast.ops.conv1x1")  # the package attribute is the function
reference = module.conv1x1_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")
# bf16 dots are wrong in Triton's interpreter: bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]


def inputs(b, cin, cout, height, width, bias=True, residual=True, seed=0):
    """float64 x (offset, so the norm matters), weight, bias, residual."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, height, width, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(cout, cin, 1, 1, generator=g, dtype=torch.float64) / cin ** 0.5
    bias = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    res = torch.randn(b, cout, height, width, generator=g, dtype=torch.float64) if residual else None
    return x, w, bias, res


def independent(x, w, bias, res, normalize, eps=1e-5):
    """Per-pixel mean and biased variance over channels, then an einsum, in float64."""
    if normalize:
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / ((x - mean).pow(2).mean(1, keepdim=True) + eps).sqrt()
    y = torch.einsum("oc,bchw->bohw", w.reshape(w.shape[0], -1), x)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y if res is None else y + res


def to(dtype, *xs):
    return [None if x is None else x.to(DEVICE, dtype) for x in xs]


def max_err(x, ref):
    return (x.double().cpu() - ref.double().cpu()).abs().max().item()


def tolerance(dtype, args, normalize, ref):
    naive = max_err(reference(*to(dtype, *args), normalize), ref)
    if dtype == torch.float32:
        return max(1e-5 * ref.abs().max().item(), 2 * naive)
    return 2 * naive


# ------------------------------------------------------------------ reference
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_an_independent_formula(normalize):
    x, w, b, r = inputs(2, 7, 5, 3, 4)
    torch.testing.assert_close(conv1x1(x, w, b, r, normalize, backend="torch"), independent(x, w, b, r, normalize),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(conv1x1(x, w.view(5, 7), None, None, normalize, backend="torch"),
                               independent(x, w, None, None, normalize), rtol=0, atol=1e-12)


def test_reference_is_differentiable():
    x, w, b, r = inputs(2, 3, 4, 2, 3)
    for t in (x, w, b, r):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: conv1x1(*a, normalize=True, backend="torch"), (x, w, b, r))


# ------------------------------------------------------------------ Triton kernel
CASES = [  # (B, Cin, Cout, H, W): qkv and project_in of the 96-wide levels, project_out, odd sizes
    (2, 96, 288, 7, 9),
    (1, 48, 254, 5, 11),
    (2, 255, 96, 3, 13),
    (3, 37, 53, 4, 5),  # odd everything; Cout <= 64: the narrow tile
    (1, 8, 3, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_matches_the_reference(case, normalize, dtype):
    args = inputs(*case)
    ref = independent(*args, normalize)
    out = conv1x1(*to(dtype, *args), normalize, backend="triton")
    assert out.shape == ref.shape and out.dtype == dtype
    assert max_err(out, ref) <= tolerance(dtype, args, normalize, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_keeps_channels_last_and_reads_bands_of_rows(dtype):
    x, w, b, r = inputs(2, 40, 80, 9, 7)
    xd, wd, bd, rd = to(dtype, x, w, b, r)
    xc, rc = (t.contiguous(memory_format=torch.channels_last) for t in (xd, rd))
    out = conv1x1(xc, wd, bd, rc, True, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = independent(x, w, b, r, True)
    tol = tolerance(dtype, (x, w, b, r), True, ref)
    assert max_err(out, ref) <= tol
    for xs, rs in ((xd, rd), (xc, rc)):  # rows 2..6 of either layout, as FastSIPL's bands pass them
        band = conv1x1(xs[:, :, 2:7], wd, bd, rs[:, :, 2:7], True, backend="triton")
        assert band.is_contiguous() or band.is_contiguous(memory_format=torch.channels_last)
        assert max_err(band, ref[:, :, 2:7]) <= tol


def test_triton_int64_offsets_for_huge_images(monkeypatch):
    """Images whose offsets reach 2**31 use int64 offsets: forced here on a small one. A band of
    rows spans its whole image's channel strides."""
    full = torch.empty(2, 5, 8, 7)
    assert _layout.span(full) == 5 * 8 * 7 and _layout.span(full[:, :, 3:5]) == 1 + 4 * 8 * 7 + 1 * 7 + 6
    monkeypatch.setattr(_layout, "INT32_OFFSETS", 1)
    x, w, b, r = inputs(2, 37, 53, 4, 5)
    ref = independent(x, w, b, r, True)
    out = conv1x1(*to(torch.float32, x, w, b, r), True, backend="triton")
    assert max_err(out, ref) <= tolerance(torch.float32, (x, w, b, r), True, ref)


@pytest.mark.parametrize("cin, offset, spread", [(48, 100.0, 1e-3), (176, -300.0, 1e-2), (96, 1e4, 1.0)])
def test_normalizing_keeps_its_digits_where_the_mean_dwarfs_the_spread(cin, offset, spread):
    """fp32 pixels whose mean is 1e4-1e5 times their spread: the naive fp32 error is 3e-3 to 1e-2
    there (x - mean after the mean's rounding); the kernel's shifted sums stay within 1e-5."""
    x, w, b, r = inputs(2, cin, 37, 7, 9)
    x = (offset + spread * x).float().double()  # the values the kernel reads
    ref = independent(x, w, b, r, True)
    naive = max_err(reference(*to(torch.float32, x, w, b, r), True), ref)
    out = conv1x1(*to(torch.float32, x, w, b, r), True, backend="triton")
    assert max_err(out, ref) <= min(1e-5, naive / 100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile list is patched (CPU tensors)")
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("cin, cout", [(37, 40), (37, 70), (37, 150), (131, 150)])
def test_every_gpu_tile_is_right_in_the_interpreter(cin, cout, normalize, monkeypatch):
    """Each 16-bit tile the GPU's autotuner may offer for the call, run by the interpreter in
    fp16 on odd channel and pixel counts (partial tiles on every axis), bias and residual:
    Cout = 150 takes two output-channel blocks (the one-sweep tiles loop over them), Cin = 131
    no one-sweep tile."""
    block_m = 64 if cout <= 64 else 128
    x, w, b, r = inputs(2, cin, cout, 13, 11, seed=3)
    ref = independent(x, w, b, r, normalize)
    bound = tolerance(torch.float16, (x, w, b, r), normalize, ref)
    tiles = module._configs_for(cin, block_m, False)
    assert any(c.kwargs["ONE_SWEEP"] for c in tiles) == (cin <= module.ONE_SWEEP_MAX_CIN)
    for cfg in interpreter_tiles(monkeypatch, module, "_INTERPRETER_CONFIGS", tiles):
        out = conv1x1(*to(torch.float16, x, w, b, r), normalize, backend="triton")
        assert max_err(out, ref) <= bound, cfg


@pytest.mark.parametrize("cin", [96, 128, 129, 192])
def test_the_autotuner_offers_one_sweep_tiles_only_where_cin_fits(cin):
    """The autotuner's own pruning (what a GPU run takes), not only the launcher's list: a
    one-sweep tile reads CIN_P channels, which must cover Cin."""
    tuner = module._conv1x1_tuned
    for block_m, fp32 in ((64, False), (128, False), (128, True)):
        x = torch.empty(1, dtype=torch.float32 if fp32 else torch.float16)
        offered = tuner.early_config_prune(tuner.configs, {"Cin": cin, "X": x}, BLOCK_M=block_m, NORMALIZE=True)
        assert offered == module._configs_for(cin, block_m, fp32)
        assert any(c.kwargs["ONE_SWEEP"] for c in offered) == (cin <= 128 and not fp32)


@needs_cuda
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("cin, cout, normalize", [(96, 510, True), (96, 150, False), (255, 96, False), (192, 576, True)])
def test_every_autotuned_tile_on_the_gpu(cin, cout, normalize, layout, monkeypatch):
    """bf16 (whose dots the interpreter gets wrong) through every tile the autotuner may choose,
    the one-sweep ones included, in either layout, against float64."""
    x, w, b, r = inputs(2, cin, cout, 13, 11, seed=3)
    ref = independent(x, w, b, r, normalize)
    bound = tolerance(torch.bfloat16, (x, w, b, r), normalize, ref)
    xb, wb, bb, rb = to(torch.bfloat16, x, w, b, r)
    xb, rb = (t.contiguous(memory_format=layout) for t in (xb, rb))
    outs = every_offered_tile(monkeypatch, lambda: conv1x1(xb, wb, bb, rb, normalize, backend="triton"))
    assert len(outs) == len(module._configs_for(cin, 128, False))
    for i, out in enumerate(outs):
        assert max_err(out, ref) <= bound, module._configs_for(cin, 128, False)[i]


def test_triton_grid_fits_cuda_limits_on_large_images(monkeypatch):
    """A 4096x2048 image has 131072 pixel blocks of 64: more than CUDA allows on a grid's
    second axis. Every GPU tile's grid is checked (the launch is recorded, not run)."""
    grids = []
    monkeypatch.setattr(_triton, "launch_fitting", lambda kernel, key, configs, grid, *a, **k: grids.append(grid))
    monkeypatch.setattr(_triton, "launch_tuned", lambda kernel, tuned, key, configs, grid, *a, **k: grids.append(grid))
    conv1x1(torch.empty(1, 8, 4096, 2048, dtype=torch.float16, device=DEVICE), torch.empty(96, 8, device=DEVICE),
            backend="triton")
    assert len(grids) == 1
    for cfg in (cfg for configs in module._CONFIGS.values() for cfg in configs):
        _triton.check_grid(module._conv1x1_kernel, grids[0](cfg.kwargs))
    with pytest.raises(ValueError, match="passes CUDA's limits"):
        _triton.check_grid(module._conv1x1_kernel, (1, 131072, 1))


def test_triton_promotes_with_the_residual_and_takes_fp32_weights():
    """fp16 x with an fp32 residual gives fp32, as ``residual + conv(x)`` does; weights stay fp32."""
    x, w, b, r = inputs(2, 24, 40, 5, 6)
    out = conv1x1(*to(torch.float16, x), w.float().to(DEVICE), b.float().to(DEVICE), r.float().to(DEVICE), True,
                  backend="triton")
    assert out.dtype == torch.float32
    ref = independent(x, w, b, r, True)
    assert max_err(out, ref) <= tolerance(torch.float16, (x, w, b, r), True, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_input(backend):
    """An image without pixels (which F.conv2d refuses) or an empty batch: the empty result."""
    for shape in ((2, 8, 4, 0, 3), (2, 8, 4, 3, 0), (0, 8, 4, 3, 3)):
        x, w, b, r = to(torch.float16, *inputs(*shape))
        out = conv1x1(x, w, b, r.float(), True, backend=backend)
        assert out.shape == (shape[0], 4, *shape[3:]) and out.dtype == torch.float32


# ------------------------------------------------------------------ choice and errors
def test_auto_uses_torch_on_cpu_and_triton_refuses_gradients_and_interpreter_bf16():
    x, w, b, r = to(torch.float32, *inputs(1, 8, 16, 3, 3))
    if DEVICE == "cpu":
        assert choose("conv1x1", module.BACKENDS, module.PREFERENCE, None, x, w, b, r, True, 1e-5).name == "torch"
        with pytest.raises(BackendError, match="bf16"):
            conv1x1(x.bfloat16(), w, b, None, True, backend="triton")
    with pytest.raises(BackendError, match="forward-only"):
        conv1x1(x, w.requires_grad_(), b, r, True, backend="triton")


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=torch.randn(4, 7)), r"weight of shape \(Cout, 8\)"),
    (dict(weight=torch.randn(4, 8, 3, 3)), "weight of shape"),
    (dict(bias=torch.randn(5)), r"bias of shape \(4,\)"),
    (dict(residual=torch.randn(1, 4, 3, 2)), r"residual of shape \(1, 4, 3, 3\)"),
    (dict(residual=torch.ones(1, 4, 3, 3, dtype=torch.int32)), "floating-point residual"),
    (dict(x=torch.ones(1, 8, 3, 3, dtype=torch.int32)), "floating-point"),
    (dict(x=torch.randn(8, 3, 3)), r"\(B, Cin, H, W\)"),
    (dict(weight=torch.ones(4, 8, dtype=torch.int64)), "weight as a real floating-point tensor"),
    (dict(weight=torch.randn(0, 8), bias=None), "Cout >= 1"),
    (dict(x=torch.randn(1, 0, 3, 3), weight=torch.randn(4, 0)), "Cin, Cout >= 1"),
    (dict(eps=-1.0), "eps as a real number >= 0"),
    (dict(eps="1e-5"), "eps as a real number >= 0"),
])
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(x=torch.randn(1, 8, 3, 3), weight=torch.randn(4, 8), bias=torch.randn(4), residual=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        conv1x1(**args)


def test_opcheck_and_compile_without_graph_breaks():
    x, w, b, r = to(torch.float32, *inputs(2, 16, 24, 5, 7))
    for args in ((x, w, b, r, True, 1e-5), (x, w, None, None, False, 1e-5),
                 (x.contiguous(memory_format=torch.channels_last), w, b, None, True, 1e-6)):
        torch.library.opcheck(module.conv1x1_triton, args)
    fn = torch.compile(lambda *a: conv1x1(*a, normalize=True, backend="triton"), fullgraph=True,
                       backend="inductor" if DEVICE == "cuda" else "aot_eager")
    assert max_err(fn(x, w, b, r), independent(*inputs(2, 16, 24, 5, 7), True)) <= 1e-5 * 10


# ------------------------------------------------------------------ GPU: graphs
@needs_cuda
def test_triton_under_graph_capture():
    x, w, b, r = to(torch.bfloat16, *inputs(2, 96, 288, 64, 48))
    graph = torch.cuda.CUDAGraph()
    eager = conv1x1(x, w, b, r, True, backend="triton")
    with torch.cuda.graph(graph):
        captured = conv1x1(x, w, b, r, True, backend="triton")
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, conv1x1(x, w, b, r, True, backend="triton"), rtol=0, atol=0)
