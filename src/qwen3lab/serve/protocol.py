"""The HTTP side's vocabulary: request bodies (OpenAI's names), errors, server-sent events, and the sampling settings a
request asks for."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..infer import grammar
from ..infer.sampling import SamplingParams

# Python's json reads NaN and Infinity (and 1e309 as inf): no setting may be one.
STRICT = ConfigDict(allow_inf_nan=False)
SEED = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes


class ChatBody(BaseModel):
    model_config = STRICT
    model: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    n: int = Field(1, ge=1)
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionBody(BaseModel):
    model_config = STRICT
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(16, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    n: int = Field(1, ge=1)
    stream: bool = False
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class TokenizeBody(BaseModel):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeBody(BaseModel):
    tokens: list[int]


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        self.message, self.param, self.status = message, param, status


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status, headers)


def stop_strings(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def sse(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def sampling_params(body, prompt_len: int, max_tokens: int | None, max_context: int, **extra) -> SamplingParams:
    """A request's sampling settings; max_tokens None: up to the context."""
    if max_tokens is None:
        max_tokens = max_context - prompt_len
        if max_tokens < 1:
            raise APIError(f"prompt ({prompt_len} tokens) exceeds the context of {max_context}", "messages")
    if prompt_len + max_tokens > max_context:
        raise APIError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {max_context}",
            "max_tokens",
        )
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=getattr(body, "top_k", 0),
        min_p=getattr(body, "min_p", 0.0),
        repetition_penalty=getattr(body, "repetition_penalty", 1.0),
        seed=body.seed,
        stop=stop_strings(body.stop),
        **extra,
    )


def constraint(body, tok, vocab_size: int, think: bool = False) -> grammar.Constraint | None:
    """The grammar a request's output is held to: OpenAI's response_format ({"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"schema": {...}}}) or, for a chat, tool_choice "required" or a named
    function (the calls in Qwen3's format, arguments valid under the tool's parameters). `think`: a think block may
    come first (the chat asked for enable_thinking)."""
    choice, fmt = getattr(body, "tool_choice", None), body.response_format or {"type": "text"}
    try:
        if choice not in (None, "auto", "none"):
            tools = body.tools or []
            if choice == "required":
                name = None
            elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
                name = choice["function"].get("name")
            else:
                raise APIError(f"tool_choice: {choice!r} is not 'none', 'auto', 'required' or a named function")
            if not tools:
                raise APIError("tool_choice: a tool call is required, but the request lists no tools", "tool_choice")
            if fmt.get("type") != "text":
                raise APIError("response_format: cannot hold together with a required tool call", "response_format")
            return grammar.Constraint(tok, grammar.tool_calls(tools, name, think), vocab_size)
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return grammar.Constraint(tok, grammar.json_schema(None, think), vocab_size)
        if kind != "json_schema":
            raise APIError(f"response_format: type {kind!r} is not 'text', 'json_object' or 'json_schema'")
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError('response_format: json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return grammar.Constraint(tok, grammar.json_schema(spec["schema"], think), vocab_size)
    except grammar.GrammarError as e:
        param = "tool_choice" if choice not in (None, "auto", "none") else "response_format"
        raise APIError(f"{param}: {e}", param) from None
