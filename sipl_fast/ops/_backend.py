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
from typing import Callable, Dict, Optional

__all__ = ["BackendError", "Backend", "backend_scope", "choose"]


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


_scope: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("sipl_fast_backend", default=None)


@contextlib.contextmanager
def backend_scope(name: Optional[str]):
    """Inside the block, op calls without ``backend=`` use ``name`` ("auto": the automatic
    choice), ahead of the environment variables. ``None`` changes nothing."""
    token = _scope.set(name)
    try:
        yield
    finally:
        _scope.reset(token)


def requested(op: str, backend: Optional[str]) -> Optional[str]:
    """The explicitly requested backend name for ``op``, or None for automatic choice."""
    if backend is None:
        backend = _scope.get()
    if backend is None:
        backend = os.environ.get(f"SIPL_FAST_BACKEND_{op.upper()}") or os.environ.get("SIPL_FAST_BACKEND")
    if backend is None or backend.strip().lower() in ("", "auto"):
        return None
    return backend.strip().lower()


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
