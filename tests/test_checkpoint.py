"""Checkpoints: every format round-trips, configurations are inferred, errors are clear."""
import os

import pytest
import torch
from safetensors.torch import save_file

import sipl_fast
from sipl_fast.checkpoint import PROMPTIR_UNUSED, infer_config

from conftest import tiny_model

X = torch.rand(2, 3, 16, 24, dtype=torch.float32)


def relevant(config):
    """The configuration fields that shape a model (dictionary sizes only with Proxy Fusion)."""
    fields = config.to_dict()
    if not config.proxy_fusion:
        fields.pop("dictionary_sizes")
    return fields


def assert_same_model(loaded, model):
    assert relevant(loaded.config) == relevant(model.config)
    assert not loaded.training
    for (k, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(model.state_dict().items())):
        assert k == k2 and torch.equal(a, b.to(a.dtype))
    with torch.no_grad():
        torch.testing.assert_close(sipl_fast.restore(loaded, X, 1), sipl_fast.restore(model, X, 1), rtol=0, atol=0)


@pytest.fixture
def model():
    return tiny_model(dtype=torch.float32)


def sd_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, model, suffix):
    path = sipl_fast.save_model(model, tmp_path / f"m{suffix}")
    assert_same_model(sipl_fast.load_model(path), model)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private one
    if suffix != ".safetensors":
        assert set(torch.load(path, weights_only=True)) == {"params"}


def test_basicsr_prefers_params_ema_and_strips_module(tmp_path, model):
    other = tiny_model(seed=1, dtype=torch.float32)
    ckpt = {"params": sd_of(other), "params_ema": {f"module.{k}": v for k, v in sd_of(model).items()}}
    torch.save(ckpt, tmp_path / "net_g_latest.pth")
    assert_same_model(sipl_fast.load_model(tmp_path / "net_g_latest.pth"), model)
    torch.save({"params": sd_of(model)}, tmp_path / "params_only.pth")
    assert_same_model(sipl_fast.load_model(tmp_path / "params_only.pth"), model)


def test_promptir_lightning_checkpoint_with_its_unused_tensors(tmp_path):
    model = tiny_model(dtype=torch.float32, proxy_fusion=False)
    sd = {f"net.{k}": v for k, v in sd_of(model).items()}
    for name in PROMPTIR_UNUSED:
        sd[f"net.{name}.weight"] = torch.randn(4, 4, 1, 1)
    torch.save({"epoch": 3, "global_step": 10, "state_dict": sd, "optimizer_states": []}, tmp_path / "model.ckpt")
    loaded = sipl_fast.load_model(tmp_path / "model.ckpt")
    assert not loaded.config.proxy_fusion
    assert_same_model(loaded, model)


def test_bare_state_dicts_in_files_and_in_memory(tmp_path, model):
    torch.save(sd_of(model), tmp_path / "bare.pth")
    assert_same_model(sipl_fast.load_model(tmp_path / "bare.pth"), model)
    save_file(sd_of(model), str(tmp_path / "bare.safetensors"))
    assert_same_model(sipl_fast.load_model(tmp_path / "bare.safetensors"), model)
    assert_same_model(sipl_fast.load_model(sd_of(model)), model)
    assert_same_model(sipl_fast.load_model({"params_ema": sd_of(model)}), model)


@pytest.mark.parametrize("overrides", [
    {},
    {"num_blocks": (2, 1, 3, 1), "num_refinement_blocks": 2, "heads": (2, 4, 2, 8)},
    {"dim": 16, "bias": True, "prompt_len": 2, "prompt_dims": (8, 6, 20), "prompt_sizes": (5, 6, 7)},
    {"ffn_expansion_factor": 2.0, "dictionary_sizes": (3, 5, 1), "inp_channels": 1, "out_channels": 1},
    {"proxy_fusion": False, "num_refinement_blocks": 0},
])
def test_config_is_inferred_from_shapes(overrides):
    model = tiny_model(dtype=torch.float32, **overrides)
    assert relevant(infer_config(model.state_dict())) == relevant(model.config)


def test_published_default_config_is_inferred():
    config = sipl_fast.SIPLConfig()
    model = sipl_fast.SIPL(config)
    assert infer_config(model.state_dict()) == config


def test_load_model_moves_to_device(model):
    loaded = sipl_fast.load_model(model.state_dict(), device="cpu")
    assert next(loaded.parameters()).device.type == "cpu"


# --- error paths ---------------------------------------------------------
def test_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        sipl_fast.load_model(tmp_path / "missing.pth")


@pytest.mark.parametrize("name,content", [("junk.pth", b"this is not a checkpoint"), ("junk.safetensors", b"\x00" * 20)])
def test_garbage_files_are_not_checkpoints(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match="not a"):
        sipl_fast.load_model(tmp_path / name)


class Pickled:
    """A class outside the safe unpickler's list."""


def test_only_pickled_objects_get_the_trust_hint(tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(ValueError, match="Unsupported operand") as corrupt:
        sipl_fast.load_model(tmp_path / "corrupt.pth")
    assert "weights_only" not in str(corrupt.value)  # trusting a corrupt file would not help
    torch.save({"params": Pickled()}, tmp_path / "objects.pth")
    with pytest.raises(ValueError, match="Unsupported global.*pass weights_only=False"):
        sipl_fast.load_model(tmp_path / "objects.pth")


def test_a_pickled_non_mapping_is_not_a_checkpoint(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a checkpoint"):
        sipl_fast.load_model(tmp_path / "list.pth")


def test_unknown_format(tmp_path):
    torch.save({"weights": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        sipl_fast.load_model(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        sipl_fast.load_model({"params": [1, 2, 3]})


def test_missing_and_unexpected_keys_are_listed(model):
    sd = sd_of(model)
    del sd["cross_p2.attn.q.weight"]
    sd["cross_p2.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        sipl_fast.load_model(sd)
    message = str(err.value)
    assert "missing keys (1): cross_p2.attn.q.weight" in message
    assert "unexpected keys (1): cross_p2.attn.extra.weight" in message


def test_shape_mismatches_are_listed(model):
    sd = sd_of(model)
    sd["cross_p1.attn.q_dwconv.weight"] = torch.zeros(5, 1, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): cross_p1.attn.q_dwconv.weight: checkpoint \(5, 1, 3, 3\)"):
        sipl_fast.load_model(sd)


def test_inconsistent_heads_are_a_clear_error(model):
    sd = sd_of(model)
    sd["encoder_level1.0.attn.temperature"] = torch.ones(3, 1, 1)  # 8 channels do not split into 3 heads
    with pytest.raises(ValueError, match="inconsistent configuration"):
        sipl_fast.load_model(sd)


def test_save_refuses_unknown_suffix(tmp_path, model):
    with pytest.raises(ValueError, match=".safetensors, .pth or .pt"):
        sipl_fast.save_model(model, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []

