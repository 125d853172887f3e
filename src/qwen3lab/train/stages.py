"""Stages: phases of one run (config `stages:`), as Qwen3 was pretrained — general text, then reasoning-heavy data,
then long context with a larger RoPE base or YaRN. Each stage has its own steps, data (a file, a prepared folder or
a mixture), learning rate and schedule, and RoPE; the model, its adapters and the optimizer go on across them.

The run's step says which stage it is in; a checkpoint holds the stage beside its data position, so a run stopped
anywhere — inside a stage or at a boundary — resumes to the steps it would have taken.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np

from ..model.config import ConfigError
from .batching import eval_batches, rank_batch
from .config import TrainConfig, _check_mix, flatten_keys, set_key
from .sources import Mixture, load_data, log_data, make_cursor

log = logging.getLogger("qwen3lab")

# what a stage may change; the rest (model, adapters, optimizer, batch) is the run's
STAGE_KEYS = ("steps", "data.", "optim.lr", "optim.muon_lr", "optim.schedule", "optim.warmup_steps")
STAGE_KEYS += ("optim.decay_fraction", "optim.min_lr_ratio", "rope_theta", "rope_scaling")
STAGE_KEYS += ("distill.lmbda", "distill.beta", "distill.temperature", "distill.max_new_tokens", "distill.top_p")


def stage_configs(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """The run's stages as (name, config): the run's keys with each stage's changes (not those of the stages
    before it). A run without stages is its one stage."""
    if not cfg.stages:
        return [("", cfg)]
    out = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("steps"), int) or stage["steps"] < 1:
            raise ConfigError(f"{where}: {stage!r}; a stage is a mapping with steps (>= 1) and the keys it changes")
        c = dataclasses.replace(cfg, stages=[], data=dataclasses.replace(cfg.data))
        c.optim, c.distill = dataclasses.replace(cfg.optim), dataclasses.replace(cfg.distill)
        changes = flatten_keys({k: v for k, v in stage.items() if k != "name"})
        if "data.mix" in changes:
            c.data.train = ""
        elif "data.train" in changes:
            c.data.mix = []
        for key, value in changes.items():
            if not key.startswith(STAGE_KEYS):
                raise ConfigError(f"{where}.{key}: a stage may change {', '.join(STAGE_KEYS)}; this is the run's")
            try:
                set_key(c, key, value)
            except ConfigError as e:
                raise ConfigError(f"{where}.{e}") from None
        if c.data.mix:
            c.data.mix = _check_mix(c)
        out.append((str(stage.get("name") or f"stage{i}"), c))
    return out


def stage_ends(stages: list[tuple[str, TrainConfig]]) -> np.ndarray:
    return np.cumsum([c.steps for _, c in stages])  # [stages] the step each stage ends at


def staged_batches(run, stages: list[tuple[str, TrainConfig]], first: tuple, saved: dict | None):
    """The run's micro-batches stage by stage, from the stage of run.step on: each stage's data is read when it
    begins (the first stage's is `first`, read at start), its cursor restored from `saved` (a checkpoint's data
    position) if that checkpoint was taken inside it."""
    ends = stage_ends(stages)
    i = min(int(np.searchsorted(ends, run.step, side="right")), len(stages) - 1)
    while True:
        name, cfg = stages[i]
        data, rows, eval_data, eval_rows = first if i == 0 else load_data(cfg, run.tok)
        cursor = make_cursor(cfg, data, rows)
        if saved and saved.get("stage", 0) == i:
            cursor.restore(saved)
        saved = None
        _enter(run, i, name, cfg, data, rows, eval_data, eval_rows)
        left = int(ends[i]) - run.step if i < len(stages) - 1 else None  # the last stage: as long as the run asks
        on_policy = run.rollouts if cfg.objective == "distill" else None  # the stage's lmbda (set by _enter)
        yield from micro_batches(run, cursor, data, rows, steps=left, stage=i, on_policy=on_policy)
        i += 1


def micro_batches(run, cursor, data, rows, ref_logps=None, steps=None, stage=None, on_policy=None):
    """This rank's micro-batches from the cursor on, for `steps` optimizer steps (None: as many as asked for); the
    rows of global micro-batch m depend on (seed, epoch, rows taken) alone. run.data_state follows the cursor (and
    the stage, in a staged run), for the checkpoint after each step. With on_policy (distillation), the micro-batches
    its lmbda draws are the student's completions of their rows' prompts, sampled with the weights of their step."""
    global_rows, pairs, accum, first = (
        run.cfg.batch_size * run.d.world,
        run.cfg.objective == "dpo",
        run.cfg.grad_accum,
        run.step,
    )
    for k in range(steps * accum) if steps is not None else itertools.count():
        taken = [rows[i] for i in cursor.take(global_rows)]
        run.data_state = cursor.state() if stage is None else {"stage": stage, **cursor.state()}
        step, micro = first + k // accum + 1, k % accum
        if on_policy is not None and on_policy.draw(step, micro):
            yield on_policy.batch(data, taken[run.d.rank :: run.d.world], step, micro)
        else:
            yield rank_batch(data, taken, run.d, run.tok.pad_token_id, pairs, ref_logps)


def _enter(run, i: int, name: str, cfg: TrainConfig, data, rows, eval_data, eval_rows) -> None:
    """A stage begins (or a resumed run is inside it): its RoPE, its held-out data, its sources' names."""
    model = run.model
    theta, scaling = model.checkpoint_rope
    model.set_rope(cfg.rope_theta or theta, cfg.rope_scaling or scaling)
    log.info(
        "stage %d (%s) from step %d: rope_theta %g%s, lr %g, %s",
        i,
        name,
        run.step,
        model.config.rope_theta,
        f", rope_scaling {model.config.rope_scaling}" if model.config.rope_scaling else "",
        cfg.optim.lr,
        cfg.data.train or ", ".join(m["path"] for m in cfg.data.mix),
    )
    log_data(cfg, run.d, data, rows, int(run.total_steps))
    global_rows, pad = run.cfg.batch_size * run.d.world, run.tok.pad_token_id
    run.eval_batches = lambda: eval_batches(eval_data, eval_rows, global_rows, run.d, pad)
    run.has_eval = bool(len(eval_rows))
    run.sources = data.names if isinstance(data, Mixture) else []
    if run.rollouts is not None:  # distillation: the stage's lmbda, beta, temperature, sampling
        run.rollouts.dc = run.net.distill = cfg.distill
