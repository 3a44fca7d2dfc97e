"""LayerNorm2d: per-pixel LayerNorm over the channel axis of an NCHW tensor.

``y[b, c, h, w] = (x - mu) / sqrt(var + eps) * weight[c] + bias[c]`` with mu and
the biased var taken over c at each (b, h, w): the norm of every Restormer
block in SIPL.

Backends:
- ``"torch"``: the reference, the published formula op by op (any float dtype,
  differentiable);
- ``"cuda"``: CUDA C++ kernel ``kernels/layer_norm2d.cu`` (forward only; fp32,
  fp16, bf16 with fp32 accumulation), through the compiled extension or, without
  one, JIT-compiled by CuPy. Registered as the custom op
  ``torch.ops.sipl_fast.layer_norm2d_cuda`` so it works under ``torch.compile``
  and CUDA-graph capture.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import Backend, choose

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm2d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Reference: the published formula, op by op, in the input's dtype."""
    c = x.shape[1]
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + eps).sqrt()
    return weight.view(1, c, 1, 1) * y + bias.view(1, c, 1, 1)


@torch.library.custom_op("sipl_fast::layer_norm2d_cuda", mutates_args=(), device_types="cuda")
def layer_norm2d_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """CUDA C++ forward; x (B, C, H, W) is made contiguous NCHW, weight/bias go to fp32."""
    from . import _cuda

    x = x.contiguous()
    y = torch.empty_like(x)
    _cuda.layer_norm2d_fwd(x, weight.float().contiguous(), bias.float().contiguous(), float(eps), y)
    return y


@layer_norm2d_cuda.register_fake
def _(x, weight, bias, eps=1e-5):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _cuda_why_not(x, weight, bias, eps) -> Optional[str]:
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return "the CUDA kernel is forward-only and this call needs gradients"
    from . import _cuda

    try:
        return None if _cuda.route() is not None else _cuda.why_unavailable()
    except (RuntimeError, ValueError) as e:  # a forced SIPL_FAST_CUDA_ROUTE that cannot run
        return str(e)


BACKENDS = {
    "torch": Backend("torch", layer_norm2d_torch, lambda *a: None),
    "cuda": Backend("cuda", layer_norm2d_cuda, _cuda_why_not),
}
PREFERENCE = ("cuda", "torch")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"layer_norm2d: expected x of shape (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"layer_norm2d: expected a floating-point x, got {x.dtype}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (c,):
            raise ValueError(f"layer_norm2d: expected {name} of shape ({c},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"layer_norm2d: {name} is on {t.device}, x on {x.device}")


def layer_norm2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, backend: Optional[str] = None
) -> torch.Tensor:
    """LayerNorm over channels of x (B, C, H, W) with weight, bias (C,); returns (B, C, H, W).

    ``backend``: None/"auto" (fastest that can run), "torch" or "cuda".
    """
    _check(x, weight, bias)
    return choose("layer_norm2d", BACKENDS, PREFERENCE, backend, x, weight, bias, eps).fn(x, weight, bias, eps)
