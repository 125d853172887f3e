"""Prompts on their way into the running batch: prefilled a chunk of columns per engine step, into a cache of their
own, so a long prompt never stalls the rows that are decoding (they take a step between its chunks).

Several short prompts are prefilled together, right-padded: a real token never sees the padding after it, so plain
causal attention needs no mask. When the last column is in, the engine copies each prompt's cache into the slots of
its rows and samples their first tokens from the hidden state of its last prompt token."""

from __future__ import annotations

import torch

from ..model.head import logprobs_topk
from .cache import PrefillLayer
from .rows import entries


class Prefill:
    """The prompts of these groups (one prompt, one or more completions each). `start` columns of the first come
    from the prefix cache's kv ([layers, kv_heads, >= start, D])."""

    def __init__(self, model, groups: list[list], start: int = 0, kv=None):
        cfg, weight = model.config, model.lm_head.weight
        self.groups, self.lengths = groups, [len(g[0].ids) for g in groups]
        B, T = len(groups), max(self.lengths)
        self.ids = torch.zeros(B, T, dtype=torch.long, device=weight.device)
        for r, group in enumerate(groups):
            self.ids[r, : self.lengths[r]] = torch.tensor(group[0].ids, device=weight.device)
        shape = (cfg.num_hidden_layers, B, cfg.num_key_value_heads, T, cfg.head_dim)
        self.k = torch.empty(shape, device=weight.device, dtype=weight.dtype)  # [layers, B, kv_heads, T, D]
        self.v = torch.empty_like(self.k)
        if kv is not None:
            self.k[:, 0, :, :start], self.v[:, 0, :, :start] = kv[0][:, :, :start], kv[1][:, :, :start]
        self.start = self.done = start  # columns in the cache
        self.last = torch.tensor(self.lengths, device=weight.device) - 1
        self.hidden = torch.empty(B, cfg.hidden_size, device=weight.device, dtype=weight.dtype)  # of last tokens
        self.scored = [[] for _ in groups]  # prompt log-probs asked for: (logp, top ids, top logps) per chunk

    @property
    def requests(self) -> list:
        return [r for g in self.groups for r in g]

    @property
    def finished(self) -> bool:
        return self.done == self.ids.shape[1]

    def step(self, model, budget: int) -> int:
        """Prefill the next columns, as many as `budget` tokens allow (at least one); returns the tokens computed."""
        ids, positions, layers = self.chunk(budget)
        self.chunk_done(model, model(ids, positions, return_hidden=True, kv_cache=layers))  # [B, C, hidden]
        return ids.numel()

    def chunk(self, budget: int) -> tuple[torch.Tensor, torch.Tensor, list[PrefillLayer]]:
        """The next chunk's ids [B, C], positions [B, C] and cache layers: C columns, C * B <= budget (C >= 1)."""
        B, s = self.ids.shape[0], self.done
        e = min(self.ids.shape[1], s + max(1, budget // B))
        positions = torch.arange(s, e, device=self.ids.device).expand(B, -1)
        layers = [PrefillLayer(k[:, :, :e], v[:, :, :e]) for k, v in zip(self.k, self.v, strict=True)]
        return self.ids[:, s:e], positions, layers

    def chunk_done(self, model, out: torch.Tensor) -> None:
        """The chunk's final hidden states [B, C, hidden]: keep those of last prompt tokens, score the prompt."""
        s, e = self.done, self.done + out.shape[1]
        ends = ((self.last >= s) & (self.last < e)).nonzero()[:, 0]  # rows whose last prompt token is in this chunk
        self.hidden[ends] = out[ends, self.last[ends] - s].to(self.hidden.dtype)
        for r, group in enumerate(self.groups):
            k = group[0].params.prompt_logprobs
            if k is not None and s < self.lengths[r] - 1:  # positions s.. predict tokens s + 1.. of the prompt
                n = min(e, self.lengths[r] - 1) - s
                head = model.lm_head.weight
                self.scored[r].append(logprobs_topk(out[r, :n], head, self.ids[r, s + 1 : s + 1 + n], max(k, 1)))
        self.done = e

    def prompt_logprobs(self, r: int) -> list:
        """Per prompt token of group r, (logp, [(id, logp), ...]); the first has none (nothing came before it)."""
        k = self.groups[r][0].params.prompt_logprobs
        return [None] + (entries(*map(torch.cat, zip(*self.scored[r], strict=True)), k) if self.scored[r] else [])
