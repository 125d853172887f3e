"""Prompts on their way into the running batch: prefilled a chunk of columns per engine step, into a cache of their
own, so a long prompt never stalls the rows that are decoding (they take a step between its chunks).

Several short prompts are prefilled together, right-padded: a real token never sees the padding after it, so plain
causal attention needs no mask. Only the real tokens go through the model's linear layers (flattened into one row,
cache.py's MixedLayer), so a step's budget counts prompt tokens, not padding: batching prompts of unlike lengths
costs nothing but their attention's padded columns. When the last column is in, the engine copies each prompt's
cache into the slots of its rows and samples their first tokens from the hidden state of its last prompt token."""

from __future__ import annotations

import torch

from ..model.head import logprobs_topk
from .cache import MixedLayer, PrefillLayer, unpacked
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
        self.real, self.width = None, 0  # the chunk in flight (chunk)

    @property
    def requests(self) -> list:
        return [r for g in self.groups for r in g]

    @property
    def finished(self) -> bool:
        return self.done == self.ids.shape[1]

    def step(self, model, budget: int) -> int:
        """Prefill the next columns, as many as `budget` tokens allow (at least one); returns the tokens computed."""
        ids, positions, layers = self.chunk(budget)
        self.chunk_done(model, model(ids[None], positions[None], return_hidden=True, kv_cache=layers)[0])
        return ids.numel()

    def chunk(self, budget: int, decode=None, n: int = 0, mask=None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The next chunk of columns, as many as keep its real tokens (not the padding after a prompt's end) within
        `budget` (at least one column): their ids [R] and positions [R], and the layers of a forward over them
        (after n running rows' tokens with the decode layers and mask of cache.decode_inputs, if any)."""
        B, s = self.ids.shape[0], self.done
        left = [max(0, length - s) for length in self.lengths]
        lo, hi = 1, self.ids.shape[1] - s  # the widest chunk whose real tokens fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(min(x, mid) for x in left) <= budget else (lo, mid - 1)
        e = s + lo
        real = None  # every column real: no prompt ends inside the chunk (decided on the host, no device sync)
        if min(self.lengths) < e:
            real = (torch.arange(s, e, device=self.ids.device) < self.last[:, None] + 1).flatten().nonzero()[:, 0]
        positions = torch.arange(s, e, device=self.ids.device).expand(B, -1).flatten()
        ids = self.ids[:, s:e].flatten()
        if real is not None:
            ids, positions = ids[real], positions[real]
        self.real, self.width = real, e - s  # for chunk_done
        layers = [
            MixedLayer(d, PrefillLayer(k[:, :, :e], v[:, :, :e]), n, (B, e - s), mask, real)
            for d, k, v in zip(decode or [None] * len(self.k), self.k, self.v, strict=True)
        ]
        return ids, positions, layers

    def chunk_done(self, model, out: torch.Tensor) -> None:
        """The chunk's final hidden states [R, hidden] (chunk's order): keep those of last prompt tokens, score the
        prompt."""
        B, s = self.ids.shape[0], self.done
        out = unpacked(out, self.real, B * self.width).view(B, self.width, -1)  # [B, C, hidden]
        e = s + out.shape[1]
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
