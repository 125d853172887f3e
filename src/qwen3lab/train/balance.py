"""Qwen3 MoE's load-balancing loss, over a micro-batch or over the whole global batch (arXiv 2501.11873).

For one sparse layer with E experts, k chosen per token, N tokens:

    LBL = E * sum_i f_i * p_i,   f_i = (selections of expert i) / N,   p_i = (sum of router probabilities of i) / N

`micro` counts f and p in each micro-batch, as transformers' `load_balancing_loss_func` does on every forward: with
a few sequences per micro-batch, it pushes each sequence towards uniform routing. `global` counts f over every
micro-batch of the optimizer step on every rank (the counts summed, no gradient through them) and p as each
micro-batch's share of the global sum, so the micro-batches' losses add up to the LBL of the global batch as one,
value and gradient, and experts may specialise by domain across it.

The loss here is the mean over sparse layers of each layer's LBL, as Switch Transformer and Megatron-LM define it;
transformers pools the layers' counts into one sum instead (the same number for a single layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.mlp import SparseMoeBlock


class RouterLogits:
    """Collects each sparse layer's router logits [N, E] during a forward (hooks on the routers, added from
    outside the model). `clear()` before each forward: an activation-checkpointed block runs its router again in
    the backward, and those calls are appended after the loss was taken."""

    def __init__(self, model: nn.Module):
        self.logits: list[torch.Tensor] = []
        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.top_k = self.blocks[0].top_k if self.blocks else 0
        self.handles = [b.gate.register_forward_hook(self._keep) for b in self.blocks]

    def _keep(self, module, args, out: torch.Tensor) -> None:
        self.logits.append(out)

    def clear(self) -> None:
        self.logits = []

    def take(self) -> list[torch.Tensor]:
        """This forward's logits, one [N, E] per sparse layer in order."""
        logits, self.logits = self.logits[: len(self.blocks)], []
        return logits

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def selections(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Counts [E] of the top-k selections of each expert over the (unmasked) tokens; no gradient."""
    chosen = logits.detach().topk(k, dim=-1).indices  # softmax is monotonic: the same top-k as the router's
    weights = None if mask is None else mask.reshape(-1, 1).expand_as(chosen).reshape(-1).float()
    return torch.bincount(chosen.reshape(-1), weights=weights, minlength=logits.shape[-1]).float()


def layer_loss(
    logits: torch.Tensor, k: int, mask: torch.Tensor | None = None, counts=None, tokens=None
) -> torch.Tensor:
    """E * sum_i f_i * p_i for one layer's router logits [N, E]; mask [N] (1 = a real token) leaves padding out.

    counts [E] and tokens: the global batch's selections and token count (global balance); by default these
    logits' own (micro). p is this micro-batch's probability sum over `tokens`, so the losses of the micro-batches of a
    global batch add up to its loss."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
    if mask is not None:
        probs = probs * mask.reshape(-1, 1).float()
    if counts is None:
        counts = selections(logits, k, mask)
        tokens = probs.shape[0] if mask is None else mask.sum()
    return logits.shape[-1] * (counts / tokens * probs.sum(0) / tokens).sum()


def balance_loss(logits: list[torch.Tensor], k: int, mask=None, counts=None, tokens=None) -> torch.Tensor:
    """The mean over sparse layers of layer_loss; counts: one [E] per layer (global balance) or None (micro)."""
    per_layer = [layer_loss(x, k, mask, None if counts is None else counts[i], tokens) for i, x in enumerate(logits)]
    return torch.stack(per_layer).mean()


def expert_load(counts: list[torch.Tensor]) -> dict[str, float]:
    """Metrics of how evenly each layer's tokens spread: the busiest expert's share over the mean share, and the
    coefficient of variation of the counts, averaged over layers (1 and 0: perfectly even)."""
    if not counts:
        return {}
    c = torch.stack(counts)  # [layers, E]
    mean = c.mean(-1)
    return {
        "expert_load_max_over_mean": float((c.max(-1).values / mean).mean()),
        "expert_load_cv": float((c.std(-1, correction=0) / mean).mean()),
    }
