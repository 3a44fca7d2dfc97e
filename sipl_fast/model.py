"""The reference SIPL network: PromptIR with Proxy Fusion, in pure PyTorch.

This module reads like SPEC.md, top to bottom, and uses the published parameter
names, so a state dict saved by the published code (``PromptIR_ProxyFusion``) or
by PromptIR loads with ``strict=True``. Every computation mirrors the published
operation order, so results agree with the published code to float rounding.

The published class hard-codes the channel counts of its default configuration;
here they are the default case of general rules over ``dim`` (and the prompt
channel counts), so small configurations can be built for tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import ops

__all__ = ["SIPLConfig", "SIPL", "PrivilegedFeatures"]

#: ``(out_enc_level2, out_enc_level3, latent)``: what ``SIPL.encode`` returns.
PrivilegedFeatures = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SIPLConfig:
    """Hyper-parameters; the defaults are the published model (40,028,562 values).

    ``proxy_fusion`` adds SIPL's privileged dictionaries and cross blocks
    (without it: plain PromptIR, ``PromptIR(decoder=True)``).
    ``prompt_dims``/``prompt_sizes``/``dictionary_sizes`` are per stage 1, 2, 3.
    """

    inp_channels: int = 3
    out_channels: int = 3
    dim: int = 48
    num_blocks: Tuple[int, int, int, int] = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    heads: Tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    prompt_len: int = 5
    prompt_dims: Tuple[int, int, int] = (64, 128, 320)
    prompt_sizes: Tuple[int, int, int] = (64, 32, 16)
    proxy_fusion: bool = True
    dictionary_sizes: Tuple[int, int, int] = (64, 32, 16)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "heads", "prompt_dims", "prompt_sizes", "dictionary_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        lengths = {"num_blocks": 4, "heads": 4, "prompt_dims": 3, "prompt_sizes": 3, "dictionary_sizes": 3}
        for name, n in lengths.items():
            if len(getattr(self, name)) != n:
                raise ValueError(f"SIPLConfig.{name} needs {n} values, got {getattr(self, name)}")
        least = {"inp_channels": 1, "out_channels": 1, "dim": 1, "num_refinement_blocks": 0, "prompt_len": 1,
                 "num_blocks": 0, "prompt_dims": 1, "prompt_sizes": 1, "dictionary_sizes": 1}
        for name, low in least.items():
            values = getattr(self, name)
            if any(v < low for v in (values if isinstance(values, tuple) else (values,))):
                raise ValueError(f"SIPLConfig.{name} must be >= {low}, got {values}")
        if not self.ffn_expansion_factor > 0 or int(self.dim * self.ffn_expansion_factor) < 1:
            raise ValueError(f"SIPLConfig: ffn_expansion_factor {self.ffn_expansion_factor} gives no hidden channels "
                             f"at dim={self.dim}")
        d = self.dim
        widths = {
            "levels 1-4 and cross blocks": [d, 2 * d, 4 * d, 8 * d],
            "noise levels": [2 * d + self.prompt_dims[0], 4 * d + self.prompt_dims[1], 8 * d + self.prompt_dims[2]],
        }
        pairs = [(c, self.heads[i]) for i, c in enumerate(widths["levels 1-4 and cross blocks"])]
        pairs += [(c, self.heads[2]) for c in widths["noise levels"]]
        pairs += [(8 * d, self.heads[0]), (8 * d, self.heads[2]), (2 * d, self.heads[0])]
        for channels, heads in pairs:
            if heads < 1 or channels % heads:
                raise ValueError(f"SIPLConfig: {channels} channels do not split into {heads} heads (dim={d}, heads={self.heads})")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------
class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels (biased variance, eps 1e-5), affine per channel."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm2d(x, self.weight, self.bias, self.eps)


class LayerNorm(nn.Module):
    """Holds the norm as ``body`` so parameters are named ``*.body.weight/bias``."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = LayerNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=bias)


def conv3x3(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=bias)


def dwconv3x3(channels: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, groups=channels, bias=bias)


class FeedForward(nn.Module):
    """GDFN: 1x1 to 2*hidden, depthwise 3x3, gate, 1x1 back; hidden = int(C * expansion).

    ``dual_gate`` selects the cross blocks' gate ``gelu(x2)*x1 + gelu(x1)*x2``
    instead of ``gelu(x1)*x2``.
    """

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool, dual_gate: bool = False):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = conv1x1(dim, hidden * 2, bias)
        self.dwconv = dwconv3x3(hidden * 2, bias)
        self.project_out = conv1x1(hidden, dim, bias)
        self.dual_gate = dual_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)  # then dwconv, chunk into x1, x2 and gate, in one op
        x = ops.gated_dwconv_gelu(x, self.dwconv.weight, "dual" if self.dual_gate else "gdfn", self.dwconv.bias)
        return self.project_out(x)


class Attention(nn.Module):
    """MDTA, transposed self-attention: a (C/heads x C/heads) map per head over H*W."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = conv1x1(dim, dim * 3, bias)
        self.qkv_dwconv = dwconv3x3(dim * 3, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads) for t in (q, k, v))
        out = ops.channel_attention(q, k, v, self.temperature)  # tokens: channels, D = H*W
        out = rearrange(out, "b head c (h w) -> b (head c) h w", head=self.num_heads, h=h, w=w)
        return self.project_out(out)


class TransformerBlock(nn.Module):
    """``x = x + MDTA(LN1(x)); x = x + GDFN(LN2(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_blocks(n: int, dim: int, heads: int, cfg: SIPLConfig) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, cfg.ffn_expansion_factor, cfg.bias) for _ in range(n)])


class CrossAttention(nn.Module):
    """Spatial (token) cross-attention: Nq query pixels attend to Nkv key/value pixels.

    q, k, v are (B, heads, tokens, C/heads), L2-normalised over channels, so the
    logits are cosine similarities scaled by the per-head temperature.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.kv = conv1x1(dim, dim * 2, bias)
        self.kv_dwconv = dwconv3x3(dim * 2, bias)
        self.q = conv1x1(dim, dim, bias)
        self.q_dwconv = dwconv3x3(dim, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def keys_values(self, x_kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, heads, Nkv, C/heads) of the key/value feature map."""
        k, v = self.kv_dwconv(self.kv(x_kv)).chunk(2, dim=1)
        return tuple(rearrange(t, "b (head c) h w -> b head (h w) c", head=self.num_heads) for t in (k, v))

    def forward(self, x_q: torch.Tensor, x_kv: Optional[torch.Tensor] = None,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Attend from x_q to x_kv, or to ready ``kv = keys_values(x_kv)``."""
        h, w = x_q.shape[-2:]
        q = rearrange(self.q_dwconv(self.q(x_q)), "b (head c) h w -> b head (h w) c", head=self.num_heads)
        k, v = self.keys_values(x_kv) if kv is None else kv
        out = ops.cosine_attention(q, k, v, self.temperature)
        out = rearrange(out, "b head (h w) c -> b (head c) h w", head=self.num_heads, h=h, w=w)
        return self.project_out(out)


class CrossBlock(nn.Module):
    """``a = LN11(x_q); y = a + CrossAttn(a, LN12(x_kv)); y = y + DualGateFFN(LN2(y))``.

    The residual adds the *normalised* query, as the published block does.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.norm11 = LayerNorm(dim)
        self.norm12 = LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim)
        self.ffn = FeedForward(dim, 2, bias, dual_gate=True)

    def keys_values(self, x_kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The attention's k, v of ``LN12(x_kv)`` (what depends on the key/value side only)."""
        return self.attn.keys_values(self.norm12(x_kv))

    def forward(self, x_q: torch.Tensor, x_kv: Optional[torch.Tensor] = None,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        a = self.norm11(x_q)
        y = a + self.attn(a, kv=self.keys_values(x_kv) if kv is None else kv)
        return y + self.ffn(self.norm2(y))


class PromptGenBlock(nn.Module):
    """PromptIR prompt: softmax(linear(mean_HW x)) mixes L learned prompts, resized to x, 3x3 conv."""

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = conv3x3(prompt_dim, prompt_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, L)
        prompt = (weights[:, :, None, None, None] * self.prompt_param).sum(dim=1)  # (B, C, S, S)
        prompt = F.interpolate(prompt, x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c: int, embed_dim: int):
        super().__init__()
        self.proj = conv3x3(in_c, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """3x3 conv to C/2, PixelUnshuffle(2): (B, C, H, W) -> (B, 2C, H/2, W/2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(n_feat, n_feat // 2, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv to 2C, PixelShuffle(2): (B, C, H, W) -> (B, C/2, 2H, 2W)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(n_feat, n_feat * 2, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------
class SIPL(nn.Module):
    """PromptIR + Proxy Fusion (``PromptIR_ProxyFusion(decoder=True)`` by default).

    - ``model(x)``: the dictionary-only pass, returns the restored image;
    - ``model.encode(x)``: the three privileged features
      ``(out_enc_level2, out_enc_level3, latent)``;
    - ``model(x, privileged=feats)``: the privileged pass.

    ``x`` is (B, inp_channels, H, W) with H and W multiples of 8
    (``sipl_fast.restore`` pads any size).
    """

    def __init__(self, config: Optional[SIPLConfig] = None, **overrides):
        super().__init__()
        if config is None:
            config = SIPLConfig(**overrides)
        elif overrides:
            config = SIPLConfig(**{**config.to_dict(), **overrides})
        self.config = cfg = config
        d, nb, hd = cfg.dim, cfg.num_blocks, cfg.heads
        p1, p2, p3 = cfg.prompt_dims

        self.patch_embed = OverlapPatchEmbed(cfg.inp_channels, d)
        self.prompt1 = PromptGenBlock(p1, cfg.prompt_len, cfg.prompt_sizes[0], lin_dim=2 * d)
        self.prompt2 = PromptGenBlock(p2, cfg.prompt_len, cfg.prompt_sizes[1], lin_dim=4 * d)
        self.prompt3 = PromptGenBlock(p3, cfg.prompt_len, cfg.prompt_sizes[2], lin_dim=8 * d)
        if cfg.proxy_fusion:
            s1, s2, s3 = cfg.dictionary_sizes
            self.privileged_dictionary1 = nn.Parameter(torch.zeros(1, 2 * d, s1, s1))
            self.privileged_dictionary2 = nn.Parameter(torch.zeros(1, 4 * d, s2, s2))
            self.privileged_dictionary3 = nn.Parameter(torch.zeros(1, 8 * d, s3, s3))
            # p_i_cross: dictionary attends to privileged features; cross_p_i: feature attends to the result.
            self.p1_cross = CrossBlock(2 * d, hd[0], cfg.bias)
            self.p2_cross = CrossBlock(4 * d, hd[1], cfg.bias)
            self.p3_cross = CrossBlock(8 * d, hd[0], cfg.bias)
            self.cross_p1 = CrossBlock(2 * d, hd[0], cfg.bias)
            self.cross_p2 = CrossBlock(4 * d, hd[1], cfg.bias)
            self.cross_p3 = CrossBlock(8 * d, hd[2], cfg.bias)

        self.encoder_level1 = transformer_blocks(nb[0], d, hd[0], cfg)
        self.down1_2 = Downsample(d)
        self.encoder_level2 = transformer_blocks(nb[1], 2 * d, hd[1], cfg)
        self.down2_3 = Downsample(2 * d)
        self.encoder_level3 = transformer_blocks(nb[2], 4 * d, hd[2], cfg)
        self.down3_4 = Downsample(4 * d)
        self.latent = transformer_blocks(nb[3], 8 * d, hd[3], cfg)

        self.up4_3 = Upsample(4 * d)
        self.reduce_chan_level3 = conv1x1(2 * d + 4 * d, 4 * d, cfg.bias)
        self.noise_level3 = TransformerBlock(8 * d + p3, hd[2], cfg.ffn_expansion_factor, cfg.bias)
        self.reduce_noise_level3 = conv1x1(8 * d + p3, 4 * d, cfg.bias)
        self.decoder_level3 = transformer_blocks(nb[2], 4 * d, hd[2], cfg)

        self.up3_2 = Upsample(4 * d)
        self.reduce_chan_level2 = conv1x1(4 * d, 2 * d, cfg.bias)
        self.noise_level2 = TransformerBlock(4 * d + p2, hd[2], cfg.ffn_expansion_factor, cfg.bias)
        self.reduce_noise_level2 = conv1x1(4 * d + p2, 4 * d, cfg.bias)
        self.decoder_level2 = transformer_blocks(nb[1], 2 * d, hd[1], cfg)

        self.up2_1 = Upsample(2 * d)
        self.noise_level1 = TransformerBlock(2 * d + p1, hd[2], cfg.ffn_expansion_factor, cfg.bias)
        self.reduce_noise_level1 = conv1x1(2 * d + p1, 2 * d, cfg.bias)
        self.decoder_level1 = transformer_blocks(nb[0], 2 * d, hd[0], cfg)
        self.refinement = transformer_blocks(cfg.num_refinement_blocks, 2 * d, hd[0], cfg)
        self.output = conv3x3(2 * d, cfg.out_channels, cfg.bias)

    # -- encoder ----------------------------------------------------------
    def encoder(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out_enc_level1, out_enc_level2, out_enc_level3, latent) of an input image."""
        self._check_input(x)
        out_enc_level1 = self.encoder_level1(self.patch_embed(x))
        out_enc_level2 = self.encoder_level2(self.down1_2(out_enc_level1))
        out_enc_level3 = self.encoder_level3(self.down2_3(out_enc_level2))
        latent = self.latent(self.down3_4(out_enc_level3))
        return out_enc_level1, out_enc_level2, out_enc_level3, latent

    def encode(self, x: torch.Tensor) -> PrivilegedFeatures:
        """The privileged features ``(out_enc_level2, out_enc_level3, latent)`` of ``x``."""
        return self.encoder(x)[1:]

    # -- decoder ----------------------------------------------------------
    def ensemble_feature(self, stage: int, batch: int, privileged: Optional[PrivilegedFeatures]) -> torch.Tensor:
        """E for a stage: the dictionary, or p_i_cross(dictionary, F_i) with privileged features."""
        dictionary = getattr(self, f"privileged_dictionary{stage}").expand(batch, -1, -1, -1)
        if privileged is None:
            return dictionary
        return getattr(self, f"p{stage}_cross")(dictionary, privileged[stage - 1])

    def inject(self, stage: int, feature: torch.Tensor, privileged: Optional[PrivilegedFeatures]) -> torch.Tensor:
        """Proxy Fusion at a stage: ``cross_p_i(query=feature, key/value=E)``."""
        if not self.config.proxy_fusion:
            return feature
        return getattr(self, f"cross_p{stage}")(feature, self.ensemble_feature(stage, feature.shape[0], privileged))

    def prompt(self, stage: int, feature: torch.Tensor) -> torch.Tensor:
        """PromptIR's prompt stage: cat the prompt, noise_level block, 1x1 reduce."""
        feature = torch.cat([feature, getattr(self, f"prompt{stage}")(feature)], 1)
        feature = getattr(self, f"noise_level{stage}")(feature)
        return getattr(self, f"reduce_noise_level{stage}")(feature)

    def decode(self, x: torch.Tensor, encoded, privileged: Optional[PrivilegedFeatures] = None) -> torch.Tensor:
        """The decoder given ``encoder(x)``; returns the restored image."""
        out_enc_level1, out_enc_level2, out_enc_level3, latent = encoded

        latent = self.prompt(3, self.inject(3, latent, privileged))
        inp_dec_level3 = torch.cat([self.up4_3(latent), out_enc_level3], 1)
        out_dec_level3 = self.decoder_level3(self.reduce_chan_level3(inp_dec_level3))

        out_dec_level3 = self.prompt(2, self.inject(2, out_dec_level3, privileged))
        inp_dec_level2 = torch.cat([self.up3_2(out_dec_level3), out_enc_level2], 1)
        out_dec_level2 = self.decoder_level2(self.reduce_chan_level2(inp_dec_level2))

        out_dec_level2 = self.prompt(1, self.inject(1, out_dec_level2, privileged))
        inp_dec_level1 = torch.cat([self.up2_1(out_dec_level2), out_enc_level1], 1)
        out_dec_level1 = self.refinement(self.decoder_level1(inp_dec_level1))
        return self.output(out_dec_level1) + x

    def forward(self, x: torch.Tensor, privileged: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        if privileged is not None:
            privileged = self._check_privileged(x, privileged)
        return self.decode(x, self.encoder(x), privileged)

    # -- validation -------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config.inp_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected an image batch of shape (B, {c}, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point image, got {x.dtype}")
        if x.shape[-2] % 8 or x.shape[-1] % 8 or x.shape[0] == 0:
            raise ValueError(
                f"H and W must be positive multiples of 8 for a single pass, got {tuple(x.shape[-2:])}; "
                "sipl_fast.restore pads any size"
            )

    def _check_privileged(self, x: torch.Tensor, privileged: Sequence[torch.Tensor]) -> PrivilegedFeatures:
        if not self.config.proxy_fusion:
            raise ValueError("this model has no Proxy Fusion (plain PromptIR): it takes no privileged features")
        b, _, h, w = x.shape
        d = self.config.dim
        expected = [(b, 2 * d, h // 2, w // 2), (b, 4 * d, h // 4, w // 4), (b, 8 * d, h // 8, w // 8)]
        tensors = len(privileged) == 3 and all(isinstance(t, torch.Tensor) for t in privileged)
        got = [tuple(t.shape) for t in privileged] if tensors else None
        if got is None or any(g[:2] != e[:2] for g, e in zip(got, expected)):
            raise ValueError(
                "privileged features must be (out_enc_level2, out_enc_level3, latent) as returned by "
                f"model.encode, with shapes like {expected}; got "
                f"{got if got is not None else [type(t).__name__ for t in privileged]}"
            )
        return tuple(privileged)
