"""Data preparation at scale: `qwen3lab prepare` vs datasets.map(num_proc=cores) with transformers' tokenizer, and
training start-up and memory on a prepared corpus.

    python bench/prepare.py [--chats 200000] [--text-tokens 200e6] [--steps 100]

1. 200k synthetic multi-turn chats (system prompts, reasoning, tool calls): qwen3lab prepare (workers = cores) vs
   `datasets.Dataset.from_json(...).map(apply_chat_template(..., return_assistant_tokens_mask=True),
   num_proc=cores)` — the same ids and masks (checked on a sample), rows/s.
2. A text corpus of --text-tokens tokens: qwen3lab prepare vs `.map(tokenizer(batch["text"]), batched=True,
   num_proc=cores)`, tokens/s; and qwen3lab prepare with 1 worker vs 2 (scaling).
3. Training on the prepared text corpus (the bench's small Qwen3, 2 layers, rows of 512): seconds from the call of
   `qwen3lab.train` to the start of its first step, and peak RSS over --steps steps, each beside the same run on a
   1-shard corpus (the model's own start-up and memory). Each run in its own process.
Both sides of each comparison run in their own process, one after the other, on the same files.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SMALL_QWEN3, WORDS, machine, synthetic_conversations

CORES = len(os.sched_getaffinity(0))


def write_chats(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for conv in synthetic_conversations(n, seed=1):
            f.write(json.dumps({"messages": conv}) + "\n")


def write_text(path: Path, tokens: float, seed: int = 0) -> None:
    """Documents of 200-4,000 words drawn from 1,000 paragraphs (each word of WORDS is one token with its space)."""
    rng = random.Random(seed)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(1000)]
    written = 0
    with open(path, "w") as f:
        while written < tokens:
            doc, n = [], rng.randint(200, 4000)
            while sum(len(p) for p in doc) < 5 * n:  # ~5 characters a word
                doc.append(rng.choice(paragraphs))
            text = "\n\n".join(doc)
            f.write(json.dumps({"text": text}) + "\n")
            written += text.count(" ") + text.count("\n\n") + 1


def in_child(fn: str, *args) -> dict:
    """Run one side in a fresh process: its time, and its own peak RSS (the children it started: their peaks)."""
    cmd = [sys.executable, __file__, "--child", fn, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode:
        raise SystemExit(f"{fn} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours(files: str, out: str, workers: str) -> dict:
    from qwen3lab.train.prepare import prepare

    t0 = time.perf_counter()
    manifest = prepare(files.split(","), out, workers=int(workers), max_length=32768)
    return {
        "seconds": time.perf_counter() - t0,
        "rows": manifest["counts"]["rows"],
        "tokens": manifest["counts"]["tokens"],
    }


def reference(file: str, cache: str, kind: str, model: str) -> dict:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    tok = transformers.AutoTokenizer.from_pretrained(model)
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_json(file, cache_dir=cache)
    if kind == "chat":

        def encode(row):
            # Arrow gives every message every key seen in the file (None where absent): dropped, as users must
            messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
            out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

        ds = ds.map(encode, num_proc=CORES, remove_columns=ds.column_names)
    else:
        ds = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=CORES, remove_columns=ds.column_names)
    seconds = time.perf_counter() - t0
    sample = [
        {"ids": ds[i]["input_ids"], "mask": ds[i].get("assistant_masks")} for i in range(0, len(ds), len(ds) // 50)
    ]
    return {"seconds": seconds, "rows": len(ds), "tokens": None, "sample": sample}


def training(data: str, out: str, steps: str) -> dict:
    """Start-up (from the call to the start of the first step: model, data, optimizer) and peak RSS of a run."""
    import qwen3lab
    from qwen3lab.train import loop

    shape = SMALL_QWEN3 | {"num_hidden_layers": 2}
    folder = Path(out) / "model"
    if not folder.is_dir():
        qwen3lab.save_model(qwen3lab.new_model(qwen3lab.preset("tiny", **shape), seed=0), folder)
        qwen3lab.load_tokenizer().save(folder)
    first = []
    original = loop.train_step

    def train_step(run, batches):
        if not first:
            first.append(time.perf_counter())
        return original(run, batches)

    loop.train_step = train_step
    t0 = time.perf_counter()
    config = {"model": str(folder), "out": str(Path(out) / "run"), "steps": int(steps), "progress": False}
    config |= {"data": {"train": data, "max_length": 512}, "batch_size": 4, "save_every": 0}
    qwen3lab.train(config)
    return {"startup": first[0] - t0, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=200_000)
    ap.add_argument("--text-tokens", type=float, default=200e6)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(globals()[args.child[0]](*args.child[1:])))
        return
    import qwen3lab

    print(f"# bench/prepare.py — {machine()}, {CORES} cores")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        qwen3lab.load_tokenizer().save(tmp / "tok")
        write_chats(tmp / "chats.jsonl", args.chats)
        write_text(tmp / "text.jsonl", args.text_tokens)
        print(
            f"data: {args.chats:,} chats ({(tmp / 'chats.jsonl').stat().st_size / 1e6:.0f} MB), text corpus "
            f"{(tmp / 'text.jsonl').stat().st_size / 1e6:.0f} MB"
        )

        a = in_child("ours", tmp / "chats.jsonl", tmp / "p-chats", CORES)
        b = in_child("reference", tmp / "chats.jsonl", tmp / "hf-cache", "chat", tmp / "tok")
        _check(tmp / "p-chats", b["sample"], len(b["sample"]), args.chats)
        print(
            f"chats: qwen3lab prepare {a['rows'] / a['seconds']:9,.0f} rows/s ({a['seconds']:.1f} s); datasets.map "
            f"{b['rows'] / b['seconds']:9,.0f} rows/s ({b['seconds']:.1f} s); ratio {b['seconds'] / a['seconds']:.2f}x"
        )

        a = in_child("ours", tmp / "text.jsonl", tmp / "p-text", CORES)
        b = in_child("reference", tmp / "text.jsonl", tmp / "hf-cache2", "text", tmp / "tok")
        one = in_child("ours", tmp / "text.jsonl", tmp / "p-text-1", 1)
        print(
            f"text:  qwen3lab prepare {a['tokens'] / a['seconds']:9,.0f} tokens/s ({a['tokens']:,} tokens, "
            f"{a['seconds']:.1f} s); datasets.map {a['tokens'] / b['seconds']:9,.0f} tokens/s ({b['seconds']:.1f} s); "
            f"ratio {b['seconds'] / a['seconds']:.2f}x"
        )
        scaling = one["seconds"] / a["seconds"]
        print(f"workers: 1 -> {CORES}: {one['seconds']:.1f} s -> {a['seconds']:.1f} s, {scaling:.2f}x")

        with open(tmp / "text.jsonl") as f:
            (tmp / "small.jsonl").write_text("".join(next(f) for _ in range(200)))
        in_child("ours", tmp / "small.jsonl", tmp / "p-small", 1)
        small = in_child("training", tmp / "p-small", tmp / "t-small", args.steps)
        big = in_child("training", tmp / "p-text", tmp / "t-big", args.steps)
        print(
            f"training on the prepared corpus: start-up {big['startup']:.2f} s (a 200-document corpus: "
            f"{small['startup']:.2f} s); peak RSS {big['rss_gib']:.2f} GiB over {args.steps} steps (the small "
            f"corpus: {small['rss_gib']:.2f} GiB): +{big['rss_gib'] - small['rss_gib']:.2f} GiB for the corpus"
        )


def _check(folder: Path, sample: list, n: int, rows: int) -> None:
    """The reference's ids and masks equal the prepared ones, on every 50th-of-the-set row."""
    from qwen3lab.train.shards import open_prepared

    corpus, _ = open_prepared(folder)
    step = rows // 50
    for j, want in enumerate(sample):
        i = j * step
        a, b = int(corpus.starts[i]), int(corpus.ends[i])
        assert corpus.ids[a:b].tolist() == want["ids"], f"row {i}: ids differ"
        assert corpus.mask[a:b].tolist() == want["mask"], f"row {i}: masks differ"
    print(f"identical ids and masks on {n} sampled rows")


if __name__ == "__main__":
    main()
