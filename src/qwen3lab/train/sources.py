"""A run's data: its training and held-out examples and the rows they make, from data files (tokenised at start,
cached) or prepared folders (`qwen3lab prepare`, memory-mapped shards)."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np

from ..text.tokenizer import Tokenizer
from . import data as D
from .batching import make_rows, split_eval
from .config import TrainConfig
from .objectives.rollouts import load_prompts
from .parallel import Dist
from .prepare import describe, tokenizer_matches
from .shards import is_prepared, open_prepared

log = logging.getLogger("qwen3lab")


def load_data(cfg: TrainConfig, tok: Tokenizer):
    """(data, rows, eval_data, eval_rows) for the objective. SFT: tokenized examples, rows of examples (packed or
    one each; a prepared text corpus: the documents end to end, cut every max_length tokens). DPO: examples 2i /
    2i + 1 are pair i's chosen / rejected sides, a row is a pair's index. GRPO: the prompts, a row is a prompt's
    index (its micro-batch is made by rollouts at the step that uses it)."""
    if cfg.objective == "grpo":
        if is_prepared(cfg.data.train):
            raise D.DataError(f"{cfg.data.train}: GRPO reads its prompts from a file (the rewards read their columns)")
        prompts = load_prompts(cfg.data.train, tok)
        return prompts, list(range(len(prompts))), None, []
    if cfg.objective == "dpo":
        data = examples(cfg.data.train, tok, cfg, "pairs")
        rows = list(range(len(data) // 2))
        if cfg.data.eval:
            eval_data = examples(cfg.data.eval, tok, cfg, "pairs")
            return data, rows, eval_data, list(range(len(eval_data) // 2))
        if cfg.data.eval_fraction <= 0:
            return data, rows, data, []
        random.Random(cfg.seed).shuffle(rows)
        n_eval = max(1, int(len(rows) * cfg.data.eval_fraction))
        return data, sorted(rows[n_eval:]), data, sorted(rows[:n_eval])
    data = examples(cfg.data.train, tok, cfg, "sft")
    eval_data = None
    if cfg.data.eval:
        eval_data = examples(cfg.data.eval, tok, cfg, "sft")
    else:
        data, eval_data = split_eval(data, cfg.data.eval_fraction, cfg.seed)
    if not cfg.data.assistant_only:
        data = data.all_tokens_supervised()
        eval_data = eval_data.all_tokens_supervised() if eval_data else None
    data, rows = _rows(data, cfg, cfg.data.pack_order)
    eval_data, eval_rows = _rows(eval_data, cfg, "best_fit") if eval_data else (None, [])
    return data, rows, eval_data, eval_rows


def _rows(data, cfg: TrainConfig, order: str):
    if getattr(data, "stream", False) and cfg.data.packing:  # pretraining text: cut, not packed
        return data.windows(cfg.data.max_length)
    return data, make_rows(data, cfg.data.max_length, cfg.data.packing, order, cfg.seed)


def examples(path: str, tok: Tokenizer, cfg: TrainConfig, want: str):
    """The examples of a data file or a prepared folder; want: sft (chats, completions, text) or pairs."""
    if not is_prepared(path):
        if want == "pairs":
            return D.load_preferences(path, tok, cfg.data.max_length)
        cache_dir = Path(os.environ.get("QWEN3LAB_CACHE", "~/.cache/qwen3lab")).expanduser() / "data"
        return D.load_tokenized(path, tok, cfg.data.max_length, cache_dir)
    corpus, manifest = open_prepared(path)
    log.info("data: %s (prepared) — %s", path, describe(manifest))
    if not tokenizer_matches(manifest, tok):
        raise D.DataError(
            f"{path}: prepared with another tokenizer or chat template than this run's model; "
            f"prepare it again with --model {cfg.model}"
        )
    kind, limit = manifest["kind"], cfg.data.max_length
    if (kind == "pairs") != (want == "pairs"):
        raise D.DataError(f"{path}: a prepared {kind} corpus; objective {cfg.objective} trains on {want} examples")
    if manifest["counts"]["text_rows"] and not (corpus.stream and cfg.data.packing):
        # text rows are kept whole by prepare; rows of one example each, or text among chats, are cut here
        corpus.ends = np.minimum(corpus.ends, corpus.starts + limit)
        corpus._supervised = None
    longer = int((corpus.lengths() > limit).sum()) if not corpus.stream else 0
    if longer:  # cut here, some could lose every learned token, and the counts would be wrong
        raise D.DataError(
            f"{path}: {longer} examples are longer than data.max_length {limit} (prepared at "
            f"{manifest['max_length']}); prepare it again with --max-length {limit}"
        )
    return corpus


def log_data(cfg: TrainConfig, d: Dist, data, rows: list, total_steps: int) -> None:
    if cfg.objective == "grpo":
        log.info(
            "data: %d prompts; %d steps of %d x %d prompts x %d completions",
            len(rows),
            total_steps,
            cfg.grad_accum,
            cfg.batch_size,
            cfg.grpo.num_generations,
        )
        return
    dpo = cfg.objective == "dpo"
    log.info(
        "data: %d %s (%d supervised tokens) in %d rows%s; %d steps of %d x %d rows x %d ranks",
        len(rows) if dpo else len(data),
        "pairs" if dpo else "examples",
        data.supervised_tokens(),
        len(rows),
        " packed" if cfg.data.packing or dpo else "",
        total_steps,
        cfg.grad_accum,
        cfg.batch_size,
        d.world,
    )
