"""`qwen3lab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for any Qwen3 folder.

HTTP over engine.Engine: one thread owns the model and batches requests continuously — a request joins the running
batch at the next decode step, each with its own sampling settings, and leaves it the step it ends (stop id, stop
string, max_tokens, or its client gone), so a short request never waits for a long one to finish.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from .chat import ChatError, parse_assistant
from .engine import Engine, EngineFull
from .generate import SamplingParams, TextStream
from .tokenizer import Tokenizer

log = logging.getLogger("qwen3lab")


# ---- requests on the engine ----


class _Job:
    """One request's events, pushed by the engine's thread into this event loop: ("token", id), ("end", reason),
    ("error", message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events, self.request, self.tokens = loop, asyncio.Queue(), None, 0

    def push(self, kind: str, value) -> None:  # from the engine's thread
        if self.loop.is_closed():  # the server is gone: nobody is listening, the row can go too
            self.cancel()
            return
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()


def _submit(engine: Engine, ids: list[int], params: SamplingParams, n: int = 1) -> list[_Job]:
    """n completions of one prompt (prefilled once); with a seed, completion i samples with seed + i."""
    loop = asyncio.get_running_loop()
    jobs = [_Job(loop) for _ in range(n)]
    each = [params if i == 0 or params.seed is None else replace(params, seed=params.seed + i) for i in range(n)]
    try:
        requests = engine.submit_group(ids, each, [job.push for job in jobs])
    except EngineFull as e:
        raise APIError(f"server busy: {e}; retry shortly", status=503) from None
    except ValueError as e:
        raise APIError(str(e), "n" if n > engine.max_batch else "max_tokens") from None
    for job, request in zip(jobs, requests, strict=True):
        job.request = request
    return jobs


class _Timeout(RuntimeError):
    pass


async def _texts(tok: Tokenizer, job: _Job, stop: list[str], timeout: float):
    """Async stream of (text piece, finish_reason or None) for one job (see generate.TextStream). The row leaves the
    engine as soon as this stream ends: at a stop string, when its client goes away, or after `timeout` seconds."""
    text = TextStream(tok, stop)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise _Timeout(f"request timed out after {timeout:g} s (--request-timeout)") from None
            if kind == "error":
                raise RuntimeError(value)
            if kind == "end":
                tail = text.flush()
                if tail:
                    yield tail, None
                yield "", value
                return
            job.tokens += 1
            piece, stopped = text.add(value)
            if piece:
                yield piece, None
            if stopped:
                yield "", "stop"
                return
    finally:
        job.cancel()


def _chat_page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: only its own inline script and style run (pinned by hash), it
    connects only to this server, and loads no images — model output is only ever text, and this backs that up."""
    page = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    csp = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, csp


# ---- request bodies (OpenAI's names) ----


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
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionBody(BaseModel):
    model: str | None = None
    prompt: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(16, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        self.message, self.param, self.status = message, param, status


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status, headers)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


# ---- the app ----


def create_app(
    model,
    tok: Tokenizer,
    model_name: str = "qwen3lab",
    max_batch: int = 16,
    max_queue: int = 256,
    request_timeout: float = 600.0,
    prefix_cache_tokens: int = 8192,
) -> FastAPI:
    app = FastAPI(title="qwen3lab")
    engine = Engine(model, max_batch, max_waiting=max_queue, prefix_cache_tokens=prefix_cache_tokens).start()
    per_token = 2 * engine.k[:, 0, :, 0].numel() * engine.k.element_size()  # keys and values, every layer
    log.info(
        "prefix cache: up to %d prompt tokens (%.0f MiB)", prefix_cache_tokens, prefix_cache_tokens * per_token / 2**20
    )
    max_context = model.config.max_position_embeddings

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(f"{where}: {first['msg']}", 400, where or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.message, exc.status, exc.param)

    page, csp = _chat_page()

    @app.get("/", include_in_schema=False)
    async def chat_page():  # the browser chat (static/chat.html), talking to /v1/chat/completions
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.get("/health")
    async def health():  # answered by the event loop alone: fast however busy the engine is
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        """Prometheus text: rows running, requests waiting, tokens generated, tokens/s over the last 10 s, prompt tokens
        and those of them taken from the prefix cache."""
        m = engine.metrics()
        lines = [
            "# TYPE qwen3lab_requests_running gauge",
            f"qwen3lab_requests_running {m['running']}",
            "# TYPE qwen3lab_requests_waiting gauge",
            f"qwen3lab_requests_waiting {m['waiting']}",
            "# TYPE qwen3lab_generated_tokens_total counter",
            f"qwen3lab_generated_tokens_total {m['generated_tokens_total']}",
            "# TYPE qwen3lab_generation_tokens_per_second gauge",
            f"qwen3lab_generation_tokens_per_second {m['tokens_per_second']:.3f}",
            "# TYPE qwen3lab_prompt_tokens_total counter",
            f"qwen3lab_prompt_tokens_total {m['prompt_tokens_total']}",
            "# TYPE qwen3lab_prefix_cache_hit_tokens_total counter",
            f"qwen3lab_prefix_cache_hit_tokens_total {m['prefix_cache_hit_tokens_total']}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "qwen3lab"}]}

    def params_for(body, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if body.n > 1 and body.stream:
            raise APIError("n: n > 1 with stream: true is not supported yet; stream one completion at a time", "n")
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
            stop=_stops(body.stop),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        kwargs = dict(body.chat_template_kwargs or {})
        try:
            ids = tok.encode_chat(
                body.messages, tools=body.tools, add_generation_prompt=True, assistant_mask=False, **kwargs
            ).input_ids
        except ChatError as e:
            raise APIError(f"messages: {e}", "messages") from None
        params = params_for(body, len(ids), body.max_completion_tokens or body.max_tokens)
        jobs = _submit(engine, ids, params, body.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}
        if body.stream:
            return StreamingResponse(_chat_stream(jobs[0], params, head, len(ids)), media_type="text/event-stream")
        choices, n_out = [], 0
        for index, (text, reason, tokens) in enumerate(await asyncio.gather(*(_collect(j, params) for j in jobs))):
            message = parse_assistant(text)
            if message["tool_calls"]:
                reason = "tool_calls"
            message.pop("malformed_tool_calls", None)
            choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": None})
            n_out += tokens
        return head | {
            "object": "chat.completion",
            "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out},
        }

    async def _collect(job, params):
        parts, reason = [], "length"
        try:
            async for piece, finish in _texts(tok, job, params.stop, request_timeout):
                parts.append(piece)
                reason = finish or reason
        except RuntimeError as e:
            raise APIError(str(e), status=504 if isinstance(e, _Timeout) else 500) from None
        return "".join(parts), reason, job.tokens  # usage counts generated ids

    async def _chat_stream(job, params, head, prompt_tokens):
        def chunk(delta, finish=None):
            body = head | {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        text, streamed, in_think = "", 0, False
        reason = "length"
        try:
            async for piece, finish in _texts(tok, job, params.stop, request_timeout):
                text += piece
                reason = finish or reason
                # Reasoning goes out as reasoning_content, as vLLM's Qwen3 parser does; tool-call markup is held
                # back and sent parsed at the end.
                while streamed < len(text):
                    rest = text[streamed:]
                    if not in_think and rest.startswith("<think>"):
                        in_think, streamed = True, streamed + len("<think>")
                        continue
                    if in_think:
                        end = rest.find("</think>")
                        if end < 0:
                            safe = len(rest) - len("</think>")
                            if safe > 0:
                                yield chunk({"reasoning_content": rest[:safe]})
                                streamed += safe
                            break
                        if end:
                            yield chunk({"reasoning_content": rest[:end]})
                        in_think, streamed = False, streamed + end + len("</think>")
                        while text[streamed : streamed + 1] == "\n":
                            streamed += 1
                        continue
                    safe = rest.find("<tool_call>")
                    if safe < 0:
                        safe = len(rest) - _partial_suffix(rest, "<tool_call>")
                    if safe > 0:
                        yield chunk({"content": rest[:safe]})
                        streamed += safe
                    break  # what is left may be tool-call markup: held back until the end
        except RuntimeError as e:
            err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(err)}\n\n"
            return
        final = parse_assistant(text[streamed:]) if streamed < len(text) else None
        if final is not None:
            if final["tool_calls"]:
                calls = [dict(c, index=i) for i, c in enumerate(final["tool_calls"])]
                if final["content"]:
                    yield chunk({"content": final["content"]})
                yield chunk({"tool_calls": calls})
                reason = "tool_calls"
            elif text[streamed:]:
                yield chunk({"content": text[streamed:]})
        n_out = job.tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out, "total_tokens": prompt_tokens + n_out}
        yield chunk({}, reason)
        yield f"data: {json.dumps(head | {'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        ids = tok.encode(body.prompt)
        if not ids:
            raise APIError("prompt: empty", "prompt")
        params = params_for(body, len(ids), body.max_tokens)
        jobs = _submit(engine, ids, params, body.n)
        job = jobs[0]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:

            async def events():
                async for piece, finish in _texts(tok, job, params.stop, request_timeout):
                    choice = {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
                    yield f"data: {json.dumps(head | {'object': 'text_completion', 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        done = await asyncio.gather(*(_collect(j, params) for j in jobs))
        n_out = sum(tokens for _, _, tokens in done)
        return head | {
            "object": "text_completion",
            "choices": [
                {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                for i, (text, reason, _) in enumerate(done)
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out},
        }

    return app


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    dtype: str = "auto",
    compile: bool = False,
    max_queue: int = 256,
    request_timeout: float = 600.0,
    prefix_cache_tokens: int = 8192,
):
    import uvicorn

    from .checkpoint import load_model
    from .generate import prepare_for_inference
    from .tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=dtype)
    prepare_for_inference(model, compile)
    tok = load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else load_tokenizer()
    app = create_app(model, tok, Path(model_dir).name, max_batch, max_queue, request_timeout, prefix_cache_tokens)
    uvicorn.run(app, host=host, port=port, log_level="info")
