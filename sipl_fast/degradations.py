"""Synthetic degradations for all-in-one training without downloaded data.

Each takes a clean image batch (B, 3, H, W) in [0, 1] and a ``torch.Generator``
(so a batch is a pure function of its seed: resumed and distributed runs see
the same data) and returns the degraded batch in [0, 1]:

- ``noise15`` / ``noise25`` / ``noise50``: additive white Gaussian noise of that
  sigma on the 0-255 scale (the denoising settings of PromptIR/SIPL);
- ``haze``: the atmospheric scattering model ``I = J t + A (1 - t)``,
  ``t = exp(-beta d)`` with a smooth random depth map d, airlight A in [0.7, 1];
- ``lowlight``: ``I = k J^gamma`` (gamma in [1.5, 3], k in [0.25, 0.6]) plus a
  little sensor noise;
- ``blur``: a linear motion-blur kernel of random length (5-15 px) and angle;
- ``rain``: bright streaks (sparse noise smeared along one random direction).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

__all__ = ["DEGRADATIONS", "degrade"]


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _noise(sigma: float) -> Callable:
    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return (x + torch.randn(x.shape, generator=g).to(x) * (sigma / 255.0)).clamp(0, 1)
    return apply


def _smooth_field(b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random field in [0, 1], (B, 1, H, W): coarse noise upsampled bilinearly."""
    coarse = torch.rand(b, 1, 4, 4, generator=g)
    field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    lo = field.amin(dim=(2, 3), keepdim=True)
    hi = field.amax(dim=(2, 3), keepdim=True)
    return (field - lo) / (hi - lo + 1e-6)


def haze(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    depth = _smooth_field(b, h, w, g).to(x)
    beta = _uniform(g, 0.6, 1.8, b).view(b, 1, 1, 1).to(x)
    airlight = _uniform(g, 0.7, 1.0, b).view(b, 1, 1, 1).to(x)
    t = torch.exp(-beta * (0.3 + depth))
    return (x * t + airlight * (1 - t)).clamp(0, 1)


def lowlight(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    gamma = _uniform(g, 1.5, 3.0, b).view(b, 1, 1, 1).to(x)
    k = _uniform(g, 0.25, 0.6, b).view(b, 1, 1, 1).to(x)
    dark = k * x.clamp_min(0).pow(gamma)
    return (dark + torch.randn(x.shape, generator=g).to(x) * (3 / 255.0)).clamp(0, 1)


def _line_kernels(b: int, g: torch.Generator, lo: int, hi: int, size: int) -> torch.Tensor:
    """(B, 1, size, size) normalised line kernels of random length and angle."""
    lengths = torch.randint(lo, hi + 1, (b,), generator=g).float()
    angles = _uniform(g, 0, math.pi, b)
    r = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    kernels = []
    for length, angle in zip(lengths, angles):
        # distance to the line through the centre, and position along it
        along = xx * torch.cos(angle) + yy * torch.sin(angle)
        across = -xx * torch.sin(angle) + yy * torch.cos(angle)
        k = ((across.abs() <= 0.5) & (along.abs() <= length / 2)).float()
        kernels.append(k / k.sum())
    return torch.stack(kernels)[:, None]


def _per_image_conv(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image of x (B, C, H, W) with its own kernel (B, 1, k, k), edge-replicating padding."""
    b, c, h, w = x.shape
    pad = kernels.shape[-1] // 2
    xp = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="replicate")
    weight = kernels.to(x).repeat_interleave(c, dim=0)
    return F.conv2d(xp, weight, groups=b * c).reshape(b, c, h, w)


def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _per_image_conv(x, _line_kernels(x.shape[0], g, 5, 15, 15)).clamp(0, 1)


def rain(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    density = _uniform(g, 0.002, 0.01, b).view(b, 1, 1, 1)
    seeds = (torch.rand(b, 1, h, w, generator=g) < density).float()
    streaks = _per_image_conv(seeds, _line_kernels(b, g, 9, 21, 21)) * 21 / 2
    strength = _uniform(g, 0.5, 0.9, b).view(b, 1, 1, 1)
    return (x + (streaks.clamp(0, 1) * strength).to(x)).clamp(0, 1)


DEGRADATIONS: Dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "noise15": _noise(15), "noise25": _noise(25), "noise50": _noise(50),
    "haze": haze, "lowlight": lowlight, "blur": blur, "rain": rain,
}


def degrade(clean: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """``name``'s degradation of ``clean`` (B, 3, H, W) in [0, 1]."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; expected one of {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[name](clean, generator)
