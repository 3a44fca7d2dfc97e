"""The Triton autotuners, checked without a GPU: each keys on arguments its kernel has (a wrong
name fails only on a GPU, at the first tuned launch)."""
import pytest

pytest.importorskip("triton")

import sipl_fast.ops  # noqa: F401,E402 - makes every autotuner
from sipl_fast.ops import _triton  # noqa: E402


def test_every_autotuner_keys_on_its_kernels_arguments():
    assert {t.base_fn.__name__ for t in _triton._tuners} >= {"_fwd_kernel", "_conv1x1_kernel"}
    for tuner in _triton._tuners:
        missing = set(tuner.keys) - set(tuner.arg_names)
        assert not missing, (tuner.base_fn.__name__, missing)


def test_launches_run_on_the_gpu_of_their_tensors(monkeypatch):
    """Triton launches on the current device: a launch (and measuring) makes its tensors' GPU
    current first, so that tensors on one GPU run while another is current. Checked on fake CUDA
    tensors on cuda:0 while "cuda:1" is current, with torch.cuda.device recorded."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sipl_fast.ops import _backend

    current = ["cuda:1"]

    @contextlib.contextmanager
    def device(d):
        saved, current[0] = current[0], str(d)
        yield
        current[0] = saved

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(current[0])

        def warmup(self, *args, **kwargs):
            seen.append(("compile", current[0]))

    with FakeTensorMode():
        x = torch.empty(3, device="cuda:0")
    _triton.launch(Kernel(), (1,), 7, x, BLOCK=4)
    with _triton.compiling_only():
        _triton.launch(Kernel(), (1,), x)
    _triton.launch(Kernel(), (1,), torch.empty(3))  # CPU tensors (the interpreter): no device made current
    assert seen == ["cuda:0", ("compile", "cuda:0"), "cuda:1"] and current == ["cuda:1"]
    # measuring too (timed by the first tensor's device, a CPU one here: wall time, no CUDA events)
    assert _backend._seconds(lambda *a: seen.append(current[0]), (torch.empty(2), x), {}, False) >= 0
    assert seen[-3:] == ["cuda:0"] * 3
