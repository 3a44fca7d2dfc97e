"""The benchmark scripts run end to end: tiny shapes on the CPU, results in a temporary folder.

A smoke test only: speed is never asserted, only that a run writes rows that make sense.
"""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_bench(script: str, *args, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SIPL_FAST_BENCH_RESULTS": str(results), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("TRITON_INTERPRET", None)  # no timing of Triton's interpreter: its kernels say n/a on the CPU
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def load_script(name: str, monkeypatch):
    """Import a benchmark script as a module (it imports ``_common`` from its own folder)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cosine_attention_quick_cpu(tmp_path):
    result = run_bench("cosine_attention.py", "--quick", "--device", "cpu", "--variants", "naive,sdpa,torch,triton,cuda",
                       results=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "cosine_attention_cpu.json").read_text())
    assert data["environment"]["device"] and data["environment"]["torch"]
    assert (tmp_path / "cosine_attention_cpu.md").exists()
    rows = data["rows"]
    forward = [r for r in rows if r["pass"] == "forward"]
    backward = [r for r in rows if r["pass"] == "fwd+bwd"]
    assert len(forward) == 2 and len(backward) == 1  # on the CPU, fwd+bwd for the first quick shape only
    for row in forward + backward:
        assert isinstance(row["naive ms"], float) and row["naive TFLOP/s"] > 0, row
        assert isinstance(row["sdpa ms"], float) and row["sdpa backend"] == "default", row
        assert row["ref"] == "naive"
        for name in ("triton", "cuda"):  # a kernel is timed, or unavailable; never broken
            assert isinstance(row[f"{name} ms"], float) or row[f"{name} ms"] == "n/a", (name, row)
    for row in forward:
        assert row["sdpa max|diff|"] < 1e-4, row
        for name in ("torch", "triton", "cuda"):
            if isinstance(row.get(f"{name} ms"), float):
                assert row[f"{name} max|diff|"] < 1e-4, (name, row)
    for row in backward:
        assert row["sdpa grad err"] < 1e-4, row
        for name in ("torch", "triton"):
            if isinstance(row.get(f"{name} ms"), float):
                assert row[f"{name} grad err"] < 1e-4, (name, row)
    assert all(isinstance(r["torch ms"], float) for r in rows)  # the op's reference backend always runs


def test_cosine_attention_no_backward_one_shape(tmp_path, monkeypatch):
    bench = load_script("cosine_attention", monkeypatch)
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path)
    bench.main(["--shapes", "9x70x8x3", "--no-backward", "--device", "cpu", "--variants", "naive,sdpa"])
    rows = json.loads((tmp_path / "cosine_attention_cpu.json").read_text())["rows"]
    assert [(r["pass"], r["Nq"], r["Nk"], r["D"], r["H"]) for r in rows] == [("forward", 9, 70, 8, 3)]
    assert rows[0]["sdpa max|diff|"] < 1e-5 and "triton ms" not in rows[0]


def test_cosine_attention_shape_flag(monkeypatch):
    import torch

    bench = load_script("cosine_attention", monkeypatch)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert bench.parse_shapes(None, False, gpu) == bench.SHAPES and len(bench.SHAPES) == 7
    assert bench.parse_shapes(None, False, cpu) == bench.QUICK == bench.parse_shapes(None, True, gpu)
    assert bench.parse_shapes("0, 4,77x45x24x2", False, cpu) == [bench.SHAPES[0], bench.SHAPES[4], (77, 45, 24, 2)]
    assert bench.parse_shapes("all", False, cpu) == bench.SHAPES
    for bad in ("7", "64x64", "big"):
        with pytest.raises(Exception, match="--shapes"):
            bench.parse_shapes(bad, False, cpu)


def test_fast_sipl_smoke(tmp_path):
    """The end-to-end script on a tiny model and a tiny image: the reference and the engine."""
    proc = run_bench("fast_sipl.py", "--sizes", "16,16x24b2", "--variants", "eager-fp32,fast-fp32",
                     "--iterations", "1", results=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "fast_sipl_quick_cpu.json").read_text())["rows"]
    assert [r["size"] for r in rows] == ["1x16x16", "2x24x16"]
    assert all(isinstance(r["fast-fp32 ms"], float) and r["fast-fp32 speedup"] > 0 for r in rows)


def test_fast_sipl_profile_smoke(tmp_path):
    """The profile of one loop: the table of the busiest kernels (CPU ops here) per size and
    layout, and the totals."""
    proc = run_bench("fast_sipl_profile.py", "--sizes", "16", "--iterations", "1", "--rows", "5",
                     "--layouts", "nchw,channels-last", results=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "fast_sipl_profile_cpu.md").read_text()
    assert "## 1x16x16, nchw" in text and "## 1x16x16, channels-last" in text
    assert "measured backends" in text and "Self CPU" in text and "| 1x16x16 | channels-last |" in text


def test_op_variants_take_only_the_ops_own_backends(monkeypatch):
    """A backend available for some ops is no variant of an op without it (conv1x1 has no CUDA C++)."""
    import torch
    from sipl_fast import ops

    common = load_script("_common", monkeypatch)
    monkeypatch.setattr(ops, "available_backends", lambda: {n: {"available": True} for n in ("torch", "triton", "cuda")})
    args = (torch.randn(1, 4, 3, 3), torch.randn(2, 4))
    variants = common.op_variants("conv1x1", lambda *a: None, args, "all", torch.device("cpu"), None)
    assert "triton-bf16" in variants and "cuda-bf16" not in variants
    assert "cuda-bf16" in common.op_variants("layer_norm2d", lambda *a: None, args, "all", torch.device("cpu"), None)


@pytest.mark.parametrize("script", ["layer_norm2d", "conv1x1", "channel_attention", "depthwise_conv3x3",
                                    "gated_dwconv_gelu"])
def test_op_scripts_quick_cpu(script, tmp_path, monkeypatch):
    """Each one-op script: the quick shapes, eager fp32 and bf16, GB/s against the copy bandwidth."""
    proc = run_bench(f"{script}.py", "--variants", "eager-fp32,eager-bf16", results=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / f"{script}_cpu_quick.json").read_text())
    assert data["environment"]["copy bandwidth"].endswith("GB/s")
    assert len(data["rows"]) == len(load_script(script, monkeypatch).QUICK) >= 2
    for row in data["rows"]:
        assert row["op"] == script and row["eager-fp32 ms"] > 0 and 0 < row["eager-bf16 %bw"] < 1000


def test_backbone_quick_cpu(tmp_path):
    """One run: every op section and the block, with the automatic fast block (torch on a CPU)."""
    proc = run_bench("backbone.py", "--variants", "eager-fp32,auto-bf16", results=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "backbone_cpu_quick.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["layer_norm2d"] * 2 + ["conv1x1"] * 2 + ["channel_attention"] * 2 + [
        "gated_dwconv_gelu"] * 3 + ["transformer_block"]  # two gates and a GDFN tail
    block = rows[-1]
    assert block["eager-fp32 ms"] > 0 and block["auto-bf16 ms"] > 0 and "auto-bf16 vs eager-bf16" not in block
    assert (tmp_path / "backbone_cpu_quick.md").read_text().count("transformer_block") == 1


def test_fast_sipl_memory_estimate_meets_the_targets(monkeypatch):
    """Shapes only, no GPU: FastSIPL bf16 at 2048x2048 within 25% of the reference's fp32 peak
    (the issue's target, both estimated here)."""
    memory = load_script("fast_sipl_memory", monkeypatch)
    reference = memory.estimate("eager-fp32", (1, 2048, 2048)).peak
    assert reference > 30 * 2**30  # the published loop holds the 16 GiB score matrix twice
    assert memory.estimate("fast-bf16", (1, 2048, 2048)).peak <= 0.25 * reference


def test_live_bytes_count_what_ops_create(monkeypatch):
    """The peak counts the storages ops create while they live; views and in-place results of
    storages made before (the model's weights) are not the loop's."""
    import torch

    memory = load_script("fast_sipl_memory", monkeypatch)
    weight = torch.ones(1000)
    tracker = memory.LiveBytes()
    with tracker:
        weight.view(10, 100).t().mul_(2.0)
        y = weight * 2  # 4000 bytes
        del y
        z = torch.zeros(500) + 1  # 2000 bytes twice (zeros, then the sum)
    assert tracker.peak == 4000 and tracker.now == 2000 and z.numel() == 500


def test_a_cpu_engines_mdta_by_rows_lowers_its_peak(monkeypatch):
    """On a CPU FastSIPL runs MDTA by rows (``engine._attention_by_rows``): with bands small
    against the image, as a photo's are, the loop's peak of live tensor bytes falls by more
    than a fifth (0.71x here) against MDTA through ``ops.channel_attention`` on whole-image
    q, k, v."""
    import torch
    from conftest import tiny_model
    from sipl_fast import FastSIPL
    from sipl_fast.model import TransformerBlock

    memory = load_script("fast_sipl_memory", monkeypatch)
    monkeypatch.setattr(importlib.import_module("sipl_fast.engine"), "CPU_BAND_BYTES", 2**18)
    model, x = tiny_model(dtype=torch.float32), torch.rand(1, 3, 64, 64)
    peaks = []
    for by_rows in (True, False):
        fast = FastSIPL(model, dtype=torch.float32)
        for block in (m for m in fast.model.modules() if isinstance(m, TransformerBlock)):
            assert block.attention_by_rows
            block.attention_by_rows = by_rows
        tracker = memory.LiveBytes()
        with tracker:
            fast(x, 1)
        peaks.append(tracker.peak)
    assert peaks[0] <= 0.8 * peaks[1]


def test_a_dry_pass_compiles_real_kernels_for_sm90a(tmp_path):
    """``ops.compiling_only`` on its GPU path, on the CPU: real JIT functions (not the
    interpreter) compile for sm_90a in Triton's asynchronous mode, through the driver that
    ``fast_sipl_compile.py`` gives Triton, and nothing launches (a launch would fail there)."""
    code = f"""
import os, sys, torch
sys.path.insert(0, {str(BENCH)!r})
from fast_sipl_compile import compile_only_driver
compile_only_driver()
from sipl_fast import ops
os.environ["TRITON_INTERPRET"] = "1"  # the ops' checks take CPU tensors, and their launchers
torch.Tensor.is_cuda = property(lambda self: True)  # the GPU tiles
x = torch.randn(2, 48, 16, 24, dtype=torch.float16)
with ops.compiling_only():
    ops.layer_norm2d(x, torch.ones(48), torch.zeros(48), backend="triton")
    ops.conv1x1(x, torch.randn(96, 48, dtype=torch.float16), None, None, True, backend="triton")
    ops.gated_dwconv_gelu(x, torch.randn(48, 1, 3, 3), "gdfn", None, torch.randn(40, 24, dtype=torch.float16),
                          backend="triton")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # compiled for the GPU: one kernel for the norm, the autotuners' every tile for the others (the
    # conv1x1 with Cin <= 128: four tiles and two one-sweep ones; the gate with its projection:
    # three, and two with the stencil's tap loop unrolled)
    assert len(list(tmp_path.rglob("__grp__*.json"))) == 1 + 6 + 5


def test_kernel_resources_reads_ptxas_for_every_tile(tmp_path):
    """The resource report's recording launchers and ptxas reading, on conv1x1's fallback list
    and one plain launch (layer_norm2d), compiled for sm_90a on the CPU."""
    code = f"""
import json, os, sys, torch
sys.path.insert(0, {str(BENCH)!r})
from fast_sipl_compile import compile_only_driver
from kernel_resources import compile_tiles, record_launches
compile_only_driver()
from sipl_fast import ops
calls = record_launches()
os.environ["TRITON_INTERPRET"] = "1"
torch.Tensor.is_cuda = property(lambda self: True)
x = torch.randn(2, 48, 16, 24)
with ops.compiling_only():
    ops.layer_norm2d(x, torch.ones(48), torch.zeros(48), backend="triton")
    ops.conv1x1(x, torch.randn(96, 48), None, None, True, backend="triton")
print(json.dumps(compile_tiles(calls, "fp32")))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows][:1] == ["_layer_norm2d_fwd_kernel"] and len(rows) >= 3
    assert {r["kernel"] for r in rows} == {"_layer_norm2d_fwd_kernel", "_conv1x1_kernel"}
    assert [r["first"] for r in rows if r["kernel"] == "_conv1x1_kernel"][0]
    for r in rows:
        assert 16 <= r["registers"] <= 255 and r["spill B"] >= 0 and r["fits"] and r["shared KiB"] >= 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_sass_reads_every_entry(monkeypatch):
    """The CUDA resource report: every extern "C" entry of the gate compiled for sm_90a, its
    ptxas report and SASS read."""
    from sipl_fast.ops import _cuda

    rows = load_script("cuda_sass", monkeypatch).measure("sm_90a")
    gate = {r["entry"]: r for r in rows if r["source"] == "gated_dwconv_gelu.cu"}
    assert set(gate) == set(_cuda._GDG_KERNEL_NAMES)
    for r in gate.values():  # rows through registers, no shared memory; 2 blocks an SM
        assert 16 <= r["registers"] <= 128 and r["spill B"] <= 32 and r.get("shared B", 0) == 0
        assert r["instructions"] > r["FFMA"] >= 18 and r["STG"] >= 1 and r["LDG"] >= 18
        loops = [int(n) for n in r["inner loops"].split("/")]  # the row loops, not the trap's self-loop
        assert loops and min(loops) > 100 and max(loops) < r["instructions"]
    assert gate["gated_dwconv_gelu_nchw_bf16"]["instructions"] > 4096  # addresses past 0xffff read too
