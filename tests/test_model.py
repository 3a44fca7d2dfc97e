"""The reference model against SPEC.md: published names and shapes, and an independent
functional re-statement of the network computed from the state dict alone."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sipl_fast import SIPL, SIPLConfig

from conftest import tiny_model

KEYS_TSV = Path(__file__).parent / "data" / "published_state_dict_keys.tsv"


def published_shapes():
    rows = [line.rstrip("\n").split("\t") for line in KEYS_TSV.read_text().splitlines() if not line.startswith("#")]
    return {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape, _ in rows}


def test_default_config_has_the_published_names_and_shapes():
    sd = SIPL().state_dict()
    published = published_shapes()
    assert len(published) == 635
    assert sorted(sd) == sorted(published)
    assert {k: tuple(v.shape) for k, v in sd.items()} == published
    assert sum(v.numel() for v in sd.values()) == 40_028_562


# --- an independent statement of SPEC.md, straight from the state dict -------------
def spec_forward(sd, cfg: SIPLConfig, x, privileged=None, encode_only=False):
    def ln(t, p):  # LayerNorm2d via F.layer_norm over a channels-last view
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), sd[p + ".body.weight"], sd[p + ".body.bias"], 1e-5).permute(0, 3, 1, 2)

    def conv(t, p, groups=1):
        w = sd[p + ".weight"]
        return F.conv2d(t, w, sd.get(p + ".bias"), padding=w.shape[-1] // 2, groups=groups)

    def dw(t, p):
        return conv(t, p, groups=t.shape[1])

    def heads_of(p):
        return sd[p + ".attn.temperature"].shape[0]

    def gdfn(t, p, dual=False):
        a, b = dw(conv(t, p + ".project_in"), p + ".dwconv").chunk(2, 1)
        return conv(F.gelu(b) * a + F.gelu(a) * b if dual else F.gelu(a) * b, p + ".project_out")

    def mdta(t, p):
        B, C, H, W = t.shape
        n = heads_of(p)
        q, k, v = dw(conv(t, p + ".attn.qkv"), p + ".attn.qkv_dwconv").reshape(B, 3, n, C // n, H * W).unbind(1)
        q, k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12), k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a = torch.softmax(torch.einsum("bhcn,bhdn->bhcd", q, k) * sd[p + ".attn.temperature"], -1)
        return conv(torch.einsum("bhcd,bhdn->bhcn", a, v).reshape(B, C, H, W), p + ".attn.project_out")

    def block(t, p):
        t = t + mdta(ln(t, p + ".norm1"), p)
        return t + gdfn(ln(t, p + ".norm2"), p + ".ffn")

    def blocks(t, name, n):
        for i in range(n):
            t = block(t, f"{name}.{i}")
        return t

    def cross(xq, xkv, p):
        a, b = ln(xq, p + ".norm11"), ln(xkv, p + ".norm12")
        B, C, H, W = a.shape
        n = heads_of(p)
        q = dw(conv(a, p + ".attn.q"), p + ".attn.q_dwconv").reshape(B, n, C // n, H * W).transpose(-1, -2)
        k, v = dw(conv(b, p + ".attn.kv"), p + ".attn.kv_dwconv").reshape(B, 2, n, C // n, -1).transpose(-1, -2).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) * sd[p + ".attn.temperature"], -1) @ v
        y = a + conv(att.transpose(-1, -2).reshape(B, C, H, W), p + ".attn.project_out")
        return y + gdfn(ln(y, p + ".norm2"), p + ".ffn", dual=True)

    def prompt(t, i):
        w = torch.softmax(F.linear(t.mean((2, 3)), sd[f"prompt{i}.linear_layer.weight"], sd[f"prompt{i}.linear_layer.bias"]), 1)
        pr = torch.einsum("bl,lcxy->bcxy", w, sd[f"prompt{i}.prompt_param"][0])
        pr = F.interpolate(pr, t.shape[-2:], mode="bilinear", align_corners=False)
        t = block(torch.cat([t, conv(pr, f"prompt{i}.conv3x3")], 1), f"noise_level{i}")
        return conv(t, f"reduce_noise_level{i}")

    def inject(t, i):
        E = sd[f"privileged_dictionary{i}"].expand(t.shape[0], -1, -1, -1)
        if privileged is not None:
            E = cross(E, privileged[i - 1], f"p{i}_cross")
        return cross(t, E, f"cross_p{i}")

    nb = cfg.num_blocks
    e1 = blocks(conv(x, "patch_embed.proj"), "encoder_level1", nb[0])
    e2 = blocks(F.pixel_unshuffle(conv(e1, "down1_2.body.0"), 2), "encoder_level2", nb[1])
    e3 = blocks(F.pixel_unshuffle(conv(e2, "down2_3.body.0"), 2), "encoder_level3", nb[2])
    lat = blocks(F.pixel_unshuffle(conv(e3, "down3_4.body.0"), 2), "latent", nb[3])
    if encode_only:
        return e2, e3, lat
    t = prompt(inject(lat, 3), 3)
    t = conv(torch.cat([F.pixel_shuffle(conv(t, "up4_3.body.0"), 2), e3], 1), "reduce_chan_level3")
    t = prompt(inject(blocks(t, "decoder_level3", nb[2]), 2), 2)
    t = conv(torch.cat([F.pixel_shuffle(conv(t, "up3_2.body.0"), 2), e2], 1), "reduce_chan_level2")
    t = prompt(inject(blocks(t, "decoder_level2", nb[1]), 1), 1)
    t = torch.cat([F.pixel_shuffle(conv(t, "up2_1.body.0"), 2), e1], 1)
    t = blocks(blocks(t, "decoder_level1", nb[0]), "refinement", cfg.num_refinement_blocks)
    return conv(t, "output") + x


@pytest.mark.parametrize("overrides", [{}, {"bias": True, "heads": (2, 2, 4, 2), "num_blocks": (2, 1, 2, 1)}])
def test_model_matches_the_spec_in_float64(overrides):
    model = tiny_model(**overrides)
    sd = model.state_dict()
    x = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    gt = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    with torch.no_grad():
        feats = model.encode(gt)
        ref_feats = spec_forward(sd, model.config, gt, encode_only=True)
        for a, b in zip(feats, ref_feats):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x), spec_forward(sd, model.config, x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x, privileged=feats), spec_forward(sd, model.config, x, feats), rtol=1e-10, atol=1e-10)
        # the privileged pass really differs from the dictionary-only pass
        assert (model(x, privileged=feats) - model(x)).abs().max() > 1e-3


def test_plain_promptir_has_no_proxy_fusion_keys_and_runs():
    model = tiny_model(proxy_fusion=False)
    keys = model.state_dict().keys()
    assert not any("dictionary" in k or "cross" in k for k in keys)
    x = torch.randn(1, 3, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).shape == x.shape
    with pytest.raises(ValueError, match="no Proxy Fusion"):
        model(x, privileged=model.encode(x))


@pytest.mark.parametrize("bad", [torch.randn(1, 4, 16, 16), torch.randn(3, 16, 16), torch.randn(1, 3, 12, 16),
                                 torch.zeros(1, 3, 16, 16, dtype=torch.int64)])
def test_bad_inputs_raise_value_error(tiny, bad):
    with pytest.raises(ValueError, match="expected|multiples of 8"):
        tiny(bad.double() if bad.is_floating_point() else bad)


def test_bad_privileged_features_raise_value_error(tiny):
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    feats = tiny.encode(x)
    with pytest.raises(ValueError, match="privileged features"):
        tiny(x, privileged=feats[:2])
    with pytest.raises(ValueError, match="privileged features"):
        tiny(x, privileged=(feats[1], feats[0], feats[2]))
    with pytest.raises(ValueError, match=r"privileged features.*\['NoneType', 'NoneType', 'NoneType'\]"):
        tiny(x, privileged=[None, None, None])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0), "dim must be >= 1"), (dict(dim=-8), "dim must be >= 1"),
    (dict(num_blocks=(1, -1, 1, 1)), "num_blocks must be >= 0"), (dict(dictionary_sizes=(4, 0, 2)), "dictionary_sizes"),
    (dict(ffn_expansion_factor=0), "ffn_expansion_factor"), (dict(prompt_len=0), "prompt_len"),
])
def test_config_rejects_sizes_below_one(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SIPLConfig(**kwargs)


def test_config_rejects_heads_that_do_not_divide_channels():
    with pytest.raises(ValueError, match="heads"):
        SIPLConfig(dim=8, heads=(3, 2, 2, 4))
    with pytest.raises(ValueError, match="needs 4 values"):
        SIPLConfig(num_blocks=(1, 1, 1))
