"""Log-probabilities through the tied lm_head in chunks, never a [tokens, vocab] tensor in all: what the
training losses (train/loss.py) and the engine's and lm-eval's log-probs share."""

from __future__ import annotations

import torch


def head_logits(h, weight, extra_ids, extra_delta):
    logits = h @ weight.T
    if extra_delta is not None:
        logits.index_add_(1, extra_ids, (h @ extra_delta.to(h.dtype).T).to(logits.dtype))
    return logits


def chunked_logps(h, weight, chunk_size: int, extra_ids=None, extra_delta=None):
    """(start, log_softmax(lm_head(h[start : start + chunk_size])) [n, V] fp32) for each chunk of h [N, H]."""
    for start in range(0, h.shape[0], chunk_size):
        yield (
            start,
            torch.log_softmax(head_logits(h[start : start + chunk_size], weight, extra_ids, extra_delta).float(), -1),
        )


@torch.no_grad()
def logprobs_topk(hidden, weight, targets, k: int, chunk_size: int = 256):
    """hidden [N, H] -> the log-prob [N] (fp32) of each target under lm_head(hidden), and the k most likely tokens
    at each position: ids [N, k] and log-probs [N, k] — chunk by chunk, never a [N, vocab] tensor in all."""
    logps, top_ids, top_logps = [], [], []
    for start, logp in chunked_logps(hidden, weight, chunk_size):
        logps.append(logp.gather(1, targets[start : start + chunk_size, None])[:, 0])
        top = logp.topk(k, -1)
        top_ids.append(top.indices)
        top_logps.append(top.values)
    if not logps:
        return hidden.new_zeros(0).float(), targets.new_zeros(0, k), hidden.new_zeros(0, k).float()
    return torch.cat(logps), torch.cat(top_ids), torch.cat(top_logps)
