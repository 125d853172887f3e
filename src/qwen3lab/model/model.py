"""Qwen3 decoder, single device, numerically the same as transformers' `Qwen3ForCausalLM` (and, with experts
(mlp.py), `Qwen3MoeForCausalLM`).

Parameter names are HF's, so a state dict loads from and saves to an HF folder as a plain copy. Operation order
follows `modeling_qwen3.py` exactly (see ../shared/QWEN3_FACTS.md): RMSNorm in fp32 then cast then weight; q/k norm
per head before RoPE; rotate-half RoPE with cos/sin in fp32; GQA; scale head_dim**-0.5. Parallelism (FSDP2,
activation checkpointing, compile) is applied from outside, in train/parallel.py and model/runtime.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .attention import Documents, attend
from .config import ModelConfig
from .mlp import MLP, SparseMoeBlock


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply, as transformers does; weight * x in fp32 differs in bf16.
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scale, for default, linear or YaRN RoPE."""
    d, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    factor = scaling.get("factor")
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    # YaRN (arXiv:2309.00071), as transformers computes it: interpolate low frequencies by `factor`, keep high
    # frequencies, ramp linearly between the two correction dimensions, and scale cos/sin by attention_factor.
    original = scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if factor is None:
        factor = cfg.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A plain attribute, not a buffer: it must stay fp32 when the model is cast to bf16, and it needs no
        # materialising after a build on the meta device. It follows the positions to their device.
        self.inv_freq, self.attention_scaling = rope_inv_freq(cfg)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, 1, T, head_dim], computed in fp32 and only then cast
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim, bias = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, docs=None):
        B, T, _ = x.shape
        # [B, T, H*D] -> [B, T, H, D]; norm per head over D, then -> [B, H, T, D]
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if hasattr(kv_cache, "attend"):  # the engine's mixed step: parts over caches of their own (infer/cache.py)
            return self.o_proj(kv_cache.attend(q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # -> [B, Hkv, S, D]: every filled slot, this forward's included
        return self.o_proj(attend(q, k, v, mask, docs))  # attention.py: packed documents, a mask, or causal


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_sparse(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, docs=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, docs)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3(nn.Module):
    """Qwen3ForCausalLM. Build on the meta device, then `load_model` or `init_weights()` materialises it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            )
        )
        self.rotary_emb = RotaryEmbedding(cfg)
        self.checkpoint_rope = (cfg.rope_theta, cfg.rope_scaling)  # as built: set_rope changes the config's
        # attention.py's backend for packed rows (auto, sdpa, varlen, flex, dense); the training config sets it
        self.attn_implementation = "auto"
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def set_rope(self, rope_theta: float | None = None, rope_scaling: dict | None = None) -> None:
        """Context extension: RoPE's base and / or its scaling (e.g. YaRN {rope_type: yarn, factor: 4,
        original_max_position_embeddings: 32768}, as Qwen documents for Qwen3 to 131,072 tokens) changed in the
        config, which the export writes, and in the rotary tables from the next forward on. A scaling's context
        (factor x original) becomes max_position_embeddings if longer."""
        changes = {"rope_theta": rope_theta or self.config.rope_theta, "rope_scaling": rope_scaling}
        if rope_scaling and rope_scaling.get("factor") and rope_scaling.get("original_max_position_embeddings"):
            longest = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
            changes["max_position_embeddings"] = max(self.config.max_position_embeddings, longest)
        self.config = dataclasses.replace(self.config, **changes)
        self.rotary_emb = RotaryEmbedding(self.config)

    def tie_weights(self):
        # Materialising from meta (to_empty) replaces each parameter, so the tie must be made again afterwards.
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Random init as transformers does it: N(0, initializer_range) for weights, zero bias, unit norms."""
        gen = None if seed is None else torch.Generator(self.lm_head.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        kv_cache=None,
        inputs_embeds: torch.Tensor | None = None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or final hidden states [B, T, hidden] with return_hidden).

        position_ids [B, T] default to 0..T-1. mask is an SDPA mask ([B, 1, T, S] bool, True = attend); without one
        attention is plainly causal; for packed rows, use `forward_packed`. kv_cache (per layer, infer/engine.py)
        appends this forward's keys and values. inputs_embeds [B, T, hidden] replaces the embedding lookup (e.g.
        with some embedding rows being trained apart). docs (attention.Documents) marks packed documents instead of
        a mask.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if kv_cache is None else kv_cache[i], docs)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def forward_packed(self, input_ids, position_ids, return_hidden=False, inputs_embeds=None, cu_seqlens=None):
        """Rows holding several documents: positions restart at 0 per document and no token sees another document.

        cu_seqlens [docs + 1] (int32 offsets into the B*T tokens, as data.collate makes them) are derived from the
        positions when not given. No [T, T] mask is built (see attention.py).
        """
        if cu_seqlens is None:
            docs = Documents.from_position_ids(position_ids, self.attn_implementation)
        else:
            docs = Documents(cu_seqlens, tuple(input_ids.shape), self.attn_implementation)
        return self.forward(input_ids, position_ids, None, return_hidden, inputs_embeds=inputs_embeds, docs=docs)
