"""What a training run is made of, built once before the first step (`build_run` -> Run): the run folder, the
tokenizer, the model with its adapters, trained token rows and reference, sharded under torchrun (`build_net`); the
data for the objective; the optimizer and schedule; and the position of a resumed run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from ..model.config import PRESETS, ModelConfig
from ..model.hf import load_model, new_model, resolve_folder, stored_dtype
from ..model.model import Qwen3
from ..model.runtime import apply_compile, cpu_bf16_is_fast
from ..text.tokenizer import Tokenizer, load_tokenizer
from .balance import Balance
from .batching import Cursor, eval_batches, rank_batch, to_device
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .config import LORA_TARGETS, TrainConfig, model_shape, train_config_dict
from .lora import apply_lora, train_routers
from .net import TrainableTokens, WithLoss, shard
from .objectives.distill import OnPolicy
from .objectives.dpo import sequence_logps
from .objectives.rollouts import Rollouts
from .optim import build_optimizer, lr_lambda, staged_lr_lambda
from .parallel import Dist, apply_activation_checkpointing, reshard
from .quant import load_model_4bit, quantize_linears
from .sources import Mixture, load_data, log_data, make_cursor
from .stages import micro_batches, stage_configs, stage_ends, staged_batches

log = logging.getLogger("qwen3lab")


@dataclass
class Run:
    """Everything a training run is made of, built once (`build_run`); `train_step` and the loop read it."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    out: Path
    tok: Tokenizer
    model: Qwen3
    source: str | None  # the folder the weights came from (None: a preset)
    net: WithLoss
    extra_tokens: TrainableTokens | None
    autocast: Callable
    trainable: list[torch.nn.Parameter]  # what the optimizer steps (and the gradient norm clips)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    step: int  # optimizer steps done (a resumed run starts past 0)
    batches: Iterator[dict]  # this rank's micro-batches, from the data position on
    data_state: dict  # what a checkpoint records: the data position after the step (GRPO: its round's start)
    eval_batches: Callable[[], Iterator[dict]]
    has_eval: bool
    rollouts: Rollouts | OnPolicy | None  # GRPO's rollouts, distill's on-policy samples
    checkpoints: Path
    balance: Balance | None = None  # MoE: the load-balancing loss
    sources: list[str] = field(default_factory=list)  # data.mix: the sources' names (metrics per source)
    tokens_seen: int = 0
    started: float = field(default_factory=time.perf_counter)


def build_run(cfg: TrainConfig, d: Dist, device: torch.device) -> Run:
    """The run folder, the tokenizer, the model (adapters, reference, sharding), the data, the optimizer and
    schedule, and the position of a resumed run."""
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(train_config_dict(cfg), sort_keys=False))
    else:
        log.setLevel(logging.WARNING)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(None if cfg.model in PRESETS else cfg.model)
    model, source, net, extra_tokens, autocast = build_net(cfg, d, device, tok)
    dpo, grpo = cfg.objective == "dpo", cfg.objective == "grpo"

    stages = stage_configs(cfg)
    data, rows, eval_data, eval_rows, total_steps = _data(cfg, d, tok, stages)
    global_rows = cfg.batch_size * d.world  # rows of one micro-batch over all ranks
    iterations = cfg.grpo.num_iterations if grpo else 1  # optimizer steps per batch of rollouts
    ref_logps = eval_ref_logps = None
    if dpo and _reference(cfg) == "precompute":  # from the starting weights, kept in the run folder for a resume
        ref_logps = _precomputed(out / "ref_logps.npy", net, data, d, device, autocast, tok.pad_token_id, cfg)
        eval_ref_logps = ref_logps
        if cfg.data.eval:
            eval_ref_logps = _precomputed(
                out / "ref_logps_eval.npy", net, eval_data, d, device, autocast, tok.pad_token_id, cfg
            )

    def held_out():
        return eval_batches(eval_data, eval_rows, global_rows, d, tok.pad_token_id, dpo, eval_ref_logps)

    optimizer = build_optimizer(net, cfg.optim)
    schedule = staged_lr_lambda(cfg, stages) if cfg.stages else lr_lambda(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    cursor = make_cursor(cfg, data, rows)
    checkpoints = checkpoints_folder(cfg, out)
    step, saved_data = resume(checkpoints, cfg, net, optimizer, scheduler, total_steps, d) if cfg.resume else (0, None)
    if saved_data and not cfg.stages:
        cursor.restore(saved_data)
    rollouts = Rollouts(cfg, tok, data, net, autocast, d, out) if grpo else None
    if cfg.objective == "distill":
        rollouts = OnPolicy(cfg, tok, net, autocast, d)
    run = Run(
        cfg=cfg,
        d=d,
        device=device,
        out=out,
        tok=tok,
        model=model,
        source=source,
        net=net,
        extra_tokens=extra_tokens,
        autocast=autocast,
        trainable=[p for p in net.parameters() if p.requires_grad],
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        step=step,
        batches=iter(()),
        data_state=cursor.state(),
        eval_batches=held_out,
        has_eval=bool(eval_rows),
        rollouts=rollouts,
        checkpoints=checkpoints,
        balance=_balance(cfg, model, d),
        sources=data.names if isinstance(data, Mixture) else [],
    )
    if cfg.stages:
        run.batches = staged_batches(run, stages, (data, rows, eval_data, eval_rows), saved_data)
    elif grpo:
        run.batches = _rollout_batches(run, cursor, rows, iterations)
    else:  # distillation's on-policy share drawn among them
        on_policy = rollouts if cfg.objective == "distill" else None
        run.batches = micro_batches(run, cursor, data, rows, ref_logps, on_policy=on_policy)
    return run


def _data(cfg: TrainConfig, d: Dist, tok: Tokenizer, stages: list):
    """(data, rows, eval_data, eval_rows, total_steps). A row is a list of examples (SFT), a pair's index (DPO) or
    a prompt's index (GRPO); a staged run reads its first stage's data here, the others' as they begin."""
    data, rows, eval_data, eval_rows = load_data(stages[0][1], tok)
    if cfg.stages:
        return data, rows, eval_data, eval_rows, int(stage_ends(stages)[-1])
    iterations = cfg.grpo.num_iterations if cfg.objective == "grpo" else 1  # optimizer steps per rollout batch
    global_rows = cfg.batch_size * d.world
    total_steps = cfg.steps or max(
        1, math.ceil(cfg.epochs * math.ceil(len(rows) / global_rows) / cfg.grad_accum) * iterations
    )
    log_data(cfg, d, data, rows, total_steps)
    return data, rows, eval_data, eval_rows, total_steps


def _balance(cfg: TrainConfig, model: Qwen3, d: Dist) -> Balance | None:
    """The load-balancing loss of an MoE model (None for a dense one, or a coefficient of 0)."""
    coef = cfg.moe.aux_loss_coef if cfg.moe.aux_loss_coef >= 0 else model.config.router_aux_loss_coef
    if not model.config.num_experts or coef == 0:
        return None
    log.info("MoE: load-balancing loss over the %s batch, coefficient %g", cfg.moe.balance, coef)
    return Balance(model, coef, cfg.moe.balance, d)


def build_net(cfg: TrainConfig, d: Dist, device: torch.device, tok: Tokenizer):
    """The model with its adapters and trained token rows, the reference where the objective needs a copy, all in
    WithLoss and sharded under torchrun -> (model, source folder, net, trained token rows, autocast)."""
    # under FSDP a model from a folder is built on the meta device, each rank loading only its shards (`shard`)
    model, source = build_model(cfg, torch.device("cpu") if d.world > 1 else device, d.world)
    model.attn_implementation = cfg.attention
    _set_rope(cfg, model)
    base_dtype = model.model.embed_tokens.weight.dtype
    use_bf16 = use_bf16_compute(cfg, device, base_dtype)
    upcast = base_dtype != torch.float32 and not use_bf16
    log.info(
        "weights %s%s, compute %s",
        str(base_dtype).removeprefix("torch."),
        " (frozen base, LoRA)" if base_dtype != torch.float32 else "",
        "bf16 autocast" if use_bf16 else "fp32" + (", frozen bf16 layers converted per call" if upcast else ""),
    )

    def autocast():  # under FSDP2 bf16 comes from its mixed-precision policy instead
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16 and d.world == 1)

    extra_tokens = None
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, cfg.moe.lora_experts)
        if cfg.moe.lora_router:
            train_routers(model)
        if upcast:
            upcast_frozen_layers(model)
        if cfg.lora.train_tokens:
            ids = [tok.token_to_id(t) for t in cfg.lora.train_tokens]
            unknown = [t for t, i in zip(cfg.lora.train_tokens, ids, strict=True) if i is None]
            if unknown:
                raise ValueError(f"lora.train_tokens: {unknown} are not tokens of this tokenizer")
            c = model.config
            where = "cpu" if model.lm_head.weight.is_meta else model.model.embed_tokens.weight.device
            extra_tokens = TrainableTokens(c.vocab_size, c.hidden_size, ids, device=where)
    if cfg.activation_checkpointing:
        offload = cfg.activation_checkpointing == "offload" and device.type == "cuda"
        if cfg.activation_checkpointing == "offload" and not offload:
            log.info("activation_checkpointing: offload keeps block inputs where they are on the CPU (no GPU)")
        apply_activation_checkpointing(model, offload, cfg.mlp_tile)
    if cfg.compile:
        apply_compile(model)
    ref_model = None
    grpo_copy = cfg.objective == "grpo" and cfg.grpo.beta != 0 and cfg.lora.rank == 0
    if (cfg.objective == "dpo" and _reference(cfg) == "model") or grpo_copy:  # a frozen copy of the starting weights
        ref_model = _set_rope(cfg, build_model(cfg, torch.device("cpu") if d.world > 1 else device, d.world)[0])
        ref_model.eval().requires_grad_(False)
        ref_model.attn_implementation = cfg.attention
        if upcast:  # a bf16 base computed in fp32
            ref_model.float()
    teacher = build_teacher(cfg, device, d.world) if cfg.objective == "distill" else None
    args = (cfg.objective, cfg.dpo.beta, ref_model, cfg.grpo, teacher, cfg.distill)
    net = WithLoss(model, extra_tokens, cfg.data.packing, cfg.loss_chunk, upcast, *args)
    if d.world > 1:
        shard(net, source, device, use_bf16)
        if net.ref_net is not None:
            shard(net.ref_net, source, device, use_bf16)
        if net.teacher_net is not None:
            shard(net.teacher_net, cfg.distill.teacher, device, use_bf16)
    net.train()
    return model, source, net, extra_tokens, autocast


def build_model(cfg: TrainConfig, device: torch.device, world: int = 1):
    """Full fine-tuning: fp32 master weights (bf16 happens in autocast). LoRA on one process: the frozen base stays
    in the checkpoint's dtype (Qwen3-4B: 8 GB in bf16, not 16 in fp32), unless precision is fp32. Under FSDP the base
    is fp32 too: FSDP2 shards a block's parameters as one flat buffer of one dtype, and the adapters are fp32; and a
    model from a folder is built on the meta device, each rank filling its own shards later (`load_sharded`).
    lora.base_bits 4: every decoder linear in 4 bits (quant.py), loaded straight into them."""
    if cfg.model in PRESETS:
        model = new_model(model_shape(cfg), device=device, dtype=torch.float32, seed=cfg.seed)
        if cfg.lora.base_bits == 4:
            quantize_linears(model, LORA_TARGETS)
        return model, None
    if cfg.lora.base_bits == 4:
        return load_model_4bit(cfg.model, LORA_TARGETS, device), cfg.model
    if world > 1:
        with torch.device("meta"):
            model = Qwen3(ModelConfig.from_file(resolve_folder(cfg.model)))
        model.generation_config = {}
        return model, cfg.model
    dtype = torch.float32
    if cfg.lora.rank > 0 and cfg.precision != "fp32" and world == 1:
        dtype = stored_dtype(cfg.model)
    return load_model(cfg.model, dtype=dtype, device=device), cfg.model


def build_teacher(cfg: TrainConfig, device: torch.device, world: int) -> Qwen3:
    """distill's teacher, frozen: in its stored dtype (fp32 with precision fp32), its decoder linears in 4 bits
    (teacher_bits 4), or under FSDP fp32 on the meta device, each rank filling its shards (`shard`)."""
    dc = cfg.distill
    if dc.teacher_bits == 4:
        teacher = load_model_4bit(dc.teacher, LORA_TARGETS, device)
    elif world > 1:
        with torch.device("meta"):
            teacher = Qwen3(ModelConfig.from_file(resolve_folder(dc.teacher)))
    else:
        dtype = torch.float32 if cfg.precision == "fp32" else stored_dtype(dc.teacher)
        teacher = load_model(dc.teacher, dtype=dtype, device=device)
    teacher.attn_implementation = cfg.attention
    log.info("distill: teacher %s, %.2fB parameters", dc.teacher, sum(p.numel() for p in teacher.parameters()) / 1e9)
    return teacher.eval().requires_grad_(False)


def _set_rope(cfg: TrainConfig, model: Qwen3) -> Qwen3:
    """rope_theta / rope_scaling of the run (context extension), where set."""
    if cfg.rope_theta or cfg.rope_scaling:
        model.set_rope(cfg.rope_theta, cfg.rope_scaling or model.config.rope_scaling)
    return model


def use_bf16_compute(cfg: TrainConfig, device: torch.device, base_dtype: torch.dtype) -> bool:
    """bf16 autocast on GPUs; on CPUs only for a bf16 frozen base (LoRA) where bf16 is measured faster than fp32
    (AMX), so full fine-tuning and the demo keep their fp32 numerics on every CPU."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return device.type == "cuda" or (base_dtype == torch.bfloat16 and cpu_bf16_is_fast())


def upcast_frozen_layers(model) -> None:
    """A bf16 frozen base computed in fp32: LoRA layers convert their weight per call; any other linear layer is
    made fp32 once (the lm_head and the tied embedding are converted per call by the loss and micro_batch_loss)."""
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and name != "lm_head" and "lora_" not in name:
            module.float()


def build_tokenizer(model_source: str | None) -> Tokenizer:
    if model_source and Path(model_source, "tokenizer.json").is_file():
        return load_tokenizer(model_source)
    return load_tokenizer()


def _reference(cfg: TrainConfig) -> str:
    """DPO's reference: adapters (LoRA with them off), model (a frozen copy) or precompute."""
    return cfg.dpo.ref if cfg.dpo.ref != "auto" else ("adapters" if cfg.lora.rank > 0 else "model")


def _rollout_batches(run: Run, cursor: Cursor, rows: list, iterations: int) -> Iterator[dict]:
    """GRPO: each round of grad_accum micro-batches is rolled out with the weights of its first step, then trained
    on for num_iterations steps. A resume inside a round rolls it out again with the resumed weights."""
    d, step = run.d, run.step
    while True:
        round_, done = divmod(step, iterations)
        round_rows = [[rows[i] for i in cursor.take(run.cfg.batch_size * d.world)] for _ in range(run.cfg.grad_accum)]
        batches = [
            run.rollouts.batch(r[d.rank :: d.world], round_ * iterations + 1, j) for j, r in enumerate(round_rows)
        ]
        for i in range(iterations - done):
            if i == iterations - done - 1:
                run.data_state = cursor.state()  # the round is done: a checkpoint after it starts the next
            yield from batches
            step += 1


def resume(
    ckpts: Path,
    cfg: TrainConfig,
    net,
    optimizer,
    scheduler,
    total_steps: int,
    d: Dist,
) -> tuple[int, dict | None]:
    """Load the latest checkpoint of the run (else resume_from's, if given) -> its step and data position (0 and
    None: none). Saved by another number of ranks, the run goes on with this one's global batch (the log says so).
    A finished run goes on to this run's total: the learning-rate schedule is that of the new total from the saved
    step on."""
    if list_checkpoints(ckpts):
        latest = list_checkpoints(ckpts)[-1]
    elif cfg.resume_from:
        latest = Path(cfg.resume_from)
        if not latest.is_dir():
            raise CheckpointError(f"resume_from: {latest} is not a checkpoint folder (…/checkpoints/step-N)")
        log.info("starting from %s (resume_from): a branch of that run, written to %s", latest, cfg.out)
    else:
        return 0, None
    step, saved = load_checkpoint(latest, net, optimizer, scheduler, d, cfg.objective)
    run = saved.get("run") or {}
    if not saved.get("data"):
        raise CheckpointError(
            f"{latest}: written by an older qwen3lab without the data position; resume: false to start anew"
        )
    # the optimizer's saved learning rate is the old schedule's; LambdaLR computes the new one the same way
    scheduler._last_lr = []
    for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * f(scheduler.last_epoch)
        scheduler._last_lr.append(group["lr"])
    if run.get("total_steps") == step and total_steps > step:
        log.info(
            "continuing from step %d of a finished run (%s): %d steps more, the schedule now runs to step %d",
            step,
            latest,
            total_steps - step,
            total_steps,
        )
    elif step >= total_steps:
        log.info("%s is at step %d of %d: nothing left to train; exporting its weights", latest, step, total_steps)
    else:
        log.info("resumed from %s (step %d)", latest, step)
    if saved["world"] != d.world:
        log.warning(
            "resumed with %d ranks from a checkpoint of %d: weights and optimizer state resharded, the data "
            "continues at %s; the global batch is now %d rows (was %d), so losses will not equal an uninterrupted "
            "run's",
            d.world,
            saved["world"],
            saved["data"],
            cfg.batch_size * d.world,
            cfg.batch_size * saved["world"],
        )
    return step, saved["data"]


def checkpoints_folder(cfg: TrainConfig, out: Path) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out / "checkpoints"


def _precomputed(path: Path, net, data, d: Dist, device, autocast, pad_id, cfg) -> np.ndarray:
    """DPO's reference log-probs: read back on a resume (the model has moved since), else computed and written."""
    if path.is_file():
        return np.load(path)
    if list_checkpoints(checkpoints_folder(cfg, path.parent)):
        raise ValueError(f"{path}: missing, and the run has checkpoints: the reference can no longer be computed")
    log.info("dpo: reference log-probs of %d sequences, computed once", len(data))
    ref = precompute_reference(net, data, cfg.batch_size, d, device, autocast, pad_id)
    if d.main:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
        np.save(tmp, ref)
        os.replace(tmp, path)
    return ref


@torch.no_grad()
def precompute_reference(net, data, batch_size: int, d: Dist, device, autocast, pad_id) -> np.ndarray:
    """Summed completion log-probs of every sequence under the reference (the model as it is before training,
    adapters off), [len(data)] fp32, indexed like the examples (pair p: 2p chosen, 2p + 1 rejected). Each rank
    computes its share of every global batch; the shares are summed over ranks."""
    out = torch.zeros(len(data), dtype=torch.float64)
    pairs, step = list(range(len(data) // 2)), batch_size * d.world
    for start in range(0, len(pairs), step):
        rows = pairs[start : start + step]
        batch = to_device(rank_batch(data, rows, d, pad_id, pairs=True), device)
        with autocast():
            logps = sequence_logps(net(batch, logps="reference"), batch).double().cpu()
        for r, p in enumerate(rows[d.rank :: d.world]):
            out[2 * p], out[2 * p + 1] = logps[2 * r], logps[2 * r + 1]
    reshard(net)  # before the optimizer takes the parameters
    return d.all_sum_tensor(out).float().numpy()
