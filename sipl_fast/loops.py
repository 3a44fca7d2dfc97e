"""The published SIPL loops: iterative self-refinement at inference, privileged training.

Inference (``restore``): reflect-pad to a multiple of 16, then ``iterations``
times ``y0 = net(img)``; ``F = encode(y0)``; ``img = net(img, privileged=F)``;
crop back. Training (``sipl_training_step``): privileged features from the
ground truth, ``F = encode(net(gt))`` under no_grad, then
``loss(net(lq, privileged=F), gt)``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "refinements", "restore", "sipl_training_step"]

PAD_MULTIPLE = 16


def _reflect_pad_end(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Reflect-pad ``pad`` samples after the end of ``dim``.

    Equals ``F.pad(mode="reflect")`` whenever that is defined (pad < size); a
    longer pad keeps reflecting the growing tensor (numpy's "reflect" rule), and a
    size-1 axis is repeated.
    """
    while pad > 0:
        size = x.shape[dim]
        if size == 1:
            return torch.cat([x] + [x] * pad, dim)
        step = min(pad, size - 1)
        mirrored = x.narrow(dim, size - 1 - step, step).flip(dim)
        x = torch.cat([x, mirrored], dim)
        pad -= step
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Reflect-pad (B, C, H, W) on the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph < h and pw < w:
        return F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
    return _reflect_pad_end(_reflect_pad_end(x, ph, -2), pw, -1)


def _check_images(name: str, x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or 0 in x.shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a non-empty image batch of shape (B, {channels}, H, W), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _check_iterations(iterations) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")


@contextlib.contextmanager
def ieee_fp32():
    """Inside the block, float32 convolutions and matrix products on a GPU are IEEE fp32: cuDNN's
    convolutions default to TF32 (10-bit mantissas), which moves SIPL's output by about 1e-3,
    ten times the agreement FastSIPL keeps with this loop. The caller's settings come back after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


@torch.no_grad()
def refinements(model, lq: torch.Tensor, iterations: int = 2) -> Iterator[torch.Tensor]:
    """Yield what ``restore(model, lq, k)`` returns for k = 0, 1, ..., ``iterations``, sharing the work.

    The dictionary-only pass (k = 0) is also the first pass of iteration 1, so
    all the results cost no more than ``restore(model, lq, iterations)`` alone.
    A model without Proxy Fusion yields its one plain pass only. float32 runs in
    IEEE fp32 on a GPU too (:func:`ieee_fp32`; not while the caller holds a result).
    """
    _check_iterations(iterations)
    _check_images("restore", lq, model.config.inp_channels)
    param = next(model.parameters())
    if lq.device != param.device or (lq.dtype != param.dtype and not torch.is_autocast_enabled(lq.device.type)):
        raise ValueError(f"restore: lq is {lq.dtype} on {lq.device}, the model's parameters {param.dtype} on "
                         f"{param.device}: move or cast one of them (or run under torch.autocast)")
    h, w = lq.shape[-2:]
    img = pad_to_multiple(lq)
    with ieee_fp32():
        y0 = model(img)
    yield y0[..., :h, :w]
    if not model.config.proxy_fusion:
        return
    for k in range(iterations):
        with ieee_fp32():
            if k:
                y0 = model(img)
            img = model(img, privileged=model.encode(y0))
        yield img[..., :h, :w]


def restore(model, lq: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    """Restore ``lq`` (B, C, H, W), any H and W, with the published SIPL inference loop.

    ``iterations=0`` runs one dictionary-only pass; a model without Proxy Fusion
    (plain PromptIR) runs one plain pass whatever ``iterations`` is. Returns
    (B, C, H, W), unclipped, like the published code. No gradients are tracked.
    """
    for out in refinements(model, lq, iterations):
        pass
    return out


def sipl_training_step(
    model,
    lq: torch.Tensor,
    gt: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    *,
    grad_clip: Optional[float] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """One SIPL training step on a batch; returns the loss (detached scalar tensor).

    Privileged features come from the ground truth under no_grad,
    ``F = encode(net(gt))``; the loss is ``loss_fn(net(lq, privileged=F), gt)``
    (L1 by default, computed in fp32); then backward, optional gradient-norm
    clipping, and ``optimizer.step()``. ``model`` may be wrapped in
    DistributedDataParallel; ``autocast_dtype`` (e.g. torch.bfloat16) runs the
    passes under autocast. A model without Proxy Fusion trains as plain
    PromptIR. H and W must be multiples of 8.
    """
    net = getattr(model, "module", model)  # the SIPL model inside a DDP wrapper
    _check_images("sipl_training_step lq", lq, net.config.inp_channels)
    _check_images("sipl_training_step gt", gt, net.config.out_channels)
    if lq.shape[0] != gt.shape[0] or lq.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"lq {tuple(lq.shape)} and gt {tuple(gt.shape)} differ in batch or size")
    loss_fn = F.l1_loss if loss_fn is None else loss_fn
    model.train()
    with torch.autocast(lq.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        privileged = None
        if net.config.proxy_fusion:
            with torch.no_grad():
                privileged = net.encode(net(gt))
        out = model(lq, privileged=privileged)
    acc = torch.promote_types(out.dtype, torch.float32)  # the loss in at least fp32
    loss = loss_fn(out.to(acc), gt.to(acc))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()
