"""`qwen3lab prepare`: data files tokenised by worker processes into memory-mapped shards (shards.py).

The rows are cut into chunks of `rows_per_shard` in file order, each chunk tokenised by a worker into one shard; the
chunks do not depend on the number of workers, and results are written in chunk order, so a folder prepared with 1
or 8 workers is the same bytes. A run that stops (killed, or at a bad row) leaves its whole shards; run again with
the same inputs, it tokenises only the chunks whose shard is missing. Everything a shard depends on — the sources'
hashes, the tokenizer and template, max_length, the chunk size — is in `plan.json`, written first; a different plan
in the folder is refused rather than mixed in.

Rows are what training reads (data.py): chats, ShareGPT, prompt + completion and text rows (one `sft` corpus; text
rows are kept whole — a `text` corpus is cut into rows at training time), or preference pairs (a `pairs` corpus:
examples 2i and 2i + 1 are pair i's chosen and rejected sides). GRPO's prompt files stay files: their rows carry the
columns the rewards read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from ..model.hf import atomic_write
from ..text.tokenizer import Tokenizer, load_tokenizer
from . import data as D
from .shards import FORMAT, MANIFEST, shard_name, write_shard

log = logging.getLogger("qwen3lab")
PLAN = "plan.json"
SHOWN_BAD = 20  # bad rows listed in the manifest (all are counted)
SHARD_BYTES = 8 << 20  # a shard's rows end after this much JSONL (~2M tokens of text)


def prepare(
    files: list[str],
    out: str | os.PathLike,
    model: str | None = None,
    workers: int | None = None,
    max_length: int = 2048,
    skip_bad: bool = False,
    rows_per_shard: int = 1024,
) -> dict:
    """Tokenise `files` into shards under `out` (the tokenizer and template of the `model` folder, or the built-in
    Qwen3 ones); returns the manifest. Examples other than text are cut to max_length, as training cuts them.
    The workers are spawned processes: a script that calls this runs it under `if __name__ == "__main__":`."""
    out = Path(out)
    workers = workers or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")  # fork would copy a parent's tokenizer thread pool
    # started first: the workers import qwen3lab and load their tokenizers while the sources are hashed
    with context.Pool(workers, _init_worker, (model, max_length, skip_bad)) as pool:
        tok = load_tokenizer(model)
        plan = {
            "format": FORMAT,
            "sources": [{"path": str(Path(f).resolve()), "sha256": _hash(Path(f))} for f in files],
            "tokenizer": tok.fingerprint(),
            "template": hashlib.sha256((tok.chat_template or "").encode()).hexdigest(),
            "max_length": max_length,
            "rows_per_shard": rows_per_shard,
            "shard_bytes": SHARD_BYTES,
        }
        _claim(out, plan)
        chunks = [0]  # how many the inputs make (all are read; those with a shard already are not sent)

        def todo():
            for k, rows in _chunks(files, rows_per_shard):
                chunks[0] = k + 1
                if not (out / shard_name(k)).is_dir():
                    yield k, rows

        started = shown = time.perf_counter()
        made = rows = tokens = 0
        for k, ids, mask, offsets, stats in pool.imap(_tokenize_chunk, todo()):
            write_shard(out, k, ids, mask, offsets, stats)
            made, rows, tokens = made + 1, rows + stats["rows"], tokens + len(ids)
            if time.perf_counter() - shown > 10:
                shown, rate = time.perf_counter(), tokens / (time.perf_counter() - started)
                log.info("prepare: %d shards, %d rows, %d tokens this run (%.0f tokens/s)", k + 1, rows, tokens, rate)
    rate = tokens / (time.perf_counter() - started)
    log.info(
        "prepare: %d of %d shards made by this run: %d rows, %d tokens (%.0f tokens/s)",
        made,
        chunks[0],
        rows,
        tokens,
        rate,
    )
    manifest = _manifest(out, plan, chunks[0])
    atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def _hash(path: Path) -> str:
    """sha256 of a file (as sha256sum prints it), or of a folder's file names and contents in name order."""
    if not path.exists():
        raise D.DataError(f"{path}: no such data file or folder")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _claim(out: Path, plan: dict) -> None:
    """Start a folder, or continue one prepared (in part) from the same plan."""
    if (out / PLAN).is_file():
        if json.loads((out / PLAN).read_text()) != plan:
            raise D.DataError(
                f"{out}: already holds shards prepared from other inputs, tokenizer or settings ({PLAN}); "
                "give another --out or remove the folder"
            )
        (out / MANIFEST).unlink(missing_ok=True)  # no longer final until this run ends
        return
    if out.exists() and any(out.iterdir()):
        raise D.DataError(f"{out}: exists and is not a prepared folder; give an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PLAN, lambda p: p.write_text(json.dumps(plan, indent=2) + "\n"))


def _rows(path: str):
    """(where, row) for each row of a file, a JSONL line left unparsed (bytes) for the worker to parse."""
    p = Path(path)
    if p.suffix == ".jsonl" and p.is_file():
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    yield f"{p}:{n}", raw
    else:
        yield from D.read_rows(p)


def _chunks(files: list[str], size: int):
    """(shard index, [(where, row)]) over all files in order: `size` rows, or fewer whose JSONL lines reach
    SHARD_BYTES (long documents: shards of similar work, so the workers finish together); never two files."""
    k = 0
    for f in files:
        chunk, nbytes = [], 0
        for where, row in _rows(f):
            chunk.append((where, row))
            nbytes += len(row) if isinstance(row, bytes) else 0
            if len(chunk) == size or nbytes >= SHARD_BYTES:
                yield k, chunk
                k, chunk, nbytes = k + 1, [], 0
        if chunk:
            yield k, chunk
            k += 1


# ---- in the workers ----

_worker: dict = {}


def _init_worker(model: str | None, max_length: int, skip_bad: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _worker.update(tok=load_tokenizer(model), max_length=max_length, skip_bad=skip_bad)


def _tokenize_chunk(chunk):
    k, rows = chunk
    tok, max_length, skip_bad = _worker["tok"], _worker["max_length"], _worker["skip_bad"]
    examples, stats = [], {"rows": len(rows), "text": 0, "pairs": 0, "dropped": 0, "bad": []}
    texts, text_at = [], []  # text rows, and their places in examples: encoded together, in one batch call
    for where, row in rows:
        try:
            row = json.loads(D._utf8(row, where)) if isinstance(row, bytes) else row
            kind = "pairs" if isinstance(row, dict) and "chosen" in row else D.row_format(row, where)
            if kind == "text":  # kept whole (a text corpus is cut into rows at training time)
                texts.append(D.row_text(row, where))
                text_at.append(len(examples))
                examples.append(None)
            else:
                cut = (D.cut_pair if kind == "pairs" else D.cut_example)(tok, row, where, max_length)
                if cut is None:
                    stats["dropped"] += 1
                else:
                    examples += cut if kind == "pairs" else [cut]
            if kind in ("text", "pairs"):
                stats[kind] += 1
        except (D.DataError, json.JSONDecodeError) as e:
            message = str(e) if isinstance(e, D.DataError) else f"{where}: not valid JSON ({e.msg})"
            if not skip_bad:
                raise D.DataError(f"{message} (--skip-bad leaves such rows out and goes on)") from None
            stats["bad"].append(message)
    eos = tok.eos_token
    # without offsets (what a chat's mask needs): ~10% faster
    texts = [t if t.endswith(eos) else t + eos for t in texts]
    encoded = [e.ids for e in tok.backend.encode_batch_fast(texts, add_special_tokens=False)]
    for at, ids in zip(text_at, encoded, strict=True):
        examples[at] = (ids, [1] * len(ids))
    lengths = [len(ids) for ids, _ in examples]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(e[0] for e in examples), np.uint32, int(offsets[-1]))
    mask = np.fromiter(itertools.chain.from_iterable(e[1] for e in examples), np.uint8, int(offsets[-1]))
    stats["examples"], stats["tokens"] = len(examples), int(offsets[-1])
    stats["supervised"] = int(mask.sum()) - int(mask[offsets[:-1]].sum()) if len(examples) else 0
    return k, ids, mask, offsets, stats


def _manifest(out: Path, plan: dict, shards: int) -> dict:
    stats = [json.loads((out / shard_name(k) / "stats.json").read_text()) for k in range(shards)]
    total = lambda key: sum(s[key] for s in stats)  # noqa: E731
    bad = [b for s in stats for b in s["bad"]]
    rows, text, pairs = total("rows") - len(bad), total("text"), total("pairs")
    if pairs and pairs != rows:
        raise D.DataError(f"{out}: preference pairs mixed with other rows ({pairs} of {rows}); prepare them apart")
    kind = "pairs" if pairs else "text" if text == rows and rows else "sft"
    counts = {key: total(key) for key in ("examples", "tokens", "supervised", "dropped")}
    counts |= {"rows": rows, "text_rows": text, "bad": len(bad)}
    return plan | {"kind": kind, "shards": shards, "counts": counts, "bad_rows": bad[:SHOWN_BAD]}


def describe(manifest: dict) -> str:
    c = manifest["counts"]
    line = f"{c['rows']:,} rows -> {c['examples']:,} {manifest['kind']} examples, {c['tokens']:,} tokens"
    line += f" ({c['supervised']:,} learned) in {manifest['shards']} shards"
    if c["dropped"]:
        line += f"; {c['dropped']} rows left without a learned token at max_length {manifest['max_length']}"
    if c["bad"]:
        line += f"; {c['bad']} bad rows left out, e.g. {manifest['bad_rows'][0]}"
    return line


def tokenizer_matches(manifest: dict, tok: Tokenizer) -> bool:
    return manifest["tokenizer"] == tok.fingerprint()
