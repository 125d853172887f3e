"""Cross-entropy over supervised positions only, through lm_head in chunks.

A [tokens x 151,936] logits tensor is never materialised: the forward computes each chunk's logits, its loss and
at once its gradients (softmax - onehot), keeping only grad_hidden [N, hidden] and grad_weight [vocab, hidden] for
the backward. The loss is a *sum*; the training loop divides by the number of supervised tokens in the whole
optimizer step, so short micro-batches are not over-weighted (no mean of means).
"""

from __future__ import annotations

import torch

from ..model.head import chunked_logps, head_logits

IGNORE = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, extra_ids, extra_delta, token_weights):
        # hidden [N, H], weight [V, H], targets [N] -> summed loss (fp32 scalar). extra_delta [k, H] is added to the
        # rows extra_ids [k] of weight (trained token rows of a frozen tied embedding) without copying weight.
        # token_weights [N] (or None: all 1) weigh each position's cross-entropy in the sum.
        need_h, need_w, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # [V, H] fp32, made by the first chunk's product (not zero-filled, then added to)
        grad_d = torch.zeros_like(extra_delta, dtype=torch.float32) if need_d else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        per_token = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N], for metrics
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            # logits in the compute dtype, then fp32 as transformers does; log_softmax is one fused row-wise kernel,
            # where logsumexp + sub + exp would stream the [n, vocab] block through memory several times
            logp = torch.log_softmax(head_logits(h, weight, extra_ids, extra_delta).float(), dim=-1)  # [n, V]
            w = None if token_weights is None else token_weights[start : start + chunk_size, None].float()
            target_logp = logp.gather(1, t[:, None])
            per_token[start : start + chunk_size] = -target_logp[:, 0]
            loss -= (target_logp if w is None else target_logp * w).sum()
            if need_h or need_w or need_d:
                grad_logits = logp.exp_()  # softmax, in place
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1
                if w is not None:
                    grad_logits *= w
                grad_logits = grad_logits.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = grad_logits @ weight
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
                        grad_h[start : start + chunk_size] += (g @ extra_delta.to(g.dtype)).to(grad_h.dtype)
                    if need_d:
                        grad_d += g.T.float() @ h.float()
        ctx.save_for_backward(grad_h, grad_w, grad_d)
        ctx.weight_dtype, ctx.delta_dtype = weight.dtype, None if extra_delta is None else extra_delta.dtype
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        # scaled in place: these buffers were made for this one backward, and grad_w is [vocab, hidden]
        grad_h, grad_w, grad_d = ctx.saved_tensors
        grad_h = grad_h.mul_(grad_loss) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        grad_d = grad_d.mul_(grad_loss).to(ctx.delta_dtype) if grad_d is not None else None
        return grad_h, grad_w, None, None, None, grad_d, None


def _supervised(hidden, weight, labels):
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
    h, targets, weight = _supervised(hidden, weight, labels)
    if h.shape[0] == 0:
        out = hidden.sum() * 0.0, 0
        return (*out, hidden.new_zeros(0, dtype=torch.float32)) if per_token else out
    extra_ids, extra_delta = extra_rows if extra_rows is not None else (None, None)
    if torch.is_grad_enabled():
        args = (h, weight, targets, chunk_size, extra_ids, extra_delta, token_weights)
        loss, each = _ChunkedLinearCrossEntropy.apply(*args)
    else:
        loss, each = torch.zeros((), dtype=torch.float32, device=h.device), []
        for start in range(0, h.shape[0], chunk_size):
            logits = head_logits(h[start : start + chunk_size], weight, extra_ids, extra_delta).float()
            ce = torch.nn.functional.cross_entropy(logits, targets[start : start + chunk_size], reduction="none")
            loss += (ce if token_weights is None else ce * token_weights[start : start + chunk_size]).sum()
            each.append(ce)
        each = torch.cat(each)
    return (loss, int(targets.numel()), each) if per_token else (loss, int(targets.numel()))


@torch.no_grad()
def token_logprobs(hidden, weight, labels, chunk_size: int = 1024, extra_rows=None, entropy: bool = False):
    """Log-probabilities [N] (fp32) of the supervised targets, chunk by chunk through lm_head, and with entropy=True
    the entropy [N] of each of those positions' distributions too."""
    h, targets, weight = _supervised(hidden, weight, labels)
    extra_ids, extra_delta = extra_rows if extra_rows is not None else (None, None)
    logps, entropies = [], []
    for start, logp in chunked_logps(h, weight, chunk_size, extra_ids, extra_delta):
        logps.append(logp.gather(1, targets[start : start + chunk_size, None])[:, 0])
        if entropy:
            entropies.append(-(logp.exp() * logp).sum(-1))
    empty = h.new_zeros(0, dtype=torch.float32)
    logps = torch.cat(logps) if logps else empty
    return (logps, torch.cat(entropies) if entropies else empty) if entropy else logps
