"""The patched template against the official one, and assistant masks against transformers, on every shape."""

import copy
from pathlib import Path

import pytest

import qwen3lab
from qwen3lab.text.chat import ChatError, qwen3_template

# Qwen3's official template, as trl ships a copy of it
OFFICIAL = (Path(pytest.importorskip("trl").__file__).parent / "chat_templates" / "qwen3.jinja").read_text()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


U = {"role": "user", "content": "What is 2+2?"}
A = {"role": "assistant", "content": "4"}
S = {"role": "system", "content": "You are terse."}

# name -> (messages, render kwargs)
SHAPES = {
    "single-turn": ([U, A], {}),
    "system": ([S, U, A], {}),
    "multi-turn": ([S, U, A, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}], {}),
    "reasoning-content": (
        [
            U,
            {"role": "assistant", "content": "4", "reasoning_content": "early thoughts, dropped"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, 4.", "reasoning_content": "\n2 and 2 make 4\n"},
        ],
        {},
    ),
    "think-in-content": (
        [
            U,
            {"role": "assistant", "content": "<think>old</think>\n\n4"},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "<think>\nstill 4\n</think>\n\nStill 4."},
        ],
        {},
    ),
    "tools-with-system": ([S, U, A], {"tools": [WEATHER, TIME]}),
    "tools-without-system": ([U, A], {"tools": [WEATHER]}),
    "tool-call-dict-args": (
        [
            {"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Zürich"})]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 °C in Zürich."},
        ],
        {"tools": [WEATHER]},
    ),
    "tool-call-string-args-no-content": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [call("get_weather", '{"city": "Oslo"}')]},
            {"role": "tool", "content": "cold"},
            {"role": "assistant", "content": "Cold."},
        ],
        {"tools": [WEATHER]},
    ),
    "consecutive-tools-with-reasoning": (
        [
            S,
            {"role": "user", "content": "Weather and time in Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "reasoning_content": "two calls",
                "tool_calls": [call("get_weather", {"city": "Rome"}), {"name": "get_time", "arguments": {}}],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "Sunny, noon.", "reasoning_content": "combine"},
        ],
        {"tools": [WEATHER, TIME]},
    ),
    "generation-prompt": ([S, U, A, {"role": "user", "content": "More?"}], {"add_generation_prompt": True}),
    "generation-prompt-no-thinking": ([U], {"add_generation_prompt": True, "enable_thinking": False}),
    "mid-conversation-system": ([U, A, {"role": "system", "content": "Now be verbose."}, U, A], {}),
    "user-looks-like-tool-response": (
        [{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}, U, A],
        {},
    ),
    "non-ascii": (
        [{"role": "user", "content": "Привет 👋 — ça va?"}, {"role": "assistant", "content": "Très bien, 谢谢!"}],
        {},
    ),
}
WITH_ASSISTANT = [n for n, (m, kw) in SHAPES.items() if any(x["role"] == "assistant" for x in m)]


@pytest.mark.parametrize("shape", SHAPES)
def test_render_is_byte_identical_to_official(tok, hf_tok, shape):
    messages, kwargs = SHAPES[shape]
    before = copy.deepcopy(messages)
    ours, _ = tok.render_chat(messages, **kwargs)
    official = hf_tok.apply_chat_template(messages, chat_template=OFFICIAL, tokenize=False, **kwargs)
    assert ours == official
    assert messages == before  # rendering never edits the caller's data


@pytest.mark.parametrize("shape", WITH_ASSISTANT)
def test_mask_equals_transformers(tok, hf_tok, shape):
    messages, kwargs = SHAPES[shape]
    ours = tok.encode_chat(messages, **kwargs)
    ref = hf_tok.apply_chat_template(
        messages,
        chat_template=qwen3_template(),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    assert ours.input_ids == ref["input_ids"]
    assert ours.assistant_mask == ref["assistant_masks"]
    assert sum(ours.assistant_mask) > 0


def test_mask_covers_think_content_and_im_end_not_header_or_newline(tok):
    enc = tok.encode_chat([U, {"role": "assistant", "content": "4", "reasoning_content": "easy"}])
    learned = [i for i, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m]
    assert tok.decode(learned) == "<think>\neasy\n</think>\n\n4<|im_end|>"
    assert enc.input_ids[-1] == 198 and enc.assistant_mask[-1] == 0  # the newline after <|im_end|> is not learned


def test_tool_call_is_learned_tool_response_is_not(tok):
    messages, kwargs = SHAPES["tool-call-dict-args"]
    enc = tok.encode_chat(messages, **kwargs)
    learned = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in learned
    assert "temp" not in learned and "Weather in" not in learned


def test_official_template_in_a_folder_is_swapped_for_the_patched_one(tok, tmp_path, caplog):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(OFFICIAL)
    loaded = qwen3lab.load_tokenizer(tmp_path)
    assert "using qwen3lab's copy with generation tags" in caplog.text
    assert loaded.chat_template == qwen3_template()


def test_template_without_generation_tags_is_an_error_for_masks(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    other = qwen3lab.load_tokenizer(tmp_path)
    with pytest.raises(ChatError, match="needs {% generation %} tags"):
        other.encode_chat([U, A])
    assert other.encode_chat([U, A], assistant_mask=False).input_ids == tok.encode(
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "empty conversation"),
        ([{"role": "bot", "content": "hi"}, A], "message 0: unknown role 'bot'"),
        ([{"role": "user"}, A], r"message 0 \(user\): content is missing"),
        ([{"role": "user", "content": ["a", "b"]}, A], r"message 0 \(user\): content is a list"),
        ([U, {"role": "assistant", "content": 4}], "message 1: assistant content must be a string"),
        ([U], "no assistant turn"),
        ([U, {"role": "tool", "content": "x"}, A], "message 1: tool message answers nothing"),
        ([U, {"role": "assistant", "content": "", "tool_calls": "get_weather"}], "tool_calls must be a non-empty list"),
        ([U, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], "no function name"),
        (
            [U, {"role": "assistant", "content": "", "tool_calls": [call("f", "{not json")]}],
            "tool call 'f' arguments are not valid JSON",
        ),
        ([U, {"role": "assistant", "content": "", "tool_calls": [call("f", [1])]}], "must be a JSON object"),
        ([U, "hello"], "message 1: must be an object"),
    ],
)
def test_bad_conversations(tok, messages, message):
    with pytest.raises(ChatError, match=message):
        tok.encode_chat(messages)


def test_parse_assistant_think_and_tool_calls():
    from qwen3lab.text.chat import parse_assistant

    out = parse_assistant(
        '<think>\nneed weather\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Zürich"}}\n</tool_call>'
    )
    assert out["reasoning_content"] == "need weather"
    assert out["content"] == "Let me check."
    assert out["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Zürich"}'}
    assert "malformed_tool_calls" not in out


def test_parse_assistant_plain_and_malformed():
    from qwen3lab.text.chat import parse_assistant

    assert parse_assistant("just text") == {
        "role": "assistant",
        "content": "just text",
        "reasoning_content": None,
        "tool_calls": None,
    }
    bad = "<tool_call>\n{not json}\n</tool_call>"
    out = parse_assistant("ok " + bad)
    assert out["tool_calls"] is None and out["content"] == "ok " + bad and out["malformed_tool_calls"] == [bad]
    out = parse_assistant('<tool_call>{"arguments": {}}</tool_call>')  # no name
    assert out["tool_calls"] is None and out["malformed_tool_calls"]
