"""The measured backend choice ("fastest"), shared by every op: it times the backends that the
automatic choice could take, once per call signature, keeps the fastest, never measures during
CUDA-graph capture and never picks a backend that ran out of memory."""
import contextlib
import time

import pytest
import torch

from sipl_fast import ops
from sipl_fast.ops import _backend
from sipl_fast.ops._backend import Backend, BackendError, choose


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(_backend, "_measured", {})


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
