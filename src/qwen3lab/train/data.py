"""Training data: read rows, tokenise them with their loss masks (cached), pack or pad them into batches.

Row formats, told apart by their keys:
  messages (+ tools)      assistant-only loss, through the chat template's {% generation %} spans
  conversations           ShareGPT ({from: human | gpt | system | tool, value}), read as messages
  prompt + completion     completion-only loss (strings, or message lists rendered by the template)
  text                    loss on every token
Each example becomes `ids` and `labels`, labels already shifted (labels[t] is ids[t+1] where that token is
supervised, else -100), so packed documents never predict across their boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..text.chat import ChatError
from ..text.tokenizer import Tokenizer
from .loss import IGNORE

log = logging.getLogger("qwen3lab")
CACHE_VERSION = 1


class DataError(ValueError):
    """A data file or row that cannot be trained on, named by file:line or row."""


# ---- reading ----


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) from a JSONL / JSON / Parquet file or a `datasets` folder; `where` names the row."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such data file or folder")
    if p.is_dir():
        yield from _read_with_datasets(p, "folder")
    elif p.suffix == ".jsonl":
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                line = _utf8(raw, f"{p}:{n}")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                yield f"{p}:{n}", row
    elif p.suffix == ".json":
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # name the line and column, as for JSONL
            line_start, line = raw.rfind(b"\n", 0, e.start) + 1, raw.count(b"\n", 0, e.start) + 1
            _utf8(raw[line_start : e.start + 1], f"{p}:{line}")
            raise
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows (use .jsonl for one row per line)")
        for i, row in enumerate(data):
            yield f"{p}[{i}]", row
    elif p.suffix == ".parquet":
        yield from _read_with_datasets(p, "parquet")
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r}; use .jsonl, .json, .parquet or a datasets folder")


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
        raise DataError(
            f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); convert the file to UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None


def _read_with_datasets(p: Path, kind: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{p}: reading {kind} data needs the `datasets` package (pip install datasets)") from None
    if kind == "parquet":
        ds = datasets.Dataset.from_parquet(str(p))
    else:
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{p}: a DatasetDict without a 'train' split (has {', '.join(ds)})")
            ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{p} row {i}", row


def row_format(row, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(
        f"{where}: unknown row format with keys {sorted(row)}; expected 'messages' (+ 'tools'), "
        "'conversations' (ShareGPT), 'prompt' + 'completion', or 'text'"
    )


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


def sharegpt_messages(turns, where: str) -> list[dict]:
    """ShareGPT `conversations` [{from, value}] -> chat messages [{role, content}]."""
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}] is from {turn['from']!r}; ShareGPT turns are from human, gpt, "
                "system or tool"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


# ---- tokenising ----


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(tok: Tokenizer, row: dict, where: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of one row, mask 1 on the tokens the loss learns."""
    kind = row_format(row, where)
    if kind == "sharegpt":
        row, kind = {"messages": sharegpt_messages(row["conversations"], where), "tools": row.get("tools")}, "messages"
    try:
        if kind == "messages":
            tools = row.get("tools")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            enc = tok.encode_chat(row["messages"], tools=tools)
            return enc.input_ids, enc.assistant_mask
        if kind == "prompt_completion":
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list) and isinstance(completion, list):
                # Rendered whole; learned where the completion begins (where the prompt-alone render stops
                # agreeing) and, with generation tags, only on what the assistant produces.
                prompt_ids = tok.encode_chat(prompt, add_generation_prompt=True, assistant_mask=False).input_ids
                enc = tok.encode_chat(prompt + completion, assistant_mask=True)
                start = _common_prefix(prompt_ids, enc.input_ids)
                mask = [m if i >= start else 0 for i, m in enumerate(enc.assistant_mask)]
                return enc.input_ids, mask
            if not (isinstance(prompt, str) and isinstance(completion, str)):
                raise DataError(f"{where}: prompt and completion must both be strings or both message lists")
            if not completion.endswith(tok.eos_token):
                completion += tok.eos_token
            ids = tok.encode(prompt + completion)
            start = _common_prefix(tok.encode(prompt), ids)
            return ids, [0] * start + [1] * (len(ids) - start)
        text = row_text(row, where)
        ids = tok.encode(text if text.endswith(tok.eos_token) else text + tok.eos_token)
        return ids, [1] * len(ids)
    except ChatError as e:
        raise DataError(f"{where}: {e}") from None


def row_text(row: dict, where: str) -> str:
    """A text row's text."""
    if not isinstance(row["text"], str):
        raise DataError(f"{where}: text must be a string, got {type(row['text']).__name__}")
    return row["text"]


def cut_example(tok: Tokenizer, row: dict, where: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """A row's (ids, mask) kept to its first max_length tokens, as trl keeps them; None when no learned token is
    left."""
    ids, mask = tokenize_row(tok, row, where)
    ids, mask = ids[:max_length], mask[:max_length]
    return (ids, mask) if any(mask[1:]) else None


def cut_pair(tok: Tokenizer, row: dict, where: str, max_length: int) -> list[tuple[list[int], list[int]]] | None:
    """A preference row's chosen and rejected (ids, mask), each cut as cut_example; None when a side is left
    without completion tokens."""
    pair = [(ids[:max_length], mask[:max_length]) for ids, mask in tokenize_preference(tok, row, where)]
    return pair if all(any(mask[1:]) for _, mask in pair) else None


@dataclass
class TokenizedData:
    """Examples stored flat: example i is ids[offsets[i]:offsets[i+1]] with its shifted labels."""

    ids: np.ndarray  # int32 [total tokens]
    labels: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [examples + 1]
    dropped: int = 0  # rows left with no supervised token after truncation

    @classmethod
    def from_examples(cls, examples, dropped: int = 0) -> TokenizedData:
        """[(ids, mask)] -> examples whose labels are the next token where its mask is 1."""
        ids_out, labels_out, lengths = [], [], []
        for ids, mask in examples:
            ids_out.extend(ids)
            labels_out.extend([t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)] + [IGNORE])
            lengths.append(len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        return cls(np.asarray(ids_out, np.int32), np.asarray(labels_out, np.int32), offsets, dropped)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    def supervised_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def all_tokens_supervised(self) -> TokenizedData:
        """The same examples with every next token learned (prompts, system turns and template included)."""
        labels = np.roll(self.ids, -1)
        labels[self.offsets[1:] - 1] = IGNORE  # an example's last token has no next token
        return TokenizedData(self.ids, labels.astype(np.int32), self.offsets, self.dropped)

    def subset(self, indices) -> TokenizedData:
        pieces = [self.example(i) for i in indices]
        lengths = [len(p[0]) for p in pieces]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int32)
        labels = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int32)
        return TokenizedData(ids, labels, offsets, 0)


def tokenize_rows(tok: Tokenizer, rows, max_length: int) -> TokenizedData:
    examples = [cut_example(tok, row, where, max_length) for where, row in rows]
    kept = [e for e in examples if e is not None]
    return TokenizedData.from_examples(kept, len(examples) - len(kept))


def _cache_key(path: Path, tok: Tokenizer, max_length: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{max_length}|".encode())
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(tok.fingerprint().encode())
    return h.hexdigest()[:24]


def load_tokenized(path: str | os.PathLike, tok: Tokenizer, max_length: int, cache_dir: Path | None) -> TokenizedData:
    """Tokenise a data file once; later runs on the same file, tokenizer and max_length read the cache."""
    path = Path(path)
    cache = None
    if cache_dir is not None and path.exists():
        cache = cache_dir / f"{path.stem}-{_cache_key(path, tok, max_length)}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                data = TokenizedData(z["ids"], z["labels"], z["offsets"], int(z["dropped"]))
            log.info("data: %s — %d examples from cache %s", path, len(data), cache)
            return data
    data = tokenize_rows(tok, read_rows(path), max_length)
    if len(data) == 0:
        raise DataError(
            f"{path}: no trainable examples"
            + (f" ({data.dropped} rows had no supervised token within max_length={max_length})" if data.dropped else "")
        )
    if data.dropped:
        log.warning(
            "data: %s — dropped %d rows with no supervised token left after truncation to max_length=%d",
            path,
            data.dropped,
            max_length,
        )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, ids=data.ids, labels=data.labels, offsets=data.offsets, dropped=data.dropped)
        os.replace(tmp, cache)
    return data


# ---- preference pairs (DPO) ----


def preference_parts(row, where: str):
    """A preference row -> (prompt, chosen, rejected, tools): trl's explicit form (`prompt` + `chosen` /
    `rejected`, messages or strings) or its implicit one (two whole conversations; the prompt is the messages they
    share)."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' (and 'prompt'), got {keys}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be whole conversations")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    kinds = {type(x) for x in (prompt, chosen, rejected)}
    if kinds not in ({list}, {str}):
        raise DataError(f"{where}: prompt, chosen and rejected must all be message lists or all be strings")
    if not prompt or not chosen or not rejected:
        raise DataError(f"{where}: empty prompt, chosen or rejected")
    return prompt, chosen, rejected, tools


def tokenize_preference(tok: Tokenizer, row: dict, where: str):
    """(ids, mask) of the chosen and of the rejected sequence. As trl takes them: each is the whole rendered
    prompt + completion, and the completion is every token after the longest prefix both share with the rendered
    prompt (with Qwen3's template: the think block, the answer, <|im_end|> and the newline after it)."""
    prompt, chosen, rejected, tools = preference_parts(row, where)
    try:
        if isinstance(prompt, list):
            prompt_ids = tok.encode_chat(prompt, tools=tools, add_generation_prompt=True, assistant_mask=False)
            prompt_ids = prompt_ids.input_ids
            sides = [
                tok.encode_chat(prompt + c, tools=tools, assistant_mask=False).input_ids for c in (chosen, rejected)
            ]
        else:
            eos = tok.eos_token
            prompt_ids = tok.encode(prompt)
            sides = [tok.encode(prompt + (c if c.endswith(eos) else c + eos)) for c in (chosen, rejected)]
    except ChatError as e:
        raise DataError(f"{where}: {e}") from None
    start = min(_common_prefix(prompt_ids, ids) for ids in sides)
    return [(ids, [0] * start + [1] * (len(ids) - start)) for ids in sides]


def load_preferences(path: str | os.PathLike, tok: Tokenizer, max_length: int) -> TokenizedData:
    """Preference pairs as examples 2i (chosen) and 2i + 1 (rejected), each cut to max_length (keeping the start,
    as trl does); a pair with a side left without completion tokens is dropped."""
    examples, dropped = [], 0
    for where, row in read_rows(path):
        pair = cut_pair(tok, row, where, max_length)
        if pair is None:
            dropped += 1
            continue
        examples += pair
    if not examples:
        raise DataError(f"{path}: no preference pairs with completion tokens within max_length={max_length}")
    if dropped:
        log.warning(
            "data: %s — dropped %d pairs left without completion tokens at max_length=%d", path, dropped, max_length
        )
    return TokenizedData.from_examples(examples, dropped)
