"""Continuous batching: rows joining and leaving a running batch give what each request gives alone."""

import time

import pytest
import torch
from helpers import hf_tiny

import qwen3lab
from qwen3lab.generate import generate
from qwen3lab.infer.engine import Engine
from qwen3lab.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random weights larger than init, so greedy continuations vary."""
    folder = tmp_path_factory.mktemp("engine")
    hf_tiny(vocab=151936, hidden=64, heads=4, kv_heads=2, head_dim=16, initializer_range=0.3).save_pretrained(folder)
    return qwen3lab.load_model(folder, dtype="float32", device="cpu")


class Collect:
    def __init__(self):
        self.ids, self.end = [], None

    def __call__(self, kind, value):
        if kind == "token":
            self.ids.append(value)
        elif kind == "end":
            self.end = value
        else:
            raise AssertionError(value)


PROMPTS = [
    "Hello there, how are you",
    "Hi",
    "A much longer prompt goes right here, with some more words, and more, and more, " * 6,
    "Numbers: 1 2 3",
]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_k": 50, "seed": 11}], ids=["greedy", "seeded"])
def test_rows_joining_and_leaving_equal_each_request_alone(model, tok, sampling):
    budgets = [24, 5, 17, 30]
    engine = Engine(model, max_batch=3, capacity=16)  # fewer slots than requests, and a cache that must grow
    results, requests = [Collect() for _ in PROMPTS], []
    for i, (prompt, budget) in enumerate(zip(PROMPTS, budgets, strict=True)):
        params = SamplingParams(max_new_tokens=budget, stop_ids=[], **sampling)
        requests.append(engine.submit(tok.encode(prompt), params, results[i]))
        for _ in range(i + 2):  # later requests arrive while earlier ones are decoding
            engine.step()
    engine.run_until_idle()
    for prompt, budget, got in zip(PROMPTS, budgets, results, strict=True):
        alone = generate(model, tok, prompt, max_new_tokens=budget, stop_ids=[], **sampling)
        assert got.ids == alone.ids, prompt
        assert got.end == "length" and len(got.ids) == budget
    assert engine.capacity > 16 and engine.running == []


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_prefill_gives_the_same_outputs(model, tok, chunk):
    """Prompts prefilled `chunk` tokens a step (a long one over many steps, short ones batched): greedy and seeded
    rows give what they give with every prompt prefilled in one step."""
    budgets, sampling = [9, 12, 6, 10], [{}, {"temperature": 1.0, "seed": 5}, {}, {"temperature": 0.8, "seed": 9}]

    def run(prefill_chunk):
        engine = Engine(model, max_batch=4, prefill_chunk=prefill_chunk)
        results = [Collect() for _ in PROMPTS]
        for prompt, budget, kw, got in zip(PROMPTS, budgets, sampling, results, strict=True):
            engine.submit(tok.encode(prompt), SamplingParams(max_new_tokens=budget, stop_ids=[], **kw), got)
            engine.step()
        engine.run_until_idle()
        return [got.ids for got in results]

    assert run(chunk) == run(4096)


def test_prompts_prefilled_together_compute_no_padding(model, tok, monkeypatch):
    """Prompts of different lengths prefilled in one job beside a running row: one forward over the running row's
    token and the prompts' real tokens only (the padding after the shorter prompts' ends is never computed), and
    each prompt's greedy output is what it gives alone."""
    engine = Engine(model, max_batch=4, prefill_chunk=512)
    running = Collect()
    engine.submit(tok.encode(PROMPTS[0]), SamplingParams(max_new_tokens=6, stop_ids=[]), running)
    engine.step()
    prompts = [tok.encode(p) for p in (PROMPTS[3], PROMPTS[1], PROMPTS[0])]
    results = [Collect() for _ in prompts]
    for ids, got in zip(prompts, results, strict=True):
        engine.submit(ids, SamplingParams(max_new_tokens=5, stop_ids=[]), got)
    forwards, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **kw: forwards.append(ids.shape) or forward(ids, *a, **kw))
    engine.step()
    assert forwards == [(1, 1 + sum(map(len, prompts)))] and all(len(got.ids) == 1 for got in results)
    engine.run_until_idle()
    for ids, got in zip(prompts, results, strict=True):
        assert got.ids == generate(model, tok, ids, max_new_tokens=5, stop_ids=[]).ids


def test_running_rows_decode_while_a_long_prompt_prefills(model, tok, monkeypatch):
    """Each step, one forward: the running row's next token and the next chunk of the long prompt (16 tokens in
    all), so the row takes a token on every step of the prefill."""
    engine = Engine(model, prefill_chunk=16)
    running, long = Collect(), Collect()
    engine.submit(tok.encode(PROMPTS[0]), SamplingParams(max_new_tokens=200, stop_ids=[]), running)
    engine.step()
    before, prompt = len(running.ids), tok.encode(PROMPTS[2])
    engine.submit(prompt, SamplingParams(max_new_tokens=3, stop_ids=[]), long)
    forwards, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **kw: forwards.append(ids.shape) or forward(ids, *a, **kw))
    steps = 0
    while not long.ids:
        engine.step()
        steps += 1
    assert steps == -(-len(prompt) // 15) > 5  # a chunk of 15 prompt tokens per step, beside the running row's
    assert forwards == [(1, 16)] * (steps - 1) + [(1, 1 + len(prompt) - 15 * (steps - 1))]
    assert len(running.ids) == before + steps  # and a token for the running row every one of those steps
    engine.run_until_idle()
    assert long.ids == generate(model, tok, prompt, max_new_tokens=3, stop_ids=[]).ids


def test_stop_id_ends_the_row(model, tok):
    alone = generate(model, tok, PROMPTS[0], max_new_tokens=12, stop_ids=[])
    stop = alone.ids[5]
    engine = Engine(model)
    got = Collect()
    engine.submit(tok.encode(PROMPTS[0]), SamplingParams(max_new_tokens=12, stop_ids=[stop]), got)
    engine.run_until_idle()
    assert got.ids == alone.ids[: alone.ids.index(stop)] and got.end == "stop"


def test_cancelled_row_leaves_the_batch(model, tok):
    engine = Engine(model)
    a, b = Collect(), Collect()
    params = SamplingParams(max_new_tokens=50, stop_ids=[])
    ra = engine.submit(tok.encode(PROMPTS[0]), params, a)
    engine.submit(tok.encode(PROMPTS[1]), params, b)
    engine.step()
    assert len(engine.running) == 2
    ra.cancel()
    engine.step()
    assert len(engine.running) == 1 and a.end is None
    engine.run_until_idle()
    assert len(b.ids) == 50 and b.ids == generate(model, tok, PROMPTS[1], max_new_tokens=50, stop_ids=[]).ids


def test_short_request_does_not_wait_for_a_long_one(model, tok):
    """The head-of-line case: a 4-token request arriving while a long generation runs finishes in about its own
    time, not after the long one (engine steps counted, not seconds)."""
    engine = Engine(model)
    long, short = Collect(), Collect()
    engine.submit(tok.encode(PROMPTS[2]), SamplingParams(max_new_tokens=400, stop_ids=[]), long)
    for _ in range(20):
        engine.step()
    engine.submit(tok.encode(PROMPTS[1]), SamplingParams(max_new_tokens=4, stop_ids=[]), short)
    steps = 0
    while short.end is None:
        engine.step()
        steps += 1
    assert steps <= 4 and long.end is None  # joined at once, left after its 4 tokens, the long one still running
    engine.run_until_idle()
    assert len(long.ids) == 400


def test_engine_thread_serves_concurrent_requests(model, tok):
    engine = Engine(model, max_batch=4).start()
    results = [Collect() for _ in range(8)]
    for i, r in enumerate(results):
        engine.submit(tok.encode(PROMPTS[i % 4]), SamplingParams(max_new_tokens=3 + i, stop_ids=[]), r)
    deadline = time.time() + 60
    while any(r.end is None for r in results) and time.time() < deadline:
        time.sleep(0.01)
    assert [len(r.ids) for r in results] == [3 + i for i in range(8)]
    with torch.inference_mode():
        assert engine.running == []


def test_completions_of_one_prompt_share_one_prefill(model, tok):
    """n > 1 / GRPO's G rollouts: one prefill forward for the group, each completion as if sampled alone."""
    engine = Engine(model, max_batch=4)
    prefills = []
    forward = model.forward

    def counting(ids, *args, **kw):
        if ids.shape[1] > 1:
            prefills.append(ids.shape[1])
        return forward(ids, *args, **kw)

    model.forward = counting
    try:
        params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s, stop_ids=[]) for s in range(4)]
        results = [Collect() for _ in params]
        engine.submit_group(tok.encode(PROMPTS[2]), params, results)
        engine.submit(tok.encode(PROMPTS[0]), SamplingParams(max_new_tokens=3, stop_ids=[]), Collect())  # waits
        engine.run_until_idle()
    finally:
        del model.forward
    assert prefills == [len(tok.encode(PROMPTS[2])), len(tok.encode(PROMPTS[0]))]
    for p, got in zip(params, results, strict=True):
        alone = generate(model, tok, PROMPTS[2], max_new_tokens=10, temperature=1.0, seed=p.seed, stop_ids=[])
        assert got.ids == alone.ids
    assert len({tuple(r.ids) for r in results}) > 1  # the seeds really differ
    with pytest.raises(ValueError, match="at most 4 rows"):
        engine.submit_group([1, 2], params * 2, [Collect()] * 8)


def test_prefix_cache_reuses_a_shared_system_prompt(model, tok):
    """Requests sharing a system prompt copy its cache instead of computing it: fewer prompt tokens computed, the
    same tokens as each request alone (greedy and seeded), and the cache stays within its token budget."""
    system = {"role": "system", "content": "You are a careful assistant who answers in one short line. " * 4}
    questions = ["What is two plus two?", "Name a colour.", "Say hello.", "Count to three."]
    prompts = [
        tok.encode_chat(
            [system, {"role": "user", "content": q}], add_generation_prompt=True, assistant_mask=False
        ).input_ids
        for q in questions
    ]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1], strict=False)) if a != b)
    budget = 2 * max(map(len, prompts))
    engine = Engine(model, max_batch=2, prefix_cache_tokens=budget)
    results = [Collect() for _ in prompts]
    sampling = [{}, {"temperature": 1.0, "seed": 3}] * 2
    for ids, got, kw in zip(prompts, results, sampling, strict=True):
        engine.submit(ids, SamplingParams(max_new_tokens=8, stop_ids=[], **kw), got)
        engine.step()  # arriving one after another: each finds the earlier prompts kept
    engine.run_until_idle()
    for ids, got, kw in zip(prompts, results, sampling, strict=True):
        assert got.ids == generate(model, tok, ids, max_new_tokens=8, stop_ids=[], **kw).ids
    m = engine.metrics()
    assert m["prefix_cache_hit_tokens_total"] >= 3 * shared  # the three later prompts copied the system prompt
    assert m["prompt_tokens_total"] == sum(map(len, prompts))
    assert sum(len(key) for key in engine.prefixes) <= budget
    without = Engine(model, max_batch=2)
    for ids in prompts:
        without.submit(ids, SamplingParams(max_new_tokens=8, stop_ids=[]), Collect())
    without.run_until_idle()
    assert without.metrics()["prefix_cache_hit_tokens_total"] == 0
