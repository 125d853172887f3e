"""Structured output: rows held to a JSON schema, a regex or tool calls, batched with rows that are not."""

import json

import pytest
import torch
from helpers import tiny_server_model

from qwen3lab.infer import grammar
from qwen3lab.infer.engine import Engine
from qwen3lab.infer.sampling import SamplingParams

jsonschema = pytest.importorskip("jsonschema")

NAME = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {
                    "city": NAME,
                    "geo": {
                        "type": "object",
                        "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.001}},
                        "additionalProperties": False,
                    },
                },
                "required": ["city", "geo"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "ok": {"type": "boolean"},
            "none": {"type": "null"},
        },
        "required": ["colour", "size", "ok", "none"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "xs": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
            "pairs": {"type": "array", "items": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 2}},
        },
        "required": ["xs", "pairs"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 1000},
            "x": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
            "k": {"type": "integer", "exclusiveMinimum": 5, "maximum": 10**6},
        },
        "required": ["n", "x", "k"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_server_model(tmp_path_factory.mktemp("structured"))


def _run(model, prompts, params, seed=0, max_batch=64):
    engine = Engine(model, max_batch=max_batch, seed=seed)
    out = [{"ids": [], "end": None} for _ in prompts]
    for o, ids, p in zip(out, prompts, params, strict=True):

        def emit(kind, value, o=o):
            if kind == "token":
                o["ids"].append(value)
            elif kind in ("end", "error"):
                o["end"] = (kind, value)

        engine.submit(ids, p, emit)
    engine.run_until_idle()
    return out


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fifty_samples_at_temperature_1_parse_and_validate(model, tok, name):
    schema = SCHEMAS[name]
    c = grammar.Constraint(tok, grammar.json_schema(schema), model.config.vocab_size)
    params = SamplingParams(max_new_tokens=400, temperature=1.0, constraint=c)
    prompt = tok.encode("Answer in JSON:")
    for o in _run(model, [prompt] * 50, [params] * 50):
        text = tok.decode(o["ids"])
        assert o["end"] == ("end", "stop"), (o["end"], text)
        jsonschema.validate(json.loads(text), schema)


def test_greedy_constrained_rows_take_the_best_allowed_token_beside_free_rows(model, tok):
    """Each token of a constrained greedy row is the argmax, under its grammar, of the logits a full forward of the
    row's own prefix gives (within float noise: a different batch shape); a free row in the same batch decodes as it
    does alone."""
    schema = SCHEMAS["nested"]
    c = grammar.Constraint(tok, grammar.json_schema(schema), model.config.vocab_size)
    prompts = [tok.encode(t) for t in ("Give me JSON", "A longer prompt that asks for some JSON now", "Free text")]
    params = [SamplingParams(max_new_tokens=60, constraint=c)] * 2 + [SamplingParams(max_new_tokens=20)]
    together = _run(model, prompts, params)
    assert together[2]["ids"] == _run(model, prompts[2:], params[2:])[0]["ids"]
    for prompt, o in zip(prompts[:2], together[:2], strict=True):
        m = c.matcher()
        for t, token in enumerate(o["ids"]):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + o["ids"][:t]]))[0, -1].float()
            ok = ~grammar.forbidden([m], logits.shape[0])[0]
            assert ok[token] and logits[token] >= logits[ok].max() - 1e-4
            assert m.consume_token(token)
        assert o["end"] == ("end", "stop") and m.is_accepting()
        jsonschema.validate(json.loads(tok.decode(o["ids"])), schema)


def test_regex_tool_calls_and_errors(model, tok):
    V = model.config.vocab_size
    regex = grammar.Constraint(tok, grammar.regex(r"[0-9]{3}-[a-z]{2}"), V)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS["enums"]}},
        {"type": "function", "function": {"name": "add", "parameters": SCHEMAS["numbers"]}},
    ]
    required = grammar.Constraint(tok, grammar.tool_calls(tools), V)
    named = grammar.Constraint(tok, grammar.tool_calls(tools, "add"), V)
    p = SamplingParams(max_new_tokens=300, temperature=1.0)
    prompt = tok.encode("Go:")
    runs = _run(
        model, [prompt] * 30, [p.__class__(**{**p.__dict__, "constraint": c}) for c in [regex, required, named] * 10]
    )
    for i, o in enumerate(runs):
        text = tok.decode(o["ids"])
        assert o["end"] == ("end", "stop"), text
        if i % 3 == 0:
            assert len(text) == 6 and text[3] == "-" and text[:3].isdigit()
            continue
        from qwen3lab.text.chat import parse_assistant

        calls = parse_assistant(text)["tool_calls"]
        assert calls and (len(calls) == 1 or i % 3 == 1), text
        for call in calls:
            fn = call["function"]
            assert fn["name"] in ("get_weather", "add") and (i % 3 == 1 or fn["name"] == "add")
            jsonschema.validate(
                json.loads(fn["arguments"]), SCHEMAS["enums" if fn["name"] == "get_weather" else "numbers"]
            )
    with pytest.raises(grammar.GrammarError, match="nope"):
        grammar.Constraint(tok, grammar.json_schema({"type": "nope"}), V)
    with pytest.raises(grammar.GrammarError, match="no tool named 'mul'"):
        grammar.tool_calls(tools, "mul")


def test_openai_client_response_format_and_tools_round_trip(model, tok):
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    from helpers import serving

    from qwen3lab.serve import create_app

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        size: str = pydantic.Field(pattern="^(S|M|L)$")
        scores: list[int] = pydantic.Field(max_length=3)

    messages = [{"role": "user", "content": "Who is it?"}]
    tools = [
        {"type": "function", "function": {"name": n, "parameters": SCHEMAS[s]}}
        for n, s in (("paint", "enums"), ("add", "numbers"))
    ]
    with serving(create_app(model, tok, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        kw = dict(model="tiny", messages=messages, temperature=1.0, seed=0, max_tokens=300, n=8)
        schema = {"name": "enums", "schema": SCHEMAS["enums"], "strict": True}
        r = client.chat.completions.create(response_format={"type": "json_schema", "json_schema": schema}, **kw)
        for choice in r.choices:
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS["enums"])
        parsed = client.chat.completions.parse(response_format=Person, **kw)
        assert all(isinstance(c.message.parsed, Person) for c in parsed.choices)
        r = client.chat.completions.create(response_format={"type": "json_object"}, **kw)
        for c in r.choices:  # any object: a random model's strings may not end within max_tokens
            assert c.message.content.startswith("{")
            assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)
        for choice_arg, names in (
            ("required", {"paint", "add"}),
            ({"type": "function", "function": {"name": "add"}}, {"add"}),
        ):
            r = client.chat.completions.create(tools=tools, tool_choice=choice_arg, **kw)
            for choice in r.choices:
                calls = choice.message.tool_calls
                assert choice.finish_reason == "tool_calls" and calls and (len(calls) == 1 or choice_arg == "required")
                for call in calls:
                    assert call.function.name in names
                    args = json.loads(call.function.arguments)
                    jsonschema.validate(args, SCHEMAS["enums" if call.function.name == "paint" else "numbers"])
        r = client.completions.create(  # not in OpenAI's legacy schema; vLLM takes it there too
            model="tiny",
            prompt="JSON:",
            max_tokens=300,
            temperature=1.0,
            n=4,
            extra_body={"response_format": {"type": "json_schema", "json_schema": schema}},
        )
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), SCHEMAS["enums"])


def test_generate_json_schema_from_the_command_line(model, tok, tmp_path, capsys):
    from qwen3lab.cli import main

    folder = tmp_path / "m"
    import qwen3lab

    qwen3lab.save_model(model, folder)
    (tmp_path / "s.json").write_text(json.dumps(SCHEMAS["arrays"]))
    base = ["generate", "--model", str(folder), "--prompt", "Lists?", "--max-new-tokens", "300"]
    for schema_arg in (str(tmp_path / "s.json"), json.dumps(SCHEMAS["arrays"])):
        main([*base, "--json-schema", schema_arg, "--temperature", "1", "--seed", "3"])
        jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS["arrays"])
    with pytest.raises(SystemExit, match="--json-schema: .*nope"):
        main([*base, "--json-schema", '{"type": "nope"}'])
    with pytest.raises(SystemExit, match="--json-schema: Expecting"):
        main([*base, "--json-schema", "{not json"])
