"""ModelConfig: the fields of a Qwen3 `config.json` (dense `qwen3` or `qwen3_moe`), read and written with HF names.

Field names are transformers' `Qwen3Config` names, so a config is a copy of the JSON file, not a translation.
Both the 4.x layout (`rope_theta` + `rope_scaling`) and the 5.x layout (`rope_parameters`) are read; the 4.x layout
is written, because it is what the official Qwen3 folders ship and every transformers version reads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# Fields a config.json must state: the shapes. `head_dim` is among them because Qwen3 does not derive it from
# hidden_size / num_attention_heads (4B: 2560 hidden but 32 heads x 128).
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
ROPE_TYPES = ("default", "linear", "yarn")
# what a qwen3_moe config.json adds to a dense one; a dense file is written without them
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
)


class ConfigError(ValueError):
    """A config.json that qwen3lab cannot run as a Qwen3 model."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    # e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False  # transformers' Qwen3Config default; the small Qwen3 models set it true
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # Qwen3 MoE (model_type qwen3_moe) when num_experts > 0: a layer is sparse when (i + 1) % decoder_sparse_step
    # == 0 and i is not in mlp_only_layers; the others keep a dense MLP of intermediate_size
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # transformers' class default; the released Qwen3 MoE configs set it true
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Everything else found in the file (use_cache, max_window_layers, ...) is kept and written back unchanged.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it to be"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError("moe_intermediate_size: a qwen3_moe config needs the experts' intermediate size")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; qwen3lab supports {ROPE_TYPES}")

    # ---- HF config.json ----

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; qwen3lab runs Qwen3 models (model_type 'qwen3' or "
                "'qwen3_moe'), not qwen2 or other architectures"
            )
        if "num_local_experts" in d and "num_experts" not in d:  # transformers 5.x writes this name
            d["num_experts"] = d.pop("num_local_experts")
        if model_type == "qwen3_moe" and not d.get("num_experts"):
            raise ConfigError(f"{source}: model_type qwen3_moe with num_experts {d.get('num_experts')!r}; it needs > 0")
        # MoE keys in a dense file mean nothing to it: kept as they are, with the other unknown keys
        dense_extra = {k: d.pop(k) for k in MOE_FIELDS if k in d} if model_type == "qwen3" else {}
        if d.get("use_sliding_window"):
            raise ConfigError(
                f"{source}: use_sliding_window is true; qwen3lab implements full attention only "
                "(no Qwen3 release uses sliding windows) — set it to false"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act is {act!r}; Qwen3 uses 'silu'")
        missing = [k for k in REQUIRED if d.get(k) is None]
        rope = d.pop("rope_parameters", None) or {}  # transformers 5.x layout
        if d.get("rope_theta") is None and "rope_theta" not in rope:
            missing.append("rope_theta")
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        if d.get("rope_theta") is None:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "dtype" in d and "torch_dtype" not in d:  # transformers 5.x name
            d["torch_dtype"] = d.pop("dtype")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names and k not in ("dtype",)} | dense_extra
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        d = dict(self.extra)
        skip = {"extra"} | (set() if self.num_experts else set(MOE_FIELDS))
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip})
        if self.num_experts:
            d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
            d.setdefault("output_router_logits", False)
        else:
            d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        d.update(hidden_act="silu", use_sliding_window=False)
        d.setdefault("sliding_window", None)
        d.setdefault("attention_dropout", 0.0)
        d.setdefault("max_window_layers", self.num_hidden_layers)
        d.setdefault("use_cache", True)
        return dict(sorted(d.items()))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json here; pass an HF model folder")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_hf_dict(d, source=str(path))

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    # ---- derived numbers ----

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` routes to experts (else it has a dense MLP), as transformers decides."""
        step = self.decoder_sparse_step
        return bool(self.num_experts) and layer not in self.mlp_only_layers and (layer + 1) % step == 0

    def num_parameters(self, embedding: bool = True, active: bool = False) -> int:
        """Parameters in all; active: those one token uses (its num_experts_per_tok experts of each sparse layer)."""
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + 2 * d + (q + 2 * kv + h if self.attention_bias else 0)
        experts = self.num_experts_per_tok if active else self.num_experts
        sparse = h * self.num_experts + experts * 3 * h * self.moe_intermediate_size  # the router and the experts
        mlp = sum(sparse if self.is_sparse(i) else 3 * h * self.intermediate_size for i in range(L))
        body = L * (attn + 2 * h) + mlp + h
        if not embedding:
            return body
        emb = self.vocab_size * h
        return body + (emb if self.tie_word_embeddings else 2 * emb)


def _qwen3(hidden, intermediate, layers, heads, kv_heads, tied, max_pos, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=128,
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
        **kw,
    )


# The published dense shapes (../shared/QWEN3_FACTS.md). A real folder's config.json always wins over these.
PRESETS = {
    "qwen3-0.6b": lambda: _qwen3(1024, 3072, 28, 16, 8, True, 40960, eos_token_id=151645),
    "qwen3-0.6b-base": lambda: _qwen3(1024, 3072, 28, 16, 8, True, 32768),
    "qwen3-1.7b": lambda: _qwen3(2048, 6144, 28, 16, 8, True, 40960, eos_token_id=151645),
    "qwen3-4b-base": lambda: _qwen3(2560, 9728, 36, 32, 8, True, 32768),
    "qwen3-8b": lambda: _qwen3(4096, 12288, 36, 32, 8, False, 40960, eos_token_id=151645),
    "qwen3-14b": lambda: _qwen3(5120, 17408, 40, 40, 8, False, 40960, eos_token_id=151645),
    "qwen3-32b": lambda: _qwen3(5120, 25600, 64, 64, 8, False, 40960, eos_token_id=151645),
    "qwen3-30b-a3b": lambda: _qwen3(2048, 6144, 48, 32, 4, False, 40960, eos_token_id=151645, **_moe(128, 768)),
    "qwen3-235b-a22b": lambda: _qwen3(4096, 12288, 94, 64, 4, False, 40960, eos_token_id=151645, **_moe(128, 1536)),
    # The demo's model: learns the built-in chat tasks from scratch on a laptop CPU in minutes.
    "demo": lambda: ModelConfig(
        vocab_size=151936,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,  # measured: 3 layers learn the demo tasks in its budget far better than 2, 4 or 6
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        torch_dtype="float32",
    ),
    # Real vocab and head_dim != hidden / heads, as in 4B, but small enough for a CPU test run.
    "tiny": lambda: ModelConfig(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        torch_dtype="float32",
    ),
}


def _moe(experts: int, intermediate: int, per_token: int = 8) -> dict:
    return dict(
        num_experts=experts, moe_intermediate_size=intermediate, num_experts_per_tok=per_token, norm_topk_prob=True
    )


PRESETS["tiny-moe"] = lambda: dataclasses.replace(PRESETS["tiny"](), **_moe(8, 32, 2))
# `qwen3lab demo --moe`: the demo's model with 8 experts of half its MLP, 2 per token (the same active size)
PRESETS["demo-moe"] = lambda: dataclasses.replace(PRESETS["demo"](), **_moe(8, 192, 2), router_aux_loss_coef=0.01)


def preset(name: str, **overrides) -> ModelConfig:
    """A published Qwen3 shape by name, e.g. preset("qwen3-4b-base"); keyword overrides replace fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)


ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flex", "dense")  # attention.py; "auto" picks per device
