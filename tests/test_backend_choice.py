"""The measured backend choice ("fastest"), shared by every op: it times the backends that the
automatic choice could take, once per call signature, keeps the fastest, never measures during
CUDA-graph capture and never picks a backend that ran out of memory or whose result disagrees
with the reference's."""
import contextlib
import time
import warnings

import pytest
import torch

from sipl_fast import ops
from sipl_fast.ops import _backend
from sipl_fast.ops._backend import Backend, BackendError, choose


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(_backend, "_measured", {})
    monkeypatch.setattr(_backend, "_rejected", {})


def fake_backends(seconds, calls):
    """Backends that sleep for their time; "refuses" can never run, "manual" is never automatic."""
    def make(name):
        def fn(x):
            calls.append(name)
            if seconds[name] == "oom":
                raise torch.cuda.OutOfMemoryError("fake")
            time.sleep(seconds[name])
            return x
        return Backend(name, fn, lambda x: "never" if name == "refuses" else None,
                       automatic=lambda x: name != "manual")
    return {name: make(name) for name in seconds}


def test_fastest_measures_once_per_signature_and_keeps_the_winner():
    calls = []
    backends = fake_backends({"cuda": 0.02, "triton": 0.0, "torch": 0.01, "refuses": 0.0, "manual": 0.0}, calls)
    preference = ("refuses", "manual", "cuda", "triton", "torch")
    x = torch.zeros(3, 5)
    assert choose("op", backends, preference, None, x).name == "cuda"  # automatic: the first that can run
    assert choose("op", backends, preference, "fastest", x).name == "triton"
    assert sorted(set(calls)) == ["cuda", "torch", "triton"]  # the refusing and manual-only ones are not timed
    calls.clear()
    assert choose("op", backends, preference, "fastest", x).name == "triton"
    assert calls == []  # remembered
    choose("op", backends, preference, "fastest", torch.zeros(3, 6))  # a new shape is measured again
    choose("op", backends, preference, "fastest", torch.zeros(5, 3).t())  # and a new layout
    assert ops.measured_choices() == {"op": {"triton": 3}}


def test_fastest_never_takes_a_backend_that_ran_out_of_memory():
    backends = fake_backends({"cuda": "oom", "torch": 0.01}, [])
    assert choose("op", backends, ("cuda", "torch"), "fastest", torch.zeros(2)).name == "torch"


def test_no_measuring_during_graph_capture(monkeypatch):
    calls = []
    backends = fake_backends({"cuda": 0.01, "torch": 0.0}, calls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose("op", backends, ("cuda", "torch"), "fastest", torch.zeros(2)).name == "cuda"
    assert calls == [] and ops.measured_choices() == {}


def test_fastest_never_takes_a_backend_whose_result_disagrees_with_the_reference():
    """The reference runs first; a faster candidate with a wrong result (off by a lot, or NaN
    where the reference is finite) is not timed and not chosen, with one warning per op and
    backend; one that agrees competes as before."""
    calls = []

    def backend(name, result):
        return Backend(name, lambda x: calls.append(name) or result(x), lambda x: None)

    backends = {"cuda": backend("cuda", lambda x: x + 1), "triton": backend("triton", lambda x: x * (1 + 2**-7)),
                "sdpa": backend("sdpa", lambda x: x), "torch": backend("torch", lambda x: time.sleep(0.01) or x)}
    preference = ("cuda", "triton", "torch")
    x = torch.linspace(-2, 2, 12)
    with pytest.warns(RuntimeWarning, match=r"'cuda' backend's result disagrees with 'torch'.*difference\| 1,"):
        assert choose("op", backends, preference, "fastest", x).name == "triton"
    assert calls[0] == "torch" and calls.count("cuda") == 1  # the reference first; cuda ran once, untimed
    backends["triton"] = backend("triton", lambda x: torch.where(x > 1, torch.nan, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuda's disagreement was said already: no second warning
        with pytest.raises(RuntimeWarning, match="'triton' backend's result disagrees with 'torch'.*NaN"):
            choose("op", backends, preference, "fastest", torch.linspace(-2, 2, 13))
    assert choose("op", backends, preference, "fastest", torch.linspace(-2, 2, 14)).name == "torch"
    assert ops.rejected_backends() == {"op": {"cuda": 3, "triton": 2}}
    assert ops.measured_choices() == {"op": {"triton": 1, "torch": 1}}  # the raised warning left one unmeasured
    # without torch among the candidates PyTorch's own sdpa is the reference; without either, no check
    assert choose("op", backends, ("cuda", "sdpa"), "fastest", torch.zeros(2, 3)).name == "sdpa"
    assert choose("op", backends, ("cuda", "triton"), "fastest", torch.zeros(2, 4)).name in ("cuda", "triton")
    assert ops.rejected_backends()["op"]["cuda"] == 4


def test_the_agreement_check_catches_gross_failure_only():
    """``disagreement`` passes an exact result rounded to the dtype against the 16-bit reference
    at temperature 50 (where that reference's rounding shows most: 4% of the output's scale in
    bf16), and fails a wrong row, NaN or inf where the reference is finite, another shape."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 96, generator=g, dtype=torch.float64) for n in (77, 45, 45))
    c = [torch.randn(2, 2, 40, 37 * 53, generator=g, dtype=torch.float64) for _ in range(3)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for op, args in ((ops.cosine_attention, (q, k, v, torch.full((3,), 50.0, dtype=torch.float64))),
                         (ops.channel_attention, (*c, torch.full((2, 1, 1), 50.0, dtype=torch.float64)))):
            exact = op(*args, backend="torch").to(dtype)
            reference = op(*(a.to(dtype) for a in args), backend="torch")
            assert _backend.disagreement(exact, reference) is None, (op.__name__, dtype)
            wrong = exact.clone()
            wrong[1, 1, 7] = 0  # one row lost
            assert "max |difference|" in _backend.disagreement(wrong, reference)
            wrong[1, 1, 7] = reference[1, 1, 7]
            wrong[0, 0, 0, 3] = torch.inf
            assert "NaN or inf" in _backend.disagreement(wrong, reference)
        reference[0, 0, 0, 3] = torch.nan  # where the reference is not finite, anything goes
        assert _backend.disagreement(wrong, reference) is None
    assert "shape" in _backend.disagreement(exact[:1], reference)
    assert _backend.disagreement(exact[:0], reference[:0]) is None and _backend.disagreement(1, 2) is None


def test_fastest_from_the_environment_and_scopes(monkeypatch):
    backends = fake_backends({"cuda": 0.01, "torch": 0.0}, [])
    monkeypatch.setenv("SIPL_FAST_BACKEND", "fastest")
    assert choose("op", backends, ("cuda", "torch"), None, torch.zeros(2)).name == "torch"
    monkeypatch.delenv("SIPL_FAST_BACKEND")
    with ops.backend_scope({"op": "fastest"}):
        assert choose("op", backends, ("cuda", "torch"), None, torch.zeros(4)).name == "torch"
    with pytest.raises(BackendError, match="'auto' or 'fastest'"):
        choose("op", backends, ("cuda", "torch"), "fasttest", torch.zeros(2))


def test_a_name_for_every_op_holds_for_the_ops_that_have_it(monkeypatch):
    backends = fake_backends({"triton": 0.0, "torch": 0.0}, [])  # no "cuda"
    for every in (lambda: ops.backend_scope("cuda"), lambda: monkeypatch.setenv("SIPL_FAST_BACKEND", "cuda")):
        with every() or contextlib.nullcontext():
            assert choose("op", backends, ("triton", "torch"), None, torch.zeros(2)).name == "triton"  # automatic
            with pytest.raises(BackendError, match="unknown backend 'cuda'"):  # a request for this op stands
                choose("op", backends, ("triton", "torch"), "cuda", torch.zeros(2))
    assert {name for names in ops.OP_BACKENDS.values() for name in names} == set(_backend.NAMES)
    monkeypatch.setenv("SIPL_FAST_BACKEND_OP", "cuda")
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        choose("op", backends, ("triton", "torch"), None, torch.zeros(2))
    with pytest.raises(BackendError, match="must be a name"):
        choose("op", backends, ("triton", "torch"), 1, torch.zeros(2))


def test_a_real_op_with_one_candidate_is_not_measured():
    x = torch.randn(2, 6, 5, 7)
    w, b = torch.rand(6), torch.randn(6)
    out = ops.layer_norm2d(x, w, b, backend="fastest")
    torch.testing.assert_close(out, ops.layer_norm2d(x, w, b, backend="torch"), rtol=0, atol=0)
    assert ops.measured_choices() == {}


def test_a_dry_pass_compiles_the_triton_candidate_and_measures_nothing():
    calls = []
    backends = fake_backends({"cuda": 0.0, "triton": 0.0, "torch": 0.0}, calls)
    with ops.compiling_only():
        assert choose("op", backends, ("cuda", "triton", "torch"), "fastest", torch.zeros(2)).name == "cuda"
    assert calls == ["triton"] and ops.measured_choices() == {}  # the caller runs cuda; torch needs no compiling


def test_compiling_only_compiles_instead_of_running(monkeypatch):
    """Every op's Triton launches become compilations inside ``compiling_only`` (in the
    interpreter: nothing runs) and run again after it."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    if torch.cuda.is_available():
        pytest.skip("the interpreter's launches are counted here; the GPU runs FastSIPL's dry pass")
    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, grid, warmup, **k: launches.append(
        (self.fn.__name__, warmup)) or run(self, *a, grid=grid, warmup=warmup, **k))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 7, generator=g)
    q, k, v = (torch.randn(2, 2, 8, 35, generator=g) for _ in range(3))
    t = torch.rand(2, generator=g) + 0.5

    def every_op():
        return [ops.layer_norm2d(x, torch.rand(8), torch.randn(8), backend="triton"),
                ops.conv1x1(x, torch.randn(6, 8), None, None, True, backend="triton"),
                ops.gated_dwconv_gelu(x, torch.randn(8, 1, 3, 3), backend="triton"),
                ops.gated_dwconv_gelu(x, torch.randn(8, 1, 3, 3), "gdfn", None, torch.randn(5, 4), backend="triton"),
                ops.channel_attention(q, k, v, t, backend="triton"),
                ops.cosine_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1), t,
                                     backend="triton")]
    with ops.compiling_only():
        every_op()
    kernels = {name for name, _ in launches}
    assert len(kernels) >= 7 and all(warmup for _, warmup in launches)
    launches.clear()
    every_op()
    assert {name for name, _ in launches} == kernels and not any(warmup for _, warmup in launches)


def test_tuned_tiles_say_what_each_autotuner_chose(monkeypatch):
    """``_triton.autotune`` remembers its autotuners, ``launch_tuned`` on a GPU goes through
    them, and ``tuned_tiles`` reports each one's choice per key (the GPU is faked: nothing
    launches)."""
    triton = pytest.importorskip("triton")
    from sipl_fast.ops import _triton

    @triton.jit
    def kernel(X, n, B: triton.language.constexpr):
        pass

    tiles = [triton.Config({"B": 16}, num_warps=4), triton.Config({"B": 32}, num_warps=8)]
    monkeypatch.setattr(_triton, "_tuners", [])
    tuner = _triton.autotune(kernel, tiles, ["n"], lambda nargs, kw: tiles)
    launched = []
    monkeypatch.setattr(_triton, "compile_configs", lambda *a, **k: None)
    monkeypatch.setattr(_triton, "launch", lambda k, grid, *a, **kw: launched.append(k))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setenv("SIPL_FAST_TRITON_AUTOTUNE", "1")
    _triton.launch_tuned(kernel, tuner, "key", tiles, lambda meta: (1,), torch.zeros(4), 4)
    assert launched == [tuner] and ops.tuned_tiles() == {}  # nothing chosen yet
    tuner.cache[(4, "torch.float32")] = tiles[1]
    assert ops.tuned_tiles() == {"kernel": {"(4, 'torch.float32')": str(tiles[1])}}


def test_device_time_decides_inside_measuring_device_time(monkeypatch):
    """Wall time favours few launches; device time (graph replays) what the GPU spends. Inside
    ``measuring_device_time`` the latter decides among the candidates that can be captured
    (a None leaves one out; if all are None, all compare by wall time). The two modes keep
    separate choices."""
    times = {False: {"cuda": 1.0, "torch": 2.0}, True: {"cuda": 3.0, "torch": 2.0}}
    backends = fake_backends({"cuda": 0.0, "torch": 0.0}, [])
    for b in backends.values():
        b.fn.__name__ = b.name
    monkeypatch.setattr(_backend, "_seconds", lambda fn, args, kwargs, device_time: times[device_time][fn.__name__])
    x = torch.zeros(2)
    assert choose("op", backends, ("cuda", "torch"), "fastest", x).name == "cuda"
    with ops.measuring_device_time():
        assert choose("op", backends, ("cuda", "torch"), "fastest", x).name == "torch"
    times[True]["cuda"] = None
    with ops.measuring_device_time():
        assert choose("op", backends, ("cuda", "torch"), "fastest", torch.zeros(3)).name == "torch"
    times[True]["torch"] = None
    with ops.measuring_device_time():
        assert choose("op", backends, ("cuda", "torch"), "fastest", torch.zeros(4)).name == "cuda"
    assert ops.measured_choices() == {"op": {"cuda": 2, "torch": 2}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_ms_times_captured_calls_and_refuses_host_syncs():
    a = torch.randn(512, 512, device="cuda")
    a @ a
    ms = _backend.graph_ms(lambda: a @ a, calls=3, replays=3)
    assert ms is not None and ms > 0
    (a.sum()).item()
    assert _backend.graph_ms(lambda: (a.sum()).item()) is None
    assert (a @ a).isfinite().all()  # the device works after the refused capture
