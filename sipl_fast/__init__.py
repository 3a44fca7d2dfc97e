"""sipl_fast: fast, faithful SIPL / PromptIR image restoration in PyTorch.

- ``SIPL``, ``SIPLConfig``: the reference network (published parameter names);
- ``restore``, ``sipl_training_step``: the published inference and training loops;
- ``FastSIPL``: the fast inference engine (same results as ``restore``);
- ``load_model``, ``save_model``: checkpoints from the published code, PromptIR, safetensors;
- ``sipl_fast.ops``: the hot ops with reference, Triton and CUDA C++ backends.
"""
from . import ops
from .checkpoint import load_default, load_model, save_model
from .engine import FastSIPL
from .loops import refinements, restore, sipl_training_step
from .model import SIPL, SIPLConfig

__all__ = ["FastSIPL", "SIPL", "SIPLConfig", "load_default", "load_model", "ops", "refinements", "restore", "save_model",
           "sipl_training_step"]
__version__ = "0.1.0"
