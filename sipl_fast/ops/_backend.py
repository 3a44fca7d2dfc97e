"""Backend choice shared by every op in ``sipl_fast.ops``.

Each op lists its backends in order of preference, the pure-PyTorch reference
``"torch"`` always first in its table and last to be preferred. The choice:

- ``backend=`` argument, else an enclosing :func:`backend_scope`, else the environment
  variable ``SIPL_FAST_BACKEND_<OP>``
  (e.g. ``SIPL_FAST_BACKEND_LAYER_NORM2D=cuda``), else ``SIPL_FAST_BACKEND``:
  an explicit request. A backend that cannot run the call raises
  :class:`BackendError` saying why.
- otherwise (``None`` or ``"auto"``) the first backend that can run the call is
  used, falling back quietly to ``"torch"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Dict, Mapping, Optional, Union

import torch

__all__ = ["KERNEL_DTYPES", "BackendError", "Backend", "backend_scope", "choose", "cuda_problem", "forward_only_problem",
           "needs_grad"]


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


def requested(op: str, backend: Optional[str]) -> Optional[str]:
    """The explicitly requested backend name for ``op``, or None for automatic choice."""
    if backend is None:
        scope = _scope.get()
        backend = scope.get(op) if isinstance(scope, dict) else scope
    if backend is None:
        backend = os.environ.get(f"SIPL_FAST_BACKEND_{op.upper()}") or os.environ.get("SIPL_FAST_BACKEND")
    if backend is None or backend.strip().lower() in ("", "auto"):
        return None
    return backend.strip().lower()


def needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on ``tensors`` (forward-only kernels refuse it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: The storage dtypes every kernel takes (fp32 accumulation throughout).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def forward_only_problem(kernel: str, x: torch.Tensor, *tensors) -> Optional[str]:
    """Why a forward-only kernel cannot take this call (x's dtype, or gradients), else None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    if needs_grad(x, *tensors):
        return f"the {kernel} kernel is forward-only and this call needs gradients (use 'torch')"
    return None


def cuda_problem(x: torch.Tensor) -> Optional[str]:
    """Why the CUDA C++ kernels cannot run on x (not a CUDA tensor, no launch route), else None."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    from . import _cuda

    return _cuda.problem()


def choose(op: str, backends: Dict[str, Backend], preference, backend: Optional[str], *args, **kwargs) -> Backend:
    """Pick the backend for one call of ``op`` (see the module docstring)."""
    name = requested(op, backend)
    if name is not None:
        if name not in backends:
            raise BackendError(f"{op}: unknown backend {name!r}; expected one of {sorted(backends)} or 'auto'")
        reason = backends[name].why_not(*args, **kwargs)
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} cannot run this call: {reason}")
        return backends[name]
    for candidate in preference:
        if backends[candidate].automatic(*args, **kwargs) and backends[candidate].why_not(*args, **kwargs) is None:
            return backends[candidate]
    return backends["torch"]
