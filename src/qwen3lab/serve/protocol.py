"""The HTTP side's vocabulary: request bodies (OpenAI's names), errors, server-sent events, and the sampling settings a
request asks for."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..infer.sampling import SamplingParams


class ChatBody(BaseModel):
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
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionBody(BaseModel):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(16, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


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


def sampling_params(body, prompt_len: int, max_tokens: int | None, max_context: int, **logprobs) -> SamplingParams:
    """A request's sampling settings; max_tokens None: up to the context."""
    if max_tokens is None:
        max_tokens = max_context - prompt_len
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
        **logprobs,
    )
