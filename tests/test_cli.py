"""The sipl-fast console script, driven in a subprocess on real image files made here."""
import argparse
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
from sipl_fast import cli
from sipl_fast.images import read_image
from sipl_fast.metrics import psnr_ssim

from conftest import tiny_model

BIN = Path(sys.executable).parent


def console(*args, cwd=None, env=None, script="sipl-fast"):
    exe = shutil.which(script, path=str(BIN)) or shutil.which(script)
    assert exe, f"{script} is not installed (pip install -e .)"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    sipl_fast.save_model(tiny_model(dtype=torch.float32), path)
    return path


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "small.png"), rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "deep.png"), rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16))
    cv2.imwrite(str(folder / "alpha.png"), rng.integers(0, 256, (17, 19, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 256, (33, 21), dtype=np.uint8))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def api_restore(weights, path, iterations=2):
    """What the Python API gives for one file: float (H, W, C) in the file's channel count. On one
    thread, as ``console`` runs the CLI: CPU convolutions split over threads may round differently."""
    model = sipl_fast.load_model(weights)
    image = read_image(path)
    x = torch.from_numpy(image.pixels).permute(2, 0, 1)[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = sipl_fast.restore(model, x.expand(1, 3, -1, -1) if x.shape[1] == 1 else x, iterations)
    finally:
        torch.set_num_threads(threads)
    y = y.mean(1, keepdim=True) if x.shape[1] == 1 else y
    return y[0].permute(1, 2, 0).numpy(), image


def quantise(pixels, dtype):
    scale = np.iinfo(dtype).max
    return np.round(np.clip(pixels, 0, 1) * scale).astype(dtype)


def test_restore_a_folder(weights, photos, tmp_path):
    out = tmp_path / "out"
    result = console("restore", "-i", photos, "-o", out, "--weights", weights, "--device", "cpu", "--engine", "reference")
    assert result.returncode == 1, result.stderr  # the corrupt file failed
    assert "restored 4, skipped 0, failed 1" in result.stdout and "reference engine, fp32 on cpu" in result.stdout
    assert "corrupt.png: not a readable image" in result.stderr
    assert "left out 1 file(s) that are not images" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["alpha_sipl.png", "deep_sipl.png", "gray_sipl.png", "small_sipl.png"]

    for name, dtype in [("small", np.uint8), ("deep", np.uint16), ("alpha", np.uint8), ("gray", np.uint8)]:
        expected, source = api_restore(weights, photos / f"{name}.png")
        written = cv2.imread(str(out / f"{name}_sipl.png"), cv2.IMREAD_UNCHANGED)
        assert written.dtype == dtype, name
        original = cv2.imread(str(photos / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert written.shape == original.shape, name  # size, channels and alpha kept
        if written.ndim == 3:
            rgb = written[..., 2::-1] if written.shape[2] == 4 else written[..., ::-1]
        else:
            rgb = written[..., None]
        np.testing.assert_array_equal(rgb, quantise(expected, dtype), err_msg=name)
        if name == "alpha":
            np.testing.assert_array_equal(written[..., 3], original[..., 3])


def test_single_file_skip_existing_and_formats(weights, photos, tmp_path):
    out = tmp_path / "out"
    first = console("restore", "-i", photos / "small.png", "-o", out, "--weights", weights, "--ext", "jpg", "--iterations", "0")
    assert first.returncode == 0, first.stderr
    assert (out / "small_sipl.jpg").is_file()
    again = console("restore", "-i", photos / "small.png", "-o", out, "--weights", weights, "--ext", "jpg", "--skip-existing")
    assert again.returncode == 0 and "restored 0, skipped 1, failed 0" in again.stdout


def test_never_writes_over_an_input(weights, photos):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    result = console("restore", "-i", photos, "-o", photos, "--weights", weights, "--suffix", "")
    assert result.returncode == 1
    assert "would overwrite an input" in result.stderr
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_tiled_restore_runs_and_stays_close(weights, photos, tmp_path):
    result = console("restore", "-i", photos / "deep.png", "-o", tmp_path, "--weights", weights, "--tile", "16", "--tile-overlap", "4")
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(tmp_path / "deep_sipl.png"), cv2.IMREAD_UNCHANGED).shape == (20, 30, 3)


@pytest.mark.parametrize("args,message", [
    (["restore", "-i", "missing", "-o", "x", "--weights", "{w}"], "-i missing: no such file or folder"),
    (["restore", "-i", ".", "-o", "x", "--weights", "nothing.pth"], "nothing.pth: no such checkpoint file"),
    (["restore", "-i", ".", "-o", "x", "--weights", "{w}", "--device", "cuda:7"] if not torch.cuda.is_available()
     else ["info", "nothing.pth"], "not available" if not torch.cuda.is_available() else "no such checkpoint"),
    (["eval", "--weights", "{w}", "--lq", ".", "--gt", ".", "--iterations", "x"], "--iterations 'x'"),
])
def test_errors_are_one_line(weights, tmp_path, args, message):
    result = console(*[a.replace("{w}", str(weights)) for a in args], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    debug = console(*[a.replace("{w}", str(weights)) for a in args], "--debug", cwd=tmp_path)
    assert "Traceback" in debug.stderr


def test_eval_scores_each_iteration(weights, tmp_path):
    rng = np.random.default_rng(1)
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    lq.mkdir(), gt.mkdir()
    for name in ("a", "b"):
        clean = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        cv2.imwrite(str(gt / f"{name}.png"), clean)
        cv2.imwrite(str(lq / f"{name}.png"), np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8))
    table = tmp_path / "scores.csv"
    result = console("eval", "--weights", weights, "--lq", lq, "--gt", gt, "--iterations", "0,1", "--csv", table)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == ["a", "b", "average"]
    for row in rows[:2]:
        for k in (0, 1):
            out, _ = api_restore(weights, lq / f"{row['image']}.png", iterations=k)
            psnr, ssim = psnr_ssim(out, read_image(gt / f"{row['image']}.png").pixels, "promptir")
            assert float(row[f"psnr@{k}"]) == pytest.approx(psnr, abs=1e-9)
            assert float(row[f"ssim@{k}"]) == pytest.approx(ssim, abs=1e-9)
    assert float(rows[2]["psnr@1"]) == pytest.approx((float(rows[0]["psnr@1"]) + float(rows[1]["psnr@1"])) / 2)
    assert "average" in result.stdout and "psnr@0" in result.stdout

    (gt / "c.png").write_bytes((gt / "a.png").read_bytes())
    unmatched = console("eval", "--weights", weights, "--lq", lq, "--gt", gt)
    assert unmatched.returncode == 2 and "unmatched images: c.png (no match in" in unmatched.stderr


def test_info_describes_a_checkpoint(weights, tmp_path):
    result = console("info", weights)
    assert result.returncode == 0, result.stderr
    n = sum(v.numel() for v in sipl_fast.load_model(weights).state_dict().values())
    assert f"parameters:    {n:,}" in result.stdout and "SIPL (PromptIR + Proxy Fusion)" in result.stdout
    plain = tmp_path / "promptir.pth"
    torch.save({"state_dict": {f"net.{k}": v for k, v in tiny_model(proxy_fusion=False).state_dict().items()}}, plain)
    result = console("info", plain)
    assert "plain PromptIR" in result.stdout and "format:        lightning" in result.stdout


def test_python_dash_m_and_help():
    result = subprocess.run([sys.executable, "-m", "sipl_fast", "restore", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--tile-overlap" in result.stdout and "example:" in result.stdout


@pytest.mark.parametrize("option,value", [("--tile", "-5"), ("--tile-overlap", "x")])
def test_bad_tile_options_are_usage_errors(option, value):
    from sipl_fast import cli

    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["restore", "-i", "a.png", "-o", "out", "--weights", "w.pth", option, value])
    assert stop.value.code == 2


def test_bench_quick_prints_its_tables(tmp_path, capsys):
    """Two of the scripts (test_benchmarks runs each one); a name that is no script is refused."""
    result = console("bench", "--quick", "--only", "layer_norm2d,backbone.py",
                     env={"SIPL_FAST_BENCH_RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| shape |" in result.stdout and result.stdout.count("== ") == 2
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["backbone_cpu_quick.json", "layer_norm2d_cpu_quick.json"]
    assert cli.run(["bench", "--only", "layer_norm2d,nope"]) == 2
    assert "expected a comma list of" in capsys.readouterr().err


def test_torchrun_shards_the_inputs_and_matches_one_process(weights, photos, tmp_path):
    (photos / "corrupt.png").unlink()
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = console("restore", "-i", photos, "-o", single, "--weights", weights, "--device", "cpu")
    assert one.returncode == 0, one.stderr
    two = console("--standalone", "--nproc-per-node", "2", "-m", "sipl_fast", "restore", "-i", photos, "-o", multi,
                  "--weights", weights, "--device", "cpu", script="torchrun")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "restored 4, skipped 0, failed 0" in two.stdout and "on 2 processes" in two.stdout
    assert two.stdout.count("restored 4") == 1  # one summary, from rank 0
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    for p in single.iterdir():
        assert (multi / p.name).read_bytes() == p.read_bytes(), p.name


def test_fast_engine_writes_what_the_reference_writes(weights, photos, tmp_path):
    """On the default device; on a CPU the fast engine is the default (``--engine auto``)."""
    ref, fast = tmp_path / "ref", tmp_path / "fast"
    gpu = torch.cuda.is_available()
    for engine, out, extra in (("reference", ref, ["--engine", "reference"]), ("fast", fast, ["--engine", "fast"] if gpu else [])):
        proc = console("restore", "-i", photos, "-o", out, "--weights", weights, "--precision", "fp32", *extra)
        assert proc.returncode == 1 and "corrupt.png" in proc.stderr  # the corrupt file fails, the others go on
        assert f"{engine} engine, fp32 on {'cuda' if gpu else 'cpu'}" in proc.stdout
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in fast.iterdir()) and len(names) == 4
    for name in names:  # 8- and 16-bit files: at most one level apart (rounding of values ~1e-6 apart)
        a, b = read_image(ref / name), read_image(fast / name)
        assert np.abs(a.pixels - b.pixels).max() <= 1.0 / (2 ** a.bit_depth - 1) + 1e-6


@pytest.mark.parametrize("memory,error", [
    ("GPU", torch.cuda.OutOfMemoryError("CUDA out of memory")),
    ("CPU", RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                         "memory: you tried to allocate 52613349376 bytes. Error code 12 (Cannot allocate memory)")),
])
def test_out_of_memory_retries_in_tiles(memory, error, monkeypatch):
    from sipl_fast import cli

    def refinements_that_fit_256(model, x, iterations):
        if max(x.shape[-2:]) > 256:
            raise error
        for k in range(iterations + 1):
            yield x * (k + 1) / 8

    monkeypatch.setattr(cli, "refinements", refinements_that_fit_256)
    messages = []
    pixels = np.random.default_rng(0).random((300, 280, 3), dtype=np.float32)
    args = argparse.Namespace(precision="fp32", tile=0, tile_overlap=32)
    out0, out2 = cli.restore_pixels(tiny_model(dtype=torch.float32), pixels, [0, 2], args, log=messages.append)
    np.testing.assert_allclose(out0, pixels / 8, atol=1e-6)
    np.testing.assert_allclose(out2, pixels * 3 / 8, atol=1e-6)
    assert messages == [f"out of {memory} memory at 280x300: retrying in 256-pixel tiles"]
    assert cli.failure_message("a.png", error, debug=False) == f"a.png: out of {memory} memory even in tiles"


def test_other_runtime_errors_are_not_retried_in_tiles(monkeypatch):
    from sipl_fast import cli

    def failing(model, x, iterations):
        raise RuntimeError("a bug, not memory")
        yield

    monkeypatch.setattr(cli, "refinements", failing)
    messages = []
    args = argparse.Namespace(precision="fp32", tile=0, tile_overlap=32)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.restore_pixels(tiny_model(dtype=torch.float32), np.zeros((300, 280, 3), np.float32), [1], args,
                           log=messages.append)
    assert messages == []
