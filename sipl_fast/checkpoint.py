"""Load and save SIPL / PromptIR checkpoints in the formats met in the field.

- BasicSR (published SIPL): ``{"params_ema": sd, "params": sd}`` (``params_ema``
  preferred) or ``{"params": sd}``, possibly with ``module.`` prefixes;
- PromptIR (Lightning): ``{"state_dict": {"net.<key>": ...}}``, plain PromptIR,
  whose six unused tensors (``chnl_reduce1/2/3``, ``reduce_noise_channel_1/2/3``)
  are accepted and ignored;
- a bare state dict, in ``.pth`` / ``.pt`` / ``.ckpt`` or ``.safetensors``.

The configuration is inferred from the tensor shapes; loading is strict.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ._files import atomic_path
from .model import SIPL, SIPLConfig

__all__ = ["load_default", "load_model", "save_model", "read_state_dict", "infer_config"]

StateDict = Dict[str, torch.Tensor]
ANCHOR = "patch_embed.proj.weight"
#: Modules of the published PromptIR class that its forward never uses.
PROMPTIR_UNUSED = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
                   "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")


def _read_file(path: Path, weights_only: bool):
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a safetensors checkpoint ({e})") from None
    try:
        # argparse.Namespace and paths are harmless and common in training checkpoints' extras
        with torch.serialization.safe_globals([argparse.Namespace, pathlib.PurePosixPath, pathlib.PosixPath]):
            return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as e:  # pickle, zip and torch errors all mean the same to a user
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        reason, hint = lines[0], ""
        marker = "WeightsUnpickler error:"  # the safe unpickler's own reason follows torch's preamble
        at = next((i for i, line in enumerate(lines) if marker in line), None)
        if at is not None:
            reason = lines[at].split(marker, 1)[1].strip() or (lines[at + 1] if at + 1 < len(lines) else reason)
            if reason.startswith("Unsupported global"):  # pickled objects: loadable if the file is trusted
                hint = "; if you trust this file, pass weights_only=False (the CLI: --trust)"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason}){hint}") from None


def _strip(sd: Mapping, prefix: str) -> Mapping:
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _unwrap(obj, where: str) -> Tuple[StateDict, str]:
    """The model's state dict inside a loaded checkpoint object, and the format's name."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: not a checkpoint (a {type(obj).__name__}, expected a mapping of tensors)")
    if "params_ema" in obj or "params" in obj:
        fmt, sd = "basicsr", obj["params_ema"] if "params_ema" in obj else obj["params"]
    elif "state_dict" in obj:
        fmt, sd = "lightning", obj["state_dict"]
    else:
        fmt, sd = "state_dict", obj
    if not isinstance(sd, Mapping):
        raise ValueError(f"{where}: unknown checkpoint format (its {fmt} entry is a {type(sd).__name__})")
    sd = _strip(sd, "module.")
    anchors = [k for k in sd if isinstance(k, str) and k.endswith(ANCHOR)]
    if ANCHOR not in sd and len(anchors) == 1:  # e.g. Lightning's "net." wrapper
        prefix = anchors[0][: -len(ANCHOR)]
        sd = _strip({k: v for k, v in sd.items() if k.startswith(prefix)}, prefix)
    if ANCHOR not in sd:
        keys = ", ".join(list(obj)[:6])
        raise ValueError(f"{where}: unknown checkpoint format: no '{ANCHOR}' found (top-level keys: {keys})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: unknown checkpoint format: non-tensor entries {bad[:5]}")
    return dict(sd), fmt


def read_state_dict(source, weights_only: bool = True) -> Tuple[StateDict, str]:
    """``(state_dict, format)`` from a path or a mapping; format is basicsr, lightning or state_dict."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _unwrap(_read_file(path, weights_only), str(path))
    return _unwrap(source, "state dict")


def _count(sd: Mapping, module: str) -> int:
    pattern = re.compile(rf"^{re.escape(module)}\.(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _heads(sd: Mapping, modules, default: int) -> int:
    for name in modules:
        t = sd.get(f"{name}.attn.temperature")
        if t is not None:
            return int(t.shape[0])
    return default


def _expansion(sd: Mapping, default: float) -> float:
    """An ffn_expansion_factor with ``int(C * f) == hidden`` for every GDFN in ``sd``."""
    pairs = [(v.shape[1], v.shape[0] // 2) for k, v in sd.items()
             if k.endswith("ffn.project_in.weight") and not re.match(r"^(p\d_cross|cross_p\d)\.", k)]
    if not pairs:
        return default
    lo = max(h / c for c, h in pairs)
    hi = min((h + 1) / c for c, h in pairs)
    candidates = [default, 2.66, 2.0, 4.0, 3.0, 1.0, lo, (lo + hi) / 2]
    for f in candidates:
        if all(int(c * f) == h for c, h in pairs):
            return f
    raise ValueError(f"checkpoint's feed-forward widths {pairs[:4]} fit no single ffn_expansion_factor")


def infer_config(sd: Mapping) -> SIPLConfig:
    """The SIPLConfig whose parameter names and shapes a state dict holds."""
    try:
        dim, inp = sd[ANCHOR].shape[:2]
        out = sd["output.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"state dict lacks {e.args[0]!r}: not a SIPL/PromptIR model") from None
    base = SIPLConfig()
    num_blocks = tuple(_count(sd, m) for m in ("encoder_level1", "encoder_level2", "encoder_level3", "latent"))
    heads = (
        _heads(sd, ["encoder_level1.0", "decoder_level1.0", "refinement.0", "cross_p1", "p1_cross"], base.heads[0]),
        _heads(sd, ["encoder_level2.0", "decoder_level2.0", "cross_p2", "p2_cross"], base.heads[1]),
        _heads(sd, ["encoder_level3.0", "decoder_level3.0", "noise_level3", "cross_p3"], base.heads[2]),
        _heads(sd, ["latent.0"], base.heads[3]),
    )
    prompt_dims = []
    for i, width in ((1, 2 * dim), (2, 4 * dim), (3, 8 * dim)):
        norm = sd.get(f"noise_level{i}.norm1.body.weight")
        prompt_dims.append(norm.shape[0] - width if norm is not None else base.prompt_dims[i - 1])
    prompt_len, prompt_sizes = base.prompt_len, base.prompt_sizes
    if "prompt1.prompt_param" in sd:
        prompt_len = sd["prompt1.prompt_param"].shape[1]
        prompt_sizes = tuple(sd[f"prompt{i}.prompt_param"].shape[-1] for i in (1, 2, 3) if f"prompt{i}.prompt_param" in sd)
    proxy_fusion = "privileged_dictionary1" in sd
    dictionary_sizes = base.dictionary_sizes
    if proxy_fusion:
        dictionary_sizes = tuple(sd[f"privileged_dictionary{i}"].shape[-1] for i in (1, 2, 3) if f"privileged_dictionary{i}" in sd)
    try:
        return SIPLConfig(
            inp_channels=inp, out_channels=out, dim=dim, num_blocks=num_blocks,
            num_refinement_blocks=_count(sd, "refinement"), heads=heads,
            ffn_expansion_factor=_expansion(sd, base.ffn_expansion_factor), bias="output.bias" in sd,
            prompt_len=prompt_len, prompt_dims=tuple(prompt_dims), prompt_sizes=prompt_sizes,
            proxy_fusion=proxy_fusion, dictionary_sizes=dictionary_sizes,
        )
    except ValueError as e:
        raise ValueError(f"checkpoint shapes give an inconsistent configuration: {e}") from None


def _drop_promptir_unused(sd: StateDict) -> StateDict:
    unused = {f"{m}.{p}" for m in PROMPTIR_UNUSED for p in ("weight", "bias")}
    return {k: v for k, v in sd.items() if k not in unused}


def _load_strict(model: SIPL, sd: StateDict) -> None:
    """``load_state_dict(strict=True)`` with one clear ValueError listing every disagreement."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{title} ({len(items)}): {', '.join(items[:10])}{more}")
        raise ValueError("checkpoint does not match the inferred configuration: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_model(source, device: Union[str, torch.device] = "cpu", weights_only: bool = True) -> SIPL:
    """A SIPL (or plain PromptIR) model in eval mode from a checkpoint path or state-dict mapping.

    ``weights_only=True`` refuses pickled code; pass False only for files you trust.
    """
    sd, _ = read_state_dict(source, weights_only=weights_only)
    sd = _drop_promptir_unused(sd)
    model = SIPL(infer_config(sd))
    _load_strict(model, sd)
    return model.to(device).eval()


#: The bundled default model, trained by ``sipl-fast train --config sipl_fast/weights/default.yaml``.
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default.safetensors"


def load_default(device: Union[str, torch.device] = "cpu") -> SIPL:
    """The small SIPL model that ships with the package (all-in-one: noise, haze, low light), in eval mode."""
    if not DEFAULT_WEIGHTS.is_file():
        raise ValueError(f"{DEFAULT_WEIGHTS}: the bundled default model is missing from this install")
    return load_model(DEFAULT_WEIGHTS, device=device)


def save_model(model: SIPL, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model``'s weights as ``.safetensors`` or as a BasicSR ``.pth``/``.pt`` (``{"params": sd}``).

    ``dtype`` (e.g. torch.float16) converts the stored tensors. The file is
    written to a temporary name first and renamed, so a failure never leaves a
    half-written checkpoint.
    """
    path = Path(path)
    sd = {k: v.detach().cpu().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: expected a .safetensors, .pth or .pt file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={"format": "pt", "sipl_fast_config": repr(model.config.to_dict())})
        else:
            torch.save({"params": sd}, tmp)
    return path
