"""LoRA: low-rank adapters on the linear layers, the base frozen; merge for export; a peft-loadable adapter folder.

`LoRALinear` keeps the base layer's parameter name `weight`, so the model's state dict still loads and saves as an HF
folder; the adapters add `lora_A.weight` / `lora_B.weight` beside it, the names peft uses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..model.hf import atomic_write
from ..model.mlp import SparseMoeBlock
from .config import LORA_TARGETS as TARGETS
from .quant import Linear4bit


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * alpha / rank. The base is an nn.Linear, whose parameters stay `weight` / `bias`,
    or a 4-bit quant.Linear4bit (lora.base_bits: 4), kept as `base`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, nn.Linear):
            self.weight, self.bias, self.base = base.weight, base.bias, None
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            base_dtype, base_device = base.weight.dtype, base.weight.device
        else:
            self.weight = self.bias = None
            self.base, base_dtype, base_device = base, base.dtype, base.packed.device
        # adapters in fp32 whatever the base's dtype (a bf16 base stays bf16): their updates are tiny
        # (on the CPU for a base still on the meta device, as FSDP's sharded loading builds it: real starting
        # values, drawn as for a loaded base)
        device = "cpu" if base_device.type == "meta" else base_device
        kw = dict(device=device, dtype=torch.promote_types(base_dtype, torch.float32))
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.enabled = True  # off: the base layer alone (the reference model of DPO / GRPO, see lora_disabled)
        self.reset_lora()

    def reset_lora(self):
        # As peft: A like nn.Linear's default init, B zero, so the adapted model starts equal to the base.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.base is not None:
            out = self.base(x)
        else:
            weight, bias = self.weight, self.bias
            if weight.dtype != x.dtype and not autocast:
                # a bf16 frozen base computed in fp32 (a CPU that multiplies fp32 faster): converted for this call
                weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
            out = F.linear(x, weight, bias)
        if not self.enabled:
            return out
        x_lora = x if autocast else x.to(self.lora_A.weight.dtype)  # the fp32 adapters of a bf16 model
        return out + (self.lora_B(self.lora_A(self.lora_dropout(x_lora))) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, summed in fp32 and rounded once to the base's dtype (a 4-bit base: the
        checkpoint's dtype, dequantised)."""
        base = self.base.dequantized(torch.float32) if self.base is not None else self.weight.float()
        dtype = self.base.dtype if self.base is not None else self.weight.dtype
        return merge(base, self.lora_A.weight, self.lora_B.weight, self.scaling).to(dtype)

    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight *in place*: a base weight memory-mapped from its
        checkpoint stays that one mapping (a merged copy of Qwen3-4B would add 8 GB at export). A 4-bit base is
        dequantised into a new weight (its export streams instead: export.py)."""
        if self.base is not None:
            linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
            return linear
        with torch.no_grad():
            self.weight.copy_(self.merged_weight())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in fp32 (the caller rounds it once to the weight's dtype)."""
    return weight.float() + (b.float() @ a.float()) * scaling


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model, adapters switched off, for the block: the reference of DPO and GRPO without a second copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def apply_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=TARGETS, experts: bool = True
) -> list[str]:
    """Freeze the model and wrap each targeted linear layer in a LoRALinear (experts: an MoE's experts' too).
    Returns the wrapped module names."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"LoRA targets {sorted(unknown)} are not Qwen3 linear layers; choose from {TARGETS}")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not experts and ".experts." in f".{name}.":
            continue
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, (nn.Linear, Linear4bit)):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}")
    return wrapped


def train_routers(model: nn.Module) -> list[str]:
    """An MoE's routers trained whole beside the adapters (moe.lora_router), in fp32 like the adapters: they are
    small (hidden x experts) and a low-rank update of a [experts, hidden] matrix would gain little."""
    names = [name for name, m in model.named_modules() if isinstance(m, SparseMoeBlock)]
    for name in names:
        model.get_submodule(f"{name}.gate").float().requires_grad_(True)
    return [f"{name}.gate" for name in names]


def trained_whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights trained whole beside the adapters (the routers of train_routers), by module name: peft's
    modules_to_save."""
    linears = ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n)
    return {n: m.weight for n, m in linears if m.weight.requires_grad}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is then a plain Qwen3 again."""
    for name, lora in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lora.merged())
    return model


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, base_model: str = "", trained_tokens=None) -> Path:
    """adapter_model.safetensors + adapter_config.json, as `peft.PeftModel.from_pretrained` reads them.

    trained_tokens: (token ids, their trained embedding rows [k, hidden]) — written as peft's trainable tokens
    (`trainable_token_indices`, peft >= 0.15), which replace those rows of the input embedding (and of a tied
    lm_head), so base + adapter in peft is the merged model.
    """
    loras = lora_modules(model)
    if not loras:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(loras.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    adapters = {name: (m.lora_A.weight, m.lora_B.weight) for name, m in loras.items()}
    whole = trained_whole(model)
    return write_peft_adapter(path, adapters, first.rank, first.alpha, dropout, base_model, trained_tokens, whole)


def write_peft_adapter(
    path,
    adapters: dict,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_model: str = "",
    trained_tokens=None,
    whole: dict | None = None,
) -> Path:
    """save_peft_adapter from tensors: adapters maps each wrapped module's name to its (lora_A, lora_B) weights;
    whole maps a module trained whole (an MoE router) to its weight, written as peft's modules_to_save."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in adapters.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    for name, weight in (whole or {}).items():
        tensors[f"base_model.model.{name}.weight"] = weight.detach().cpu().contiguous()
    token_ids = None
    if trained_tokens is not None:
        token_ids, rows = trained_tokens
        key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"  # the rows' new values
        tensors[key] = rows.detach().cpu().contiguous()
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rpartition(".")[2] for name in adapters}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": sorted({name.rpartition(".")[2] for name in whole}) if whole else None,
        "trainable_token_indices": token_ids,
    }
    atomic_write(folder / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder
