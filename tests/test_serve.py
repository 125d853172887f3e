"""The OpenAI-compatible server through the official `openai` client, on loopback."""

import concurrent.futures
import time

import pytest
from helpers import serving, tiny_server_model

import qwen3lab

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok):
    from qwen3lab.serve import create_app

    folder = tmp_path_factory.mktemp("srv")
    model = tiny_server_model(folder)
    with serving(create_app(model, tok, "tiny")) as url:
        yield url, model, folder


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Hello!"}]


def test_chat_completion_matches_library_generate(client, server, tok):
    from qwen3lab.generate import generate

    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    ids = tok.encode_chat(MESSAGES, add_generation_prompt=True, assistant_mask=False).input_ids
    want = generate(server[1], tok, ids, max_new_tokens=12)
    assert r.choices[0].message.content == qwen3lab.text.chat.parse_assistant(want.text)["content"]
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == whole


def test_completions_and_models_and_health(client, server):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
        )  # noqa: E501
    )
    assert streamed == r.choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=3)
    assert client.chat.completions.create(**kw).choices[0].message.content == (
        client.chat.completions.create(**kw).choices[0].message.content
    )


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
        ({"messages": MESSAGES, "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text parts"),
        ({"messages": MESSAGES, "top_logprobs": 2}, "needs logprobs"),
        ({"messages": MESSAGES, "n": 99}, "at most 16 rows"),
        ({"messages": MESSAGES, "max_tokens": 10**7}, "exceeds the context"),
        ({}, "messages"),
    ],
)
def test_malformed_requests_get_openai_errors_and_server_keeps_serving(server, client, body, fragment):
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_64_concurrent_clients_with_mixed_lengths_all_complete(client, server, tok):
    from qwen3lab.generate import generate

    def ask(i):
        r = client.completions.create(model="tiny", prompt=f"Count to {i}", max_tokens=1 + i % 13, temperature=0)
        return i, r.choices[0].text, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, range(64)))
    assert [i for i, _, _ in answers] == list(range(64))
    for i, text, used in answers[::9]:  # each answer is the one it gets alone
        alone = generate(server[1], tok, f"Count to {i}", max_new_tokens=1 + i % 13)
        assert text == alone.text and used == len(alone.ids) <= 1 + i % 13


def _metric(url, name):
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return float(next(ln.split()[1] for ln in lines if ln.startswith(name + " ")))


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_frees_its_row(server, n):
    url = server[0]
    body = {
        "model": "tiny",
        "prompt": "Tell a long story",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "n": n,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        chunks = r.iter_lines()
        for _ in range(3):
            next(chunks)
        assert _metric(url, "qwen3lab_requests_running") == n
    deadline = time.monotonic() + 30  # the response is closed: the row leaves at the engine's next step
    while _metric(url, "qwen3lab_requests_running") != 0 and time.monotonic() < deadline:  # (slow on a busy machine)
        time.sleep(0.05)
    assert _metric(url, "qwen3lab_requests_running") == 0
    assert _metric(url, "qwen3lab_generated_tokens_total") < 3000 * n


def test_full_queue_is_503_with_retry_after_and_timeouts_are_504(server, tok):
    from fastapi.testclient import TestClient

    from qwen3lab.infer.sampling import SamplingParams
    from qwen3lab.serve import create_app

    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 5}
    app = create_app(server[1], tok, "tiny", max_batch=1, max_queue=1)
    with TestClient(app) as busy:
        # one row runs, one request is held for the next free row, one waits in the queue: the queue is full
        ahead = [app.state.engine.submit([1, 2], SamplingParams(max_new_tokens=3000), lambda *a: None)]
        while app.state.engine.running == []:
            time.sleep(0.01)
        ahead += [app.state.engine.submit([1, 2], SamplingParams(max_new_tokens=5), lambda *a: None)]
        while app.state.engine.waiting.qsize():
            time.sleep(0.01)
        ahead += [app.state.engine.submit([1, 2], SamplingParams(max_new_tokens=5), lambda *a: None)]
        r = busy.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "server busy" in r.json()["error"]["message"]
        assert busy.get("/health").status_code == 200
        r = busy.post("/v1/completions", json=body | {"prompt": ["Hi", "Ho"]})  # no retry can help: 400
        assert r.status_code == 400 and "at most 1 can wait" in r.json()["error"]["message"]
        for request in ahead:
            request.cancel()
    with TestClient(create_app(server[1], tok, "tiny", request_timeout=0.01)) as slow:
        r = slow.post("/v1/completions", json=body | {"max_tokens": 3000})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]


def test_usage_counts_generated_ids(client, server, tok):
    from qwen3lab.generate import generate

    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0)
    want = generate(server[1], tok, "Once upon a time", max_new_tokens=4)
    assert r.usage.completion_tokens == len(want.ids) <= 4
    assert r.choices[0].text == want.text


def test_short_request_is_not_blocked_by_a_long_one(client):
    """Head-of-line: a 4-token request sent while a 1,500-token one runs finishes while the long one still runs.

    The order is the property; how much slower the short request gets beside the long one is timing, which
    bench/serve_load.py measures (TTFT percentiles) rather than a test on a shared machine.
    """

    def short():
        t0 = time.perf_counter()
        r = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
        return r, time.perf_counter() - t0

    alone = min(short()[1] for _ in range(3))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(
            client.completions.create, model="tiny", prompt="Tell a long story", max_tokens=1500, temperature=0
        )
        time.sleep(0.5)
        r, during = short()
        assert r.usage.completion_tokens >= 1 and not long.done()  # done while the long request still runs
        print(f"short request alone {alone * 1e3:.0f} ms, beside a long one {during * 1e3:.0f} ms")
        long.result()


def test_n_completions_share_one_prompt_and_follow_their_seeds(client, server, tok):
    from qwen3lab.generate import generate

    r = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, max_tokens=6, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        alone = generate(server[1], tok, MESSAGES, max_new_tokens=6, temperature=1.0, seed=5 + i)
        assert choice.message.content == parse(alone.text)
    assert r.usage.completion_tokens == sum(
        len(generate(server[1], tok, MESSAGES, max_new_tokens=6, temperature=1.0, seed=5 + i).ids) for i in range(3)
    )
    c = client.completions.create(model="tiny", prompt="Once", n=2, max_tokens=4, temperature=0)
    assert len(c.choices) == 2 and c.choices[0].text == c.choices[1].text  # greedy: the same twice


def parse(text):
    from qwen3lab.text.chat import parse_assistant

    return parse_assistant(text)["content"]


def test_echo_logprobs_score_the_prompt_as_transformers_does(client, server, tok):
    """/v1/completions in the legacy schema lm-eval's local-completions uses: prompts as token-id lists, echo with
    logprobs; each prompt token's log-prob equals log_softmax of transformers' logits on the same weights, the
    first is null, the top-1 is the argmax, text offsets follow the tokens; max_tokens 0 scores the prompt alone."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(server[2], dtype=torch.float32)
    prompts = [tok.encode("The cat sat on the mat."), tok.encode("Two plus two is four")]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=1, temperature=0, logprobs=3, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, choice in zip(prompts, r.choices, strict=True):
        lp = choice.logprobs
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(ids) + 1 and "".join(lp.tokens) == choice.text
        assert choice.text.startswith(tok.decode(ids))
        got = torch.tensor(lp.token_logprobs[1 : len(ids)])
        torch.testing.assert_close(got, want[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
        for t, top in enumerate(lp.top_logprobs[1:], start=1):
            assert len(top) <= 3 and max(top.values()) == pytest.approx(float(want[t - 1].max()), abs=1e-4)
        generated = int(want[-1].argmax())  # greedy: the one generated token is the argmax after the prompt
        assert lp.tokens[-1] == tok.decode([generated])
        assert lp.token_logprobs[-1] == pytest.approx(float(want[-1, generated]), abs=1e-4)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    scored = httpx.post(
        server[0] + "/v1/completions",
        json={"prompt": prompts[0], "max_tokens": 0, "echo": True, "logprobs": 0},
        timeout=30,
    ).json()
    assert scored["usage"]["completion_tokens"] == 0
    # the same prompt scored alone and in a batch of two: the matmuls' blocking may differ, so not bit for bit
    alone, batched = scored["choices"][0]["logprobs"]["token_logprobs"], r.choices[0].logprobs.token_logprobs[:-1]
    assert alone[0] is None and batched[0] is None and len(alone) == len(batched)
    assert alone[1:] == pytest.approx(batched[1:], abs=1e-5)


def test_prompt_forms_logprobs_and_streamed_n(client, server, tok):
    """A string, a list of strings, token ids: one choice per prompt and n in order; generated tokens' logprobs
    (completions and chat), text parts, and n > 1 streamed as interleaved choices that equal the unstreamed ones."""
    ids = tok.encode("Once upon a time")
    kw = dict(model="tiny", max_tokens=4, temperature=0)
    one = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    many = client.completions.create(prompt=["Once upon a time", "Hello"], n=2, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.choices[0].text == many.choices[1].text == one
    assert client.completions.create(prompt=ids, **kw).choices[0].text == one
    lp = client.completions.create(prompt="Once upon a time", logprobs=2, **kw).choices[0].logprobs
    assert len(lp.tokens) == 4 and all(
        max(t.values()) == v for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset[0] == len("Once upon a time")

    chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2, **kw).choices[0]
    content = chat.logprobs.content
    assert len(content) == 4 and all(c.top_logprobs[0].logprob == c.logprob for c in content)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]}]
    joined = [{"role": "user", "content": "Hel\nlo!"}]
    assert (
        client.chat.completions.create(messages=parts, **kw).choices[0].message.content
        == client.chat.completions.create(messages=joined, **kw).choices[0].message.content
    )

    kw = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=5, n=3)
    whole = [c.message.content for c in client.chat.completions.create(**kw).choices]
    pieces, usage = ["", "", ""], None
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, logprobs=True, **kw
    ):
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    # (the unstreamed message's content is stripped of surrounding whitespace, as the template renders it)
    assert [p.strip() for p in pieces] == whole and usage.completion_tokens > 0
    streamed = ["", "", ""]
    for chunk in client.completions.create(model="tiny", prompt="Hi", max_tokens=5, n=3, seed=5, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [
        c.text for c in client.completions.create(model="tiny", prompt="Hi", max_tokens=5, n=3, seed=5).choices
    ]


def test_api_key_and_tokenizer_routes(server, tok):
    """--api-key: /v1 and the tokenizer routes need the bearer key (401 without), / and /health stay open; the
    tokenizer routes are vLLM's, which lm-eval's local-completions detects and uses."""
    from qwen3lab.serve import create_app

    with serving(create_app(server[1], tok, "tiny", api_key="s3cret")) as url:
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert keyed.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        headers = {"Authorization": "Bearer s3cret"}
        info = httpx.get(url + "/tokenizer_info", headers=headers).json()
        assert info["eos_token"] == tok.eos_token and "generation" in info["chat_template"]
        ids = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}, headers=headers).json()["tokens"]
        assert ids == tok.encode("Hello world")
        assert httpx.post(url + "/detokenize", json={"tokens": ids}, headers=headers).json()["prompt"] == "Hello world"
