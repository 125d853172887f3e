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
from .batching import to_device


class RouterLogits:
    """Collects each sparse layer's router logits [N, E] during a forward: hooks on the routers, added from outside
    the model. Calls without gradients are left out (a DPO reference, rollouts, eval) unless `counting` is set;
    an activation-checkpointed block runs its router again in the backward, after the loss has taken them, so
    `take()` returns the last forward's: the newest entries."""

    def __init__(self, model: nn.Module):
        self.logits: list[torch.Tensor] = []
        self.counting = False
        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.top_k = self.blocks[0].top_k if self.blocks else 0
        self.handles = [b.gate.register_forward_hook(self._keep) for b in self.blocks]

    def _keep(self, module, args, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() or self.counting:
            self.logits.append(out)

    def take(self) -> list[torch.Tensor]:
        """The last forward's logits, one [N, E] per sparse layer in order."""
        logits = self.logits[len(self.logits) - len(self.blocks) :]
        self.logits = []
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


def expert_load(counts: torch.Tensor) -> dict[str, float]:
    """How evenly each layer's tokens spread over its experts, from counts [layers, E]: the busiest expert's load
    over the mean load, and the coefficient of variation (1 and 0: perfectly even); per layer, and their means."""
    mean = counts.mean(-1).clamp(min=1e-9)
    peak, cv = counts.max(-1).values / mean, counts.std(-1, correction=0) / mean
    metrics = {"expert_load/max_over_mean": float(peak.mean()), "expert_load/cv": float(cv.mean())}
    for i, (p, c) in enumerate(zip(peak.tolist(), cv.tolist(), strict=True)):
        metrics |= {f"expert_load/max_over_mean/layer{i}": p, f"expert_load/cv/layer{i}": c}
    return metrics


class Balance:
    """A training run's balancing loss: `moe.balance` global or micro, times `moe.aux_loss_coef`.

    Per optimizer step: `begin(...)`, then `loss(batch)` after each micro-batch's forward, added to what it
    backpropagates, and `metrics()` after the step. Global with several micro-batches counts the step's selections
    over all of them and all ranks first, by a routing pass without gradients under the same random state as the
    training pass (its cost: one more forward, without the head); with one micro-batch the counts are taken after
    its forward and summed over ranks. The scale makes the sum over micro-batches and ranks the step's loss under
    FSDP's mean of the gradients over ranks: global adds its parts into the global-batch loss, micro averages them.
    """

    def __init__(self, model: nn.Module, coef: float, mode: str, d):
        self.router, self.coef, self.mode, self.d = RouterLogits(model), coef, mode, d
        self.layers, self.experts = len(self.router.blocks), model.config.num_experts

    def begin(self, net, batches: list[dict], device: torch.device, autocast) -> None:
        self.micro_batches, self.counts, self.tokens = len(batches), None, None
        self.step_counts, self.aux = torch.zeros(self.layers, self.experts), 0.0
        if self.mode != "global" or len(batches) == 1:
            return
        counts, tokens = torch.zeros(self.layers, self.experts), 0.0
        self.router.counting = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for b in batches:
                    b = to_device(b, device)
                    with autocast():
                        net(None, call=lambda b=b: net.hidden(b))
                    c, n = self._count(self.router.take(), b)
                    counts, tokens = counts + c, tokens + n
        finally:
            self.router.counting = False
        self.counts, self.tokens = self._over_ranks(counts, tokens)

    def loss(self, batch: dict) -> torch.Tensor:
        """This micro-batch's part of the step's balancing loss, scaled for the backward."""
        logits = self.router.take()
        counts, tokens = self._count(logits, batch)
        self.step_counts += counts
        if self.mode == "global":
            if self.counts is None:  # the step's only micro-batch: its own counts, summed over ranks
                self.counts, self.tokens = self._over_ranks(counts, tokens)
            counts, tokens = self.counts, self.tokens
            scale, share = self.d.world, 1.0  # parts summed over micro-batches and ranks
        elif not tokens:  # a rank's empty micro-batch: nothing to balance, but its graph must still run
            return logits[0].sum() * 0
        else:
            scale, share = 1 / self.micro_batches, 1 / (self.micro_batches * self.d.world)  # a mean of them
        device = logits[0].device
        aux = balance_loss(logits, self.router.top_k, _mask(batch), list(counts.to(device)), tokens)
        self.aux += float(aux.detach()) * share
        return self.coef * scale * aux

    def metrics(self) -> dict[str, float]:
        (aux,) = self.d.all_sum(self.aux)
        return {"aux_loss": aux} | expert_load(self.d.all_sum_tensor(self.step_counts))

    def _count(self, logits: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, float]:
        """Selections [layers, E] of a micro-batch's real tokens (padding left out), and how many tokens."""
        mask = _mask(batch)
        counts = torch.stack([selections(x, self.router.top_k, mask).cpu() for x in logits])
        return counts, float(logits[0].shape[0] if mask is None else mask.sum())

    def _over_ranks(self, counts: torch.Tensor, tokens: float) -> tuple[torch.Tensor, float]:
        (total,) = self.d.all_sum(tokens)
        return self.d.all_sum_tensor(counts), max(total, 1.0)


def _mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")  # [B, T], 1 on real tokens, 0 on padding
    return None if mask is None else mask.reshape(-1)
