"""The app: FastAPI over one engine. The routes live by endpoint family (chat_completions, completions, tokens) and
read the engine, the tokenizer and the settings from `app.state`; here are the page, health, metrics, models, the
API key and the error responses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..infer.engine import Engine
from ..text.tokenizer import Tokenizer
from . import chat_completions, completions, tokens
from .protocol import APIError, error_response

log = logging.getLogger("qwen3lab")


def create_app(
    model,
    tok: Tokenizer,
    model_name: str = "qwen3lab",
    max_batch: int = 16,
    max_queue: int = 256,
    request_timeout: float = 600.0,
    prefix_cache_tokens: int = 8192,
    api_key: str | None = None,
    prefill_chunk: int = 512,
    speculate: int = 0,
    draft_model=None,
) -> FastAPI:
    """api_key: every route but / and /health needs `Authorization: Bearer <api_key>`. prefill_chunk: prompt tokens
    prefilled per engine step at most. speculate: draft tokens a row proposes per step (0: off), by draft_model (a
    smaller Qwen3 with the model's tokenizer; 4 drafts when speculate is 0) or else by prompt lookup."""
    app = FastAPI(title="qwen3lab")
    engine = Engine(
        model,
        max_batch,
        prefill_chunk,
        max_waiting=max_queue,
        prefix_cache_tokens=prefix_cache_tokens,
        speculate=speculate,
        draft_model=draft_model,
    ).start()
    per_token = 2 * engine.k[:, 0, :, 0].numel() * engine.k.element_size()  # keys and values, every layer
    log.info(
        "prefix cache: up to %d prompt tokens (%.0f MiB)", prefix_cache_tokens, prefix_cache_tokens * per_token / 2**20
    )
    s = app.state
    s.engine, s.tok, s.model_name, s.request_timeout = engine, tok, model_name, request_timeout
    s.max_context, s.vocab_size = model.config.max_position_embeddings, model.config.vocab_size
    s.page, s.csp = _chat_page()
    s.registry = CollectorRegistry()
    s.registry.register(_EngineCollector(engine))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
    if api_key:
        app.middleware("http")(_authorize(f"Bearer {api_key}".encode()))
    for module in (chat_completions, completions, tokens):
        app.include_router(module.router)
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    return app


async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return error_response(f"{where}: {first['msg']}", 400, where or None)


async def _api_error(request: Request, exc: APIError):
    return error_response(exc.message, exc.status, exc.param)


async def _unexpected(request: Request, exc: Exception):
    """A bug, not the client's fault: logged with its traceback, answered in OpenAI's error shape."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(f"internal error: {type(exc).__name__}: {exc}", 500)


def _authorize(expected: bytes):
    async def check(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if request.url.path not in ("/", "/health") and not hmac.compare_digest(given, expected):
            return error_response("missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401)
        return await call_next(request)

    return check


async def chat_page(request: Request):
    """The browser chat (static/chat.html), talking to /v1/chat/completions."""
    return HTMLResponse(request.app.state.page, headers={"Content-Security-Policy": request.app.state.csp})


async def health():
    """Answered by the event loop alone: fast however busy the engine is."""
    return {"status": "ok"}


async def metrics(request: Request):
    """Prometheus text (prometheus_client), read from the engine at each scrape."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request):
    name = request.app.state.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "qwen3lab"}]}


class _EngineCollector:
    """The engine's counters as Prometheus metrics: rows running, requests waiting, tokens generated, tokens/s over
    the last 10 s, prompt tokens and those of them taken from the prefix cache."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        m = self.engine.metrics()
        yield GaugeMetricFamily("qwen3lab_requests_running", "rows in the running batch", value=m["running"])
        yield GaugeMetricFamily("qwen3lab_requests_waiting", "requests waiting to be admitted", value=m["waiting"])
        yield CounterMetricFamily(
            "qwen3lab_generated_tokens", "tokens generated since start", value=m["generated_tokens_total"]
        )
        yield GaugeMetricFamily(
            "qwen3lab_generation_tokens_per_second", "tokens generated per second, last 10 s", m["tokens_per_second"]
        )
        yield CounterMetricFamily("qwen3lab_prompt_tokens", "prompt tokens admitted", value=m["prompt_tokens_total"])
        yield CounterMetricFamily(
            "qwen3lab_prefix_cache_hit_tokens",
            "prompt tokens copied from the prefix cache",
            value=m["prefix_cache_hit_tokens_total"],
        )


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
    prefill_chunk: int = 512,
    speculate: int = 0,
    draft_model_dir: str | None = None,
):
    import ipaddress

    import uvicorn

    from ..model.hf import load_model
    from ..model.runtime import prepare_for_inference
    from ..text.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=dtype)
    prepare_for_inference(model, compile)
    draft = None if draft_model_dir is None else load_model(draft_model_dir, dtype=dtype)
    tok = load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else load_tokenizer()
    app = create_app(
        model,
        tok,
        Path(model_dir).name,
        max_batch,
        max_queue,
        request_timeout,
        prefix_cache_tokens,
        api_key,
        prefill_chunk,
        speculate,
        draft,
    )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not api_key and not loopback:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key)", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
