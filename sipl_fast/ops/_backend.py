"""Backend choice shared by every op in ``sipl_fast.ops``.

Each op lists its backends in order of preference, the pure-PyTorch reference
``"torch"`` always first in its table and last to be preferred. The choice:

- ``backend=`` argument, else an enclosing :func:`backend_scope`, else the environment
  variable ``SIPL_FAST_BACKEND_<OP>``
  (e.g. ``SIPL_FAST_BACKEND_LAYER_NORM2D=cuda``), else ``SIPL_FAST_BACKEND``:
  an explicit request. A backend that cannot run the call raises
  :class:`BackendError` saying why. A name for every op (a scope's plain name,
  ``SIPL_FAST_BACKEND``) holds for the ops that have that backend; the others
  choose automatically.
- otherwise (``None`` or ``"auto"``) the first backend that can run the call is
  used, falling back quietly to ``"torch"``.
- ``"fastest"`` (the same places) measures: the first call of each signature (op,
  shapes, strides, dtypes, the other arguments) times every backend that the
  automatic choice could take, and later calls of that signature use the fastest.
  Measuring syncs the device, so it never happens during CUDA-graph capture (a
  signature not measured before takes the automatic choice there), nor in a dry pass
  (``_triton.compiling_only``: the automatic choice, after compiling the Triton kernels
  that measuring may take). FastSIPL chooses this way during its warm-up.
  Measuring compares wall time per call (host launch overhead included: what eager code
  pays), or, inside :func:`measuring_device_time`, device time of the calls replayed as a
  CUDA graph (what a captured graph pays; FastSIPL with CUDA graphs measures so), among the
  candidates that can be captured (one that cannot would break the loop's graph).
  Measuring also checks: the reference among the candidates (``torch``, else PyTorch's own
  ``sdpa``) runs first, and a candidate whose result disagrees with it grossly (NaN or inf
  where the reference is finite, or off by more than ``AGREEMENT`` of the reference's largest
  magnitude) is never chosen, with a warning (``rejected_backends()``): a kernel that
  computes garbage on this device (a miscompile, a broken build) costs speed, not results.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import time
import warnings
from typing import Callable, Dict, Mapping, Optional, Union

import torch

from . import _triton

__all__ = ["AGREEMENT", "FASTEST", "KERNEL_DTYPES", "NAMES", "BackendError", "Backend", "backend_scope",
           "check_real_floating", "choose", "cuda_problem", "forward_only_problem", "graph_ms", "measured_choices",
           "measuring_device_time", "needs_grad", "rejected_backends", "result_dtype"]

#: The backend name that measures (see the module docstring).
FASTEST = "fastest"

#: Every backend name some op has (``ops.OP_BACKENDS``).
NAMES = ("torch", "triton", "cuda", "sdpa")

#: PyTorch's own implementations, which measuring trusts: the last of them among the
#: candidates is the reference the others' results are checked against.
REFERENCES = ("torch", "sdpa")

#: How far (max |difference|) a measured candidate's result may lie from the reference's, as a
#: fraction of the reference's largest finite magnitude, by the reference's dtype. A check for
#: gross failure only, not for precision (the tests check that): the 16-bit references round
#: their intermediates, and at large attention temperatures they differ from an fp32-accurate
#: kernel by several percent.
AGREEMENT = {torch.float32: 2.0**-5, torch.float16: 2.0**-4, torch.bfloat16: 2.0**-3}


class BackendError(ValueError):
    """An explicitly requested backend is unknown or cannot run this call."""


class Backend:
    """A named implementation with a check that says why it cannot run a call.

    ``why_not(*args, **kwargs)`` returns ``None`` when the backend can run the
    call, else a short reason. ``automatic(*args, **kwargs)`` says whether the
    automatic choice may take it (e.g. not Triton's CPU interpreter, which runs
    only when asked for).
    """

    def __init__(self, name: str, fn: Callable, why_not: Callable[..., Optional[str]],
                 automatic: Callable[..., bool] = lambda *args, **kwargs: True):
        self.name, self.fn, self.why_not, self.automatic = name, fn, why_not, automatic


_scope: contextvars.ContextVar[Union[None, str, dict]] = contextvars.ContextVar("sipl_fast_backend", default=None)


@contextlib.contextmanager
def backend_scope(name: Union[None, str, Mapping[str, str]]):
    """Inside the block, op calls without ``backend=`` use ``name`` ("auto": the automatic
    choice), ahead of the environment variables; a mapping ``{op: name}`` names a backend per
    op (ops not in it choose as outside). ``None`` changes nothing."""
    token = _scope.set(dict(name) if isinstance(name, Mapping) else name)
    try:
        yield
    finally:
        _scope.reset(token)


def requested(op: str, backend: Optional[str], names=()) -> Optional[str]:
    """The explicitly requested backend name for ``op``, or None for automatic choice.

    A request for one op (the argument, a mapping's entry, ``SIPL_FAST_BACKEND_<OP>``) stands
    as made; a request for every op (a scope's plain name, ``SIPL_FAST_BACKEND``) holds for the
    ops that have that backend (``names``) and leaves the others to the automatic choice
    (``SIPL_FAST_BACKEND=cuda``: the CUDA C++ kernels where there are any); a name no op has
    stays a request, which fails."""
    every = False
    if backend is None:
        scope = _scope.get()
        backend, every = (scope.get(op), False) if isinstance(scope, dict) else (scope, scope is not None)
    if backend is None:
        backend = os.environ.get(f"SIPL_FAST_BACKEND_{op.upper()}")
    if backend is None:
        backend, every = os.environ.get("SIPL_FAST_BACKEND"), True
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise BackendError(f"{op}: backend must be a name (str) or None, got {backend!r}")
    name = backend.strip().lower()
    if name in ("", "auto") or (every and name in NAMES and name not in names):
        return None
    return name


def needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on ``tensors`` (forward-only kernels refuse it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: The storage dtypes every kernel takes (fp32 accumulation throughout).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def result_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of ``residual + y`` for y in x's dtype (ops that add a residual in the same pass)."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def check_real_floating(op: str, eps: float = 0.0, **tensors) -> None:
    """ValueError unless every given tensor (weights, biases, temperatures; None skipped) is real
    floating point (an integer, bool or complex one would be cast, or fail, deep inside a
    backend), and a norm's ``eps`` is a real number >= 0."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{op}: expected {name} as a real floating-point tensor, got {t.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{op}: expected eps as a real number >= 0, got {eps!r}")


def forward_only_problem(kernel: str, x: torch.Tensor, *tensors, dots: bool = False) -> Optional[str]:
    """Why a forward-only ``kernel`` ("triton" or "cuda") cannot take this call, else None: no
    way to run it on x's device (``dots``: its Triton kernel multiplies matrices), x's dtype,
    or gradients."""
    reason = _triton.problem(x, dots) if kernel == "triton" else cuda_problem(x)
    if reason is not None:
        return reason
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    if needs_grad(x, *tensors):
        name = {"triton": "Triton", "cuda": "CUDA"}[kernel]
        return f"the {name} kernel is forward-only and this call needs gradients (use 'torch')"
    return None


def cuda_problem(x: torch.Tensor) -> Optional[str]:
    """Why the CUDA C++ kernels cannot run on x (not a CUDA tensor, no launch route), else None."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    from . import _cuda

    return _cuda.problem()


_measured: Dict[tuple, str] = {}  # signature -> the fastest backend's name
_rejected: Dict[tuple, Dict[str, str]] = {}  # signature -> {disagreeing backend: why}
_REPEATS = 3  # timed calls (or timed graph replays of one call) per candidate


def _signature(op: str, args, kwargs) -> tuple:
    """What a measurement holds for: tensors by shape, strides, dtype, device and grad needs."""
    def one(x):
        if isinstance(x, torch.Tensor):
            return ("tensor", tuple(x.shape), x.stride(), x.dtype, str(x.device), x.requires_grad)
        return ("value", x)

    return (op, torch.is_grad_enabled(), tuple(one(a) for a in args), tuple((k, one(v)) for k, v in sorted(kwargs.items())))


_device_time: contextvars.ContextVar[bool] = contextvars.ContextVar("sipl_fast_device_time", default=False)


@contextlib.contextmanager
def measuring_device_time(on: bool = True):
    """Inside the block, ``"fastest"`` compares the device time of CUDA-graph replays (no host
    launch overhead: what a captured graph costs) instead of wall time per call."""
    token = _device_time.set(on)
    try:
        yield
    finally:
        _device_time.reset(token)


def graph_ms(fn: Callable[[], object], calls: int = 1, replays: int = 5) -> Optional[float]:
    """Device milliseconds per call of ``fn``, host launch overhead excluded: ``calls`` calls
    captured into one CUDA graph, the median of ``replays`` timed replays over ``calls``. None
    where ``fn`` cannot be captured (it synchronises with the host, say, or runs out of
    memory). ``fn`` must have run once before (compiled, autotuned). Captures on a side stream
    with ``capture_begin``/``capture_end``: ``torch.cuda.graph`` would also collect garbage
    and empty the allocator's cache at every measurement."""
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                for _ in range(calls):
                    fn()
            finally:
                graph.capture_end()
    except Exception:  # noqa: BLE001 - whatever breaks the capture: the caller times otherwise
        torch.cuda.synchronize()
        return None
    current.wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


def _seconds(fn: Callable, args, kwargs, device_time: bool) -> Optional[float]:
    """Time of one call of ``fn``, which has run once (compiled, autotuned), over a few calls:
    with ``device_time`` on a GPU the median device time of replays of one call captured as a
    CUDA graph (None if it cannot be captured; 5 executions in all, where a 3-call graph took
    13: at 2048^2 measuring every candidate of every op call dominated the first run), else
    wall time; infinite if the device runs out of memory. On the tensors' GPU (streams, events
    and graphs belong to the current device)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    try:
        with _triton.on_device(args):
            if device.type == "cuda" and device_time:
                ms = graph_ms(lambda: fn(*args, **kwargs), calls=1, replays=_REPEATS)
                return None if ms is None else ms / 1e3
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(_REPEATS):
                    fn(*args, **kwargs)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3 / _REPEATS
            begin = time.perf_counter()
            for _ in range(_REPEATS):
                fn(*args, **kwargs)
            return (time.perf_counter() - begin) / _REPEATS
    except torch.cuda.OutOfMemoryError:
        return math.inf


def disagreement(out, expected) -> Optional[str]:
    """Why ``out`` grossly disagrees with the reference's result ``expected``, else None:
    another shape, NaN or inf where ``expected`` is finite, or a max |difference| beyond
    ``AGREEMENT`` of ``expected``'s largest finite magnitude (where ``expected`` itself is NaN or
    inf, anything goes). Results that are not tensors are not compared."""
    if not isinstance(expected, torch.Tensor):
        return None
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        return f"a result of shape {tuple(getattr(out, 'shape', ()))}, the reference's {tuple(expected.shape)}"
    if expected.numel() == 0:
        return None
    with torch.no_grad():  # results that autograd records (training): no graph for the check
        finite = expected.isfinite()
        lost = (finite & ~out.isfinite()).any()
        error = (out.to(expected.dtype) - expected).abs().masked_fill_(~finite, 0).amax()
        scale = expected.abs().masked_fill_(~finite, 0).amax()
        lost, error, scale = torch.stack([x.double() for x in (lost, error, scale)]).tolist()  # one sync
    if lost:
        return "NaN or inf where the reference's result is finite"
    fraction = AGREEMENT.get(expected.dtype, AGREEMENT[torch.float32])
    if error > fraction * scale:
        return f"max |difference| {error:.3g}, more than {fraction:g} of the reference's largest magnitude {scale:.3g}"
    return None


def _reject(op: str, name: str, reference: str, key: tuple, reason: str) -> None:
    """Record a disagreeing candidate; warn at its first disagreement for this op."""
    first = not any(k[0] == op and name in why for k, why in _rejected.items())
    _rejected.setdefault(key, {})[name] = reason
    if first:
        warnings.warn(f"{op}: the {name!r} backend's result disagrees with {reference!r} on this device ({reason}); "
                      f"measuring leaves it out (sipl_fast.ops.rejected_backends() counts such calls)",
                      RuntimeWarning, stacklevel=6)  # the op's caller


def _measure(op: str, candidates, args, kwargs, device_time: bool, key: tuple) -> str:
    """The fastest candidate's name. Each runs once untimed (compiling, autotuning), the
    reference (the last of ``REFERENCES`` among them) first; a candidate whose result
    disagrees with the reference's is not timed. Among the others, those that can be captured
    compete by device time (``device_time``), or all of them by wall time if none can."""
    reference = next((c for c in reversed(candidates) if c.name in REFERENCES), None)
    by_name = {c.name: c for c in candidates}
    expected, times = None, {}
    for c in sorted(candidates, key=lambda c: c is not reference):
        try:
            out = c.fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            times[c.name] = math.inf
            continue
        if c is reference:
            expected = out
        else:
            reason = disagreement(out, expected) if expected is not None else None
            if reason is not None:
                _reject(op, c.name, reference.name, key, reason)
                continue
        del out
        times[c.name] = _seconds(c.fn, args, kwargs, device_time)
    del expected
    timed = {n: s for n, s in times.items() if s is not None} or {
        n: _seconds(by_name[n].fn, args, kwargs, False) for n in times}
    return min(timed, key=timed.get)


def _fastest(op: str, candidates, args, kwargs) -> Backend:
    if _triton.compiling():  # a dry pass: compile the Triton kernels that measuring may choose
        for c in candidates[1:]:
            if c.name == "triton":
                c.fn(*args, **kwargs)
        return candidates[0]
    device_time = _device_time.get()
    key = _signature(op, args, kwargs) + (device_time,)
    name = _measured.get(key)
    if name is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return candidates[0]
        name = _measured[key] = _measure(op, candidates, args, kwargs, device_time, key)
    return next(c for c in candidates if c.name == name)


def _counts(choices) -> Dict[str, Dict[str, int]]:
    """``{op: {backend: number of signatures}}`` from (signature, backend names) pairs."""
    counts: Dict[str, Dict[str, int]] = {}
    for key, names in choices:
        per_op = counts.setdefault(key[0], {})
        for name in names:
            per_op[name] = per_op.get(name, 0) + 1
    return counts


def measured_choices() -> Dict[str, Dict[str, int]]:
    """What ``"fastest"`` has chosen so far: ``{op: {backend: number of signatures}}``."""
    return _counts((key, (name,)) for key, name in _measured.items())


def rejected_backends() -> Dict[str, Dict[str, int]]:
    """The candidates ``"fastest"`` left out because their results disagreed with the
    reference's: ``{op: {backend: number of signatures}}`` (empty where every kernel agreed)."""
    return _counts(_rejected.items())


def choose(op: str, backends: Dict[str, Backend], preference, backend: Optional[str], *args, **kwargs) -> Backend:
    """Pick the backend for one call of ``op`` (see the module docstring)."""
    name = requested(op, backend, backends)
    if name is not None and name != FASTEST:
        if name not in backends:
            raise BackendError(f"{op}: unknown backend {name!r}; expected one of {sorted(backends)}, 'auto' "
                               f"or {FASTEST!r}")
        reason = backends[name].why_not(*args, **kwargs)
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} cannot run this call: {reason}")
        return backends[name]
    candidates = [backends[c] for c in preference
                  if backends[c].automatic(*args, **kwargs) and backends[c].why_not(*args, **kwargs) is None]
    if not candidates:
        return backends["torch"]
    if name is None or len(candidates) == 1:
        return candidates[0]
    return _fastest(op, candidates, args, kwargs)
