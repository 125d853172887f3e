"""`qwen3lab prepare`: data tokenised by worker processes into memory-mapped shards that training reads as it reads a
file — the same examples, the same bytes with any number of workers, a stopped run continued, bad rows reported;
plain text trained as pretraining rows (documents end to end, cut every max_length tokens)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import crash_after_step

from qwen3lab.train import data as D
from qwen3lab.train.prepare import prepare
from qwen3lab.train.shards import open_prepared

CHAT = [{"role": "user", "content": "Sort 3142"}, {"role": "assistant", "content": "1234"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def mixed_rows(n: int) -> list[dict]:
    """Every row format training reads, in turn, with varied content."""
    rows = []
    for i in range(n):
        user = {"role": "user", "content": f"Reverse {i * 7919 % 10000}"}
        kinds = [
            {"messages": [user, {"role": "assistant", "content": str(i)[::-1]}]},
            {"messages": [user, {"role": "assistant", "content": f"ok {i}"}], "tools": TOOLS},
            {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]},
            {"prompt": f"Count to {i % 9}:", "completion": " " + " ".join(map(str, range(i % 9 + 1)))},
            {"text": " ".join(f"word{j}" for j in range(i % 50 + 1))},
        ]
        rows.append(kinds[i % len(kinds)])
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_corpus(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    return write(
        path, [{"text": " ".join(f"w{x}" for x in rng.integers(0, 500, rng.integers(5, 120)))} for _ in range(n)]
    )


def shard_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_hold_exactly_the_in_memory_tokenisation(tmp_path, tok):
    """Each example of a prepared folder (5 shards), as training reads it, is the in-memory tokenisation's: ids and
    shifted labels (text rows are kept whole in the shards and cut to max_length when read); the manifest counts
    them and names its sources by hash; preference pairs likewise."""
    from qwen3lab.train.config import load_train_config
    from qwen3lab.train.sources import examples

    data = write(tmp_path / "mixed.jsonl", mixed_rows(45))
    manifest = prepare([str(data)], tmp_path / "p", workers=2, max_length=64, rows_per_shard=10)
    cfg = load_train_config(None, {"model": "tiny", "data.train": str(tmp_path / "p"), "data.max_length": 64})
    corpus = examples(cfg.data.train, tok, cfg, "sft")
    want = D.tokenize_rows(tok, D.read_rows(data), 64)
    assert manifest["shards"] == 5 and manifest["kind"] == "sft" and len(corpus) == len(want)
    for i in range(len(want)):
        ids, labels = corpus.example(i)
        assert ids.tolist() == want.example(i)[0].tolist() and labels.tolist() == want.example(i)[1].tolist(), i
    assert corpus.supervised_tokens() == want.supervised_tokens()
    assert manifest["counts"]["dropped"] == 9 and manifest["counts"]["text_rows"] == 9  # the tool chats: long
    assert manifest["counts"]["tokens"] > len(want.ids)  # the long text rows, whole
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()

    pairs = [{"prompt": [CHAT[0]], "chosen": [CHAT[1]], "rejected": [{"role": "assistant", "content": f"{i}"}]}]
    pairs = write(tmp_path / "pairs.jsonl", pairs * 3)
    assert prepare([str(pairs)], tmp_path / "pp", workers=1)["kind"] == "pairs"
    corpus, want = open_prepared(tmp_path / "pp")[0], D.load_preferences(pairs, tok, 2048)
    assert len(corpus) == len(want) == 6
    for i in range(6):
        assert corpus.example(i)[1].tolist() == want.example(i)[1].tolist()


def test_one_and_two_workers_write_the_same_bytes(tmp_path):
    data = write(tmp_path / "mixed.jsonl", mixed_rows(30))
    one = prepare([str(data)], tmp_path / "one", workers=1, rows_per_shard=7)
    two = prepare([str(data)], tmp_path / "two", workers=2, rows_per_shard=7)
    assert one == two and one["shards"] == 5
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


@pytest.mark.slow  # three runs of the command
def test_a_killed_prepare_continues_to_the_same_shards(tmp_path):
    """`qwen3lab prepare` killed (SIGKILL, workers and all) once its first shards are written, then run again:
    only the missing shards are made, and the folder is the uninterrupted run's, byte for byte."""
    data = text_corpus(tmp_path / "text.jsonl", n=3000)
    cmd = [sys.executable, "-m", "qwen3lab", "prepare", str(data), "--workers", "1", "--rows-per-shard", "100"]
    straight = subprocess.run(cmd + ["--out", str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    killed = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "shard-00002").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    left = sorted(p.name for p in (tmp_path / "killed").glob("shard-*"))
    assert 3 <= len(left) < 30 and not (tmp_path / "killed" / "manifest.json").exists()
    again = subprocess.run(cmd + ["--out", str(tmp_path / "killed")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"{30 - len(left)} of 30 shards made by this run" in again.stderr  # only the missing ones
    whole = {k: v for k, v in shard_bytes(tmp_path / "killed").items() if not k.startswith(".")}
    assert whole == shard_bytes(tmp_path / "straight")


def test_bad_rows_stop_the_run_or_are_skipped_and_listed(tmp_path):
    rows = mixed_rows(6)
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'  # cut short
    lines[4] = json.dumps({"question": "no known keys"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "qwen3lab", "prepare", str(tmp_path / "bad.jsonl"), "--workers", "1"]
    stopped = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert stopped.returncode != 0
    assert "bad.jsonl:3: not valid JSON" in stopped.stderr and "--skip-bad" in stopped.stderr
    manifest = prepare([str(tmp_path / "bad.jsonl")], tmp_path / "b", workers=1, skip_bad=True)
    assert manifest["counts"]["bad"] == 2 and manifest["counts"]["rows"] == 4
    assert "bad.jsonl:5: unknown row format" in manifest["bad_rows"][1]
    with pytest.raises(D.DataError, match="already holds shards prepared from other inputs"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "b", workers=1, max_length=99, skip_bad=True)


def _train(tmp_path, name, data, data_keys=None, **keys):
    from qwen3lab.train import train

    config = {"model": "tiny", "out": str(tmp_path / name), "steps": 4, "progress": False, "batch_size": 2}
    config["data"] = {"train": str(data) if data else "", "max_length": 128} | (data_keys or {})
    run = train(config | keys)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_on_a_prepared_folder_is_training_on_its_file_and_resumes_exactly(tmp_path, monkeypatch):
    """The same losses from the file and from its prepared folder; a run on the folder stopped after step 2 and
    resumed from its checkpoint gives the uninterrupted losses (the cursor walks the shards)."""
    data = write(tmp_path / "mixed.jsonl", mixed_rows(40))
    prepare([str(data)], tmp_path / "p", workers=2, max_length=128, rows_per_shard=9)
    from_file = _train(tmp_path, "file", data)
    from_folder = _train(tmp_path, "folder", tmp_path / "p")
    assert [m["loss"] for m in from_folder] == [m["loss"] for m in from_file]
    with crash_after_step(monkeypatch, 2):
        _train(tmp_path, "resumed", tmp_path / "p", save_every=2)
    resumed = _train(tmp_path, "resumed", tmp_path / "p", save_every=2)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in from_folder], abs=1e-6)


def test_text_corpus_trains_as_documents_end_to_end_cut_every_max_length(tmp_path, tok):
    """A text corpus: rows of exactly max_length tokens (the last one shorter) that are the documents end to end,
    each ending with EOS, nothing lost; positions restart at every document and at every row; every token is
    learned but the last of each piece, which has no next token in its row."""
    from qwen3lab.train.batching import collate
    from qwen3lab.train.config import load_train_config
    from qwen3lab.train.sources import load_data

    data = text_corpus(tmp_path / "text.jsonl")
    manifest = prepare([str(data)], tmp_path / "t", workers=1, rows_per_shard=25)
    assert manifest["kind"] == "text"
    cfg = load_train_config(None, {"model": "tiny", "data.train": str(tmp_path / "t"), "data.max_length": 100})
    pieces, rows, _, _ = load_data(cfg, tok)
    batch = collate(pieces, rows, tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert (lengths[:-1] == 100).all() and 0 < lengths[-1] <= 100
    stream = batch["input_ids"][batch["attention_mask"].bool()].tolist()
    docs = [t + tok.eos_token for t in (json.loads(line)["text"] for line in data.read_text().splitlines())]
    assert stream == [i for ids in tok.encode_batch(docs) for i in ids]
    eos = tok.token_to_id(tok.eos_token)
    pos, ids, labels = batch["position_ids"], batch["input_ids"], batch["labels"]
    starts = (pos == 0) & batch["attention_mask"].bool()
    follows_eos = (ids[:, :-1] == eos) & batch["attention_mask"][:, 1:].bool()
    assert (pos[:, 1:][follows_eos] == 0).all()  # a document after an EOS starts at position 0
    learned = labels != -100
    ends = ~learned & batch["attention_mask"].bool()
    assert (ends.sum(1) == starts.sum(1)).all()  # one unlearned token per piece: its last
    assert pieces.supervised_tokens() == int(learned.sum())


def test_prepared_folder_refused_for_another_tokenizer_or_objective(tmp_path, tok):
    from qwen3lab import load_tokenizer
    from qwen3lab.train.config import load_train_config
    from qwen3lab.train.sources import examples

    data = write(tmp_path / "mixed.jsonl", mixed_rows(10))
    prepare([str(data)], tmp_path / "p", workers=1)
    cfg = load_train_config(None, {"model": "tiny", "data.train": str(tmp_path / "p")})
    other = load_tokenizer()
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(D.DataError, match="prepared with another tokenizer or chat template"):
        examples(str(tmp_path / "p"), other, cfg, "sft")
    with pytest.raises(D.DataError, match="a prepared sft corpus; objective sft trains on pairs"):
        examples(str(tmp_path / "p"), tok, cfg, "pairs")


def test_mixture_draws_each_source_in_its_proportion_and_resumes_the_same_stream():
    """1,000 global batches of 8 rows from three sources (weights 6:3:1, sizes 5, 50 and 7 rows): each source's
    share within 4 binomial standard deviations; a cursor restored from a saved state continues the same rows."""
    from qwen3lab.train.batching import Cursor, MixCursor

    def mix():
        cursors = [Cursor(n, seed=s, shuffle=True) for s, n in enumerate((5, 50, 7))]
        return MixCursor(cursors, [6, 3, 1], [[1] * 5, [2] * 50, [3] * 7], seed=0)

    cursor, bases = mix(), (0, 5, 55, 62)
    counts = np.zeros(3)
    for _ in range(1000):
        for row in cursor.take(8):
            counts[np.searchsorted(bases, row, side="right") - 1] += 1
    n, p = counts.sum(), np.array([0.6, 0.3, 0.1])
    assert (np.abs(counts - n * p) < 4 * np.sqrt(n * p * (1 - p))).all(), counts
    assert cursor.state()["tokens"] == [counts[0] * 1, counts[1] * 2, counts[2] * 3]
    saved = json.loads(json.dumps(cursor.state()))  # as a checkpoint holds it
    ahead = [cursor.take(8) for _ in range(20)]
    again = mix()
    again.restore(saved)
    assert [again.take(8) for _ in range(20)] == ahead


def test_mixed_run_reports_each_source_and_resumes_exactly(tmp_path, monkeypatch):
    """A file and a prepared text corpus mixed 3:1: every step logs each source's loss and tokens (which add up to
    the run's); with one source's weight near 0 its loss is the run's; stopped after step 2 and resumed, the same
    losses."""
    chats = write(tmp_path / "chats.jsonl", mixed_rows(40))
    prepare([str(text_corpus(tmp_path / "text.jsonl"))], tmp_path / "t", workers=1)
    mix = [{"path": str(chats), "weight": 3, "name": "chats"}, {"path": str(tmp_path / "t"), "weight": 1}]
    keys = {"data_keys": {"mix": mix}}
    straight = _train(tmp_path, "straight", "", **keys)
    before = {"tokens/chats": 0, "tokens/t": 0}
    for m in straight:  # a source's loss is logged in the steps that drew rows from it
        assert m["tokens/chats"] + m["tokens/t"] == m["tokens"]
        assert all((f"loss/{s}" in m) == (m[f"tokens/{s}"] > before[f"tokens/{s}"]) for s in ("chats", "t"))
        before = m
    assert any("loss/t" in m for m in straight) and any("loss/chats" in m for m in straight)
    with crash_after_step(monkeypatch, 2):
        _train(tmp_path, "resumed", "", save_every=2, **keys)
    resumed = _train(tmp_path, "resumed", "", save_every=2, **keys)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], abs=1e-6)
    assert [m["tokens/t"] for m in resumed] == [m["tokens/t"] for m in straight]
    mix[1]["weight"] = 1e-9
    (one,) = _train(tmp_path, "one", "", steps=1, **keys)
    assert one["loss/chats"] == pytest.approx(one["loss"], rel=1e-6) and "loss/t" not in one


def test_dpo_on_prepared_pairs_is_dpo_on_their_file(tmp_path):
    """A prepared `pairs` folder trains DPO as its file does: the same losses and reward margins."""
    from qwen3lab.train import train

    rows = [
        {"prompt": [{"role": "user", "content": f"Sort {i}{i + 3}{i + 1}"}], "chosen": [CHAT[1]], "rejected": [r]}
        for i, r in enumerate({"role": "assistant", "content": str(j) * (j % 4 + 1)} for j in range(12))
    ]
    pairs = write(tmp_path / "pairs.jsonl", rows)
    prepare([str(pairs)], tmp_path / "p", workers=1, rows_per_shard=5)

    def run(name, data):
        config = {"model": "tiny", "out": str(tmp_path / name), "objective": "dpo", "steps": 3, "batch_size": 2}
        train(config | {"progress": False, "data": {"train": str(data)}, "optim": {"lr": 1e-3}})
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    from_file, from_folder = run("file", pairs), run("folder", tmp_path / "p")
    assert [m["loss"] for m in from_folder] == [m["loss"] for m in from_file]
    assert [m["rewards/margins"] for m in from_folder] == [m["rewards/margins"] for m in from_file]


@pytest.mark.slow  # processes under torchrun's launcher
def test_a_staged_mixture_on_two_ranks_trains_as_one_process(tmp_path):
    """torchrun with 2 gloo ranks × 1 row against one process × 2 rows, on a run whose first stage mixes a file and a
    prepared text corpus and whose second reads the corpus alone: the same losses, per-source losses and tokens."""
    from pathlib import Path

    import yaml

    chats = write(tmp_path / "chats.jsonl", mixed_rows(40))
    prepare([str(text_corpus(tmp_path / "text.jsonl"))], tmp_path / "t", workers=1)
    mix = [f"{chats}:3", f"{tmp_path / 't'}:1"]
    config = {"model": "tiny", "progress": False, "data": {"train": str(chats), "max_length": 128}, "seed": 3}
    config["stages"] = [{"steps": 3, "data": {"mix": mix}}, {"steps": 2, "data": {"train": str(tmp_path / "t")}}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    one = _train(tmp_path, "one", chats, batch_size=2, **{k: v for k, v in config.items() if k not in ("data",)})
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    cmd += ["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "two"), "--batch_size", "1"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in two] == [0, 0, 0, 1, 1]
    for a, b in zip(one, two, strict=True):
        assert set(a) - {"elapsed", "tokens_per_s"} == set(b) - {"elapsed", "tokens_per_s"}
        for key in set(a) - {"elapsed", "tokens_per_s", "grad_norm"}:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
