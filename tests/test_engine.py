"""FastSIPL against the published loop (sipl_fast.restore) on the same model: fp32 within 1e-4,
bf16 no worse than twice eager bf16 autocast; odd sizes, batches, iteration counts, plain PromptIR,
tiling, checkpoints, bad input; CUDA-graph replay, shapes and cache eviction on a GPU."""
import importlib
import warnings

import pytest
import torch

from conftest import tf32_flags, tiny_model
from sipl_fast import FastSIPL, ops, restore, save_model
from sipl_fast.model import CrossBlock, FeedForward, TransformerBlock
from sipl_fast.ops import _layout
from sipl_fast.tiling import tiled

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Where the Triton kernels run: a GPU, else the interpreter on the CPU (conftest sets it).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def images(b, h, w, seed=0, device="cpu"):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def model():
    return tiny_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def device_model():
    """The tiny model on DEVICE, for the tests that run the Triton kernels."""
    return tiny_model(dtype=torch.float32).to(DEVICE)


@pytest.mark.parametrize("iterations", [0, 1, 2])
@pytest.mark.parametrize("size", [(2, 19, 23), (1, 32, 16), (3, 9, 40)])
def test_fp32_engine_equals_restore(model, iterations, size):
    x = images(*size)
    out = FastSIPL(model, dtype=torch.float32)(x, iterations)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert err(out, restore(model, x, iterations)) <= 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_either_layout_equals_restore(model, channels_last):
    """Weights and input in NCHW or channels-last memory (the default on a CPU): the same loop
    (fp32 within 1e-4), NCHW output."""
    x = images(2, 19, 23)
    fast = FastSIPL(model, dtype=torch.float32, channels_last=channels_last)
    out = fast(x, 2)
    assert out.is_contiguous() and err(out, restore(model, x, 2)) <= 1e-4
    assert FastSIPL(model).memory_format == torch.channels_last  # the tiny model is on the CPU


def test_bf16_engine_error_is_that_of_autocast(model):
    x = images(2, 24, 21)
    ref = restore(model, x, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = restore(model, x, 2)
    out = FastSIPL(model, dtype=torch.bfloat16)(x, 2)
    assert out.dtype == torch.float32
    assert 0 < err(out, ref) <= 2 * err(eager, ref)


@pytest.mark.parametrize("dtype, inside", [(torch.float32, (False, False)), (torch.bfloat16, (True, True))])
def test_fp32_engine_computes_in_ieee_fp32_as_restore_does(model, monkeypatch, tf32_on, dtype, inside):
    """No TF32 on a GPU in float32 (it moves the result by about 1e-3); other dtypes keep the
    caller's settings, which come back after the call either way."""
    fast = FastSIPL(model, dtype=dtype)
    seen = []
    loop = fast._loop
    monkeypatch.setattr(fast, "_loop", lambda *a: seen.append(tf32_flags()) or loop(*a))
    fast(images(1, 16, 16), 1)
    assert seen == [inside] and tf32_flags() == (True, True)


def test_plain_promptir_runs_its_single_pass():
    plain = tiny_model(dtype=torch.float32, proxy_fusion=False)
    x = images(2, 17, 16)
    for iterations in (0, 2):
        assert err(FastSIPL(plain, dtype=torch.float32)(x, iterations), restore(plain, x, iterations)) <= 1e-4


def test_the_users_model_is_untouched():
    model = tiny_model(dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    fast = FastSIPL(model, dtype=torch.float32)
    fast(images(1, 16, 16).double(), 1)
    assert type(model) is cls and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float64 and fast.model is not model


def test_tiling_blends_the_tiles_of_the_published_loop(model):
    x = images(1, 40, 56)
    out = FastSIPL(model, dtype=torch.float32, tile=32, tile_overlap=8)(x, 1)
    ref = tiled(lambda t: restore(model, t, 1), x, 32, 8)
    assert out.shape == x.shape and err(out, ref) <= 1e-4
    # a tile that covers the image is no tiling at all
    assert err(FastSIPL(model, dtype=torch.float32, tile=64)(x, 1), restore(model, x, 1)) <= 1e-4


def test_from_checkpoint(model, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    fast = FastSIPL.from_checkpoint(path, device="cpu", dtype=torch.float32)
    x = images(1, 16, 24)
    assert err(fast(x, 1), restore(model, x, 1)) <= 1e-4


def torch_backend_calls(monkeypatch) -> list:
    """The names of the ops whose torch backend runs, in call order (a spy on each)."""
    calls = []
    for name in ops.OPS:
        module = importlib.import_module(f"sipl_fast.ops.{name}")
        torch_backend = module.BACKENDS["torch"]
        monkeypatch.setitem(module.BACKENDS, "torch", type(torch_backend)(
            "torch", lambda *a, _f=torch_backend.fn, _n=name: calls.append(_n) or _f(*a), torch_backend.why_not))
    return calls


def test_backend_is_applied_to_every_op(model, monkeypatch):
    calls = torch_backend_calls(monkeypatch)
    FastSIPL(model, dtype=torch.float32, backend="torch")(images(1, 16, 16), 1)
    assert set(ops.OPS) <= set(calls)


@pytest.mark.skipif(DEVICE == "cuda", reason="Triton on CPU tensors needs the interpreter, not set on a GPU machine")
def test_a_backend_named_for_one_op_leaves_the_others_automatic(model, monkeypatch):
    calls = torch_backend_calls(monkeypatch)
    FastSIPL(model, dtype=torch.float32, backend={"layer_norm2d": "triton"})(images(1, 16, 16), 1)
    # the others choose automatically: the reference here, but for Proxy Fusion (sdpa on a CPU)
    # and MDTA (by rows on a CPU, through conv1x1 and depthwise_conv3x3)
    assert set(calls) == set(ops.OPS) - {"layer_norm2d", "cosine_attention", "channel_attention"}


def test_proxy_fusion_runs_through_sdpa_on_a_cpu(model, monkeypatch):
    """On a CPU "auto" takes PyTorch's fused attention for Proxy Fusion (fp32 within 1e-4 of the
    reference loop) wherever every head dim suits it, else the automatic choice."""
    module = importlib.import_module("sipl_fast.ops.cosine_attention")
    calls = []
    for name in ("torch", "sdpa"):
        b = module.BACKENDS[name]
        spy = type(b)(name, lambda *a, _f=b.fn, _n=name: calls.append(_n) or _f(*a), b.why_not, b.automatic)
        monkeypatch.setitem(module.BACKENDS, name, spy)
    x = images(2, 19, 23)
    out = FastSIPL(model, dtype=torch.float32)(x, 2)
    assert calls and set(calls) == {"sdpa"}
    assert err(out, restore(model, x, 2)) <= 1e-4  # the reference model keeps the reference
    assert calls[-1] == "torch"
    calls.clear()
    assert FastSIPL(model, dtype=torch.float32, backend="torch")._scope["cosine_attention"] == "torch"
    monkeypatch.setattr(module, "MAX_D", 31)  # a head dim of 32 or more: not every block suits
    FastSIPL(model, dtype=torch.float32)(x, 1)
    assert set(calls) == {"torch"}


def test_a_backend_for_every_op_leaves_the_ops_without_it_to_the_automatic_choice(model, monkeypatch):
    calls = []
    for name in ops.OPS:
        module = importlib.import_module(f"sipl_fast.ops.{name}")
        if "cuda" in module.BACKENDS:  # a CUDA backend that runs here: the reference, recorded
            ref = module.BACKENDS["torch"]
            monkeypatch.setitem(module.BACKENDS, "cuda", type(ref)(
                "cuda", lambda *a, _f=ref.fn, _n=name: calls.append(_n) or _f(*a), lambda *a, **k: None))
    x = images(1, 16, 16)
    assert err(FastSIPL(model, dtype=torch.float32, backend="cuda")(x, 1), restore(model, x, 1)) <= 1e-4
    assert set(calls) == {op for op in ops.OPS if "cuda" in ops.OP_BACKENDS[op]}
    assert {"conv1x1", "channel_attention"}.isdisjoint(calls)
    with pytest.raises(ValueError, match="conv1x1"):  # asked for one op that has no such backend
        FastSIPL(model, dtype=torch.float32, backend={"conv1x1": "cuda"})


@pytest.mark.parametrize("band_bytes,backend,batch,iterations", [
    (1, "auto", 2, 2), (20000, "auto", 2, 2),  # one row per band; a few rows
    (200000, "triton", 1, 1),  # 2-3 bands at full resolution, which the Triton kernels read in place
])
def test_local_stages_by_rows_equal_the_whole_image(device_model, monkeypatch, band_bytes, backend, batch,
                                                    iterations):
    """Bands of rows with one row of halo give the whole image's result (odd size)."""
    monkeypatch.setattr(importlib.import_module("sipl_fast.engine"), "BAND_BYTES", band_bytes)
    x = images(batch, 21, 19, seed=4, device=DEVICE)
    out = FastSIPL(device_model, dtype=torch.float32, backend=backend, cuda_graphs=False)(x, iterations)
    assert err(out, restore(device_model, x, iterations)) <= 1e-4


@pytest.mark.parametrize("band_bytes", [1, 2**30])  # one row per band; the whole image
@pytest.mark.parametrize("channels_last", [False, True])
def test_mdta_by_rows_is_the_published_mdta(monkeypatch, band_bytes, channels_last):
    """``_attention_by_rows`` (the Gram matrices summed over bands, project_out folded) is
    x + MDTA(LN1(x)) of the published block, in float64: two images, three heads, biases, an
    odd size, a channel of q that is zero everywhere (F.normalize's eps), LN1's affine folded
    into qkv as the engine folds it."""
    engine = importlib.import_module("sipl_fast.engine")
    monkeypatch.setattr(engine, "BAND_BYTES", band_bytes)
    block = TransformerBlock(12, 3, 2.66, bias=True).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.4, generator=torch.Generator().manual_seed(p.numel()))
    with torch.no_grad():
        block.attn.qkv.weight[1].zero_()
        block.attn.qkv.bias[1] = 0.0
        block.attn.qkv_dwconv.bias[1] = 0.0
    x = torch.randn(2, 12, 9, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = x + block.attn(block.norm1(x))
        engine._fold_norm_affine(block.norm1, block.attn.qkv)
        out = engine._attention_by_rows(block.norm1, block.attn, x)
    assert _layout.channels_last(out) == channels_last
    assert err(out, expected) <= 1e-12


def test_a_cpu_engine_runs_mdta_by_rows_unless_a_backend_is_named(model):
    def by_rows(fast):
        return {b.attention_by_rows for b in fast.model.modules() if isinstance(b, TransformerBlock)}

    assert by_rows(FastSIPL(model, dtype=torch.float32)) == {True}
    assert by_rows(FastSIPL(model, dtype=torch.float32, backend="torch")) == {False}
    assert by_rows(FastSIPL(model, dtype=torch.float32, backend={"channel_attention": "triton"})) == {False}
    if torch.cuda.is_available():
        assert by_rows(FastSIPL(tiny_model(dtype=torch.float32).cuda())) == {False}


def test_bands_are_small_on_a_cpu(monkeypatch):
    """A CPU's bands hold CPU_BAND_BYTES of intermediates (in the caches), another device's
    BAND_BYTES; the smaller of the two wins on a CPU (the tests shrink BAND_BYTES)."""
    engine = importlib.import_module("sipl_fast.engine")
    x = torch.empty(1, 96, 128, 128)
    assert engine._band_rows(x) == 16 * 2**20 // (8 * 96 * 128 * 4) == 42
    assert engine._band_rows(x.to("meta")) == 512 * 2**20 // (8 * 96 * 128 * 4)
    monkeypatch.setattr(engine, "BAND_BYTES", 200000)
    assert engine._band_rows(x) == 1


def test_layer_norm_affine_is_folded_into_the_next_convolution(model):
    fast = FastSIPL(model, dtype=torch.float32)
    blocks = [m for m in fast.model.modules() if isinstance(m, (TransformerBlock, CrossBlock))]
    assert blocks and all(torch.all(b.norm2.body.weight == 1) and torch.all(b.norm2.body.bias == 0) for b in blocks)
    assert all(b.ffn.project_in.bias is not None for b in blocks)
    assert not torch.all(model.refinement[0].norm2.body.weight == 1)  # the user's model keeps its own
    x = images(2, 21, 17)
    assert err(fast(x, 2), restore(model, x, 2)) <= 1e-4


@pytest.mark.parametrize("dual", [False, True])
def test_padding_the_hidden_width_changes_nothing(dual):
    """The GDFN with zero channels added to its hidden width: aligned, the same output."""
    engine = importlib.import_module("sipl_fast.engine")
    ffn = FeedForward(24, 2.66, bias=True, dual_gate=dual).double()  # hidden 63
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 24, 9, 7, dtype=torch.float64)
    before = ffn(x)
    engine._pad_hidden(ffn)
    assert ffn.project_out.in_channels == 64 and ffn.project_in.weight.shape[0] == ffn.dwconv.groups == 128
    assert torch.equal(ffn(x), before)


@pytest.mark.parametrize("channels_last, batch", [(False, 1), (True, 2)])
def test_triton_backend_of_every_op_serves_the_whole_model(device_model, channels_last, batch, monkeypatch):
    """fp32 through the Triton kernels (the interpreter on a CPU) matches the reference loop.
    Channels-last (here in bands of rows too, of a batch: a band of B > 1 images is not dense),
    every block's output stays channels-last."""
    x = images(batch, 19, 23, device=DEVICE)
    fast = FastSIPL(device_model, dtype=torch.float32, backend="triton", cuda_graphs=False,
                    channels_last=channels_last)
    layouts = []
    if channels_last:
        monkeypatch.setattr(importlib.import_module("sipl_fast.engine"), "BAND_BYTES", 200000)
        for block in (m for m in fast.model.modules() if isinstance(m, (TransformerBlock, CrossBlock))):
            block.register_forward_hook(lambda m, i, out: layouts.append(out.stride(1) == 1))
    assert err(fast(x, 1), restore(device_model, x, 1)) <= 1e-4
    if channels_last:
        assert len(layouts) > 20 and all(layouts)


def test_fp16_engine_through_the_triton_kernels(device_model):
    """Every fused kernel in half precision (the interpreter on a CPU runs fp16 dots; bf16 ones
    run on a GPU only): the error no worse than twice eager fp16 autocast's (one small image:
    the interpreter computes fp16 slowly)."""
    x = images(1, 17, 20, device=DEVICE)
    ref = restore(device_model, x, 1)
    with torch.autocast(DEVICE, dtype=torch.float16):
        eager = restore(device_model, x, 1)
    out = FastSIPL(device_model, dtype=torch.float16, backend="triton", cuda_graphs=False)(x, 1)
    assert 0 < err(out, ref) <= 2 * err(eager, ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=torch.float64), "dtype must be one of"),
    (dict(backend="fast"), "backend must be one of"),
    (dict(backend={"layer_norm": "torch"}), "mapping"),
    (dict(backend={"layer_norm2d": "fast"}), "mapping"),
    (dict(tile=20), "tile must be a multiple of 16"),
    (dict(tile=32, tile_overlap=32), "tile_overlap"),
    (dict(max_graphs=0), "max_graphs"),
    (dict(tile="32"), "integers"),
    (dict(tile=32, tile_overlap=3.5), "integers"),
])
def test_bad_settings_are_value_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastSIPL(model, **kwargs)


@pytest.mark.parametrize("call,match", [
    (lambda f: f(images(1, 16, 16), -1), "iterations"),
    (lambda f: f(torch.rand(1, 4, 16, 16), 1), r"\(B, 3, H, W\)"),
    (lambda f: f(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 1), "floating-point"),
])
def test_bad_input_is_a_value_error(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(FastSIPL(model, dtype=torch.float32))


# ------------------------------------------------------------------ GPU: CUDA graphs
@needs_cuda
def test_graph_replay_equals_eager_for_two_shapes_and_evicts():
    model = tiny_model(dtype=torch.float32).cuda()
    graphs = FastSIPL(model, dtype=torch.float32, max_graphs=1)
    eager = FastSIPL(model, dtype=torch.float32, cuda_graphs=False)
    for size in [(2, 40, 24), (1, 33, 17), (2, 40, 24)]:
        for seed in (0, 1):  # new data through the same captured graph
            x = images(*size, seed=seed, device="cuda")
            out = graphs(x, 2)
            assert err(out, eager(x, 2)) <= 1e-5
            assert err(out, restore(model, x, 2)) <= 1e-4
        assert len(graphs._graphs) == 1  # the other shape was evicted


@needs_cuda
def test_graphs_serve_calls_in_and_out_of_inference_mode():
    """A shape first captured under torch.inference_mode replays for a call outside it, and the
    other way round (an input buffer made in inference mode could not be refilled outside)."""
    model = tiny_model(dtype=torch.float32).cuda()
    fast = FastSIPL(model, dtype=torch.float32)
    x, y = images(1, 32, 48, device="cuda"), images(1, 48, 32, device="cuda")
    with torch.inference_mode():
        first = fast(x, 1)
    again = fast(x, 1)
    assert not again.is_inference() and err(first, again) == 0
    fast(y, 1)
    with torch.inference_mode():
        assert err(fast(y, 1), restore(model, y, 1)) <= 1e-4
    assert len(fast._graphs) == 2


@needs_cuda
def test_fp32_on_the_gpu_is_the_cpus_fp32():
    """restore and the fp32 engine on a GPU agree with the CPU's restore to 1e-4 (TF32 would not)."""
    model = tiny_model(dtype=torch.float32)
    x = images(2, 37, 30)
    ref = restore(model, x, 2)
    gpu = model.cuda()
    assert err(restore(gpu, x.cuda(), 2).cpu(), ref) <= 1e-4
    assert err(FastSIPL(gpu, dtype=torch.float32)(x.cuda(), 2).cpu(), ref) <= 1e-4


@needs_cuda
def test_bf16_engine_on_the_gpu():
    model = tiny_model(dtype=torch.float32).cuda()
    x = images(2, 48, 40, device="cuda")
    ref = restore(model, x, 2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = restore(model, x, 2)
    assert err(FastSIPL(model)(x, 2), ref) <= 2 * err(eager, ref)
    assert "cosine_attention" in ops.measured_choices()  # "auto" timed its backends at the first run


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_runs_there():
    """A model on cuda:1 while cuda:0 is current: the ops' kernels (Triton launches on the
    current device), measuring and the graph capture all run on cuda:1."""
    model = tiny_model(dtype=torch.float32)
    x = images(2, 37, 30)
    ref = restore(model, x, 2)
    torch.cuda.set_device(0)
    second = model.to("cuda:1")
    with ops.backend_scope("triton"):
        assert err(restore(second, x.to("cuda:1"), 2).cpu(), ref) <= 1e-4
    fast = FastSIPL(second, dtype=torch.float32)
    assert err(fast(x.to("cuda:1"), 2).cpu(), ref) <= 1e-4
    assert len(fast._graphs) == 1 and torch.cuda.current_device() == 0


@needs_cuda
def test_a_kernel_that_computes_garbage_is_measured_out(monkeypatch):
    """A Triton conv1x1 whose result is wrong (negated) on this device: measuring checks every
    candidate against the reference, so the engine never takes it and still restores right."""
    conv1x1 = importlib.import_module("sipl_fast.ops.conv1x1")
    right = conv1x1.BACKENDS["triton"]
    monkeypatch.setitem(conv1x1.BACKENDS, "triton", ops._backend.Backend(
        "triton", lambda *a, **kw: right.fn(*a, **kw).neg(), right.why_not, right.automatic))
    monkeypatch.setattr(ops._backend, "_measured", {})
    monkeypatch.setattr(ops._backend, "_rejected", {})
    model = tiny_model(dtype=torch.float32).cuda()
    x = images(1, 35, 41, device="cuda")
    ref = restore(model, x, 2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = restore(model, x, 2)
    with pytest.warns(RuntimeWarning, match="conv1x1: the 'triton' backend's result disagrees"):
        out = FastSIPL(model)(x, 2)
    assert err(out, ref) <= 2 * err(eager, ref)
    assert ops.rejected_backends()["conv1x1"]["triton"] >= 1 and "triton" not in ops.measured_choices()["conv1x1"]


@needs_cuda
def test_first_run_of_a_shape_compiles_ahead():
    """The dry pass (``ops.compiling_only``) runs once per shape, without failing."""
    model = tiny_model(dtype=torch.float32).cuda()
    fast = FastSIPL(model, cuda_graphs=False)
    x = images(1, 40, 24, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(x, 1)
        fast(x, 1)
    assert not any("compiling ahead" in str(w.message) for w in caught)
    assert [key[0] for key in fast._compiled] == [(1, 3, 48, 32)]
    assert torch.isfinite(out).all()


@needs_cuda
def test_capture_failure_falls_back_to_eager(monkeypatch):
    model = tiny_model(dtype=torch.float32).cuda()
    fast = FastSIPL(model, dtype=torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("capture refused")
    monkeypatch.setattr(torch.cuda, "graph", broken)
    x = images(1, 16, 16, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(x, 1)
    assert any("capture failed" in str(w.message) for w in caught)
    assert err(out, restore(model, x, 1)) <= 1e-4


def test_no_call_of_the_loop_casts_or_copies_a_weight(model):
    """Weights are stored as the loop reads them (each copy would be a kernel in the replayed
    graph): the depthwise weights in fp32, on a GPU tap-major as the fused ops and
    ``ops.depthwise_conv3x3`` read them (``tap_major`` is then a view; on a CPU PyTorch's
    convolutions read them, slower tap-major), the convolutions and linear layers that run
    under autocast in the engine's dtype (to which autocast rounds them)."""
    fast = FastSIPL(model, dtype=torch.bfloat16, cuda_graphs=False)
    blocks = [m for m in fast.model.modules() if isinstance(m, (TransformerBlock, CrossBlock))]
    dw = [b.ffn.dwconv.weight for b in blocks] + [b.attn.qkv_dwconv.weight for b in blocks
                                                  if isinstance(b, TransformerBlock)]
    dw += [w for b in blocks if isinstance(b, CrossBlock) for w in (b.attn.q_dwconv.weight, b.attn.kv_dwconv.weight)]
    for w in dw:
        assert w.dtype == torch.float32
        assert (_layout.tap_major(w).data_ptr() == w.data_ptr()) == (fast.device.type == "cuda")
        assert torch.equal(_layout.tap_major(w), _layout.tap_major(w.contiguous()))
    called = []
    for m in fast.model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_pre_hook(lambda m, i: called.append(m))
    fast(images(1, 19, 23), 2)
    assert len(called) > 20
    assert all(p.dtype == torch.bfloat16 for m in called for p in (m.weight, m.bias) if p is not None)
