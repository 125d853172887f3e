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
from .batching import Cursor, MixCursor, make_rows, split_eval
from .config import TrainConfig
from .objectives.rollouts import load_prompts
from .parallel import Dist
from .prepare import describe, tokenizer_matches
from .shards import Ranges, is_prepared, open_prepared

log = logging.getLogger("qwen3lab")


def load_data(cfg: TrainConfig, tok: Tokenizer):
    """(data, rows, eval_data, eval_rows) for the objective. SFT: tokenized examples, rows of examples (packed or
    one each; a prepared text corpus: the documents end to end, cut every max_length tokens). DPO: examples 2i /
    2i + 1 are pair i's chosen / rejected sides, a row is a pair's index. GRPO: the prompts, a row is a prompt's
    index (its micro-batch is made by rollouts at the step that uses it). distill: as SFT, or a prompt file's
    prompts as examples with nothing learned (the student completes them)."""
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
    if cfg.data.mix:
        return _load_mixture(cfg, tok)
    if cfg.objective == "distill" and _prompts_only(cfg.data.train):
        if cfg.distill.lmbda != 1:
            raise D.DataError(
                f"{cfg.data.train}: prompts without completions; the student must sample every one: distill.lmbda: 1"
            )
        prompts = load_prompts(cfg.data.train, tok)
        data = D.TokenizedData.from_examples([(p["ids"], [0] * len(p["ids"])) for p in prompts])
        return data, make_rows(data, cfg.data.max_length, cfg.data.packing, cfg.data.pack_order, cfg.seed), None, []
    data = examples(cfg.data.train, tok, cfg, "sft")
    eval_data = None
    if cfg.data.eval:
        eval_data = examples(cfg.data.eval, tok, cfg, "sft")
    else:
        data, eval_data = split_eval(data, cfg.data.eval_fraction, cfg.seed)
    data, rows = _rows(data, cfg, cfg.data.pack_order)
    eval_data, eval_rows = _rows(eval_data, cfg, "best_fit") if eval_data else (None, [])
    return data, rows, eval_data, eval_rows


def _prompts_only(path: str) -> bool:
    """A file of GRPO-style prompt rows (`prompt` without `completion`), which distillation completes on-policy."""
    if is_prepared(path):
        return False
    row = next(D.read_rows(path), (None, None))[1]
    return isinstance(row, dict) and "prompt" in row and "completion" not in row


class Mixture:
    """The sources of data.mix as one set of examples: source 0's, then source 1's, ...; its rows likewise, each of
    one source (`rows_of[s]`: how many, `row_tokens[s]`: the tokens of each). The cursor draws among them."""

    def __init__(self, names: list[str], weights: list[float], parts: list, rows: list[list]):
        self.names, self.weights, self.parts = names, weights, parts
        self.bases = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.rows_of = [len(r) for r in rows]
        self.row_tokens = [_row_tokens(p.lengths(), r) for p, r in zip(parts, rows, strict=True)]
        self.dropped = 0

    def __len__(self) -> int:
        return int(self.bases[-1])

    def source_of(self, i: int) -> int:
        return int(np.searchsorted(self.bases, i, side="right")) - 1

    def example(self, i: int):
        s = self.source_of(i)
        return self.parts[s].example(i - int(self.bases[s]))

    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths() for p in self.parts])

    def supervised_tokens(self) -> int:
        return sum(p.supervised_tokens() for p in self.parts)


def _row_tokens(lengths: np.ndarray, rows) -> np.ndarray:
    """The tokens of each row; a text corpus's rows (shards.Ranges) without making their lists."""
    if isinstance(rows, Ranges):
        ends = np.concatenate([[0], np.cumsum(lengths)])
        return ends[rows.bounds[1:]] - ends[rows.bounds[:-1]]
    return np.array([int(lengths[row].sum()) for row in rows], dtype=np.int64)


def _load_mixture(cfg: TrainConfig, tok: Tokenizer):
    """data.mix: each source read as data.train would be (held-out rows split off each by eval_fraction), its rows
    made apart, all put together with example indices shifted to the Mixture's."""
    names, weights, parts, rows, eval_parts, eval_rows = [], [], [], [], [], []
    for source in cfg.data.mix:
        data, eval_data = split_eval(examples(source["path"], tok, cfg, "sft"), cfg.data.eval_fraction, cfg.seed)
        data, source_rows = _rows(data, cfg, cfg.data.pack_order)
        names.append(source["name"]), weights.append(source["weight"]), parts.append(data), rows.append(source_rows)
        if eval_data is not None:
            eval_data, more = _rows(eval_data, cfg, "best_fit")
            base = sum(len(p) for p in eval_parts)
            eval_parts.append(eval_data)
            eval_rows += [[i + base for i in row] for row in more]
    mixture = Mixture(names, weights, parts, rows)
    shifted = [[i + int(base) for i in row] for base, r in zip(mixture.bases, rows, strict=False) for row in r]
    if cfg.data.eval:
        eval_data, eval_rows = _rows(examples(cfg.data.eval, tok, cfg, "sft"), cfg, "best_fit")
        return mixture, shifted, eval_data, eval_rows
    eval_data = Mixture(names, weights, eval_parts, [[]] * len(eval_parts)) if eval_parts else None
    return mixture, shifted, eval_data, eval_rows


def make_cursor(cfg: TrainConfig, data, rows: list):
    """The run's cursor over its rows: a mixture's draws among its sources, or one stream."""
    if isinstance(data, Mixture):
        cursors = [Cursor(n, cfg.seed + s, cfg.data.shuffle) for s, n in enumerate(data.rows_of)]
        return MixCursor(cursors, data.weights, data.row_tokens, cfg.seed)
    return Cursor(len(rows), cfg.seed, cfg.data.shuffle)


def _rows(data, cfg: TrainConfig, order: str):
    """SFT examples -> (examples, rows): every token learned unless data.assistant_only; packed or one a row, and a
    pretraining text corpus cut into rows of max_length."""
    if not cfg.data.assistant_only:
        data = data.all_tokens_supervised()
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
