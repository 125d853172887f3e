"""Log-probabilities through the tied lm_head in chunks, never a [tokens, vocab] tensor in all: what the
training losses (train/loss.py) and the engine's and lm-eval's log-probs share."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_reuse = threading.local()  # .blocks: {(role, dtype, device): tensor} while reused_blocks() is entered


@contextmanager
def reused_blocks():
    """Within, block() hands out one buffer per role (grown to the largest chunk), so a pass of many chunks over
    lm_head maps its [chunk, vocab] blocks once. PyTorch's CPU allocator is plain malloc: a block of this size is
    mapped afresh and zeroed by the kernel for each chunk, or kept in a heap that fragments (bench/grpo.py: peak RSS
    2.9 GiB kept, against 1.5 GiB live). Nested uses share the outermost's buffers; they are freed when it exits."""
    if getattr(_reuse, "blocks", None) is not None:
        yield
        return
    _reuse.blocks = {}
    try:
        yield
    finally:
        _reuse.blocks = None


def block(role: str, n: int, vocab: int, device, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised [n, vocab] tensor: `role`'s reused buffer inside reused_blocks(), a new one outside. A
    role's buffer is overwritten by the next call for that role."""
    blocks = getattr(_reuse, "blocks", None)
    if blocks is None:
        return torch.empty(n, vocab, dtype=dtype, device=device)
    key = (role, dtype, torch.device(device))
    b = blocks.get(key)
    if b is None or b.shape[0] < n or b.shape[1] != vocab:
        del b
        blocks.pop(key, None)  # freed before the larger one is made
        b = blocks[key] = torch.empty(n, vocab, dtype=dtype, device=device)
    return b[:n]


def head_logits(h, weight, extra_ids, extra_delta, out=None):
    logits = torch.matmul(h, weight.T, out=out)
    if extra_delta is not None:
        logits.index_add_(1, extra_ids, (h @ extra_delta.to(h.dtype).T).to(logits.dtype))
    return logits


def chunked_logps(h, weight, chunk_size: int, extra_ids=None, extra_delta=None):
    """(start, log_softmax(lm_head(h[start : start + chunk_size])) [n, V] fp32) for each chunk of h [N, H]; inside
    reused_blocks() each chunk's log-probs overwrite the last chunk's."""
    for start in range(0, h.shape[0], chunk_size):
        x = h[start : start + chunk_size]
        logits = fp32_logits(x, weight, extra_ids, extra_delta)
        yield start, torch.log_softmax(logits, -1, out=block("logp", len(x), len(weight), x.device))


def fp32_logits(h, weight, extra_ids=None, extra_delta=None, role: str = "logits"):
    """lm_head(h) [n, V] in the compute dtype, then fp32 as transformers does (role's block)."""
    if torch.is_autocast_enabled(h.device.type) or h.dtype != weight.dtype:
        logits = head_logits(h, weight, extra_ids, extra_delta)  # autocast picks the product's dtype
    else:
        logits = head_logits(h, weight, extra_ids, extra_delta, out=block(role, len(h), len(weight), h.device, h.dtype))
    if logits.dtype == torch.float32:
        return logits
    return block(role, len(h), len(weight), h.device).copy_(logits)


@torch.no_grad()
def logprobs_topk(hidden, weight, targets, k: int, chunk_size: int = 256):
    """hidden [N, H] -> the log-prob [N] (fp32) of each target under lm_head(hidden), and the k most likely tokens
    at each position: ids [N, k] and log-probs [N, k] — chunk by chunk, never a [N, vocab] tensor in all."""
    logps, top_ids, top_logps = [], [], []
    with reused_blocks():
        for start, logp in chunked_logps(hidden, weight, chunk_size):
            logps.append(logp.gather(1, targets[start : start + chunk_size, None])[:, 0])
            top = logp.topk(k, -1)
            top_ids.append(top.indices)
            top_logps.append(top.values)
    if not logps:
        return hidden.new_zeros(0).float(), targets.new_zeros(0, k), hidden.new_zeros(0, k).float()
    return torch.cat(logps), torch.cat(top_ids), torch.cat(top_logps)
