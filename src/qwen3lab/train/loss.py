"""Cross-entropy over supervised positions only, through lm_head in chunks.

A [tokens x 151,936] logits tensor is never materialised: the forward computes each chunk's logits, its loss and
at once its gradients (softmax - onehot), keeping only grad_hidden [N, hidden] and grad_weight [vocab, hidden] for
the backward. The loss is a *sum*; the training loop divides by the number of supervised tokens in the whole
optimizer step, so short micro-batches are not over-weighted (no mean of means). `head_loss` is that chunked pass for
any loss whose gradient in the logits is known in closed form: the cross-entropy here, distillation's divergence
(objectives/distill.py).
"""

from __future__ import annotations

import torch

from ..model.head import block, chunked_logps, fp32_logits, reused_blocks

IGNORE = -100


class _ChunkedHeadLoss(torch.autograd.Function):
    """A loss over lm_head(hidden) whose gradient with respect to the logits is known in closed form, taken chunk by
    chunk: each chunk's logits, its loss and at once the gradient (per_chunk), keeping only grad_hidden [N, H] and
    grad_weight [V, H] for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, extra_ids, extra_delta, per_chunk, chunk_size):
        # hidden [N, H], weight [V, H] -> summed loss (fp32 scalar), each position's loss [N]. extra_delta [k, H] is
        # added to the rows extra_ids [k] of weight (trained token rows of a frozen tied embedding) without copying
        # weight. per_chunk(logits, rows, need_grad) -> (loss, loss per position [n], grad of the loss with respect to
        # the logits [n, V] or None); logits() makes the chunk's [n, V] fp32 logits, a block per_chunk owns (and can
        # free or overwrite as soon as it has read them: a [n, vocab] block is the loss's unit of memory).
        need_h, need_w, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        need = need_h or need_w or need_d
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # [V, H] fp32, made by the first chunk's product (not zero-filled, then added to)
        grad_d = torch.zeros_like(extra_delta, dtype=torch.float32) if need_d else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        each = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N], for metrics
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            rows = slice(start, start + len(h))
            chunk_loss, each[rows], grad_logits = per_chunk(_logits_of(h, weight, extra_ids, extra_delta), rows, need)
            loss += chunk_loss
            if not need:
                continue
            grad_logits = grad_logits.to(weight.dtype)
            if need_h:
                grad_h[rows] = grad_logits @ weight
            if need_w:
                if grad_w is None:
                    grad_w = (grad_logits.T @ h).float()
                elif grad_w.dtype == h.dtype:
                    grad_w.addmm_(grad_logits.T, h)
                else:  # bf16 compute: the product in bf16, accumulated in fp32
                    grad_w += (grad_logits.T @ h).float()
            if extra_delta is not None and (need_h or need_d):
                g = grad_logits[:, extra_ids]  # [n, k]: the trained rows' share of the gradient
                if need_h:
                    grad_h[rows] += (g @ extra_delta.to(g.dtype)).to(grad_h.dtype)
                if need_d:
                    grad_d += g.T.float() @ h.float()
        ctx.save_for_backward(grad_h, grad_w, grad_d)
        ctx.weight_dtype, ctx.delta_dtype = weight.dtype, None if extra_delta is None else extra_delta.dtype
        ctx.mark_non_differentiable(each)
        return loss, each

    @staticmethod
    def backward(ctx, grad_loss, _grad_each):
        # scaled in place: these buffers were made for this one backward, and grad_w is [vocab, hidden]
        grad_h, grad_w, grad_d = ctx.saved_tensors
        grad_h = grad_h.mul_(grad_loss) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        grad_d = grad_d.mul_(grad_loss).to(ctx.delta_dtype) if grad_d is not None else None
        return grad_h, grad_w, None, grad_d, None, None


def head_loss(h: torch.Tensor, weight: torch.Tensor, per_chunk, chunk_size: int, extra_rows=None):
    """(summed loss, loss per position [N] without gradient) of per_chunk over lm_head(h) for h [N, H], chunk by
    chunk (see _ChunkedHeadLoss); the gradient is kept only when grad is enabled."""
    extra_ids, extra_delta = extra_rows if extra_rows is not None else (None, None)
    with reused_blocks():
        if torch.is_grad_enabled():
            return _ChunkedHeadLoss.apply(h, weight, extra_ids, extra_delta, per_chunk, chunk_size)
        loss, each = torch.zeros((), dtype=torch.float32, device=h.device), []
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, min(start + chunk_size, h.shape[0]))
            chunk_loss, chunk_each, _ = per_chunk(_logits_of(h[rows], weight, extra_ids, extra_delta), rows, False)
            loss += chunk_loss
            each.append(chunk_each)
    return loss, torch.cat(each) if each else h.new_zeros(0, dtype=torch.float32)


def _logits_of(h, weight, extra_ids, extra_delta):
    """The logits of a chunk, made when called: in the compute dtype, then fp32 as transformers does."""
    return lambda: fp32_logits(h, weight, extra_ids, extra_delta)


def _cross_entropy(targets: torch.Tensor, token_weights: torch.Tensor | None):
    """per_chunk of the cross-entropy against targets [N], each position weighted by token_weights [N] (or 1)."""

    def per_chunk(logits, rows, need_grad):
        # log_softmax is one fused row-wise kernel, where logsumexp + sub + exp would stream the [n, vocab] block
        # through memory several times
        x = logits()
        logp = torch.log_softmax(x, dim=-1, out=block("logp", *x.shape, x.device))  # [n, V]
        t = targets[rows]
        ce = -logp.gather(1, t[:, None])[:, 0]  # [n]
        w = None if token_weights is None else token_weights[rows].float()
        loss = (ce if w is None else ce * w).sum()
        if not need_grad:
            return loss, ce, None
        grad = logp.exp_()  # softmax - onehot, in place
        grad[torch.arange(len(t), device=t.device), t] -= 1
        return loss, ce, grad if w is None else grad.mul_(w[:, None])

    return per_chunk


def supervised(hidden, weight, labels):
    """hidden [B, T, H], labels [B, T] -> hidden [N, H] and targets [N] of the supervised positions, and the
    weight to multiply them with (a bf16-stored frozen base computed in fp32: converted once per call)."""
    keep = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    if weight.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        weight = weight.to(h.dtype)
    return h, labels.reshape(-1)[keep], weight


def lm_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    extra_rows=None,
    token_weights: torch.Tensor | None = None,
    per_token: bool = False,
):
    """Summed cross-entropy of lm_head(hidden) against labels, over positions whose label is not -100.

    hidden [B, T, H] final hidden states; weight [V, H] lm_head weight; labels [B, T] already shifted (label t is the
    token after position t). extra_rows: (token_ids [k], delta [k, H]) added to those rows of weight, for trained
    token rows of a tied embedding. token_weights [N]: one weight per supervised position, in order (objectives/).
    Returns (loss_sum, number of supervised tokens), and with per_token the unweighted cross-entropy of each
    supervised position [N] (no gradient: for metrics, e.g. the loss per data source).
    """
    h, targets, weight = supervised(hidden, weight, labels)
    if h.shape[0] == 0:
        out = hidden.sum() * 0.0, 0
        return (*out, hidden.new_zeros(0, dtype=torch.float32)) if per_token else out
    loss, each = head_loss(h, weight, _cross_entropy(targets, token_weights), chunk_size, extra_rows)
    return (loss, int(targets.numel()), each) if per_token else (loss, int(targets.numel()))


@torch.no_grad()
def token_logprobs(hidden, weight, labels, chunk_size: int = 1024, extra_rows=None, entropy: bool = False):
    """Log-probabilities [N] (fp32) of the supervised targets, chunk by chunk through lm_head, and with entropy=True
    the entropy [N] of each of those positions' distributions too."""
    h, targets, weight = supervised(hidden, weight, labels)
    extra_ids, extra_delta = extra_rows if extra_rows is not None else (None, None)
    logps, entropies = [], []
    with reused_blocks():
        for start, logp in chunked_logps(h, weight, chunk_size, extra_ids, extra_delta):
            logps.append(logp.gather(1, targets[start : start + chunk_size, None])[:, 0])
            if entropy:  # -sum p log p, p in the logits' block (read by the log-softmax already)
                p = torch.exp(logp, out=block("logits", *logp.shape, logp.device))
                entropies.append(-p.mul_(logp).sum(-1))
    empty = h.new_zeros(0, dtype=torch.float32)
    logps = torch.cat(logps) if logps else empty
    return (logps, torch.cat(entropies) if entropies else empty) if entropy else logps
