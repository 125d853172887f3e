"""Speculative decoding, by prompt lookup and by a draft model: greedy output is plain decoding's, sampled output is
distributed as the model's."""

import collections

import pytest
import torch
from helpers import hf_tiny

import qwen3lab
from qwen3lab.infer.engine import Engine
from qwen3lab.infer.sampling import SamplingParams
from qwen3lab.infer.speculative import lookup


def test_lookup_takes_what_followed_the_longest_match():
    assert lookup([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7], 3) == [9, 2, 6]  # "6 7" last seen before "9 2 6"
    assert lookup([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], 2) == [9, 2]  # "1 2 3" beats the later "2 3"
    assert lookup([8, 8, 8, 8, 8], 3) == [8, 8]  # the latest "8 8 8" is followed by one 8, the earliest by two
    assert lookup([1, 2, 3, 4], 3) == [] and lookup([4, 4], 5) == [4] and lookup([7], 2) == []


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    hf_tiny(vocab=151936, hidden=64, heads=4, kv_heads=2, head_dim=16, initializer_range=0.3).save_pretrained(folder)
    return qwen3lab.load_model(folder, dtype="float32", device="cpu")


def _run(model, prompts, params, speculate, max_batch=64, prefill_chunk=2048, draft_model=None, capacity=256):
    engine = Engine(
        model,
        max_batch,
        prefill_chunk,
        capacity,
        max_waiting=len(prompts),
        speculate=speculate,
        seed=0,
        draft_model=draft_model,
    )
    out = [[] for _ in prompts]
    for o, ids, p in zip(out, prompts, params, strict=True):
        engine.submit(ids, p, lambda kind, value, o=o: o.append(value) if kind == "token" else None)
    engine.run_until_idle()
    return out, engine


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A vocabulary of 8: its greedy text soon cycles, so most drafts are right."""
    folder = tmp_path_factory.mktemp("spec8")
    hf_tiny(vocab=8, hidden=32, heads=2, kv_heads=1, head_dim=16, initializer_range=0.2).save_pretrained(folder)
    return qwen3lab.load_model(folder, dtype="float32", device="cpu")


def test_greedy_output_is_plain_decodings(model, small, tok):
    """Prompts that repeat themselves, budgets that end inside a step's drafts, rows with and without drafts in one
    batch: the tokens are plain decoding's. On the 8-token model most of them come from accepted drafts."""
    texts = ["one two three four one two three four one two", "def f(x):\n    return x\n\ndef g(x):\n    return", "Hi"]
    prompts = [tok.encode(t) for t in texts]
    params = [SamplingParams(max_new_tokens=n, stop_ids=[]) for n in (60, 41, 37)]
    plain, _ = _run(model, prompts, params, 0)
    fast, engine = _run(model, prompts, params, 4)
    assert fast == plain and engine.drafted_total > 0
    prompts = [[1, 2, 3, 1, 2], [5], [4, 4, 6, 1, 7, 4, 4]]
    plain, _ = _run(small, prompts, params, 0)
    fast, engine = _run(small, prompts, params, 4)
    assert fast == plain
    assert engine.accepted_total > 0.3 * sum(len(o) for o in plain)


def test_sampled_tokens_are_distributed_as_the_models(small):
    """Rows of 3 tokens (the first from the prefill, then a step that checks a draft: every token occurs in the
    prompt, so every row has one): the 2nd and 3rd tokens of 4,000 rows, each its own seed, against the model's exact
    distribution of them (a rejection that kept the draft, or never resampled, would put them apart)."""
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 1, 2]
    with torch.no_grad():
        p1 = small(torch.tensor([prompt]))[0, -1].softmax(-1)  # [8]
        p2 = small(torch.tensor([prompt + [a] for a in range(8)]))[:, -1].softmax(-1)  # [a, b]
        rows = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
        p3 = small(rows)[:, -1].softmax(-1).view(8, 8, 8)  # [a, b, c]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # p(b, c)
    N = 4000
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, stop_ids=[]) for s in range(N)]
    out, engine = _run(small, [prompt] * N, params, 3, max_batch=N, prefill_chunk=N * len(prompt))  # one prefill
    assert engine.drafted_total == N  # one draft a row, in its second step
    counts = collections.Counter(tuple(o[1:]) for o in out)
    tv = sum(abs(counts[(b, c)] / N - float(exact[b, c])) for b in range(8) for c in range(8)) / 2
    assert tv < 0.08, tv


def test_on_by_flag_for_generate_rollouts_and_the_server(model, tok):
    from fastapi.testclient import TestClient

    from qwen3lab.generate import generate
    from qwen3lab.serve import create_app
    from qwen3lab.train.objectives.rollouts import sample

    prompt = "one two three four one two three four one two"
    plain = generate(model, tok, prompt, max_new_tokens=30, stop_ids=[])
    assert generate(model, tok, prompt, max_new_tokens=30, stop_ids=[], speculate=4).ids == plain.ids
    greedy = SamplingParams(max_new_tokens=30, stop_ids=[])
    ids = tok.encode(prompt)
    assert sample(model, [ids], 2, greedy, seed=0, speculate=4) == [plain.ids] * 2
    with TestClient(create_app(model, tok, "tiny", speculate=4)) as client:
        body = {"prompt": prompt, "max_tokens": 30, "temperature": 0}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == plain.text


# ---- a draft model ----


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A smaller model of the same vocabulary with weights of its own: many of its drafts are wrong."""
    folder = tmp_path_factory.mktemp("draft")
    hf_tiny(
        vocab=151936, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, initializer_range=0.3, seed=1
    ).save_pretrained(folder)
    return folder, qwen3lab.load_model(folder, dtype="float32", device="cpu")


def test_greedy_output_with_a_draft_model_is_plain_decodings(model, draft, tok):
    """Five prompts through two rows, so rows leave and join while others decode (a joining prompt is read into the
    draft's cache, a leaving row's slot taken by another): the tokens are plain decoding's. With the model as its own
    draft nearly every draft is kept, which holds only while the draft's cache follows every row exactly (through
    joins, slot moves and growth)."""
    texts = ["one two three four one two", "def f(x):\n    return x", "Hi", "a b a b a b a", "The cat sat on the"]
    prompts = [tok.encode(t) for t in texts]
    params = [SamplingParams(max_new_tokens=n, stop_ids=[]) for n in (30, 9, 21, 14, 25)]
    plain, _ = _run(model, prompts, params, 0, max_batch=2)
    fast, engine = _run(model, prompts, params, 3, max_batch=2, draft_model=draft[1])
    assert fast == plain and engine.drafted_total > 0 and engine.accepted_total < engine.drafted_total
    # caches that start small and grow as the rows do (the draft's ahead of the engine's)
    itself, engine = _run(model, prompts, params, 3, max_batch=2, draft_model=model, capacity=8)
    assert itself == plain and engine.accepted_total >= 0.95 * engine.drafted_total > 0


def test_sampled_tokens_with_a_draft_model_are_distributed_as_the_models(small, tmp_path):
    """As the prompt-lookup test, the draft now a model of its own (q != p): 4,000 rows' 2nd and 3rd tokens against
    the target's exact distribution. Drafts are accepted with min(1, p/q) and rejections resample from max(0, p - q)."""
    hf_tiny(
        vocab=8, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, initializer_range=0.5, seed=3
    ).save_pretrained(tmp_path)
    draft = qwen3lab.load_model(tmp_path, dtype="float32", device="cpu")
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 1, 2]
    with torch.no_grad():
        p1 = small(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = small(torch.tensor([prompt + [a] for a in range(8)]))[:, -1].softmax(-1)
        rows = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
        p3 = small(rows)[:, -1].softmax(-1).view(8, 8, 8)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # p(b, c)
    N = 4000
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, stop_ids=[]) for s in range(N)]
    out, engine = _run(small, [prompt] * N, params, 2, N, N * len(prompt), draft_model=draft)
    assert engine.drafted_total == N and 0 < engine.accepted_total < N  # one draft a row; some rejected
    counts = collections.Counter(tuple(o[1:]) for o in out)
    tv = sum(abs(counts[(b, c)] / N - float(exact[b, c])) for b in range(8) for c in range(8)) / 2
    assert tv < 0.08, tv


def test_a_draft_model_by_flag_and_its_mistakes(model, draft, tok, tmp_path, capsys):
    from qwen3lab.cli import main
    from qwen3lab.generate import generate

    prompt = "one two three four one two"
    plain = generate(model, tok, prompt, max_new_tokens=20, stop_ids=[])
    assert generate(model, tok, prompt, max_new_tokens=20, stop_ids=[], draft_model=draft[1]).ids == plain.ids
    target = tmp_path / "target"
    qwen3lab.save_model(model, target)
    main(
        [
            "generate",
            "--model",
            str(target),
            "--draft-model",
            str(draft[0]),
            "--prompt",
            prompt,
            "--raw",
            "--max-new-tokens",
            "20",
        ]
    )
    assert capsys.readouterr().out.strip() == generate(model, tok, prompt, max_new_tokens=20).text.strip()
    hf_tiny(vocab=512).save_pretrained(tmp_path / "other")
    other = qwen3lab.load_model(tmp_path / "other", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="its vocabulary has 512 tokens, the model's 151936"):
        Engine(model, 2, draft_model=other)
