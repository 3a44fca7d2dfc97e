"""Shared fixtures: tiny randomised SIPL models that run in milliseconds on a CPU.

Without a GPU, Triton kernels run in Triton's interpreter (set before any kernel
is defined); the ops only use it when a test asks for backend="triton".
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # under pytest-xdist (-n): each worker one share of the cores it may run on (as xdist's -n
    # auto counts them), not PyTorch's default of all of them each (oversubscribed once per worker)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
if os.environ.get("SIPL_FAST_TEST_FILL_EMPTY") == "1":
    # every new tensor filled with NaN (integers with their largest value), so a kernel that
    # reads memory nobody wrote (an output, a split's partial) gives NaN, not a small error
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True

from sipl_fast import SIPL, SIPLConfig

TINY = dict(
    dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 2, 4), prompt_len=3,
    prompt_dims=(4, 8, 12), prompt_sizes=(8, 4, 4), dictionary_sizes=(4, 4, 2),
)


def randomise(model: SIPL, seed: int = 0) -> SIPL:
    """Give every parameter a non-trivial value (the published init has zero dictionaries, unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("temperature"):
                p.copy_(0.5 + noise.abs())
            elif ".body." in name:
                p.add_(0.2 * noise)
            elif "dictionary" in name or "prompt_param" in name:
                p.copy_(noise)
    return model


def cosine_attention_f64(q, k, v, t):
    """softmax(t cos(q_i, k_j)) v over the last two axes in float64, with explicit norms, einsum
    and exp / sum: the independent formula both attention ops are tested against."""
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = torch.einsum("bhid,bhjd->bhij", qn, kn) * t.reshape(1, -1, 1, 1)
    w = (logits - logits.amax(-1, keepdim=True)).exp()
    return torch.einsum("bhij,bhjd->bhid", w / w.sum(-1, keepdim=True), v)


def heads_past_twice_naive(out, naive, ref) -> list:
    """(b, h, error, naive error) of each head of ``out`` (B, H, ...) whose error against ``ref``
    passes twice that of ``naive`` (the reference computed in the 16-bit dtype) in that head, or is NaN: the
    attention ops' 16-bit bound, taken head by head, so that a large temperature's error in one
    head cannot hide a wrong result in another."""
    ref = ref.double().cpu()
    err, bound = ((x.double().cpu() - ref).abs().flatten(2).amax(dim=2) for x in (out, naive))
    bad = (err > 2 * bound) | err.isnan()  # a NaN in out is never within a bound
    return [(b, h, err[b, h].item(), bound[b, h].item()) for b, h in bad.nonzero().tolist()]


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> SIPL:
    torch.manual_seed(seed)
    return randomise(SIPL(SIPLConfig(**{**TINY, **overrides})), seed).to(dtype).eval()


@pytest.fixture
def tiny():
    return tiny_model()


def tf32_flags():
    """(cuDNN's, cuBLAS's) TF32 switches."""
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_on():
    """Both TF32 switches on for the test, the caller's values back after it. Assigned and
    restored by hand: monkeypatch's undo deletes cuBLAS's switch (pytest >= 9.2 restores an
    instance's ``__dict__`` entry, which that module-like object does not have)."""
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def interpreter_tiles(monkeypatch, module, name: str, configs):
    """Each of ``configs`` (a GPU launcher's tiles) in turn as ``module.<name>``, the tile list
    that the interpreter's launches take, with the launchers' remembered choices cleared."""
    from sipl_fast.ops import _triton

    for cfg in configs:
        monkeypatch.setattr(module, name, [cfg])
        monkeypatch.setattr(_triton, "_fitting", {})
        yield cfg


def every_offered_tile(monkeypatch, call):
    """``call()``'s results, once per tile that its autotuned launches offer (on a GPU: what
    the autotuners choose among; in the interpreter: its one tile): the i-th call launches each
    kernel with its i-th tile (modulo its count), until the launch offering the most tiles has
    taken every one. Unlike the autotuner, each tile's output is then checked. A tile that does
    not fit the device (too much shared memory) gives way to the next that does, as the
    autotuner skips it."""
    from sipl_fast.ops import _triton

    fitting = _triton.launch_fitting
    state = {"i": 0, "most": 1}

    def one_tile(kernel, tuned, key, configs, grid, *args, **constants):
        state["most"] = max(state["most"], len(configs))
        i = state["i"] % len(configs)
        fitting(kernel, ("one tile", key, i), configs[i:] + configs[:i], grid, *args, **constants)

    monkeypatch.setattr(_triton, "launch_tuned", one_tile)
    results = []
    while state["i"] < state["most"]:
        results.append(call())
        state["i"] += 1
    return results
