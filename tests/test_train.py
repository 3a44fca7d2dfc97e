"""Training: deterministic data, exact resume, DDP = one process, checkpoints load, the bundled model."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import sipl_fast
from sipl_fast.data import HELD_OUT, TrainingData, bundled_image, clean_images, paired_images
from sipl_fast.degradations import DEGRADATIONS, degrade
from sipl_fast.train import TrainConfig, train

from conftest import TINY

SETTINGS = dict(model={k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}, crop=16, batch_size=4,
                iterations=6, warmup=2, save_every=3, val_every=100, val_samples=2, lr=1e-3,
                degradations=["noise25", "haze", "rain"])


def losses(run: Path):
    return [(int(r[0]), float(r[1])) for r in csv.reader((run / "loss.csv").open())]


def test_degradations_are_deterministic_bounded_and_visible():
    clean = torch.rand(2, 3, 24, 20) * 0.8 + 0.1
    for name in DEGRADATIONS:
        a = degrade(clean, name, torch.Generator().manual_seed(3))
        b = degrade(clean, name, torch.Generator().manual_seed(3))
        assert a.shape == clean.shape and torch.equal(a, b), name
        assert a.min() >= 0 and a.max() <= 1, name
        assert (a - clean).abs().mean() > 0.005, name
    assert degrade(clean, "lowlight", torch.Generator().manual_seed(0)).mean() < clean.mean()
    assert degrade(clean, "haze", torch.Generator().manual_seed(0)).mean() > clean.mean()
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(clean, "snow", torch.Generator())


def test_noise_has_the_named_sigma():
    clean = torch.full((1, 3, 128, 128), 0.5)
    noisy = degrade(clean, "noise25", torch.Generator().manual_seed(0))
    assert (noisy - clean).std().item() * 255 == pytest.approx(25, rel=0.03)


def test_batches_are_a_function_of_step_and_index():
    data = TrainingData(32, seed=1, clean=[bundled_image("camera"), bundled_image("rocket")], degradations=["noise25", "blur"])
    lq, gt = data.batch(5, [0, 1, 2])
    lq1, gt1 = data.batch(5, [1])
    assert torch.equal(lq[1:2], lq1) and torch.equal(gt[1:2], gt1)
    assert not torch.equal(data.batch(6, [1])[1], gt1)
    assert lq.shape == (3, 3, 32, 32)


def test_bundled_training_images_leave_out_the_held_out_photos():
    images = clean_images("skimage")
    held_out = [bundled_image(n) for n in HELD_OUT]
    for h in held_out:
        assert not any(t.shape == h.shape and torch.equal(t, h) for t in images)


def test_paired_folders(tmp_path):
    rng = np.random.default_rng(0)
    for d in ("lq", "gt"):
        (tmp_path / d).mkdir()
    for name in ("a", "b"):
        img = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "gt" / f"{name}.png"), img)
        cv2.imwrite(str(tmp_path / "lq" / f"{name}.png"), 255 - img)
    data = TrainingData(16, pairs=paired_images(str(tmp_path / "lq"), str(tmp_path / "gt")))
    lq, gt = data.batch(0, range(4))
    torch.testing.assert_close(lq, 1 - gt)  # aligned crops, flips and turns
    (tmp_path / "gt" / "c.png").write_bytes((tmp_path / "gt" / "a.png").read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        paired_images(str(tmp_path / "lq"), str(tmp_path / "gt"))


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    whole = TrainConfig.from_dict({**SETTINGS, "output": str(tmp_path / "whole")})
    last = train(whole, show_progress=False)
    parts = TrainConfig.from_dict({**SETTINGS, "output": str(tmp_path / "parts")})
    train(parts, stop_at=3, show_progress=False)
    assert [s for s, _ in losses(tmp_path / "parts")] == [1, 2, 3]
    train(parts, resume="auto", show_progress=False)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    a = torch.load(last, weights_only=True)
    b = torch.load(tmp_path / "parts" / "models" / "net_g_6.pth", weights_only=True)
    for key in ("params", "params_ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert losses(tmp_path / "whole")[-1][1] < losses(tmp_path / "whole")[0][1]
    # the checkpoint is a BasicSR file that load_model reads, preferring the EMA weights
    model = sipl_fast.load_model(last)
    assert torch.equal(model.state_dict()["output.weight"], a["params_ema"]["output.weight"])
    assert (tmp_path / "whole" / "val.csv").read_text().startswith("6,")


def test_unknown_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_torchrun_ddp_matches_one_process(tmp_path):
    exe = Path(sys.executable).parent
    sets = [f"--set=model.{k}={v}" for k, v in SETTINGS["model"].items()]
    args = ["train", "--iterations", "3", "--batch-size", "4", "--crop", "16", "--degradations", "noise25,haze",
            "--set=save_every=3", "--set=val_every=100", "--set=val_samples=2", "--set=warmup=1", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([shutil.which("sipl-fast", path=str(exe)) or "sipl-fast", *args, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([shutil.which("torchrun", path=str(exe)) or "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "sipl_fast",
                          *args, "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in l2], [v for _, v in l1], rtol=1e-5)
    a = torch.load(tmp_path / "one" / "models" / "net_g_3.pth", weights_only=True)["params"]
    b = torch.load(tmp_path / "two" / "models" / "net_g_3.pth", weights_only=True)["params"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_export_writes_half_precision_safetensors(tmp_path):
    src = tmp_path / "m.pth"
    model = sipl_fast.SIPL(sipl_fast.SIPLConfig(**SETTINGS["model"]))
    torch.save({"params": model.state_dict()}, src)
    exe = shutil.which("sipl-fast", path=str(Path(sys.executable).parent)) or "sipl-fast"
    result = subprocess.run([exe, "export", str(src), str(tmp_path / "m.safetensors"), "--half"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(tmp_path / "m.safetensors")).values()} == {torch.float16}
    assert sipl_fast.load_model(tmp_path / "m.safetensors").config == model.config


def test_bundled_default_model_really_restores():
    """The shipped model: at least 6 dB over the noisy input (sigma 25) on the held-out photos."""
    from sipl_fast.cli import demo_image
    from sipl_fast.metrics import psnr_ssim

    model = sipl_fast.load_default()
    gains = []
    for name in HELD_OUT:
        gt = demo_image(name, 256)
        lq = degrade(gt, "noise25", torch.Generator().manual_seed(0))
        out = sipl_fast.restore(model, lq, iterations=0)
        score = lambda t: psnr_ssim(t[0].permute(1, 2, 0).numpy(), gt[0].permute(1, 2, 0).numpy())[0]  # noqa: E731
        gains.append(score(out) - score(lq))
    assert np.mean(gains) >= 6.0, gains


def test_demo_runs_offline_and_writes_the_side_by_side(tmp_path):
    exe = shutil.which("sipl-fast", path=str(Path(sys.executable).parent)) or "sipl-fast"
    result = subprocess.run([exe, "demo", "--size", "96", "-o", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "astronaut  noise25" in result.stdout
    panel = cv2.imread(str(tmp_path / "sipl_demo_astronaut_noise25.png"))
    assert panel.shape == (96, 3 * 96, 3)
