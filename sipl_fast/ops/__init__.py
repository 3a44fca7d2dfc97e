"""SIPL's hot ops, each with a pure-PyTorch reference backend and faster ones.

Choose a backend per call (``backend="torch" | "cuda" | "triton" | None | "fastest"``) or by
the environment (``SIPL_FAST_BACKEND_<OP>`` or ``SIPL_FAST_BACKEND``); ``None``
picks the first backend that can run the call, in an order set from benchmarks, and
falls back to ``"torch"``; ``"fastest"`` times the candidates on each new call signature
and keeps the fastest (``measured_choices()`` says what it chose), after checking each
candidate's result against the reference's (``rejected_backends()``: those that disagreed). Inside
``compiling_only()`` the Triton kernels compile, all at once, instead of running (a dry pass
that warms a loop up).
"""
from __future__ import annotations

import importlib
import os
from typing import Dict

import torch

from ._backend import (FASTEST, BackendError, backend_scope, graph_ms, measured_choices, measuring_device_time,
                       rejected_backends)
from ._triton import compiling_only, tuned_tiles
from .channel_attention import channel_attention
from .conv1x1 import conv1x1
from .cosine_attention import cosine_attention, cosine_attention_torch
from .depthwise_conv3x3 import depthwise_conv3x3
from .gated_dwconv_gelu import gated_dwconv_gelu
from .layer_norm2d import layer_norm2d

#: Every op, by the name its backend variables and ``backend_scope`` mappings use.
OPS = ("channel_attention", "conv1x1", "cosine_attention", "depthwise_conv3x3", "gated_dwconv_gelu", "layer_norm2d")

#: The backends of each op, the reference first.
OP_BACKENDS = {op: tuple(importlib.import_module(f".{op}", __name__).BACKENDS) for op in OPS}

__all__ = ["FASTEST", "OPS", "OP_BACKENDS", "BackendError", "available_backends", "backend_scope", "channel_attention",
           "compiling_only", "conv1x1", "cosine_attention", "cosine_attention_torch", "depthwise_conv3x3",
           "gated_dwconv_gelu", "graph_ms", "layer_norm2d", "measured_choices", "measuring_device_time",
           "rejected_backends", "tuned_tiles"]


def _triton_status() -> dict:
    try:
        import triton  # noqa: F401
    except ImportError:
        return {"available": False, "route": None, "reason": "Triton is not installed"}
    if torch.cuda.is_available():
        return {"available": True, "route": "gpu", "reason": None}
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"available": False, "route": "interpreter",
                "reason": "no CUDA device; the interpreter runs CPU tensors only when backend='triton' is asked for"}
    return {"available": False, "route": None, "reason": "no CUDA device visible to PyTorch"}


def available_backends() -> Dict[str, dict]:
    """What this install can run: ``{name: {"available": bool, "route": str | None, "reason": str | None}}``.

    ``route`` says how a backend runs: for ``"cuda"``, ``"extension"`` (the
    compiled ``sipl_fast._C``) or ``"cupy"`` (the same CUDA C++ JIT-compiled by CuPy);
    for ``"triton"``, ``"gpu"`` or ``"interpreter"`` (``TRITON_INTERPRET=1``).
    """
    from . import _cuda

    result = {"torch": {"available": True, "route": "pytorch", "reason": None}, "triton": _triton_status()}
    try:
        route = _cuda.route()
    except (RuntimeError, ValueError) as e:  # a forced SIPL_FAST_CUDA_ROUTE that cannot run
        return {**result, "cuda": {"available": False, "route": None, "reason": str(e)}}
    if not torch.cuda.is_available():
        reason = "no CUDA device visible to PyTorch" + ("" if route else f"; {_cuda.why_unavailable()}")
        result["cuda"] = {"available": False, "route": route, "reason": reason}
    elif route is None:
        result["cuda"] = {"available": False, "route": None, "reason": _cuda.why_unavailable()}
    else:
        result["cuda"] = {"available": True, "route": route, "reason": None}
    return result
