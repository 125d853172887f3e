"""Generation against transformers' generate, batching, the KV cache, sampling, stops and streaming."""

import pytest
import torch
from helpers import hf_tiny

import qwen3lab
from qwen3lab.generate import generate, stream
from qwen3lab.infer.sampling import SamplingParams, process_logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random model whose greedy continuations vary (weights larger than init), in both implementations."""
    hf = hf_tiny(vocab=151936, hidden=64, heads=4, kv_heads=2, head_dim=16, initializer_range=0.3)
    folder = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(folder)
    return hf, qwen3lab.load_model(folder, dtype="float32", device="cpu")


PROMPTS = ["Hello there, how are you", "Hi", "A much longer prompt goes right here, with some more words"]


def test_greedy_equals_transformers_64_tokens(models, tok):
    hf, ours = models
    ids = tok.encode(PROMPTS[0])
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None)[0, len(ids) :]
    got = generate(ours, tok, ids, max_new_tokens=64, stop_ids=[])
    assert len(set(got.ids)) > 5  # a continuation that actually varies
    assert got.ids == ref.tolist()
    assert got.finish_reason == "length"


def test_batched_equals_one_by_one(models, tok):
    _, ours = models
    batch = generate(ours, tok, PROMPTS, max_new_tokens=16, stop_ids=[])
    for prompt, got in zip(PROMPTS, batch, strict=True):
        assert got.ids == generate(ours, tok, prompt, max_new_tokens=16, stop_ids=[]).ids


def test_cached_decode_equals_full_recomputation(models, tok):
    _, ours = models
    ids = tok.encode(PROMPTS[2])
    got = generate(ours, tok, ids, max_new_tokens=12, stop_ids=[]).ids
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(ids) :]


def test_sampling_with_seed_is_reproducible(models, tok):
    _, ours = models
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_ids=[])
    a, b = generate(ours, tok, PROMPTS[0], **kw), generate(ours, tok, PROMPTS[0], **kw)
    c = generate(ours, tok, PROMPTS[0], **(kw | {"seed": 8}))
    assert a.ids == b.ids and a.ids != c.ids


def test_stop_ids_end_generation(models, tok):
    _, ours = models
    free = generate(ours, tok, PROMPTS[0], max_new_tokens=10, stop_ids=[]).ids
    stopped = generate(ours, tok, PROMPTS[0], max_new_tokens=10, stop_ids=[free[3]])
    assert stopped.ids == free[: free.index(free[3])] and stopped.finish_reason == "stop"


def test_stop_strings_end_generation_and_are_cut(models, tok):
    _, ours = models
    free = generate(ours, tok, PROMPTS[0], max_new_tokens=12, stop_ids=[])
    stop = free.text[5:8]
    cut = generate(ours, tok, PROMPTS[0], max_new_tokens=12, stop_ids=[], stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    streamed = "".join(stream(ours, tok, PROMPTS[0], max_new_tokens=12, stop_ids=[], stop=[stop]))
    assert streamed == cut.text


def test_stream_joins_to_the_text_and_never_splits_characters(models, tok):
    _, ours = models
    pieces = list(stream(ours, tok, PROMPTS[1], max_new_tokens=24, stop_ids=[]))
    full = generate(ours, tok, PROMPTS[1], max_new_tokens=24, stop_ids=[])
    assert "".join(pieces) == full.text
    assert not any("\ufffd" in p for p in pieces[:-1])


def test_default_stop_ids_include_both_chat_ends(models):
    _, ours = models
    from qwen3lab.infer.sampling import default_stop_ids

    assert {151643, 151645} <= set(default_stop_ids(ours))


def test_process_logits_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = SamplingParams(temperature=1.0, top_k=2)
    assert torch.isinf(process_logits(logits, None, p)[0, 2:]).all()
    p = SamplingParams(temperature=1.0, top_p=0.5)
    assert torch.isfinite(process_logits(logits, None, p)).sum() == 1
    p = SamplingParams(temperature=1.0, min_p=0.3)  # keeps tokens with prob >= 0.3 * max
    assert torch.isfinite(process_logits(logits, None, p)).sum() == 2
    p = SamplingParams(repetition_penalty=2.0)
    out = process_logits(logits, torch.tensor([[0]]), p)
    assert out[0, 0] == 2.0 and out[0, 1] == 3.0


def test_prompt_too_long_or_empty(models, tok):
    _, ours = models
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(ours, tok, [1] * 10, max_new_tokens=10**6)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(ours, tok, [[]])


@pytest.mark.slow
def test_compiled_decode_equals_eager(tmp_path, tok):
    """--compile (decoder blocks compiled for any length) generates what eager does, batched and padded, with no
    recompile per decode step."""
    from torch._dynamo.utils import counters

    from qwen3lab.model.runtime import apply_compile

    hf = hf_tiny(vocab=151936, hidden=64, heads=4, kv_heads=2, head_dim=16, initializer_range=0.3, layers=2)
    hf.save_pretrained(tmp_path)
    eager, compiled = (qwen3lab.load_model(tmp_path, dtype="float32", device="cpu") for _ in range(2))
    apply_compile(compiled, dynamic=True)
    torch._dynamo.reset()
    counters.clear()
    want = [g.ids for g in generate(eager, tok, PROMPTS, max_new_tokens=12, stop_ids=[])]
    assert [g.ids for g in generate(compiled, tok, PROMPTS, max_new_tokens=12, stop_ids=[])] == want
    assert [g.ids for g in generate(compiled, tok, PROMPTS[:2], max_new_tokens=20, stop_ids=[])] == [
        g.ids for g in generate(eager, tok, PROMPTS[:2], max_new_tokens=20, stop_ids=[])
    ]
    assert counters["stats"]["unique_graphs"] <= 2  # a prompt graph and a decode graph, whatever the lengths


def test_long_prompt_prefill_without_mask_equals_masked_batch_and_transformers(models, tok):
    """A single 1,500-token prompt is prefilled with the causal kernel and no [n, S] mask; the same prompt in a
    left-padded batch goes through the masked path: the same greedy ids, and transformers' too."""
    hf, ours = models
    ids = torch.randint(0, 151_000, (1500,), generator=torch.Generator().manual_seed(0)).tolist()
    alone = generate(ours, tok, ids, max_new_tokens=8, stop_ids=[]).ids
    batched = generate(ours, tok, [ids, ids[:700]], max_new_tokens=8, stop_ids=[])[0].ids
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(ids) :]
    assert alone == batched == ref.tolist()


@pytest.mark.parametrize("stop", [[], ["界 🙂"], ["llo"], ["🙂 st", "zzz"], ["end."]])
def test_text_stream_is_incremental_never_splits_characters_nor_leaks_stops(tok, stop):
    from qwen3lab.infer.detokenize import TextStream

    text = "héllo 世界 🙂 stop, ünïcödé 🎉🎉 and the end. " * 40
    ids = tok.encode(text)

    class Counting:  # the tokenizer, counting how many ids it is asked to decode
        decoded = 0

        def decode(self, part):
            Counting.decoded += len(part)
            return tok.decode(part)

    s = TextStream(Counting(), stop)
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = s.add(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(s.flush())
    cut = min((text.find(x) for x in stop if x in text), default=len(text))
    assert "".join(pieces) == text[:cut]
    assert not any("\ufffd" in p for p in pieces)
    assert Counting.decoded <= 8 * len(ids)  # O(1) per token: never the whole list again


def test_sampling_draws_each_token_with_its_probability():
    """The engine's sampler (inverse CDF, one uniform per row): frequencies follow the probabilities, a token of
    probability 0 is never drawn, and a seeded generator repeats itself."""
    from qwen3lab.infer.sampling import sample

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    logits = probs.log().expand(40_000, -1)
    params = SamplingParams(temperature=1.0)
    picks = sample(logits, params, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4) / len(picks)
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], probs[0, :3], atol=0.01, rtol=0)
    assert torch.equal(picks, sample(logits, params, torch.Generator().manual_seed(0)))
