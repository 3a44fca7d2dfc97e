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
