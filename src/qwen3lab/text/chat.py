"""Chat templates: render a conversation and, in the same pass, the character spans the assistant produces.

Rendering follows transformers' `apply_chat_template` exactly (sandboxed Jinja, trim_blocks, lstrip_blocks,
loopcontrols, a `tojson` that keeps non-ASCII), so the text is byte-identical. `{% generation %}` blocks record
where the assistant's own output lies; tokenizer.py maps those spans to tokens. Masks come from one render of the
whole conversation, never turn by turn: Qwen3's template drops earlier think blocks, so per-turn renders disagree.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import re
from datetime import datetime
from importlib import resources

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
# what encode_chat and render set themselves: a caller's template kwargs may not name these
TEMPLATE_NAMES = frozenset(
    {"messages", "tools", "add_generation_prompt", "assistant_mask", "bos_token", "eos_token", "pad_token"}
    | {"raise_exception", "strftime_now"}
)


class ChatError(ValueError):
    """A conversation the template cannot render as asked."""


@functools.cache
def qwen3_template() -> str:
    """qwen3lab's patched Qwen3 template: the official one plus {% generation %} tags."""
    return resources.files("qwen3lab.text").joinpath("chat_template.jinja").read_text()


# sha256 of the official Qwen3 hybrid-thinking template with all whitespace removed (as shipped in the Qwen3
# model folders and copied unmodified by trl as chat_templates/qwen3.jinja).
OFFICIAL_QWEN3_SHA256 = "88519bf74b59d633f433d87204654c703b4b87ca2ce1b9900ce10dfbfdf5e6cf"


def is_official_qwen3(template: str) -> bool:
    return hashlib.sha256(re.sub(r"\s+", "", template).encode()).hexdigest() == OFFICIAL_QWEN3_SHA256


def has_generation_tags(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


# ---- rendering ----

_spans: contextvars.ContextVar = contextvars.ContextVar("qwen3lab_generation_spans")


class _Render:
    """Per-render state: characters emitted so far and the generation spans found. A context variable holds it, so
    concurrent renders (the server's threads) never share one."""

    def __init__(self):
        self.pos = 0
        self.spans: list[tuple[int, int]] = []


class GenerationTags(Extension):
    """`{% generation %}...{% endgeneration %}`: records the span of what the block rendered."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller):
        text = caller()
        state = _spans.get(None)
        if state is not None and text:
            # template.generate() has yielded (and the renderer counted) everything before this block already
            state.spans.append((state.pos, state.pos + len(text)))
        return text


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    # A model folder's template runs sandboxed, as transformers runs it (it could come from anywhere); qwen3lab's own
    # runs in a plain environment: the same text (tested against transformers), without the sandbox's check of
    # every attribute access, which took half of each render.
    kind = jinja2.Environment if source == qwen3_template() else ImmutableSandboxedEnvironment
    env = kind(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTags, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def render(template: str, messages: list[dict], **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the [start, end) character spans of {% generation %} blocks."""
    state = _Render()
    token = _spans.set(state)
    parts = []
    try:
        for chunk in compile_template(template).generate(messages=messages, **kwargs):
            parts.append(chunk)
            state.pos += len(chunk)
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"chat template failed: {e}") from e
    finally:
        _spans.reset(token)
    return "".join(parts), state.spans


# ---- input checks ----


def _check_tool_call(call, where: str) -> None:
    if not isinstance(call, dict):
        raise ChatError(f"{where}: each tool call must be an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatError(f"{where}: tool call has no function name; expected {{'function': {{'name': ..., ...}}}}")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatError(f"{where}: tool call {fn['name']!r} arguments are not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ChatError(f"{where}: tool call {fn['name']!r} arguments must be a JSON object (dict or JSON string)")


def check_messages(messages, tools=None, need_assistant: bool = False) -> None:
    """Raise ChatError, naming the message, for anything the Qwen3 template would render wrongly or not at all."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("empty conversation: messages must be a non-empty list of {'role', 'content'} objects")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatError("tools must be a list of JSON-schema function objects")
    pending_calls = False  # whether a tool message here has an assistant tool call to answer
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise ChatError(f"{where}: must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        calls = m.get("tool_calls")
        if role == "assistant":
            if calls is not None:
                if not isinstance(calls, list) or not calls:
                    raise ChatError(f"{where}: tool_calls must be a non-empty list")
                for call in calls:
                    _check_tool_call(call, where)
            if not (isinstance(content, str) or (content is None and calls)):
                raise ChatError(
                    f"{where}: assistant content must be a string (or absent when the turn has tool_calls), "
                    f"got {type(content).__name__}"
                )
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatError(f"{where}: reasoning_content must be a string")
            pending_calls = bool(calls)
            continue
        if not isinstance(content, str):
            what = "missing" if content is None else f"a {type(content).__name__}"
            raise ChatError(f"{where} ({role}): content is {what}; the Qwen3 template needs a string")
        if role == "tool":
            if not pending_calls:
                raise ChatError(
                    f"{where}: tool message answers nothing; it must follow an assistant turn with tool_calls"
                )
        else:
            pending_calls = False
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatError("conversation has no assistant turn, so there is nothing to learn from it")


# ---- reading what the model wrote ----

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_assistant(text: str) -> dict:
    """Split a generated assistant turn into OpenAI-style fields.

    `<think>…</think>` becomes reasoning_content; each well-formed `<tool_call>{"name", "arguments"}</tool_call>`
    becomes a tool_calls entry. A malformed tool call is left in content as text and listed under
    malformed_tool_calls — never raised, since a model's output is not the user's fault.
    """
    reasoning = None
    if "</think>" in text:
        head, _, text = text.partition("</think>")
        reasoning = head.split("<think>")[-1].strip("\n")
        text = text.lstrip("\n")
    calls, malformed = [], []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError("no function name")
            args = call.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args)
        except (ValueError, json.JSONDecodeError):
            malformed.append(match.group(0))
            return match.group(0)
        calls.append(
            {
                "id": f"call_{len(calls)}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
        return ""

    content = _TOOL_CALL.sub(take, text).strip()
    out = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls or None}
    if malformed:
        out["malformed_tool_calls"] = malformed
    return out
