"""The published loops: padding, iteration semantics on odd sizes and batches, training."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sipl_fast
from sipl_fast.loops import pad_to_multiple

from conftest import tf32_flags, tiny_model


def published_loop(model, lq, iterations):
    """SPEC.md's loop written out plainly: pad, iterate, crop."""
    h, w = lq.shape[-2:]
    img = F.pad(lq, (0, (16 - w % 16) % 16, 0, (16 - h % 16) % 16), mode="reflect")
    with torch.no_grad():
        if iterations == 0:
            return model(img)[..., :h, :w]
        for _ in range(iterations):
            y0 = model(img)
            feats = model.encode(y0)
            img = model(img, privileged=feats)
    return img[..., :h, :w]


@pytest.mark.parametrize("iterations", [0, 1, 2])
def test_restore_follows_the_published_loop_on_odd_sizes(iterations):
    model = tiny_model()
    lq = torch.rand(2, 3, 37, 53, dtype=torch.float64)
    out = sipl_fast.restore(model, lq, iterations=iterations)
    assert out.shape == lq.shape
    torch.testing.assert_close(out, published_loop(model, lq, iterations), rtol=0, atol=0)
    # batch elements are independent
    torch.testing.assert_close(out[1:], sipl_fast.restore(model, lq[1:], iterations=iterations), rtol=1e-12, atol=1e-12)


def test_refinements_yield_what_restore_returns_for_each_count():
    model = tiny_model()
    lq = torch.rand(2, 3, 19, 26, dtype=torch.float64)
    outs = list(sipl_fast.refinements(model, lq, 2))
    assert len(outs) == 3
    for k, out in enumerate(outs):
        torch.testing.assert_close(out, published_loop(model, lq, k), rtol=0, atol=0)
    assert len(list(sipl_fast.refinements(tiny_model(proxy_fusion=False), lq, 2))) == 1


def test_the_loop_computes_in_ieee_fp32_and_gives_the_callers_settings_back(monkeypatch, tf32_on):
    """cuDNN's TF32 default would move a GPU result by about 1e-3; the caller's flags stay theirs
    outside the passes, also while ``refinements`` waits between its results."""
    model = tiny_model()
    seen = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, *a, **k: seen.append(tf32_flags()) or forward(self, *a, **k))
    for _ in sipl_fast.refinements(model, torch.rand(1, 3, 17, 20, dtype=torch.float64), 2):
        assert tf32_flags() == (True, True)
    assert seen and set(seen) == {(False, False)}
    assert tf32_flags() == (True, True)


def test_iterations_change_the_result():
    model = tiny_model()
    lq = torch.rand(1, 3, 21, 18, dtype=torch.float64)
    outs = [sipl_fast.restore(model, lq, iterations=i) for i in range(3)]
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    assert (outs[1] - outs[2]).abs().max() > 1e-6


def test_plain_promptir_runs_one_pass_whatever_the_iterations():
    model = tiny_model(proxy_fusion=False)
    lq = torch.rand(2, 3, 19, 33, dtype=torch.float64)
    one = published_loop(model, lq, 0)
    for iterations in (0, 1, 2):
        torch.testing.assert_close(sipl_fast.restore(model, lq, iterations=iterations), one, rtol=0, atol=0)


@pytest.mark.parametrize("h,w", [(37, 53), (16, 32), (7, 9), (1, 1), (3, 40)])
def test_padding_is_bottom_right_reflect_like_numpy(h, w):
    x = torch.arange(2 * 3 * h * w, dtype=torch.float64).reshape(2, 3, h, w)
    padded = pad_to_multiple(x)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    ph, pw = padded.shape[-2] - h, padded.shape[-1] - w
    mode = "reflect" if min(h, w) > 1 else "edge"
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (0, ph), (0, pw)), mode=mode)
    np.testing.assert_array_equal(padded.numpy(), expected)


def test_restore_handles_tiny_images():
    model = tiny_model()
    lq = torch.rand(1, 3, 7, 9, dtype=torch.float64)
    assert sipl_fast.restore(model, lq).shape == lq.shape


@pytest.mark.parametrize("iterations", [-1, 1.5, True, "2"])
def test_restore_rejects_bad_iterations(iterations):
    with pytest.raises(ValueError, match="iterations"):
        sipl_fast.restore(tiny_model(), torch.rand(1, 3, 16, 16, dtype=torch.float64), iterations=iterations)


@pytest.mark.parametrize("bad", [torch.rand(3, 16, 16), torch.rand(1, 1, 16, 16), torch.zeros(1, 3, 0, 16),
                                 torch.zeros(1, 3, 16, 16, dtype=torch.uint8)])
def test_restore_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="expected"):
        sipl_fast.restore(tiny_model(dtype=torch.float32), bad)


def test_restore_says_when_the_image_and_the_model_differ_in_dtype():
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(ValueError, match="float64 on cpu, the model's parameters torch.float32"):
        sipl_fast.restore(model, torch.rand(1, 3, 16, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed
        assert sipl_fast.restore(model, torch.rand(1, 3, 16, 16, dtype=torch.bfloat16), 0).shape == (1, 3, 16, 16)


def test_restore_does_not_track_gradients():
    model = tiny_model(dtype=torch.float32)
    out = sipl_fast.restore(model, torch.rand(1, 3, 16, 16, requires_grad=True))
    assert not out.requires_grad


@pytest.mark.parametrize("proxy_fusion", [True, False])
def test_training_step_reduces_the_loss(proxy_fusion):
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float32, proxy_fusion=proxy_fusion)
    gt = torch.rand(2, 3, 16, 16)
    lq = (gt + 0.2 * torch.randn_like(gt)).clamp(0, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = [float(sipl_fast.sipl_training_step(model, lq, gt, opt)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_training_step_uses_privileged_features_from_the_ground_truth():
    """The loss equals loss_fn(net(lq, privileged=encode(net(gt))), gt) before the update."""
    model = tiny_model(dtype=torch.float64)
    gt = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    lq = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = F.mse_loss(model(lq, privileged=model.encode(model(gt))), gt)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = sipl_fast.sipl_training_step(model, lq, gt, opt, loss_fn=F.mse_loss)
    torch.testing.assert_close(loss, expected)
    assert all(p.grad is not None for p in model.p1_cross.parameters())


def test_training_step_rejects_mismatched_pairs():
    model = tiny_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="differ"):
        sipl_fast.sipl_training_step(model, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 24), opt)
