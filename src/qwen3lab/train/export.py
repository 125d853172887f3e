"""The end of a training run: its model as an HF folder (LoRA folded in, trained token rows written into the
embedding) plus a peft adapter folder for LoRA runs — from one process's model, or streamed from FSDP2's shards."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from ..model.hf import save_model, write_hf_folder
from ..text.tokenizer import Tokenizer
from .config import TrainConfig
from .lora import LoRALinear, lora_modules, merge, merge_lora, save_peft_adapter, write_peft_adapter
from .parallel import Dist, unwrap_activation_checkpointing
from .quant import quantized_layers


def export_sharded(net, cfg: TrainConfig, tok: Tokenizer, out: Path, source: str | None, d: Dist) -> None:
    """The final HF folder from the sharded model (net: the run's WithLoss under FSDP2), as export() writes it:
    every rank takes part in gathering each tensor in turn and rank 0 writes the safetensors files shard by shard,
    so no rank ever holds the whole model. LoRA adapters (small) are first gathered whole to rank 0, folded into
    their base weights as those are written, and saved as the peft adapter folder."""
    clean = lambda name: name.replace("_checkpoint_wrapped_module.", "")  # noqa: E731
    trained, loras = {}, {clean(n): m for n, m in lora_modules(net.model).items()}
    if loras or net.extra_tokens is not None:  # the trained parameters alone (the base is frozen)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        trained = {clean(k): v for k, v in get_model_state_dict(net, options=options).items()}
    params = {clean(n): p for n, p in net.model.named_parameters() if ".lora_" not in n}  # tied lm_head: once
    token_rows = None

    def get(name: str) -> torch.Tensor:
        nonlocal token_rows
        p = params[name]
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if not d.main:
            return full
        module = name.removesuffix(".weight")
        if module in loras:  # W + scaling * B @ A, summed in fp32 as LoRALinear.merged does
            a, b = trained[f"model.{module}.lora_A.weight"], trained[f"model.{module}.lora_B.weight"]
            full = merge(full, a, b, loras[module].scaling).to(full.dtype)
        if name == "model.embed_tokens.weight" and net.extra_tokens is not None:
            ids = net.extra_tokens.token_ids.cpu()
            full = full.clone()
            full[ids] = (full[ids].float() + trained["extra_tokens.delta"]).to(full.dtype)
            token_rows = (ids.tolist(), full[ids].float())
        return full

    dtype = next(iter(params.values())).dtype
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    # shards of 1 GB (not save_model's 5): what rank 0 holds at once, beside the one tensor being gathered
    write_hf_folder(net.model.config, out / "model", shapes, get, "1GB", dtype, write=d.main)
    if d.main:
        tok.save(out / "model")
        if loras:
            first = next(iter(loras.values()))
            adapters = {m: (trained[f"model.{m}.lora_A.weight"], trained[f"model.{m}.lora_B.weight"]) for m in loras}
            whole = {
                k.removeprefix("model.").removesuffix(".weight"): v for k, v in trained.items() if ".mlp.gate." in k
            }
            write_peft_adapter(
                out / "adapter", adapters, first.rank, first.alpha, cfg.lora.dropout, source or "", token_rows, whole
            )


def export(model, tok: Tokenizer, extra_tokens, out: Path, source: str | None) -> None:
    """The final HF folder (LoRA merged in) with tokenizer and template, plus a peft adapter folder for LoRA runs."""
    unwrap_activation_checkpointing(model)
    loras = lora_modules(model)
    if loras:
        rows = None
        if extra_tokens is not None:  # peft's trainable tokens hold the rows' values, not a delta
            w = model.model.embed_tokens.weight
            ids = extra_tokens.token_ids.to(w.device)
            rows = (ids.tolist(), w[ids].float() + extra_tokens.delta.detach().to(w.device))
        save_peft_adapter(model, out / "adapter", base_model=source or "", trained_tokens=rows)
    if extra_tokens is not None:
        with torch.no_grad():
            w, ids = model.model.embed_tokens.weight, extra_tokens.token_ids.to(model.model.embed_tokens.weight.device)
            w[ids] = (w[ids].float() + extra_tokens.delta.to(w.device)).to(w.dtype)
    if quantized_layers(model):
        _export_4bit(model, out / "model")
    else:
        merge_lora(model)
        save_model(model, out / "model")
    tok.save(out / "model")


def _export_4bit(model, folder: Path) -> None:
    """A 4-bit base's HF folder, streamed: each 4-bit weight is dequantised (and its adapter merged) as its shard is
    written, so the full-precision model never exists in memory (shards of 1 GB: what is held at once)."""
    four_bit = {f"{name}.weight": m for name, m in lora_modules(model).items() if m.base is not None}
    four_bit |= {f"{n}.weight": m for n, m in quantized_layers(model).items() if not n.endswith(".base")}
    state = model.state_dict()
    shapes = {}
    for name, module in model.named_modules():  # HF's order: a layer's weights where its module stands
        if f"{name}.weight" in four_bit:
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
        elif ".lora_" not in name:
            shapes |= {key: tuple(t.shape) for key, t in module.named_parameters(prefix=name, recurse=False)}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)

    def get(name: str) -> torch.Tensor:
        if name not in four_bit:
            return state[name]
        m = four_bit[name]
        return m.merged_weight() if isinstance(m, LoRALinear) else m.dequantized()

    write_hf_folder(model.config, folder, shapes, get, "1GB", model.model.embed_tokens.weight.dtype)
