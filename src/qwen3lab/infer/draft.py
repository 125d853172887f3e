"""Speculative decoding with a draft model: a smaller Qwen3 with the same tokenizer (Qwen3-0.6B for Qwen3-4B)
proposes k tokens a step for each running row, one forward of its own per token, and the engine checks them all in
one forward of the target over 1 + k positions (speculative.py verifies them).

The draft keeps a slot cache of its own, row i in slot i as in the engine's. A row's draft cache lags the row by the
tokens the draft has not read yet — the target's own token after the drafts, or a whole prompt just joined — and the
first of the k forwards reads them in (a lag longer than a step's, a new prompt, is read first, that row alone).

Greedy rows draft the draft's argmax and keep the drafts the target's argmax agrees with: the output is plain
decoding's. Sampling rows draft from the draft's distribution q, after the row's own temperature / top-k / top-p, and
keep draft d with probability min(1, p(d) / q(d)), else sample from max(0, p - q) renormalised (Leviathan et al.
2023; Chen et al. 2023): what they sample is distributed as the target's, whatever the draft."""

from __future__ import annotations

import torch

from .cache import decode_inputs, grown
from .sampling import process_logits, sample
from .speculative import budget


class Drafter:
    def __init__(self, model, target, max_batch: int, capacity: int):
        cfg = model.config
        if cfg.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"draft model: its vocabulary has {cfg.vocab_size} tokens, the model's {target.config.vocab_size}; "
                "a draft model shares the model's tokenizer (e.g. Qwen3-0.6B for Qwen3-4B)"
            )
        if cfg.max_position_embeddings < target.config.max_position_embeddings:
            raise ValueError(
                f"draft model: its context ({cfg.max_position_embeddings} positions) is shorter than the model's "
                f"({target.config.max_position_embeddings})"
            )
        self.model, self.capacity = model, capacity
        w = model.lm_head.weight
        shape = (cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros_like(self.k)

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        self.k, self.v, self.capacity = grown(self.k, capacity), grown(self.v, capacity), capacity

    def move(self, i: int, last: int, length: int) -> None:
        """Row `last` takes slot i (the engine's _remove)."""
        self.k[:, i, :, :length] = self.k[:, last, :, :length]
        self.v[:, i, :, :length] = self.v[:, last, :, :length]

    def _forward(self, tokens: list[list[int]], starts: list[int], rows: slice) -> torch.Tensor:
        """Feed rows' tokens at positions start.. -> hidden [n, T, hidden]."""
        width = max(starts) + max(map(len, tokens))
        if width > self.capacity:  # drafts run ahead of the engine's cache, which grows in the check after them
            self.grow(max(width, 2 * self.capacity))
        x, positions, mask, layers = decode_inputs(tokens, starts, self.k, self.v, rows)
        return self.model(x, positions, mask, return_hidden=True, kv_cache=layers)

    def drafts(self, rows: list, k: int, max_context: int, generator) -> tuple[list[list[int]], list]:
        """Each running row's drafts this step (as many as speculative.budget allows it) and their q."""
        ks = [budget(r, k, max_context) for r in rows]
        return self.propose(rows, ks, generator) if any(ks) else ([[] for _ in rows], [None] * len(rows))

    def propose(self, rows: list, ks: list[int], generator) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Rows 0..n-1 of the engine and the drafts each may take (0: none) -> each row's drafts and the draft's
        probabilities q [len(drafts), V] they were drawn from (None for greedy rows and rows without drafts)."""
        n, k = len(rows), max(ks)
        feeds = [r.seen[r.drafted :] for r in rows]  # what the draft has not read, through the row's next token
        for i, feed in enumerate(feeds):
            if len(feed) > k + 1:  # a prompt just joined (or a long lag): read in alone, all but its last token
                self._forward([feed[:-1]], [rows[i].drafted], slice(i, i + 1))
                rows[i].drafted += len(feed) - 1
                feeds[i] = feed[-1:]
        hidden = self._forward(feeds, [r.drafted for r in rows], slice(0, n))  # [n, T, hidden]
        last = hidden[torch.arange(n), torch.tensor([len(f) - 1 for f in feeds])]  # [n, hidden]
        for r, feed in zip(rows, feeds, strict=True):
            r.drafted += len(feed)  # read; drafts count once the target keeps them (kept)
        drafts, probs = [[] for _ in rows], [[] for _ in rows]
        for step in range(k):
            logits = self.model.lm_head(last).float()  # [n, V]
            tokens = []
            for i, r in enumerate(rows):
                scores = process_logits(logits[i : i + 1], None, r.params)
                token = int(sample(scores, r.params, r.generator or generator)[0])
                if r.params.temperature > 0:
                    probs[i].append(scores[0].softmax(-1))
                drafts[i].append(token)
                tokens.append([token])
            if step + 1 < k:  # the last draft is the target's to check; the draft reads it next step if kept
                last = self._forward(tokens, [r.drafted + step for r in rows], slice(0, n))[:, 0]
        out = [d[:m] for d, m in zip(drafts, ks, strict=True)]
        return out, [torch.stack(p[:m]) if p and m else None for p, m in zip(probs, ks, strict=True)]
