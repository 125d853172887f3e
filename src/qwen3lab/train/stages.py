"""Stages: phases of one run (config `stages:`), as Qwen3 was pretrained — general text, then reasoning-heavy data,
then long context with a larger RoPE base or YaRN. Each stage has its own steps, data (a file, a prepared folder or
a mixture), learning rate and schedule, and RoPE; the model, its adapters and the optimizer go on across them.

The run's step says which stage it is in; a checkpoint holds the stage beside its data position, so a run stopped
anywhere — inside a stage or at a boundary — resumes to the steps it would have taken.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from .batching import rank_batch
from .config import TrainConfig
from .sources import Mixture, load_data, log_data, make_cursor

log = logging.getLogger("qwen3lab")


def stage_ends(stages: list[tuple[str, TrainConfig]]) -> np.ndarray:
    return np.cumsum([c.steps for _, c in stages])  # [stages] the step each stage ends at


def staged_batches(run, stages: list[tuple[str, TrainConfig]], first: tuple, saved: dict | None):
    """The run's micro-batches stage by stage, from the stage of run.step on: each stage's data is read when it
    begins (the first stage's is `first`, read at start), its cursor restored from `saved` (a checkpoint's data
    position) if that checkpoint was taken inside it."""
    ends = stage_ends(stages)
    i = min(int(np.searchsorted(ends, run.step, side="right")), len(stages) - 1)
    global_rows = run.cfg.batch_size * run.d.world
    while True:
        name, cfg = stages[i]
        data, rows, eval_data, eval_rows = first if i == 0 else load_data(cfg, run.tok)
        cursor = make_cursor(cfg, data, rows)
        if saved and saved.get("stage", 0) == i:
            cursor.restore(saved)
        saved = None
        _enter(run, i, name, cfg, data, rows, eval_data, eval_rows)
        left = int(ends[i]) - run.step if i < len(stages) - 1 else None  # the last stage: as long as the run asks
        for _ in range(left * run.cfg.grad_accum) if left is not None else itertools.count():
            taken = [rows[j] for j in cursor.take(global_rows)]
            run.data_state = {"stage": i, **cursor.state()}
            yield rank_batch(data, taken, run.d, run.tok.pad_token_id)
        i += 1


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

    def eval_batches():
        for start in range(0, len(eval_rows), global_rows):
            yield rank_batch(eval_data, eval_rows[start : start + global_rows], run.d, pad)

    run.eval_batches, run.has_eval = eval_batches, bool(len(eval_rows))
    run.sources = data.names if isinstance(data, Mixture) else []
