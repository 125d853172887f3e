"""One engine step's work on its rows' logits [n, V]: the grammar masks of constrained rows, one token per row
(rows that share a SamplingParams object sampled together), and the log-probs each request asked for."""

from __future__ import annotations

import torch

from . import grammar
from .sampling import process_logits, sample


def constrain(requests: list, logits: torch.Tensor) -> torch.Tensor:
    """The logits with what each constrained row's grammar forbids at -inf; a row whose grammar is complete may also
    take its stop ids. In place, unless a row reports log-probs (those stay the model's)."""
    rows = [i for i, r in enumerate(requests) if r.matcher is not None]
    if not rows:
        return logits
    masked = grammar.forbidden([requests[i].matcher for i in rows], logits.shape[1])
    for j, i in enumerate(rows):
        if requests[i].matcher.is_accepting():
            masked[j, sorted(requests[i].stops)] = False
    if any(r.params.logprobs is not None for r in requests):
        logits = logits.clone()
    if len(rows) == len(requests):  # every row held: one pass over the logits
        return logits.masked_fill_(masked.to(logits.device), float("-inf"))
    logits[rows] = logits[rows].masked_fill_(masked.to(logits.device), float("-inf"))
    return logits


def sample_rows(requests: list, logits: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """One token per request. Rows that share a SamplingParams object and have no generator or history of their own
    are sampled together, from `generator`; the others one by one."""
    tokens: list[int | None] = [None] * len(requests)
    logits = constrain(requests, logits)
    shared: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        if request.generator is None and request.history is None:
            shared.setdefault(id(request.params), []).append(i)
            continue
        p = request.params
        tokens[i] = int(sample(process_logits(logits[i : i + 1], request.history, p), p, request.generator)[0])
        _emit_sampled_logprobs([request], logits[i : i + 1], tokens[i : i + 1])
        if request.history is not None:
            request.history = torch.cat([request.history, request.history.new_tensor([[tokens[i]]])], 1)
    for rows in shared.values():
        p = requests[rows[0]].params
        picked = sample(process_logits(logits[rows], None, p), p, generator).tolist()
        for i, token in zip(rows, picked, strict=True):
            tokens[i] = token
        _emit_sampled_logprobs([requests[i] for i in rows], logits[rows], picked)
    return tokens


def _emit_sampled_logprobs(requests: list, logits: torch.Tensor, tokens: list[int]) -> None:
    """("sampled_logprob", logp) before each token or stop id, for requests whose params ask: the token's log-prob
    under the distribution it was sampled from at the sampling temperature (its grammar's mask applied; before
    top-k / top-p / min-p cut it, as vLLM's processed logprobs), which is what a trainer recomputes."""
    p = requests[0].params
    if not p.sampled_logprobs:
        return
    scaled = logits.float() / p.temperature if p.temperature > 0 else logits.float()
    logp = torch.log_softmax(scaled, -1).gather(1, torch.tensor(tokens, device=logits.device)[:, None])
    for request, value in zip(requests, logp[:, 0].tolist(), strict=True):
        request.emit("sampled_logprob", value)


def emit_logprobs(requests: list, logits: torch.Tensor, tokens: list[int]) -> None:
    """("logprob", (logp, [(id, logp), ...])) for the rows that asked, before their token or stop id."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return
    logp = torch.log_softmax(logits[rows], -1)  # [n, V]
    picked = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logp.device))[:, 0]
    k = max(requests[i].params.logprobs for i in rows)
    top = logp.topk(max(k, 1), -1)
    for j, entry in enumerate(entries(picked, top.indices, top.values, k)):
        request = requests[rows[j]]
        request.emit("logprob", (entry[0], entry[1][: request.params.logprobs]))


def entries(logps, top_ids, top_logps, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Tensors [N], [N, >= k], [N, >= k] -> per position (log-prob, [(id, log-prob)] of the k most likely)."""
    top = [list(zip(i[:k], v[:k], strict=True)) for i, v in zip(top_ids.tolist(), top_logps.tolist(), strict=True)]
    return list(zip(logps.tolist(), top, strict=True))
