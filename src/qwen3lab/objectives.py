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

from .loss import IGNORE, lm_loss_sum, token_logprobs

OBJECTIVES = ("sft", "dpo")


def logprob_loss(hidden, weight, labels, objective: Callable, chunk: int, extra_rows=None):
    """objective(logps [N]) -> (loss, aux), N the supervised positions of labels in order. Returns the loss's value
    carrying its gradient through hidden (and weight / extra rows), and aux."""
    logps = token_logprobs(hidden.detach(), weight, labels, chunk, extra_rows)
    with torch.enable_grad():
        leaf = logps.requires_grad_()
        loss, aux = objective(leaf)
        if not hidden.requires_grad:  # evaluation
            return loss.detach(), aux
        (grad,) = torch.autograd.grad(loss, leaf)
    surrogate, _ = lm_loss_sum(hidden, weight, labels, chunk, extra_rows, token_weights=-grad)
    return loss.detach() + (surrogate - surrogate.detach()), aux  # its value is the loss, its gradient the loss's


def sequence_logps(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token log-probs [N] -> their sums per sequence [2 * pairs] (chosen, rejected, chosen, ...)."""
    keep = batch["labels"].reshape(-1) != IGNORE
    seq = batch["sequence_ids"].reshape(-1)[keep]
    n = 2 * int(batch["num_items"])
    return torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, seq, logps)


@torch.no_grad()
def reference_logps(hidden, weight, batch, chunk: int) -> torch.Tensor:
    return sequence_logps(token_logprobs(hidden, weight, batch["labels"], chunk), batch)


def dpo_loss(hidden, weight, batch, ref: torch.Tensor, beta: float, chunk: int, extra_rows=None):
    """Sigmoid DPO summed over the batch's pairs: -logsigmoid(beta * ((pc - rc) - (pr - rr))), with p the policy's
    and r the reference's summed completion log-probs. Returns (loss sum, metric sums over pairs)."""

    def objective(logps):
        sums = sequence_logps(logps, batch)
        chosen, rejected = beta * (sums[0::2] - ref[0::2]), beta * (sums[1::2] - ref[1::2])  # implicit rewards
        return -F.logsigmoid(chosen - rejected).sum(), (chosen.detach(), rejected.detach(), sums.detach())

    loss, (chosen, rejected, sums) = logprob_loss(hidden, weight, batch["labels"], objective, chunk, extra_rows)
    metrics = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).sum(),  # trl's names
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": sums[0::2].sum(),
        "logps/rejected": sums[1::2].sum(),
    }
    return loss, {k: float(v) for k, v in metrics.items()}
