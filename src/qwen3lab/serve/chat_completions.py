"""POST /v1/chat/completions: the chat template, then the engine; think blocks as reasoning_content and tool calls
parsed, as vLLM's Qwen3 parsers give them; streamed or not, n choices, log-probs."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..infer.sampling import SamplingParams
from ..text.chat import TEMPLATE_NAMES, ChatError, parse_assistant
from ..text.tokenizer import Tokenizer
from .jobs import Job, collect, merged, submit, texts
from .protocol import APIError, ChatBody, constraint, sampling_params, sse

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request):
    s = request.app.state
    kwargs = dict(body.chat_template_kwargs or {})
    taken = sorted(set(kwargs) & TEMPLATE_NAMES)
    if taken:
        raise APIError(f"chat_template_kwargs: {taken[0]!r} is set by the server itself", "chat_template_kwargs")
    try:
        ids = s.tok.encode_chat(
            text_content(body.messages),
            tools=None if body.tool_choice == "none" else body.tools,
            add_generation_prompt=True,
            assistant_mask=False,
            **kwargs,
        ).input_ids
    except ChatError as e:
        raise APIError(f"messages: {e}", "messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs: needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    held = await asyncio.to_thread(constraint, body, s.tok, s.vocab_size, kwargs.get("enable_thinking") is True)
    params = sampling_params(body, len(ids), max_tokens, s.max_context, logprobs=logprobs, constraint=held)
    jobs = submit(s.engine, [(ids, params)], body.n)[0]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": s.model_name}
    if body.stream:
        return StreamingResponse(
            _chat_events(s.tok, jobs, params, head, len(ids), s.request_timeout), media_type="text/event-stream"
        )
    choices, n_out = [], 0
    for index, (text, reason, job) in enumerate(
        await asyncio.gather(*(collect(s.tok, j, params.stop, s.request_timeout) for j in jobs))
    ):
        message = parse_assistant(text)
        if message["tool_calls"]:
            reason = "tool_calls"
        message.pop("malformed_tool_calls", None)
        lp = {"content": _chat_logprobs(s.tok, job.ids, job.logprobs)} if body.logprobs else None
        choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": lp})
        n_out += job.tokens
    return head | {
        "object": "chat.completion",
        "choices": choices,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out},
    }


def _chat_logprobs(tok: Tokenizer, ids: list[int], entries: list) -> list[dict]:
    """The chat schema: per token {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""

    def one(token_id, logp):
        piece = tok.decode([token_id])
        return {"token": piece, "logprob": logp, "bytes": list(piece.encode())}

    return [one(i, e[0]) | {"top_logprobs": [one(t, lp) for t, lp in e[1]]} for i, e in zip(ids, entries, strict=True)]


def text_content(messages: list[dict]) -> list[dict]:
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


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


async def _chat_events(
    tok: Tokenizer, jobs: list[Job], params: SamplingParams, head: dict, prompt_tokens: int, timeout: float
):
    """The stream of every choice (interleaved as they come), then usage and [DONE]; a failed choice sends an
    error event and ends the stream there."""
    try:
        async for event in merged([_chat_stream(tok, job, i, params, head, timeout) for i, job in enumerate(jobs)]):
            yield event
    except RuntimeError as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        return
    n_out = sum(job.tokens for job in jobs)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out, "total_tokens": prompt_tokens + n_out}
    yield sse(head | {"object": "chat.completion.chunk", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _chat_stream(tok: Tokenizer, job: Job, index: int, params: SamplingParams, head: dict, timeout: float):
    """One choice's chunks. Each carries the log-probs (if asked for) of the tokens that arrived since the last."""
    sent = 0

    def chunk(delta, finish=None):
        nonlocal sent
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        if params.logprobs is not None:
            choice["logprobs"] = {"content": _chat_logprobs(tok, job.ids[sent:], job.logprobs[sent:])}
            sent = len(job.ids)
        return sse(head | {"object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    text, streamed, in_think = "", 0, False
    reason = "length"
    async for piece, finish in texts(tok, job, params.stop, timeout):
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
