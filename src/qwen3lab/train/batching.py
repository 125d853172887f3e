"""Examples into batches: packing (best fit or shuffled), collation of packed or padded rows, preference pairs and
empty ones; the data cursor an exact resume restarts from; and each rank's share of a global batch.

A batch is a dict of tensors: input_ids, labels (shifted, -100 where not supervised), position_ids (restarting at
each packed document), cu_seqlens, num_tokens, attention_mask (1 on real tokens, 0 on padding); pairs add
sequence_ids and num_items (and ref_logps if precomputed).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..model.attention import cu_seqlens_from_position_ids
from .data import DataError, TokenizedData
from .loss import IGNORE
from .parallel import Dist


def collate_sequences(data: TokenizedData, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """collate's batch plus sequence_ids [B, T]: the examples numbered 0, 1, ... in the order they appear, row by
    row (-1 on padding), for objectives summing log-probs per sequence."""
    batch = collate(data, rows, pad_id)
    sequence_ids = torch.full_like(batch["input_ids"], -1)
    lengths, n = data.lengths(), 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            sequence_ids[r, at : at + lengths[i]] = n
            at, n = at + int(lengths[i]), n + 1
    batch["sequence_ids"] = sequence_ids
    return batch


def collate_pairs(data: TokenizedData, pairs: list[int], pad_id: int, ref_logps=None) -> dict[str, torch.Tensor]:
    """Pairs -> one packed row each (chosen, then rejected: no attention between them; sequences 2r and 2r + 1),
    num_items (pairs) and, when precomputed, ref_logps [2B]."""
    batch = collate_sequences(data, [[2 * p, 2 * p + 1] for p in pairs], pad_id)
    batch["num_items"] = torch.tensor(len(pairs))
    if ref_logps is not None:
        batch["ref_logps"] = torch.from_numpy(np.stack([ref_logps[[2 * p, 2 * p + 1]] for p in pairs]).reshape(-1))
    return batch


def empty_batch(pad_id: int, objective: str = "sft") -> dict[str, torch.Tensor]:
    """One padding token with no label: the micro-batch of a rank left with no rows, which must still run each
    forward and backward for FSDP's collectives. Carries the keys the objective's loss reads, with nothing in them."""
    none = torch.zeros(1, 1, dtype=torch.long)
    batch = {
        "input_ids": none + pad_id,
        "labels": none + IGNORE,
        "position_ids": none,
        "cu_seqlens": torch.tensor([0, 1], dtype=torch.int32),
        "num_tokens": none.sum(),
        "attention_mask": none,
    }
    if objective != "sft":
        batch |= {"sequence_ids": none - 1, "num_items": none.sum()}
    if objective == "grpo":
        batch["advantages"] = torch.zeros(0)
    return batch


def pack_best_fit(lengths, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: longest example first, each into the fullest row it still fits. Returns index lists."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack_shuffled(lengths, capacity: int, seed: int) -> list[list[int]]:
    """Next-fit over a seeded shuffle: each row holds a random mix of examples (rows are less full than
    best-fit's, which groups examples of similar length, and so often of the same kind, into the same rows)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows, used = [], capacity
    for i in order:
        n = int(lengths[i])
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def make_rows(data: TokenizedData, max_length: int, packing: bool, order: str = "best_fit", seed: int = 0):
    """Example indices per training row: packed rows (best_fit or shuffled), or one example per row."""
    if not packing:
        return [[i] for i in range(len(data))]
    if order == "best_fit":
        return pack_best_fit(data.lengths(), max_length)
    if order == "shuffled":
        return pack_shuffled(data.lengths(), max_length, seed)
    raise DataError(f"data.pack_order {order!r}: use best_fit or shuffled")


def collate(data: TokenizedData, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> input_ids, labels, position_ids [B, T], right-padded to the longest row.

    Positions restart at 0 for every example, so the model's document mask keeps packed examples apart.
    """
    built = []
    for row in rows:
        parts = [data.example(i) for i in row]
        ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        pos = np.concatenate([np.arange(len(p[0])) for p in parts])
        built.append((ids, labels, pos))
    T = max(len(b[0]) for b in built)
    B = len(built)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for r, (ids, lab, pos) in enumerate(built):
        n = len(ids)
        input_ids[r, :n] = torch.from_numpy(ids.astype(np.int64))
        labels[r, :n] = torch.from_numpy(lab.astype(np.int64))
        position_ids[r, :n] = torch.from_numpy(pos)
        position_ids[r, n:] = torch.arange(T - n)  # padding: one more "document" that nothing attends to
    # document boundaries over the flattened B*T tokens, once per batch, for attention.py (padding is a document too)
    cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    num_tokens = torch.tensor(sum(len(b[0]) for b in built))  # real (non-pad) tokens
    attention_mask = (torch.arange(T) < torch.tensor([len(b[0]) for b in built])[:, None]).long()  # 1: real token
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "num_tokens": num_tokens,
        "attention_mask": attention_mask,
    }


def epoch_order(n_rows: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(n_rows))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass
class Cursor:
    """Where the run is in its stream of rows: an epoch and how many rows of that epoch's order it has taken. It
    counts rows, not steps, so a resume with another number of ranks (another global batch) takes up exactly where
    the saved run stopped: no row skipped or repeated."""

    n_rows: int
    seed: int
    shuffle: bool
    epoch: int = 0
    offset: int = 0
    _order: tuple[int, list[int]] | None = None  # (epoch, its order): shuffled once per epoch, not per batch

    def take(self, k: int) -> list[int]:
        """The next k row indices, fewer at the end of an epoch (its last batch is short, as a DataLoader's)."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.n_rows, self.epoch, self.seed, self.shuffle))
        out = self._order[1][self.offset : self.offset + k]
        self.offset += len(out)
        if self.offset >= self.n_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


class MixCursor:
    """A mixture's stream of rows (data.mix): each row's source drawn with the sources' weights, from a generator
    seeded by (seed, the row's position in the stream), then the next row of that source's own cursor (each source
    goes through its epochs at its own pace). Deterministic and resumable: the state is the position, each source's
    cursor, and the tokens each source has given. Row indices are into the concatenation of the sources' rows."""

    def __init__(self, cursors: list[Cursor], weights: list[float], row_tokens: list, seed: int):
        self.cursors, self.row_tokens, self.seed = cursors, row_tokens, seed
        self.bounds = np.cumsum(weights) / sum(weights)  # [S] where each source's share of [0, 1) ends
        self.bases = np.concatenate([[0], np.cumsum([c.n_rows for c in cursors])])  # [S + 1] first row of each
        self.position, self.tokens = 0, [0] * len(cursors)

    def draw(self, position: int) -> int:
        """The source of the row at this position of the stream."""
        u = random.Random(self.seed * 1_000_003 + position).random()
        return min(int(np.searchsorted(self.bounds, u, side="right")), len(self.cursors) - 1)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            s = self.draw(self.position)
            row = self.cursors[s].take(1)[0]
            self.position, self.tokens[s] = self.position + 1, self.tokens[s] + int(self.row_tokens[s][row])
            out.append(int(self.bases[s]) + row)
        return out

    def state(self) -> dict:
        return {"position": self.position, "sources": [c.state() for c in self.cursors], "tokens": list(self.tokens)}

    def restore(self, state: dict) -> None:
        self.position, self.tokens = state["position"], list(state["tokens"])
        for c, saved in zip(self.cursors, state["sources"], strict=True):
            c.restore(saved)


def split_eval(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData | None]:
    if fraction <= 0:
        return data, None
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(data) * fraction))
    if n_eval >= len(data):
        raise DataError(f"eval_fraction={fraction} leaves no training examples out of {len(data)}")
    return data.subset(sorted(order[n_eval:])), data.subset(sorted(order[:n_eval]))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rank_batch(data, rows: list, d: Dist, pad_id: int, pairs: bool = False, ref_logps=None) -> dict:
    """This rank's share of a global batch: rows rank, rank + world, ... (with pairs, each row is a preference
    pair's index); a rank left with none gets empty_batch."""
    mine = rows[d.rank :: d.world]
    if not mine:
        return empty_batch(pad_id, "dpo" if pairs else "sft")
    if pairs:
        return collate_pairs(data, mine, pad_id, ref_logps)
    batch = collate(data, mine, pad_id)
    if hasattr(data, "source_of"):  # a mixture: each row's source, for the loss per source
        batch["row_source"] = torch.tensor([data.source_of(row[0]) for row in mine])
    return batch


def eval_batches(data, rows, global_rows: int, d: Dist, pad_id: int, pairs: bool = False, ref_logps=None):
    """The held-out rows in global batches of `global_rows`, this rank's share of each."""
    for start in range(0, len(rows), global_rows):
        yield rank_batch(data, rows[start : start + global_rows], d, pad_id, pairs, ref_logps)


def units(batch) -> int:
    """What a step's loss is averaged over: supervised tokens (SFT), or pairs (DPO)."""
    return int(batch["num_items"]) if "num_items" in batch else int((batch["labels"] != IGNORE).sum())
