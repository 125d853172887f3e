"""Objectives beyond SFT, on the one training loop: each turns a micro-batch into a summed loss and summed metrics.

Their losses are functions of the log-probs of completion tokens. These are computed without a [tokens, vocab]
logits tensor and with one forward and one backward of the model (`logprob_loss`): a pass through lm_head without
gradient gives each completion token's log-prob; autograd on the objective — a small function of those N numbers —
gives its gradient with respect to each of them; a second pass, the chunked cross-entropy weighted by minus those
gradients (loss.lm_loss_sum), carries exactly that gradient into the hidden states and lm_head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import GRPO_LOSS_TYPES
from .loss import IGNORE, lm_loss_sum, token_logprobs

LOSS_TYPES = GRPO_LOSS_TYPES


def logprob_loss(hidden, weight, labels, objective: Callable, chunk: int, extra_rows=None, entropy: bool = False):
    """objective(logps [N]) -> (loss, aux), N the supervised positions of labels in order. Returns the loss's value
    carrying its gradient through hidden (and weight / extra rows), aux, and with entropy=True each position's
    entropy [N] (taken in the same pass as the log-probs), else None."""
    logps = token_logprobs(hidden.detach(), weight, labels, chunk, extra_rows, entropy)
    logps, entropies = logps if entropy else (logps, None)
    with torch.enable_grad():
        leaf = logps.requires_grad_()
        loss, aux = objective(leaf)
        if not hidden.requires_grad:  # evaluation
            return loss.detach(), aux, entropies
        (grad,) = torch.autograd.grad(loss, leaf)
    surrogate, _ = lm_loss_sum(hidden, weight, labels, chunk, extra_rows, token_weights=-grad)
    return loss.detach() + (surrogate - surrogate.detach()), aux, entropies  # valued as the loss, its gradient too


def token_sequences(batch: dict) -> torch.Tensor:
    """The sequence index [N] of each supervised position, in order."""
    return batch["sequence_ids"].reshape(-1)[batch["labels"].reshape(-1) != IGNORE]


def sequence_logps(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token log-probs [N] -> their sums per sequence [2 * pairs] (chosen, rejected, chosen, ...)."""
    n = 2 * int(batch["num_items"])
    return torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, token_sequences(batch), logps)


def dpo_loss(hidden, weight, batch, ref: torch.Tensor, beta: float, chunk: int, extra_rows=None):
    """Sigmoid DPO summed over the batch's pairs: -logsigmoid(beta * ((pc - rc) - (pr - rr))), with p the policy's
    and r the reference's summed completion log-probs. Returns (loss sum, metric sums over pairs)."""

    def objective(logps):
        sums = sequence_logps(logps, batch)
        chosen, rejected = beta * (sums[0::2] - ref[0::2]), beta * (sums[1::2] - ref[1::2])  # implicit rewards
        return -F.logsigmoid(chosen - rejected).sum(), (chosen.detach(), rejected.detach(), sums.detach())

    loss, (chosen, rejected, sums), _ = logprob_loss(hidden, weight, batch["labels"], objective, chunk, extra_rows)
    metrics = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).sum(),  # trl's names
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": sums[0::2].sum(),
        "logps/rejected": sums[1::2].sum(),
    }
    return loss, {k: float(v) for k, v in metrics.items()}


def grpo_loss(hidden, weight, batch, cfg, chunk: int, extra_rows=None):
    """GRPO's clipped surrogate (+ beta * k3 KL to the reference) over the completion tokens of a micro-batch, summed
    so that the training loop's division by the batch's `num_items` gives trl's normalisation for cfg.loss_type:
    dapo: over the step's completion tokens; grpo: per-sequence means, averaged; dr_grpo: over sequences x
    max_completion_length; bnpo: over this micro-batch's completion tokens (num_items 1).

    batch: packed prompt + completion sequences (labels on the completion), sequence_ids, advantages [sequences],
    and per completion token (in order) old_logps (else this policy's, detached: one iteration) and ref_logps (beta).
    Returns (loss sum, metric sums), the metrics summed over the micro-batch's num_items like the loss."""
    seq = token_sequences(batch)
    n_seq = batch["advantages"].shape[0]
    advantages = batch["advantages"].float()[seq]  # [N]
    old, ref = batch.get("old_logps"), batch.get("ref_logps")
    eps_low, eps_high = cfg.epsilon, cfg.epsilon_high or cfg.epsilon
    hidden = hidden / cfg.temperature  # log-probs of the distribution the completions were sampled from

    def objective(logps):
        ratio = torch.exp(logps - (logps.detach() if old is None else old))
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        kl = None
        if cfg.beta != 0.0:
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if cfg.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + cfg.beta * kl
        if cfg.loss_type == "grpo":
            lengths = torch.bincount(seq, minlength=n_seq).clamp(min=1)
            loss = (torch.zeros(n_seq, device=logps.device).index_add(0, seq, per_token) / lengths).sum()
        elif cfg.loss_type == "bnpo":
            loss = per_token.sum() / max(len(per_token), 1)
        elif cfg.loss_type == "dr_grpo":
            loss = per_token.sum() / cfg.max_completion_length
        else:  # dapo
            loss = per_token.sum()
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        return loss, (low | high, None if kl is None else kl.detach())

    labels = batch["labels"]
    loss, (clipped, kl), entropies = logprob_loss(hidden, weight, labels, objective, chunk, extra_rows, entropy=True)
    share = float(batch["num_items"]) / max(len(seq), 1)  # token means, weighted like the loss over the step
    metrics = {"clip_ratio": float(clipped.float().sum()) * share, "entropy": float(entropies.sum()) * share}
    if kl is not None:
        metrics["kl"] = float(kl.sum()) * share
    return loss, metrics
