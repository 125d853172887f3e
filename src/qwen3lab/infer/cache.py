"""The engine's KV cache as each layer of the model sees it during a forward: `layer_cache.update(k, v)` writes this
forward's keys and values and returns every key and value the forward's queries attend to. These hold only tensor
views made outside the (maybe compiled) blocks, never Python ints, so a compiled block sees shapes, not a constant
per row or offset."""

from __future__ import annotations

import torch

from ..model.attention import attend


def grown(cache: torch.Tensor, capacity: int) -> torch.Tensor:
    """A slot cache [layers, rows, kv_heads, positions, D] with room for `capacity` positions, what it held kept."""
    new = cache.new_zeros(*cache.shape[:3], capacity, cache.shape[4])
    new[:, :, :, : cache.shape[3]] = cache
    return new


class PrefillLayer:
    """One layer's cache [rows, kv_heads, end, D] for a chunk that fills its last T positions."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, k, v):  # [rows, kv_heads, T, D] -> [rows, kv_heads, end, D], this chunk's included
        T = k.shape[2]
        self.k[:, :, self.k.shape[2] - T :] = k
        self.v[:, :, self.v.shape[2] - T :] = v
        return self.k, self.v


class DecodeLayer:
    """One layer's slots [n, kv_heads, width, D] for a decode step: row i writes its T new keys at positions[i]
    ([n, T]: T is 1, or 1 + the drafts a speculative step verifies)."""

    def __init__(self, k, v, positions: torch.Tensor):
        self.k, self.v, self.positions = k, v, positions

    def update(self, k, v):  # [n, kv_heads, T, D] -> [n, kv_heads, width, D]
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, self.positions] = k.transpose(1, 2)  # indexed as [n, T, kv_heads, D]
        self.v[rows, :, self.positions] = v.transpose(1, 2)
        return self.k, self.v


class MixedLayer:
    """One layer of a step over the running rows' next tokens (n, first; maybe none) and a prefill chunk (B rows of
    C columns, only the real tokens: `real` holds their flat indices, None when none is padding). They go through one
    forward as one row, so each linear layer reads its weights once for all and no padding is computed; attention
    is apart, each part over its own cache."""

    def __init__(self, decode: DecodeLayer | None, prefill, n: int, chunk: tuple[int, int], mask, real=None):
        self.decode, self.prefill, self.n, self.chunk, self.mask, self.real = decode, prefill, n, chunk, mask, real

    def attend(self, q, k, v):  # q [1, H, N, D], k and v [1, Hkv, N, D] -> [1, N, H*D]
        n, (B, C), real = self.n, self.chunk, self.real

        def rows(x):  # the running rows' tokens, a row each: [1, h, n, D] -> [n, h, 1, D]
            return x[:, :, :n].transpose(0, 2)

        def chunk(x):  # the chunk's tokens [1, h, R, D] -> [B, h, C, D], zeros in the padding after a prompt's end
            return unpacked(x[0, :, n:].transpose(0, 1), real, B * C).unflatten(0, (B, C)).transpose(1, 2)

        prefill = attend(chunk(q), *self.prefill.update(chunk(k), chunk(v))).reshape(B * C, -1)  # [B*C, H*D]
        prefill = (prefill if real is None else prefill[real])[None]  # [1, R, H*D]
        if n == 0:
            return prefill
        running = attend(rows(q), *self.decode.update(rows(k), rows(v)), self.mask)  # [n, 1, H*D]
        return torch.cat([running.transpose(0, 1), prefill], 1)


def unpacked(x: torch.Tensor, real: torch.Tensor | None, size: int) -> torch.Tensor:
    """A chunk's real tokens x [R, ...] back in their [B*C] places (real: their flat indices), zeros in the padding."""
    return x if real is None else x.new_zeros(size, *x.shape[1:]).index_copy_(0, real, x)


def decode_inputs(tokens: list[list[int]], starts: list[int], k: torch.Tensor, v: torch.Tensor, rows: slice):
    """Rows' tokens (padded to one length T) at positions start.. over slot caches k, v [layers, slots, heads,
    capacity, dim] (rows: the rows' slots) -> x [n, T], positions [n, T], the mask and the cache layers. The mask is
    [n, 1, T, width], or None where no row can see a slot it must not (one token each, rows of one length). Padding
    writes past a row's last real token, where its next real token goes before anything reads it."""
    T, device = max(map(len, tokens)), k.device
    x = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=device)
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
    width = max(starts) + T  # the keys a row can see this step, at most
    mask = None
    if T > 1 or min(starts) < width - 1:  # each row its own filled slots and this step's tokens
        mask = (torch.arange(width, device=device) <= positions[:, :, None])[:, None]
    layers = [DecodeLayer(kl[rows, :, :width], vl[rows, :, :width], positions) for kl, vl in zip(k, v, strict=True)]
    return x, positions, mask, layers
