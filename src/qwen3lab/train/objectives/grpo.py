"""GRPO's clipped surrogate with trl's loss types, on rollouts made by rollouts.py and scored by rewards.py."""

from __future__ import annotations

import torch

from ..config import GRPO_LOSS_TYPES
from .logprob import logprob_loss, token_sequences

LOSS_TYPES = GRPO_LOSS_TYPES


def grpo_loss(hidden, weight, batch, cfg, chunk: int, extra_rows=None):
    """GRPO's clipped surrogate (+ beta * k3 KL to the reference) over the completion tokens of a micro-batch, summed
    so that the training loop's division by the batch's `num_items` gives trl's normalisation for cfg.loss_type:
    dapo and cispo: over the step's completion tokens; grpo: per-sequence means, averaged; dr_grpo: over sequences x
    max_completion_length; bnpo: over this micro-batch's completion tokens (num_items 1). Importance ratios per
    token, or per sequence (GSPO); cispo weighs each log-prob by its ratio capped at epsilon_high, without the
    cap's gradient; delta caps the unclipped ratio too (two-sided clipping); sampler_weights (sampler_weights())
    weigh each token's surrogate, as trl's vllm_importance_sampling_correction does.

    batch: packed prompt + completion sequences (labels on the completion), sequence_ids, advantages [sequences],
    and per completion token (in order) old_logps (else this policy's, detached: one iteration) and ref_logps (beta).
    Returns (loss sum, metric sums), the metrics summed over the micro-batch's num_items like the loss."""
    seq = token_sequences(batch)
    n_seq = batch["advantages"].shape[0]
    advantages = batch["advantages"].float()[seq]  # [N]
    old, ref, weights = batch.get("old_logps"), batch.get("ref_logps"), batch.get("sampler_weights")
    eps_low, eps_high = cfg.epsilon, cfg.epsilon_high or cfg.epsilon
    hidden = hidden / cfg.temperature  # log-probs of the distribution the completions were sampled from

    lengths = torch.bincount(seq, minlength=n_seq).clamp(min=1)  # [sequences] completion tokens

    def objective(logps):
        log_ratio = logps - (logps.detach() if old is None else old)
        if cfg.importance_sampling_level == "sequence":  # GSPO: each token weighted by its sequence's mean ratio
            log_ratio = (torch.zeros(n_seq, device=logps.device).index_add(0, seq, log_ratio) / lengths)[seq]
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        if cfg.loss_type == "cispo":  # the clipped weight without its gradient, on the log-prob's gradient
            per_token = -torch.clamp(ratio, max=eps_high).detach() * advantages * logps
        else:
            capped = torch.clamp(ratio, max=cfg.delta) if cfg.delta > 0 else ratio  # two-sided clipping
            per_token = -torch.min(capped * advantages, clipped * advantages)
        if weights is not None:  # the sampler-mismatch correction
            per_token = per_token * weights
        kl = None
        if cfg.beta != 0.0:
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if cfg.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + cfg.beta * kl
        if cfg.loss_type == "grpo":
            loss = (torch.zeros(n_seq, device=logps.device).index_add(0, seq, per_token) / lengths).sum()
        elif cfg.loss_type == "bnpo":
            loss = per_token.sum() / max(len(per_token), 1)
        elif cfg.loss_type == "dr_grpo":
            loss = per_token.sum() / cfg.max_completion_length
        else:  # dapo, cispo
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


def sampler_weights(old: torch.Tensor, sampled: torch.Tensor, seq: torch.Tensor, n_seq: int, cfg) -> torch.Tensor:
    """trl's sampler-mismatch correction: the ratio of the trainer's probability of each completion token (old [N])
    to the engine's (sampled [N]), per token or per sequence (the product over its tokens), clipped to
    [sampler_clip_min, sampler_clip_max] (truncate) or 0 outside it (mask). seq [N]: each token's sequence."""
    log_ratio = old - sampled
    if cfg.sampler_correction.startswith("sequence"):
        log_ratio = torch.zeros(n_seq, dtype=log_ratio.dtype).index_add(0, seq, log_ratio)[seq]
    ratio = log_ratio.exp()
    low, high = cfg.sampler_clip_min, cfg.sampler_clip_max
    if cfg.sampler_correction.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
