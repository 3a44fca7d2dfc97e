"""PSNR and SSIM as the papers compute them, through scikit-image.

- ``promptir``: the PromptIR / SIPL test scripts: RGB, output and target
  clipped to [0, 1], data range 1, ``peak_signal_noise_ratio`` and
  ``structural_similarity`` with its default 7x7 uniform window over the
  channel axis.
- ``basicsr-y``: BasicSR's convention: the output quantised to 8 bits, both
  images taken to the Y channel of ITU-R BT.601 YCbCr (16-235, as BasicSR's
  ``bgr2ycbcr``), data range 255, SSIM with an 11x11 Gaussian window (sigma 1.5)
  and population statistics, as Wang et al. and BasicSR do.

Both crop ``crop_border`` pixels from every side first.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

PROTOCOLS = ("promptir", "basicsr-y")


def _crop(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border else a


def psnr(output: np.ndarray, target: np.ndarray) -> float:
    """PSNR of the ``promptir`` protocol alone: both clipped to [0, 1], data range 1."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(np.clip(target.astype(np.float64), 0, 1),
                                         np.clip(output.astype(np.float64), 0, 1), data_range=1))


def psnr_ssim(output: np.ndarray, target: np.ndarray, protocol: str = "promptir", crop_border: int = 0) -> Tuple[float, float]:
    """(PSNR, SSIM) of ``output`` against ``target``, both float (H, W, C) in [0, 1] (output may overshoot)."""
    from skimage.color import rgb2ycbcr  # imported here: scikit-image takes a second to load
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if output.shape != target.shape:
        raise ValueError(f"output {output.shape} and target {target.shape} differ in size")
    out = np.clip(output.astype(np.float64), 0, 1)
    ref = np.clip(target.astype(np.float64), 0, 1)
    if protocol == "promptir":
        out, ref = _crop(out, crop_border), _crop(ref, crop_border)
        return psnr(out, ref), structural_similarity(ref, out, data_range=1, channel_axis=-1)
    out = np.round(out * 255) / 255  # BasicSR saves and scores 8-bit images
    ref = np.round(ref * 255) / 255
    if out.shape[-1] == 3:
        out, ref = rgb2ycbcr(out)[..., 0], rgb2ycbcr(ref)[..., 0]
    else:
        out, ref = out[..., 0] * 255, ref[..., 0] * 255
    out, ref = _crop(out, crop_border), _crop(ref, crop_border)
    return (peak_signal_noise_ratio(ref, out, data_range=255),
            structural_similarity(ref, out, data_range=255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False))
