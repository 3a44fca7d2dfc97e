"""PSNR/SSIM protocols against direct computations."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from sipl_fast.metrics import psnr_ssim


def pair(seed=0, shape=(24, 20, 3)):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, shape).astype(np.float32) / 255
    return np.clip(gt + rng.normal(0, 0.05, shape), -0.1, 1.1).astype(np.float32), gt


def test_promptir_protocol_clips_and_uses_data_range_one():
    out, gt = pair()
    psnr, ssim = psnr_ssim(out, gt, "promptir")
    clipped = np.clip(out.astype(np.float64), 0, 1)
    assert psnr == pytest.approx(10 * np.log10(1 / np.mean((clipped - gt) ** 2)), abs=1e-9)
    assert ssim == pytest.approx(structural_similarity(gt.astype(np.float64), clipped, data_range=1, channel_axis=-1))


def test_basicsr_y_protocol_uses_8_bit_y_and_crops():
    out, gt = pair(1)
    psnr, ssim = psnr_ssim(out, gt, "basicsr-y", crop_border=2)
    def y(a):
        a = np.round(np.clip(a.astype(np.float64), 0, 1) * 255) / 255
        return (16 + 65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2])[2:-2, 2:-2]
    assert psnr == pytest.approx(10 * np.log10(255**2 / np.mean((y(out) - y(gt)) ** 2)), abs=1e-6)
    assert 0 < ssim < 1


def test_bad_protocol_and_sizes():
    out, gt = pair()
    with pytest.raises(ValueError, match="unknown protocol"):
        psnr_ssim(out, gt, "niqe")
    with pytest.raises(ValueError, match="differ in size"):
        psnr_ssim(out[:-1], gt)
