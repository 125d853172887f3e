"""Prepared data: token shards on disk, read through memory maps (what `qwen3lab prepare` writes, prepare.py).

A prepared folder holds `manifest.json` and shards `shard-00000/` ... each with three arrays saved by numpy:
  ids.npy      uint32 [tokens]        the token ids of its examples, end to end
  mask.npy     uint8  [tokens]        1 where the token is learned (the assistant's tokens, a completion, all text)
  offsets.npy  int64  [examples + 1]  where each example starts and ends in the shard
  stats.json                          its rows, examples, tokens, learned tokens, and the rows left out
A shard is written under a temporary name and renamed into place, so a folder only ever holds whole shards.

`Corpus` reads them as training reads a tokenised file (data.TokenizedData: example(i) -> ids and shifted labels),
without loading them: the ids and masks stay memory-mapped, only the example boundaries are in memory (8 bytes per
example), so a run's memory does not grow with the corpus and it starts in the time it takes to read the offsets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .data import DataError
from .loss import IGNORE

MANIFEST = "manifest.json"
FORMAT = 1


def is_prepared(path: str | os.PathLike) -> bool:
    return Path(path, MANIFEST).is_file()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(folder: Path, index: int, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, stats: dict):
    """One shard, whole or not at all: written into a temporary folder and renamed. stats.json: its counts."""
    final = folder / shard_name(index)
    tmp = folder / f".{shard_name(index)}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "ids.npy", ids.astype(np.uint32, copy=False))
    np.save(tmp / "mask.npy", mask.astype(np.uint8, copy=False))
    np.save(tmp / "offsets.npy", offsets.astype(np.int64, copy=False))
    (tmp / "stats.json").write_text(json.dumps(stats))
    os.replace(tmp, final)


def read_manifest(folder: str | os.PathLike) -> dict:
    manifest = json.loads(Path(folder, MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{folder}: prepared by another version (format {manifest.get('format')}); prepare it again")
    return manifest


class _Mapped:
    """The shards' arrays of one name as one token axis; a slice never crosses a shard (examples do not)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.bases = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def __getitem__(self, s: slice) -> np.ndarray:
        if s.start >= s.stop:
            return self.arrays[0][:0]
        k = int(np.searchsorted(self.bases, s.start, side="right")) - 1
        base = self.bases[k]
        return self.arrays[k][s.start - base : s.stop - base]


class Corpus:
    """Examples as (start, end) spans of a token axis, their ids and learned-token masks memory-mapped.

    The interface of data.TokenizedData that batching and training read: len, lengths(), example(i),
    supervised_tokens(), subset(), all_tokens_supervised()."""

    def __init__(self, ids, mask, starts, ends, supervised=None, learn_all: bool = False, stream: bool = False):
        self.ids, self.mask = ids, mask
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)  # [examples] each
        self._supervised, self.learn_all = supervised, learn_all
        self.stream = stream  # pretraining text: rows are the documents end to end, cut (windows), not packed
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.starts)

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [n] and labels [n] (labels[t] = ids[t + 1] where that token is learned, else -100)."""
        a, b = int(self.starts[i]), int(self.ends[i])
        ids = self.ids[a:b].astype(np.int64)
        learn = np.ones(b - a - 1, bool) if self.learn_all else self.mask[a + 1 : b].astype(bool)
        labels = np.full(b - a, IGNORE, np.int64)
        labels[:-1] = np.where(learn, ids[1:], IGNORE)
        return ids, labels

    def supervised_tokens(self) -> int:
        if self.learn_all:
            return int(self.lengths().sum()) - len(self)
        if self._supervised is None:  # a subset or windows of a corpus: counted once (reads every mask)
            self._supervised = sum(int(self.mask[a + 1 : b].sum()) for a, b in zip(self.starts, self.ends, strict=True))
        return self._supervised

    def subset(self, indices) -> Corpus:
        idx = np.asarray(indices, np.int64)
        return Corpus(self.ids, self.mask, self.starts[idx], self.ends[idx], None, self.learn_all, self.stream)

    def all_tokens_supervised(self) -> Corpus:
        return Corpus(self.ids, self.mask, self.starts, self.ends, None, True, self.stream)

    def windows(self, length: int) -> tuple[Corpus, list[list[int]]]:
        """Pretraining rows: the examples end to end (each ends with EOS), cut every `length` tokens. Returns the
        pieces (an example cut at a row's end continues as a new piece in the next row: no attention across rows
        or documents) and each row's pieces; the last, partial row is kept."""
        lengths = self.lengths()
        stream = np.concatenate([[0], np.cumsum(lengths)])  # [examples + 1] where each starts in the stream
        cuts = np.union1d(stream, np.arange(0, stream[-1], length, dtype=np.int64))  # piece starts, and the end
        starts_in_stream = cuts[:-1]
        example = np.searchsorted(stream, starts_in_stream, side="right") - 1  # the example of each piece
        starts = self.starts[example] + (starts_in_stream - stream[example])
        ends = starts + np.diff(cuts)
        pieces = Corpus(self.ids, self.mask, starts, ends, learn_all=self.learn_all)
        row_of = starts_in_stream // length
        return pieces, Ranges(np.searchsorted(row_of, np.arange(row_of[-1] + 2)) if len(row_of) else np.zeros(1))


class Ranges:
    """Rows of consecutive pieces, row r = [bounds[r], bounds[r + 1]), as the lists of piece indices batching
    reads, made when asked for (a 200M-token corpus is ~400k rows of 512: no list of lists kept)."""

    def __init__(self, bounds: np.ndarray):
        self.bounds = np.asarray(bounds, np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, r: int | slice) -> list:
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(r)
        r %= len(self)
        return list(range(self.bounds[r], self.bounds[r + 1]))


def open_prepared(folder: str | os.PathLike) -> tuple[Corpus, dict]:
    """A prepared folder as a Corpus (the arrays memory-mapped) and its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    ids, mask, starts, ends, base = [], [], [], [], 0
    for k in range(manifest["shards"]):
        shard = folder / shard_name(k)
        ids.append(np.load(shard / "ids.npy", mmap_mode="r"))
        mask.append(np.load(shard / "mask.npy", mmap_mode="r"))
        offsets = np.load(shard / "offsets.npy")
        starts.append(offsets[:-1] + base)
        ends.append(offsets[1:] + base)
        base += len(ids[-1])
    if not ids:
        raise DataError(f"{folder}: a prepared folder with no examples")
    text = manifest["kind"] == "text"  # every token learned: no need to read the masks
    supervised = manifest["counts"]["supervised"]
    corpus = Corpus(_Mapped(ids), _Mapped(mask), np.concatenate(starts), np.concatenate(ends), supervised, text, text)
    return corpus, manifest
