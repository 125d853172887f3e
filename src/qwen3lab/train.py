"""One readable training loop for supervised fine-tuning: full or LoRA, packed or padded, resumable.

    run = qwen3lab.train("configs/demo.yaml")            # or a TrainConfig, or a dict of keys
    qwen3lab train configs/demo.yaml --optim.lr 1e-4     # the same from the command line

The loss of a step is the summed cross-entropy of every supervised token in all its micro-batches divided by their
number (not a mean of per-batch means), so it equals trl's first-step loss on the same batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from . import data as D
from .checkpoint import default_device, load_model, new_model, save_model
from .config import PRESETS, TrainConfig, flatten_keys, load_train_config, preset, train_config_dict
from .lora import apply_lora, lora_modules, merge_lora, save_peft_adapter
from .loss import IGNORE, lm_loss_sum
from .parallel import apply_activation_checkpointing, apply_compile, unwrap_activation_checkpointing
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("qwen3lab")


# ---- setup ----


def resolve_config(config) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_train_config(config)
    if isinstance(config, dict):
        return load_train_config(None, flatten_keys(config))
    raise TypeError(f"config must be a TrainConfig, a YAML path or a dict, got {type(config).__name__}")


def build_model(cfg: TrainConfig, device: torch.device):
    """Master weights in fp32 (bf16 happens in autocast), from a folder or a preset at random init."""
    if cfg.model in PRESETS:
        return new_model(preset(cfg.model), device=device, dtype=torch.float32, seed=cfg.seed), None
    return load_model(cfg.model, dtype=torch.float32, device=device), cfg.model


def build_tokenizer(model_source: str | None) -> Tokenizer:
    if model_source and Path(model_source, "tokenizer.json").is_file():
        return load_tokenizer(model_source)
    return load_tokenizer()


def param_groups(model, weight_decay: float):
    """No weight decay on norms, biases and embeddings' extra rows; decay on matrices."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig, total_steps: int):
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    if o.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule {o.schedule!r}: use cosine, linear or constant")
    return f


class TrainableTokens(torch.nn.Module):
    """Train the embedding rows of chosen tokens while the rest stays frozen: a delta on those rows only.

    With tied embeddings the same rows of lm_head move too, as they are the same tensor.
    """

    def __init__(self, embedding: torch.nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, device=embedding.weight.device), persistent=False)
        rows, hidden = len(token_ids), embedding.weight.shape[1]
        self.delta = torch.nn.Parameter(torch.zeros(rows, hidden, device=embedding.weight.device))

    def weight(self, base: torch.Tensor) -> torch.Tensor:
        return base.index_add(0, self.token_ids, self.delta.to(base.dtype))


# ---- the step ----


def micro_batch_loss(model, batch, packing: bool, chunk: int, extra_tokens: TrainableTokens | None):
    """Summed loss and supervised-token count of one micro-batch."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    head, embeds = model.lm_head.weight, None
    if extra_tokens is not None:
        weight = extra_tokens.weight(model.model.embed_tokens.weight)
        embeds = torch.nn.functional.embedding(ids, weight)
        if model.config.tie_word_embeddings:
            head = weight
    forward = model.forward_packed if packing else model.forward
    hidden = forward(ids, pos, return_hidden=True, inputs_embeds=embeds)
    return lm_loss_sum(hidden, head, labels, chunk)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, data, rows, cfg, device, pad_id, autocast, extra_tokens) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), cfg.batch_size):
        batch = to_device(D.collate(data, rows[start : start + cfg.batch_size], pad_id), device)
        with autocast():
            loss, n = micro_batch_loss(model, batch, cfg.data.packing, cfg.loss_chunk, extra_tokens)
        total += float(loss)
        count += n
    model.train()
    return total / max(count, 1)


# ---- checkpoints ----


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, step: int, model, extra_tokens, optimizer, scheduler, keep: int) -> Path:
    """Written into a temporary folder and renamed into place: an interrupted save leaves the last good one."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = out / "checkpoints" / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if extra_tokens is not None:
        trainable["trainable_tokens.delta"] = extra_tokens.delta.detach().cpu()
    save_file(trainable, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save({"step": step, "rng": rng}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, extra_tokens, optimizer, scheduler) -> int:
    for name in ("trainable.safetensors", "optimizer.pt", "state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path}: checkpoint is missing {name}; delete the folder to resume from an older one"
            )
    trainable = load_file(path / "trainable.safetensors")
    if extra_tokens is not None:
        extra_tokens.delta.data.copy_(trainable.pop("trainable_tokens.delta"))
    params = dict(model.named_parameters())
    for name, t in trainable.items():
        if name not in params:
            raise KeyError(f"{path}: checkpoint has {name}, which this run's model does not train; same config?")
        params[name].data.copy_(t)
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    state = torch.load(path / "state.pt", weights_only=False)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# ---- reporting ----


class Reporter:
    """metrics.jsonl always; TensorBoard / W&B when asked for and installed."""

    def __init__(self, out: Path, cfg: TrainConfig, resumed_step: int):
        self.path = out / "metrics.jsonl"
        if resumed_step == 0:
            self.path.unlink(missing_ok=True)
        else:  # drop lines past the checkpoint, which the resumed run writes again
            kept = [ln for ln in self._read() if ln.get("step", 0) <= resumed_step]
            self.path.write_text("".join(json.dumps(ln) + "\n" for ln in kept))
        self.sinks = []
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
            self.sinks.append(lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items() if k != "step"])
        if "wandb" in cfg.report_to:
            import wandb

            wandb.init(project="qwen3lab", config=train_config_dict(cfg), dir=str(out))
            self.sinks.append(lambda m: wandb.log(m, step=m["step"]))

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for sink in self.sinks:
            sink(metrics)

    def plot(self, png: Path) -> None:
        rows = self._read()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / supervised token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)


# ---- the loop ----


def train(config) -> Path:
    """Run SFT as configured; returns the run folder, whose `model/` is the final HF-format model."""
    cfg = resolve_config(config)
    if not cfg.model:
        raise ValueError("model: give an HF model folder or a preset name (e.g. --model tiny)")
    if not cfg.data.train:
        raise ValueError("data.train: give a JSONL / JSON / Parquet file or a datasets folder")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(train_config_dict(cfg), sort_keys=False))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # model, tokenizer, adapters
    model, source = build_model(cfg, device)
    tok = build_tokenizer(source)
    extra_tokens = None
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        if cfg.lora.train_tokens:
            ids = [tok.token_to_id(t) for t in cfg.lora.train_tokens]
            unknown = [t for t, i in zip(cfg.lora.train_tokens, ids, strict=True) if i is None]
            if unknown:
                raise ValueError(f"lora.train_tokens: {unknown} are not tokens of this tokenizer")
            extra_tokens = TrainableTokens(model.model.embed_tokens, ids)
    elif cfg.lora.train_tokens:
        raise ValueError("lora.train_tokens needs lora.rank > 0; full fine-tuning trains every embedding row already")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    model.train()

    # data
    cache_dir = Path(os.environ.get("QWEN3LAB_CACHE", "~/.cache/qwen3lab")).expanduser() / "data"
    data = D.load_tokenized(cfg.data.train, tok, cfg.data.max_length, cache_dir)
    eval_data = None
    if cfg.data.eval:
        eval_data = D.load_tokenized(cfg.data.eval, tok, cfg.data.max_length, cache_dir)
    else:
        data, eval_data = D.split_eval(data, cfg.data.eval_fraction, cfg.seed)
    rows = D.make_rows(data, cfg.data.max_length, cfg.data.packing)
    eval_rows = D.make_rows(eval_data, cfg.data.max_length, cfg.data.packing) if eval_data else []
    batches_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    log.info(
        "data: %d examples (%d supervised tokens) in %d rows%s; %d steps of %d x %d rows",
        len(data),
        data.supervised_tokens(),
        len(rows),
        " packed" if cfg.data.packing else "",
        total_steps,
        cfg.grad_accum,
        cfg.batch_size,
    )

    # optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, cfg.optim.weight_decay)
    if extra_tokens is not None:
        groups.append({"params": [extra_tokens.delta], "weight_decay": 0.0})
        trainable.append(extra_tokens.delta)
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=device.type == "cuda",
        foreach=None if device.type == "cuda" else True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    step = 0
    if cfg.resume and _checkpoints(out):
        latest = _checkpoints(out)[-1]
        step = load_checkpoint(latest, model, extra_tokens, optimizer, scheduler)
        log.info("resumed from %s (step %d)", latest, step)
    reporter = Reporter(out, cfg, step)

    def micro_batches(start_step: int):
        """The micro-batches of each step from `start_step` on; the order depends on (seed, epoch) alone."""
        m = start_step * cfg.grad_accum
        while True:
            epoch, k = divmod(m, batches_per_epoch)
            order = D.epoch_order(len(rows), epoch, cfg.seed, cfg.data.shuffle)
            chosen = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            yield D.collate(data, [rows[i] for i in chosen], tok.pad_token_id)
            m += 1

    stream = micro_batches(step)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), 0
    while step < total_steps:
        batches = [next(stream) for _ in range(cfg.grad_accum)]
        n_supervised = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        loss_total = 0.0
        for b in batches:
            b = to_device(b, device)
            with autocast():
                loss_sum, _ = micro_batch_loss(model, b, cfg.data.packing, cfg.loss_chunk, extra_tokens)
            (loss_sum / n_supervised).backward()
            loss_total += float(loss_sum.detach())
            tokens_seen += int(b["num_tokens"])
        grad_norm = None
        if cfg.optim.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t_start
        metrics = {
            "step": step,
            "loss": loss_total / n_supervised,
            "lr": lr,
            "tokens": tokens_seen,
            "elapsed": elapsed,
            "tokens_per_s": tokens_seen / elapsed,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            metrics["eval_loss"] = evaluate(
                model, eval_data, eval_rows, cfg, device, tok.pad_token_id, autocast, extra_tokens
            )
        if step % cfg.log_every == 0 or step == total_steps or "eval_loss" in metrics:
            reporter.log(metrics)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save_checkpoint(out, step, model, extra_tokens, optimizer, scheduler, cfg.keep_checkpoints)
    if bar is not None:
        bar.close()
    export(model, tok, extra_tokens, out, source)
    reporter.plot(out / "loss.png")
    log.info("run folder %s: model/ (HF format), metrics.jsonl, loss.png", out)
    return out


def export(model, tok: Tokenizer, extra_tokens, out: Path, source: str | None) -> None:
    """The final HF folder (LoRA merged in) with tokenizer and template, plus a peft adapter folder for LoRA runs."""
    unwrap_activation_checkpointing(model)
    if lora_modules(model):
        if extra_tokens is not None:
            log.warning("adapter/: trained token rows are not in the peft adapter; they are merged into model/")
        save_peft_adapter(model, out / "adapter", base_model=source or "")
        merge_lora(model)
    if extra_tokens is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight.index_add_(0, extra_tokens.token_ids, extra_tokens.delta)
    save_model(model, out / "model")
    tok.save(out / "model")
