"""DPO's sigmoid loss on preference pairs (chosen, rejected, chosen, ...), equal to trl's DPOTrainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logprob import logprob_loss, token_sequences


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
