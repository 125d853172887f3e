"""ModelConfig: the fields of a Qwen3 dense `config.json`, read and written with HF names.

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


class ConfigError(ValueError):
    """A config.json that qwen3lab cannot run as a Qwen3 dense model."""


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
    # Everything else found in the file (use_cache, max_window_layers, ...) is kept and written back unchanged.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it to be"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; qwen3lab supports {ROPE_TYPES}")

    # ---- HF config.json ----

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; qwen3lab runs Qwen3 dense models only (model_type 'qwen3'), "
                "not qwen2, qwen3_moe or other architectures"
            )
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
        extra = {k: v for k, v in d.items() if k not in names and k not in ("dtype",)}
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu", use_sliding_window=False)
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

    def num_parameters(self, embedding: bool = True) -> int:
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + 2 * d + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        body = L * (attn + mlp + 2 * h) + h
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


def preset(name: str, **overrides) -> ModelConfig:
    """A published Qwen3 shape by name, e.g. preset("qwen3-4b-base"); keyword overrides replace fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)


# ---- training configuration: one dataclass tree is the YAML schema and the CLI flags ----


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    train: str = ""  # JSONL / JSON / Parquet file, or a folder saved by `datasets`
    eval: str = ""  # held-out file; empty: split eval_fraction off the training rows
    eval_fraction: float = 0.0
    max_length: int = 2048
    packing: bool = True  # best-fit-decreasing packing of whole examples, no attention across them
    pack_order: str = "best_fit"  # best_fit: fullest rows; shuffled: rows mix examples of every kind
    assistant_only: bool = True  # learn assistant turns / completions only; false: every token (an ablation)
    shuffle: bool = True


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    # Embedding rows to train beside the adapters. Qwen3-Base never trained the ChatML tokens, and LoRA runs that
    # keep them frozen learn turn boundaries poorly (QwenLM/Qwen3 #1608).
    train_tokens: list = field(default_factory=list)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the decoder's matrices, AdamW for the rest; one process only)
    lr: float = 2e-5
    muon_lr: float = 0.0  # the Muon matrices' learning rate with name: muon; 0: lr
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup, constant, linear decay at the end)
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the share of the steps, at the end, over which the rate decays
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping


@dataclass
class DPOConfig:
    beta: float = 0.1
    # the reference model: auto (LoRA: the same model with its adapters off; full: a frozen copy), model (a frozen
    # copy), precompute (every pair's reference log-probs computed once before training, kept in the run folder)
    ref: str = "auto"


@dataclass
class GRPOConfig:
    num_generations: int = 8  # G completions per prompt; the prompt is prefilled once for all of them
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # reward functions: built-in names (exact_match, think_format, tool_call_json) or "module:function" with trl's
    # signature (prompts, completions, **columns) -> list of float | None; weighted by reward_weights (default 1)
    rewards: list = field(default_factory=lambda: ["exact_match"])
    reward_weights: list = field(default_factory=list)
    scale_rewards: str = "group"  # group | batch | none: advantages (r - group mean) / (std + 1e-4), or unscaled
    loss_type: str = "dapo"  # dapo | grpo | dr_grpo | bnpo, as trl normalises them
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0: epsilon
    beta: float = 0.0  # k3 KL to the reference (as in DPO: adapters off for LoRA, else a frozen copy)
    use_bias_correction_kl: bool = True  # the KL term times the importance ratio (trl's default since 1.x)
    num_iterations: int = 1  # updates per generation batch, against its stored old log-probs


@dataclass
class TrainConfig:
    model: str = ""  # HF model folder, or a preset name (random init) such as tiny
    out: str = "runs/sft"
    objective: str = "sft"  # sft | dpo (preference pairs: prompt + chosen / rejected) | grpo (prompts + rewards)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 0  # optimizer steps; 0: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 8  # rows per micro-batch on each rank (packed rows of max_length, or padded examples)
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    # auto: bf16 autocast on GPUs, and on CPUs for a LoRA run's bf16 base where bf16 is measured faster (AMX), else
    # fp32; fp32: fp32 everywhere (a LoRA base too); bf16: autocast everywhere
    precision: str = "auto"
    attention: str = "auto"  # packed rows: auto | sdpa | varlen | flex | dense (attention.py)
    activation_checkpointing: bool = False
    compile: bool = False
    loss_chunk: int = 256  # positions per lm_head chunk in the loss: chunk x vocab fp32 logits at a time
    log_every: int = 1
    eval_every: int = 0  # 0: at the end only
    save_every: int = 0  # checkpoints every N steps and after the last (to continue the run); 0: none
    keep_checkpoints: int = 2
    # where checkpoints go: "" is the run folder's checkpoints/; a node-local path (fast local disks) works too, each
    # node keeping its ranks' shards and a copy of the metadata
    checkpoint_dir: str = ""
    dist_timeout: float = 600.0  # seconds a rank waits for the others before the run fails (torchrun jobs)
    resume: bool = True  # continue from the newest checkpoint in `out` when there is one
    report_to: list = field(default_factory=list)  # tensorboard, wandb (when installed)
    progress: bool = True


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def config_keys(cls=TrainConfig, prefix: str = "") -> dict[str, type]:
    """Every settable key as a dotted path (data.max_length, optim.lr, ...) with its default's type."""
    keys = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.update(config_keys(type(default), f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = type(default)
    return keys


def _coerce(key: str, value, kind: type):
    """A YAML or command-line value as the field's type; strings from the command line are parsed as YAML."""
    import yaml

    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value) if kind in (int, float) else yaml.safe_load(value)
        except (ValueError, yaml.YAMLError):
            pass  # reported below with the expected type
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            pass
    if kind is list and isinstance(value, str):
        value = [v for v in value.split(",") if v]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def set_key(cfg: TrainConfig, key: str, value) -> None:
    keys = config_keys()
    if key not in keys:
        import difflib

        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(keys)}"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, _coerce(key, value, keys[key]))


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """Nested sections -> dotted keys (data: {max_length: 512} -> data.max_length); list-valued keys stay whole."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in config_keys():
            flat.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (nested sections or dotted keys) and then key=value overrides."""
    import yaml

    cfg = TrainConfig()
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        for key, value in flatten_keys(data).items():
            try:
                set_key(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    return cfg


# The values each enumerated key takes (the modules that use them import them from here).
OBJECTIVES = ("sft", "dpo", "grpo")
ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flex", "dense")
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
CHOICES = {
    "objective": OBJECTIVES,
    "precision": ("auto", "bf16", "fp32"),
    "attention": ATTENTION_BACKENDS,
    "data.pack_order": ("best_fit", "shuffled"),
    "dpo.ref": ("auto", "model", "precompute"),
    "optim.name": ("adamw", "muon"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "grpo.loss_type": GRPO_LOSS_TYPES,
    "grpo.scale_rewards": ("group", "batch", "none"),
}
# (key, the rule its value must meet, the rule in words)
RANGES = [
    ("steps", lambda v: v >= 0, ">= 0 (0: epochs)"),
    ("epochs", lambda v: v > 0, "> 0"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum", lambda v: v >= 1, ">= 1"),
    ("loss_chunk", lambda v: v >= 1, ">= 1"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("eval_every", lambda v: v >= 0, ">= 0"),
    ("save_every", lambda v: v >= 0, ">= 0"),
    ("keep_checkpoints", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("data.max_length", lambda v: v >= 2, ">= 2"),
    ("data.eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lora.rank", lambda v: v >= 0, ">= 0 (0: full fine-tuning)"),
    ("lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.lr", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.decay_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("dpo.beta", lambda v: v > 0, "> 0"),
    ("grpo.num_generations", lambda v: v >= 2, ">= 2 (advantages compare a prompt's completions)"),
    ("grpo.max_completion_length", lambda v: v >= 1, ">= 1"),
    ("grpo.temperature", lambda v: v > 0, "> 0 (GRPO samples)"),
    ("grpo.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("grpo.epsilon", lambda v: v >= 0, ">= 0"),
    ("grpo.num_iterations", lambda v: v >= 1, ">= 1"),
]


def _get(cfg: TrainConfig, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_train_config(cfg: TrainConfig, world: int = 1) -> TrainConfig:
    """Every value and every combination that cannot work, checked before anything is loaded: one ConfigError
    naming the key, the value and what it may be. `world`: the number of ranks (torchrun's WORLD_SIZE)."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key, ok, rule in RANGES:
        if not ok(_get(cfg, key)):
            raise ConfigError(f"{key}: {_get(cfg, key)!r}; it must be {rule}")
    for key, allowed in (("lora.targets", LORA_TARGETS), ("report_to", ("tensorboard", "wandb"))):
        unknown = [v for v in _get(cfg, key) if v not in allowed]
        if unknown:
            raise ConfigError(f"{key}: {unknown} not among {', '.join(allowed)}")
    if not cfg.model:
        raise ConfigError("model: give an HF model folder or a preset name (e.g. --model tiny)")
    if not cfg.data.train:
        raise ConfigError("data.train: give a JSONL / JSON / Parquet file or a datasets folder")
    if cfg.optim.name == "muon" and world > 1:
        raise ConfigError("optim.name: muon orthogonalises whole matrices, which FSDP shards; use adamw with torchrun")
    if cfg.lora.train_tokens and cfg.lora.rank == 0:
        raise ConfigError("lora.train_tokens: needs lora.rank > 0; full fine-tuning trains every embedding row already")
    if cfg.dpo.ref != "auto" and cfg.objective != "dpo":
        raise ConfigError(f"dpo.ref: {cfg.dpo.ref!r} applies to objective: dpo only (this run is {cfg.objective})")
    g = cfg.grpo
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        raise ConfigError(f"grpo.reward_weights: {len(g.reward_weights)} weights for {len(g.rewards)} rewards")
    from .rewards import BUILTIN  # names only: a module:function is imported when the run starts

    for spec in g.rewards:
        if spec not in BUILTIN and ":" not in spec:
            raise ConfigError(f"grpo.rewards: {spec!r}; use a built-in ({', '.join(BUILTIN)}) or 'module:function'")
    if cfg.attention in ("varlen", "flex") and cfg.device in ("cpu", "auto"):
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError(f"attention: {cfg.attention} needs a CUDA device; use auto or sdpa on the CPU")
    return cfg


def train_config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
