"""TrainConfig: one dataclass tree is the YAML schema and the CLI flags, checked in full before anything loads.

cfg = load_train_config("configs/demo.yaml", {"optim.lr": 1e-4})
check_train_config(cfg, world=1)   # one ConfigError naming the key, the value and what it may be
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..model.config import ATTENTION_BACKENDS, ROPE_TYPES, ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    train: str = ""  # JSONL / JSON / Parquet file, a folder saved by `datasets`, or a prepared folder
    # or a mixture: [{path, weight, name}] or ["path:weight"], each row of every batch drawn from them by weight
    mix: list = field(default_factory=list)
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
    # 4: the frozen base's decoder linears held as NF4 with double quantisation (QLoRA, bitsandbytes); 16: as stored
    base_bits: int = 16


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
    loss_type: str = "dapo"  # dapo | grpo | dr_grpo | bnpo | cispo, as trl computes and normalises them
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0: epsilon (cispo: the cap on its importance weights)
    importance_sampling_level: str = "token"  # token | sequence (GSPO: one ratio a completion, its mean log-ratio)
    delta: float = 0.0  # > 0: two-sided clipping, the ratio also capped at delta (0: off)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length learn nothing
    beta: float = 0.0  # k3 KL to the reference (as in DPO: adapters off for LoRA, else a frozen copy)
    use_bias_correction_kl: bool = True  # the KL term times the importance ratio (trl's default since 1.x)
    num_iterations: int = 1  # updates per generation batch, against its stored old log-probs
    # the sampler-mismatch correction (trl's vllm_importance_sampling_*): each token's loss weighted by the ratio of
    # the trainer's log-prob to the engine's, per token or per sequence, clipped (truncate) or zeroed (mask) outside
    # [sampler_clip_min, sampler_clip_max]: none | token_truncate | token_mask | sequence_truncate | sequence_mask
    sampler_correction: str = "none"
    sampler_clip_min: float = 0.0
    sampler_clip_max: float = 3.0
    response_format: dict = field(default_factory=dict)  # a JSON schema every completion is held to ({}: none)
    speculate: int = 0  # draft tokens per decode step by prompt lookup while sampling (infer/speculative.py; 0: off)


@dataclass
class DistillConfig:
    teacher: str = ""  # the teacher's HF folder: any Qwen3 (dense or MoE) with the student's tokenizer, held frozen
    teacher_bits: int = 16  # 16: in its stored dtype (fp32 with precision fp32); 4: its decoder linears in NF4
    beta: float = 0.5  # 0: forward KL(teacher || student), 1: reverse KL, between: generalized JSD (trl's GKD)
    temperature: float = 1.0  # of both distributions in the loss, and of the student's sampling
    lmbda: float = 0.5  # the share of micro-batches whose completions the student samples (on-policy)
    max_new_tokens: int = 128  # the length limit of on-policy completions
    top_p: float = 1.0
    top_k: int = 0  # > 0: the teacher's k most likely tokens, renormalised, stand for its distribution (beta 0)


@dataclass
class MoEConfig:
    """Qwen3 MoE models only (model_type qwen3_moe)."""

    balance: str = "global"  # the load-balancing loss over the global batch of a step, or per micro-batch (balance.py)
    aux_loss_coef: float = -1.0  # < 0: the model's router_aux_loss_coef (0.001 in Qwen3 MoE); 0: no balancing loss
    lora_experts: bool = False  # LoRA: adapters on every expert's linears too (else attention and dense MLPs only)
    lora_router: bool = False  # LoRA: the routers' full weights trained too (hidden x experts a layer; peft's
    # modules_to_save in the adapter folder)


@dataclass
class TrainConfig:
    model: str = ""  # HF model folder, or a preset name (random init) such as tiny
    # a preset's fields replaced, e.g. {hidden_size: 256, num_hidden_layers: 4}: a new shape trained from scratch
    # (a sweep over model sizes); {}: the preset as it is
    model_config: dict = field(default_factory=dict)
    out: str = "runs/sft"
    # sft | dpo (preference pairs: prompt + chosen / rejected) | grpo (prompts + rewards) | distill (a teacher's
    # distributions on chats or prompts)
    objective: str = "sft"
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
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
    # true: each decoder block recomputed in the backward, only its input kept; offload: that input kept in host
    # memory until the backward (CUDA)
    activation_checkpointing: bool = False
    # with activation checkpointing, rows longer than this many tokens run the MLP over tiles of it, so the
    # [tokens, intermediate_size] activations are never whole (0: never tiled)
    mlp_tile: int = 4096
    # context extension (e.g. a long-context stage): RoPE's base (0: the model's) and scaling ({}: the model's),
    # e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: 32768}; the export's config carries them
    rope_theta: float = 0.0
    rope_scaling: dict = field(default_factory=dict)
    compile: bool = False
    loss_chunk: int = 128  # positions per lm_head chunk in the loss: chunk x vocab fp32 logits at a time
    # one process on the CPU: keep (freed memory kept in the heap for speed) | lean (large blocks returned when
    # freed: peak RSS = the tensors alive, steps slower) | auto (lean for a 4-bit base, else keep); model/runtime.py
    cpu_memory: str = "auto"
    log_every: int = 1
    eval_every: int = 0  # 0: at the end only
    save_every: int = 0  # checkpoints every N steps and after the last (to continue the run); 0: none
    keep_checkpoints: int = 2
    # where checkpoints go: "" is the run folder's checkpoints/; a node-local path (fast local disks) works too, each
    # node keeping its ranks' shards and a copy of the metadata
    checkpoint_dir: str = ""
    dist_timeout: float = 600.0  # seconds a rank waits for the others before the run fails (torchrun jobs)
    resume: bool = True  # continue from the newest checkpoint in `out` when there is one
    # a checkpoint folder (…/checkpoints/step-000400) to start from when `out` has none of its own: a branch, e.g.
    # a wsd decay run from a checkpoint of the stable phase
    resume_from: str = ""
    # phases of one run, each [{name, steps, and the keys it changes}] (STAGE_KEYS): data, learning rate and
    # schedule, RoPE (e.g. general text, then reasoning data, then long context with YaRN); steps: their sum
    stages: list = field(default_factory=list)
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


# values a key takes beside those of its default's type
ALSO = {"activation_checkpointing": ("offload",)}


def _coerce(key: str, value, kind: type):
    """A YAML or command-line value as the field's type; strings from the command line are parsed as YAML."""
    if value in ALSO.get(key, ()):
        return value

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
OBJECTIVES = ("sft", "dpo", "grpo", "distill")
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo")
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
    "grpo.importance_sampling_level": ("token", "sequence"),
    "grpo.sampler_correction": ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    "lora.base_bits": (16, 4),
    "distill.teacher_bits": (16, 4),
    "cpu_memory": ("auto", "keep", "lean"),
    "moe.balance": ("global", "micro"),
}
# (key, the rule its value must meet, the rule in words)
RANGES = [
    ("steps", lambda v: v >= 0, ">= 0 (0: epochs)"),
    ("epochs", lambda v: v > 0, "> 0"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum", lambda v: v >= 1, ">= 1"),
    ("loss_chunk", lambda v: v >= 1, ">= 1"),
    ("mlp_tile", lambda v: v >= 0, ">= 0 (0: never tiled)"),
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
    ("grpo.sampler_clip_min", lambda v: v >= 0, ">= 0"),
    ("grpo.sampler_clip_max", lambda v: v > 0, "> 0"),
    ("grpo.speculate", lambda v: v >= 0, ">= 0"),
    ("distill.beta", lambda v: 0 <= v <= 1, "in [0, 1] (0: forward KL, 1: reverse KL)"),
    ("distill.temperature", lambda v: v > 0, "> 0"),
    ("distill.lmbda", lambda v: 0 <= v <= 1, "in [0, 1] (the share of on-policy micro-batches)"),
    ("distill.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("distill.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("distill.top_k", lambda v: v >= 0, ">= 0 (0: the teacher's whole distribution)"),
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
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key, ok, rule in RANGES:
        if not ok(_get(cfg, key)):
            raise ConfigError(f"{key}: {_get(cfg, key)!r}; it must be {rule}")
    for key, allowed in (("lora.targets", LORA_TARGETS), ("report_to", ("tensorboard", "wandb"))):
        unknown = [v for v in _get(cfg, key) if v not in allowed]
        if unknown:
            raise ConfigError(f"{key}: {unknown} not among {', '.join(allowed)}")
    if not cfg.model:
        raise ConfigError("model: give an HF model folder or a preset name (e.g. --model tiny)")
    if cfg.model_config:
        model_shape(cfg)
    rope = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) if cfg.rope_scaling else None
    if cfg.rope_scaling and (rope not in ROPE_TYPES or (rope != "default" and not cfg.rope_scaling.get("factor"))):
        raise ConfigError(f"rope_scaling: {cfg.rope_scaling}; give rope_type ({', '.join(ROPE_TYPES)}) and factor")
    if cfg.stages:
        _check_stages(cfg, world)
        return cfg
    if cfg.data.mix:
        cfg.data.mix = _check_mix(cfg)
    elif not cfg.data.train:
        raise ConfigError("data.train: give a JSONL / JSON / Parquet file, a datasets folder or a prepared folder")
    if cfg.optim.name == "muon" and world > 1:
        raise ConfigError("optim.name: muon orthogonalises whole matrices, which FSDP shards; use adamw with torchrun")
    if cfg.lora.base_bits == 4:
        if cfg.lora.rank == 0:
            raise ConfigError("lora.base_bits: 4 quantises a frozen base; it needs lora.rank > 0")
        if world > 1:
            raise ConfigError("lora.base_bits: 4 runs on one process for now; use 16 with torchrun")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("lora.base_bits: 4 needs bitsandbytes: pip install 'qwen3lab[qlora]'")
    if cfg.lora.train_tokens and cfg.lora.rank == 0:
        raise ConfigError("lora.train_tokens: needs lora.rank > 0; full fine-tuning trains every embedding row already")
    if cfg.moe.lora_router:
        _check_lora_router(cfg)
    if cfg.objective == "distill":
        from .objectives.distill import check_config  # its teacher's config.json read, nothing loaded

        check_config(cfg, world)
    if cfg.dpo.ref != "auto" and cfg.objective != "dpo":
        raise ConfigError(f"dpo.ref: {cfg.dpo.ref!r} applies to objective: dpo only (this run is {cfg.objective})")
    g = cfg.grpo
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        raise ConfigError(f"grpo.reward_weights: {len(g.reward_weights)} weights for {len(g.rewards)} rewards")
    from .objectives.rewards import BUILTIN  # names only: a module:function is imported when the run starts

    for spec in g.rewards:
        if spec not in BUILTIN and ":" not in spec:
            raise ConfigError(f"grpo.rewards: {spec!r}; use a built-in ({', '.join(BUILTIN)}) or 'module:function'")
    if cfg.activation_checkpointing == "offload" and cfg.device == "cpu":
        raise ConfigError("activation_checkpointing: offload moves GPU memory to the host; on the CPU use true")
    if cfg.attention in ("varlen", "flex") and cfg.device in ("cpu", "auto"):
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError(f"attention: {cfg.attention} needs a CUDA device; use auto or sdpa on the CPU")
    return cfg


def _check_stages(cfg: TrainConfig, world: int) -> None:
    if cfg.objective not in ("sft", "distill"):
        raise ConfigError(
            f"stages: phases of SFT, pretraining or distillation runs; objective {cfg.objective} has none"
        )
    from .stages import stage_configs

    for i, (name, stage) in enumerate(stage_configs(cfg)):
        try:
            check_train_config(stage, world)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({name}): {e}") from None


def _check_mix(cfg: TrainConfig) -> list[dict]:
    """data.mix as [{path, weight, name}]: each entry a dict or "path:weight" (weight 1 when left out)."""
    if cfg.data.train:
        raise ConfigError("data.mix: replaces data.train; give one or the other")
    if cfg.objective != "sft":
        raise ConfigError(f"data.mix: mixes SFT / pretraining sources; objective {cfg.objective} reads one file")
    mix = []
    for i, entry in enumerate(cfg.data.mix):
        if isinstance(entry, str):
            path, _, weight = entry.rpartition(":") if ":" in entry else (entry, "", "1")
            entry = {"path": path, "weight": weight}
        if not isinstance(entry, dict) or not entry.get("path") or set(entry) - {"path", "weight", "name"}:
            raise ConfigError(f"data.mix[{i}]: {entry!r}; give {{path, weight, name}} or 'path:weight'")
        try:
            weight = float(entry.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = -1.0
        if not weight > 0:
            raise ConfigError(f"data.mix[{i}]: weight {entry.get('weight')!r}; it must be a number > 0")
        name = str(entry.get("name") or Path(entry["path"]).stem)
        if any(m["name"] == name for m in mix):
            raise ConfigError(f"data.mix[{i}]: a second source named {name!r}; give each a name")
        mix.append({"path": str(entry["path"]), "weight": weight, "name": name})
    return mix


def _check_lora_router(cfg: TrainConfig) -> None:
    # a reference model made by switching the adapters off would still route with the trained routers
    if cfg.lora.rank == 0:
        raise ConfigError("moe.lora_router: applies to LoRA (lora.rank > 0); full fine-tuning trains the routers")
    if cfg.objective == "dpo" and cfg.dpo.ref in ("auto", "adapters"):
        raise ConfigError(
            "moe.lora_router: DPO's adapters-off reference would keep the trained routers; dpo.ref: model"
        )
    if cfg.objective == "grpo" and cfg.grpo.beta != 0:
        raise ConfigError("moe.lora_router: GRPO's KL reference (adapters off) would keep the trained routers; beta 0")


def model_shape(cfg: TrainConfig):
    """The ModelConfig of a run from a preset, with model_config's fields replaced."""
    from ..model.config import PRESETS, ModelConfig, preset

    if cfg.model not in PRESETS:
        raise ConfigError(f"model_config: reshapes a preset trained from scratch; {cfg.model!r} is not a preset")
    unknown = sorted(set(cfg.model_config) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"model_config: {', '.join(unknown)} not among ModelConfig's fields (config.json names)")
    return preset(cfg.model, **cfg.model_config)


def train_config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
