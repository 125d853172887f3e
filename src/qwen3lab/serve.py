"""`qwen3lab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for any Qwen3 folder.

HTTP over engine.Engine: one thread owns the model and batches requests continuously — a request joins the running
batch at the next decode step, each with its own sampling settings, and leaves it the step it ends (stop id, stop
string, max_tokens, or its client gone), so a short request never waits for a long one to finish.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
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
    ("error", message), and the log-probs asked for. `ids` and `logprobs` grow together as tokens arrive; the stop
    id that ended the request is their last entry (OpenAI and vLLM count it in usage and give its log-prob, and
    lm-eval's scoring of echoed prompts relies on one entry per generated token), though never part of the text."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events, self.request = loop, asyncio.Queue(), None
        self.ids: list[int] = []
        self.logprobs: list = []  # per generated token: (logp, [(id, logp), ...]) or None
        self.prompt_logprobs: list | None = None  # per prompt token, the first None
        self._next_logprob = None

    @property
    def tokens(self) -> int:
        return len(self.ids)

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
            if kind == "logprob":
                job._next_logprob = value
                continue
            if kind == "prompt_logprobs":
                job.prompt_logprobs = value
                continue
            if kind == "end":
                stop_id = job.request.stop_token if job.request is not None else None
                if stop_id is not None:  # counted and scored like a token (usage, log-probs), never shown as text
                    job.ids.append(stop_id)
                    job.logprobs.append(job._next_logprob)
                tail = text.flush()
                if tail:
                    yield tail, None
                yield "", value
                return
            job.ids.append(value)
            job.logprobs.append(job._next_logprob)
            job._next_logprob = None
            piece, stopped = text.add(value)
            if piece:
                yield piece, None
            if stopped:
                yield "", "stop"
                return
    finally:
        job.cancel()


async def _merged(streams):
    """The items of several async generators as each comes (the choices of a streamed n > 1)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as e:  # handed to the consumer, raised there
            await queue.put(e)
        finally:
            await stream.aclose()  # at once, cancelled or not: its row leaves the engine now, not when collected
        await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _completion_logprobs(tok: Tokenizer, ids: list[int], entries: list, offset: int) -> dict:
    """The legacy completions schema: tokens, token_logprobs, top_logprobs ({token: logp}), text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, entry in zip(ids, entries, strict=True):
        piece = tok.decode([i])
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        out["token_logprobs"].append(None if entry is None else entry[0])
        top = None
        if entry is not None:
            top = {}
            for t, logp in entry[1]:
                top.setdefault(tok.decode([t]), logp)  # ids that decode alike: the likelier one
        out["top_logprobs"].append(top)
    return out


def _chat_logprobs(tok: Tokenizer, ids: list[int], entries: list) -> list[dict]:
    """The chat schema: per token {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""

    def one(token_id, logp):
        piece = tok.decode([token_id])
        return {"token": piece, "logprob": logp, "bytes": list(piece.encode())}

    return [one(i, e[0]) | {"top_logprobs": [one(t, lp) for t, lp in e[1]]} for i, e in zip(ids, entries, strict=True)]


def _text_content(messages: list[dict]) -> list[dict]:
    """Message content given as a list of parts: the text parts joined with newlines (as vLLM does); any other part
    type is refused."""
    out = []
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts = []
            for p, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(
                        f"messages[{m}].content[{p}]: only text parts are supported, not {kind!r}",
                        f"messages[{m}].content",
                    )
                texts.append(part["text"])
            message = message | {"content": "\n".join(texts)}
        out.append(message)
    return out


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


# ---- responses ----


async def _collect(tok: Tokenizer, job: _Job, stop: list[str], timeout: float):
    parts, reason = [], "length"
    try:
        async for piece, finish in _texts(tok, job, stop, timeout):
            parts.append(piece)
            reason = finish or reason
    except RuntimeError as e:
        raise APIError(str(e), status=504 if isinstance(e, _Timeout) else 500) from None
    return "".join(parts), reason, job  # usage counts generated ids


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _chat_events(
    tok: Tokenizer, jobs: list[_Job], params: SamplingParams, head: dict, prompt_tokens: int, timeout: float
):
    """The stream of every choice (interleaved as they come), then usage and [DONE]; a failed choice sends an
    error event and ends the stream there."""
    try:
        async for event in _merged([_chat_stream(tok, job, i, params, head, timeout) for i, job in enumerate(jobs)]):
            yield event
    except RuntimeError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        return
    n_out = sum(job.tokens for job in jobs)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out, "total_tokens": prompt_tokens + n_out}
    yield _sse(head | {"object": "chat.completion.chunk", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _chat_stream(tok: Tokenizer, job: _Job, index: int, params: SamplingParams, head: dict, timeout: float):
    """One choice's chunks. Each carries the log-probs (if asked for) of the tokens that arrived since the last."""
    sent = 0

    def chunk(delta, finish=None):
        nonlocal sent
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        if params.logprobs is not None:
            choice["logprobs"] = {"content": _chat_logprobs(tok, job.ids[sent:], job.logprobs[sent:])}
            sent = len(job.ids)
        return _sse(head | {"object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    text, streamed, in_think = "", 0, False
    reason = "length"
    async for piece, finish in _texts(tok, job, params.stop, timeout):
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
    yield chunk({}, reason)


def _prompts(tok: Tokenizer, prompt) -> list[tuple[list[int], str | None]]:
    """OpenAI's prompt forms -> (ids, text if given as text) per prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError("prompt: empty", "prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(f"prompt[{i}]: empty", "prompt")
        if max(ids) >= tok.vocab_size or min(ids) < 0:
            raise APIError(f"prompt[{i}]: token ids must lie in [0, {tok.vocab_size})", "prompt")
        out.append((ids, p if isinstance(p, str) else None))
    return out


# ---- the app ----


def create_app(
    model,
    tok: Tokenizer,
    model_name: str = "qwen3lab",
    max_batch: int = 16,
    max_queue: int = 256,
    request_timeout: float = 600.0,
    prefix_cache_tokens: int = 8192,
    api_key: str | None = None,
) -> FastAPI:
    """api_key: every route but / and /health needs `Authorization: Bearer <api_key>`."""
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

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authorize(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path not in ("/", "/health") and not hmac.compare_digest(given, expected):
                return _error("missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401)
            return await call_next(request)

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

    # the tokenizer over HTTP, as vLLM serves it (lm-eval's `local-completions` finds and uses these)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {
            "eos_token": tok.eos_token,
            "bos_token": None,
            "pad_token": tok.pad_token,
            "chat_template": tok.chat_template,
            "model_max_length": max_context,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        ids = tok.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        return {"prompt": tok.decode(body.tokens)}

    def params_for(body, prompt_len: int, max_tokens: int | None, **logprobs) -> SamplingParams:
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
            **logprobs,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        kwargs = dict(body.chat_template_kwargs or {})
        try:
            ids = tok.encode_chat(
                _text_content(body.messages),
                tools=body.tools,
                add_generation_prompt=True,
                assistant_mask=False,
                **kwargs,
            ).input_ids
        except ChatError as e:
            raise APIError(f"messages: {e}", "messages") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs: needs logprobs: true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = params_for(body, len(ids), body.max_completion_tokens or body.max_tokens, logprobs=logprobs)
        jobs = _submit(engine, ids, params, body.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}
        if body.stream:
            return StreamingResponse(
                _chat_events(tok, jobs, params, head, len(ids), request_timeout), media_type="text/event-stream"
            )
        choices, n_out = [], 0
        for index, (text, reason, job) in enumerate(
            await asyncio.gather(*(_collect(tok, j, params.stop, request_timeout) for j in jobs))
        ):
            message = parse_assistant(text)
            if message["tool_calls"]:
                reason = "tool_calls"
            message.pop("malformed_tool_calls", None)
            lp = {"content": _chat_logprobs(tok, job.ids, job.logprobs)} if body.logprobs else None
            choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": lp})
            n_out += job.tokens
        return head | {
            "object": "chat.completion",
            "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out},
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        """One choice per prompt and n (index = prompt * n + j). echo: the prompt comes back before the completion,
        with its tokens' log-probs (the first token's is null) when logprobs is set; max_tokens 0 scores the prompt
        alone. The prompt's log-probs come from the prefill's own forward, chunk by chunk through lm_head."""
        prompts, stop = _prompts(tok, body.prompt), _stops(body.stop)
        echo_k = body.logprobs if body.echo else None
        groups = []
        for ids, _ in prompts:
            params = params_for(body, len(ids), body.max_tokens, logprobs=body.logprobs, prompt_logprobs=echo_k)
            groups.append(_submit(engine, ids, params, body.n))
        jobs = [job for group in groups for job in group]
        which = [k for k, group in enumerate(groups) for _ in group]  # the prompt of each job
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def prompt_text(k):
            ids, text = prompts[k]
            return text if text is not None else tok.decode(ids)

        def logprobs_of(job, k, start, offset, with_prompt):
            """The legacy logprobs of job's tokens from `start` on, after the prompt's with echo."""
            ids, entries = job.ids[start:], job.logprobs[start:]
            if with_prompt:
                ids, entries = prompts[k][0] + ids, (job.prompt_logprobs or [None] * len(prompts[k][0])) + entries
            return _completion_logprobs(tok, ids, entries, offset)

        if body.stream:

            async def one(index, job):
                k, sent, echo = which[index], 0, body.echo
                offset = 0 if echo else len(prompt_text(k))
                async for piece, finish in _texts(tok, job, stop, request_timeout):
                    text = prompt_text(k) + piece if echo else piece
                    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
                    if body.logprobs is not None:
                        choice["logprobs"] = logprobs_of(job, k, sent, offset, echo)
                        offset += sum(len(t) for t in choice["logprobs"]["tokens"])
                        sent = len(job.ids)
                    echo = False
                    yield _sse(head | {"object": "text_completion", "choices": [choice]})

            async def events():
                try:
                    async for event in _merged([one(i, job) for i, job in enumerate(jobs)]):
                        yield event
                except RuntimeError as e:
                    yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
                    return
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        done = await asyncio.gather(*(_collect(tok, job, stop, request_timeout) for job in jobs))
        choices = []
        for index, (text, reason, job) in enumerate(done):
            k = which[index]
            prefix = prompt_text(k) if body.echo else ""
            choice = {"index": index, "text": prefix + text, "finish_reason": reason, "logprobs": None}
            if body.logprobs is not None:
                choice["logprobs"] = logprobs_of(job, k, 0, 0 if body.echo else len(prompt_text(k)), body.echo)
            choices.append(choice)
        n_in, n_out = sum(len(ids) for ids, _ in prompts), sum(job.tokens for job in jobs)
        return head | {
            "object": "text_completion",
            "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
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
    api_key: str | None = None,
):
    import ipaddress

    import uvicorn

    from .checkpoint import load_model
    from .generate import prepare_for_inference
    from .tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=dtype)
    prepare_for_inference(model, compile)
    tok = load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else load_tokenizer()
    app = create_app(
        model, tok, Path(model_dir).name, max_batch, max_queue, request_timeout, prefix_cache_tokens, api_key
    )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not api_key and not loopback:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key)", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
