"""One readable training loop: full or LoRA, packed or padded, resumable; SFT, DPO or GRPO (`objective`).

    run = qwen3lab.train("configs/demo.yaml")            # or a TrainConfig, or a dict of keys
    qwen3lab train configs/demo.yaml --optim.lr 1e-4     # the same from the command line
    qwen3lab train cfg.yaml --objective dpo              # preference pairs; grpo: prompts, rollouts and rewards

In torchtitan's shape: `build_run` (build.py) builds the run once (model, adapters, reference, data, optimizer,
schedule, the position of a resumed run), `train_step(run, batches) -> metrics` is one optimizer step, and `_train`
is the short loop around it (logging, eval, checkpoints, export). One loop for every objective.

The loss of a step is the summed loss of all its micro-batches divided by their units — supervised tokens for SFT
(not a mean of per-batch means, so it equals trl's first-step loss on the same batch), pairs for DPO, and for GRPO
what its loss type normalises by. The model and its loss are one module, net.WithLoss; DPO and GRPO live in objectives/.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..model.runtime import keep_freed_cpu_memory, return_freed_cpu_memory
from .batching import to_device, units
from .build import Run, build_run
from .checkpoint import save_checkpoint
from .config import TrainConfig, check_train_config, flatten_keys, load_train_config
from .export import export, export_sharded
from .parallel import Dist, init_distributed
from .report import Progress, Reporter

log = logging.getLogger("qwen3lab")


def train(config) -> Path:
    """Run SFT, DPO or GRPO as configured; returns the run folder, whose `model/` is the final HF-format model.

    Under torchrun each process is one data-parallel rank: the model is sharded with FSDP2, each rank takes its
    share of every global batch (batch_size rows per rank), and rank 0 alone logs and exports.
    """
    cfg = check_train_config(resolve_config(config), int(os.environ.get("WORLD_SIZE", "1")))
    d, device = init_distributed(cfg.device, cfg.dist_timeout)
    if device.type == "cpu" and d.world == 1:
        # not under FSDP on the CPU: its gather and reduce buffers would stay as heap (bench/fsdp_memory.py, 0.6B
        # shape, 2 ranks: 9.6-10.3 GiB per rank after a step with it, 5.1-5.2 without)
        lean = cfg.cpu_memory == "lean" or (cfg.cpu_memory == "auto" and cfg.lora.base_bits == 4)
        (return_freed_cpu_memory if lean else keep_freed_cpu_memory)()
    try:
        return _train(cfg, d, device)
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_config(config) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_train_config(config)
    if isinstance(config, dict):
        return load_train_config(None, flatten_keys(config))
    raise TypeError(f"config must be a TrainConfig, a YAML path or a dict, got {type(config).__name__}")


def _train(cfg: TrainConfig, d: Dist, device: torch.device) -> Path:
    """The loop: a step, then logging, eval and checkpoints as configured; the export at the end."""
    run = build_run(cfg, d, device)
    reporter = Reporter(run.out, cfg, run.step) if d.main else None
    bar = Progress(run.total_steps, run.step) if cfg.progress and d.main else None
    while run.step < run.total_steps:
        metrics = train_step(run, [next(run.batches) for _ in range(cfg.grad_accum)])
        step, last = run.step, run.step == run.total_steps
        if run.has_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            metrics["eval_loss"] = evaluate(run.net, run.eval_batches(), d, device, run.autocast)
        if reporter and (step % cfg.log_every == 0 or last or "eval_loss" in metrics):
            reporter.log(metrics)
        if bar is not None:
            bar.update(metrics)
        if cfg.save_every and (step % cfg.save_every == 0 or last):  # the last too: a longer rerun continues it
            run_info = {"objective": cfg.objective, "total_steps": run.total_steps}
            save_checkpoint(
                run.checkpoints,
                step,
                run.net,
                run.optimizer,
                run.scheduler,
                cfg.keep_checkpoints,
                d,
                run.data_state,
                run_info,
            )
    if bar is not None:
        bar.close()
    if d.world > 1:
        export_sharded(run.net, cfg, run.tok, run.out, run.source, d)
    elif d.main:
        export(run.model, run.tok, run.extra_tokens, run.out, run.source)
    if d.main:
        reporter.plot(run.out / "loss.png")
        log.info("run folder %s: model/ (HF format), metrics.jsonl, loss.png", run.out)
    d.barrier()
    return run.out


def train_step(run: Run, batches: list[dict]) -> dict:
    """One optimizer step over this rank's micro-batches -> the step's metrics (over every rank).

    The loss is the sum over every supervised token (DPO: pair) of the step on all ranks, over their global count;
    FSDP averages gradients over ranks, hence the factor world."""
    d = run.d
    (n_units,) = d.all_sum(sum(units(b) for b in batches))
    # every rank sums the same keys in the same order, whichever sources its rows came from
    sums = {f"source_{m}/{s}": 0.0 for s in range(len(run.sources)) for m in ("loss", "units")}
    loss_total, step_tokens = 0.0, 0
    if run.balance is not None:  # MoE: the load-balancing loss (balance.py), its global counts first
        run.balance.begin(run.net, batches, run.device, run.autocast)
    for b in batches:
        b = to_device(b, run.device)
        with run.autocast():
            loss_sum, batch_metrics = run.net(b)
            aux = run.balance.loss(b) if run.balance is not None else 0.0
        (loss_sum * (d.world / n_units) + aux).backward()
        loss_total += float(loss_sum.detach())
        step_tokens += int(b["num_tokens"])
        for k, v in batch_metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    grad_norm = None
    if run.cfg.optim.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.optim.max_grad_norm)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss_total, step_tokens, *summed = d.all_sum(loss_total, step_tokens, *sums.values())
    run.tokens_seen += int(step_tokens)
    elapsed = time.perf_counter() - run.started
    metrics = {
        "step": run.step,
        "loss": loss_total / n_units,
        "lr": lr,
        "tokens": run.tokens_seen,
        "elapsed": elapsed,
        "tokens_per_s": run.tokens_seen / elapsed,
    }
    summed = dict(zip(sums, summed, strict=True))
    metrics |= {k: v / n_units for k, v in summed.items() if not k.startswith("source_")}  # means over the units
    for s, name in enumerate(run.sources):  # a mixture: each source's loss over its own learned tokens
        if summed[f"source_units/{s}"]:
            metrics[f"loss/{name}"] = summed[f"source_loss/{s}"] / summed[f"source_units/{s}"]
        metrics[f"tokens/{name}"] = run.data_state["tokens"][s]
    if "stage" in run.data_state:  # stages.py
        metrics["stage"] = run.data_state["stage"]
    if run.rollouts is not None:
        metrics |= run.rollouts.pop_metrics()
    if run.balance is not None:
        metrics |= run.balance.metrics()
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    return metrics


@torch.no_grad()
def evaluate(net, batches, d: Dist, device, autocast) -> float:
    net.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast():
            total += float(net(batch)[0])
        count += units(batch)
    net.train()
    total, count = d.all_sum(total, count)
    return total / max(count, 1)
