"""The one-forward, one-backward loss on completion log-probs that DPO and GRPO are written in."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...model.head import reused_blocks
from ..loss import IGNORE, lm_loss_sum, token_logprobs


def logprob_loss(hidden, weight, labels, objective: Callable, chunk: int, extra_rows=None, entropy: bool = False):
    """objective(logps [N]) -> (loss, aux), N the supervised positions of labels in order. Returns the loss's value
    carrying its gradient through hidden (and weight / extra rows), aux, and with entropy=True each position's
    entropy [N] (taken in the same pass as the log-probs), else None."""
    with reused_blocks():  # the two passes over lm_head share their [chunk, vocab] blocks
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
