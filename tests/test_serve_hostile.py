"""Hostile requests on every route: each gets a 4xx that says what is wrong, never a 5xx, and the server answers the
same afterwards."""

import pytest
from helpers import tiny_server_model

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

USER = [{"role": "user", "content": "Hello!"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HOSTILE = [
    # ids
    (COMPLETIONS, {"prompt": [151936, 5]}, "token ids"),
    (COMPLETIONS, {"prompt": [10**12]}, "token ids"),
    (COMPLETIONS, {"prompt": [-4, 5]}, "token ids"),
    (COMPLETIONS, {"prompt": [[1, 2], [3, -1]]}, "prompt[1]"),
    (COMPLETIONS, {"prompt": [1.5, 2]}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt: empty"),
    (COMPLETIONS, {"prompt": [[]]}, "prompt[0]: empty"),
    (COMPLETIONS, {"prompt": [""]}, "prompt[0]: empty"),
    (COMPLETIONS, {"prompt": ["a", [1, 2]]}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": {"text": "hi"}}, "prompt"),
    ("/detokenize", {"tokens": [10**12, -4]}, "token ids"),
    ("/detokenize", {"tokens": [2**70]}, "tokens"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    # sizes
    (COMPLETIONS, {"prompt": ["hi"] * 1000}, "at most"),
    (COMPLETIONS, {"prompt": "hi", "n": 10**9}, "at most"),
    (CHAT, {"messages": USER, "n": 10**9}, "at most"),
    (COMPLETIONS, {"prompt": "hi " * 5000, "max_tokens": 5}, "exceeds the context"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**12}, "exceeds the context"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 10**6}, "logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "9" * 5000}}]}, "exceeds"),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**80}, "seed"),
    # numbers that are not numbers
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e309}', "repetition_penalty"),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    (CHAT, {"messages": USER, "temperature": "hot"}, "temperature"),
    # content
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    (CHAT, {"messages": [{"role": "user", "content": [[{"type": "text", "text": "x"}]]}]}, "content"),
    (CHAT, {"messages": [{"role": "user", "content": {"type": "text", "text": "x"}}]}, "content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "content"),
    (CHAT, {"messages": [{"role": "user"}]}, "content"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [5]}, "messages.0"),
    (CHAT, {"messages": USER + [{"role": "tool", "content": 5}]}, "content"),
    (CHAT, {"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [{"function": 5}]}]}, "tool"),
    (CHAT, {"messages": USER, "tools": [5]}, "tools"),
    (CHAT, {"messages": USER, "tools": {"name": "f"}}, "tools"),
    # template kwargs that collide with the template's own variables
    (CHAT, {"messages": USER, "chat_template_kwargs": {"messages": 5}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"tools": 5}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"eos_token": "x"}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"assistant_mask": True}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"raise_exception": 1}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": 5}, "chat_template_kwargs"),
    # structured output
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, "json_schema"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, "schema"),
    (
        CHAT,
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
        "schema",
    ),
    (CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (CHAT, {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    # not JSON at all
    (CHAT, "{", ""),
]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tok):
    from qwen3lab.serve import create_app

    model = tiny_server_model(tmp_path_factory.mktemp("hostile"))
    with TestClient(
        create_app(model, tok, "tiny", max_batch=16, max_queue=64), raise_server_exceptions=False
    ) as client:
        yield client


def _greedy(client):
    r = client.post(CHAT, json={"messages": USER, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_every_hostile_request_is_a_4xx_and_the_server_answers_the_same_after(app_client):
    before, wrong = _greedy(app_client), []
    for path, body, fragment in HOSTILE:
        if isinstance(body, str):
            r = app_client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = app_client.post(path, json=body)
        message = r.json().get("error", {}).get("message", "") if r.headers["content-type"].startswith("app") else ""
        if not (400 <= r.status_code < 500 and fragment in message):
            wrong.append(f"{path} {str(body)[:120]} -> {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert _greedy(app_client) == before
    assert app_client.get("/metrics").status_code == 200
