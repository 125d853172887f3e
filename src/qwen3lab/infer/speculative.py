"""Speculative decoding by prompt lookup (a draft model's drafts: draft.py): each decode step, a row proposes up to k
draft tokens — those that followed an earlier occurrence of its last n tokens (n = 3, 2, 1) in its own prompt and
output — and the model checks them all in one forward of 1 + k positions. A row keeps the drafts the model agrees with
and one token of the model's own after them, so a step gives 1 to k + 1 tokens for about the cost of one where
decoding is bandwidth-bound: the win of edits, code changes and quotes, whose output copies the prompt.

Greedy rows keep a draft while it is the argmax: the output is plain decoding's. Sampling rows accept draft d with
probability p(d) and otherwise sample from p with d taken out (speculative sampling, Leviathan et al. 2023 / Chen et
al. 2023, with a draft that puts all its mass on one token), so what they sample is distributed as the model's."""

from __future__ import annotations

import numpy as np
import torch

from .sampling import process_logits, sample

MAX_NGRAM = 3


def lookup(seen: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n tokens of `seen` (longest n first): the
    latest occurrence with k tokens after it, else the earliest (a loop's latest one is followed by little)."""
    if k < 1 or len(seen) < 2:
        return []
    h = np.asarray(seen)
    for n in range(min(max_ngram, len(h) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)  # [L - n, n]: each followed by a token
        hits = np.flatnonzero((windows == h[-n:]).all(1))
        if hits.size:
            full = hits[hits + n + k <= len(h)]
            start = int(full[-1] if full.size else hits[0]) + n
            return h[start : start + k].tolist()
    return []


def budget(request, k: int, max_context: int) -> int:
    """How many drafts a running row may propose this step: none for rows whose sampling the check does not cover (a
    grammar, a repetition penalty, log-probs to report) or that wait after drafts that failed."""
    p = request.params
    if request.matcher is not None or p.repetition_penalty != 1.0 or p.logprobs is not None or p.sampled_logprobs:
        return 0
    if request.draft_wait > 0:  # its last drafts all failed: plain steps for a while
        request.draft_wait -= 1
        return 0
    # the model's own token still comes after the drafts: the budget and the context leave room for it
    return max(0, min(k, p.max_new_tokens - request.generated - 1, max_context - request.length - 2))


def drafts_for(request, k: int, max_context: int) -> list[int]:
    """The drafts a running row proposes this step by prompt lookup."""
    return lookup(request.seen, budget(request, k, max_context))


def record(request, accepted: int) -> None:
    """After drafts of which none was accepted, the row waits 1, 3, 7, 15, then 16 steps before it drafts again:
    where the output does not copy, each drafting step pays a longer forward for nothing."""
    request.draft_misses = 0 if accepted else request.draft_misses + 1
    request.draft_wait = min(2**request.draft_misses - 1, 16)


def verify(logits: torch.Tensor, drafts: list[int], p, generator: torch.Generator | None, q=None) -> list[int]:
    """logits [1 + len(drafts), V] fp32 at the row's next token and at each draft -> the tokens the row takes: the
    drafts the model accepts, then one of its own. q [len(drafts), V]: a draft model's probabilities the drafts were
    drawn from (draft.py); None: all of a draft's mass on it (prompt lookup)."""
    scores = process_logits(logits, None, p)  # temperature, top-k, top-p, min-p at each position
    if p.temperature <= 0:
        best = scores.argmax(-1).tolist()
        taken = 0
        while taken < len(drafts) and drafts[taken] == best[taken]:
            taken += 1
        return drafts[:taken] + [best[taken]]
    probs = scores.softmax(-1)
    accept = torch.rand(len(drafts), generator=generator, device=logits.device)
    for t, d in enumerate(drafts):
        if accept[t] >= (probs[t, d] if q is None else probs[t, d] / q[t, d]):  # rejected: from max(0, p - q)
            rest = probs[t].clone() if q is None else (probs[t] - q[t]).clamp(min=0)
            if q is None:
                rest[d] = 0
            return drafts[:t] + [int(torch.multinomial(rest, 1, generator=generator))]
    return drafts + [int(sample(scores[-1:], p, generator)[0])]
