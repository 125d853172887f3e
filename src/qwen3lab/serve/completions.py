"""POST /v1/completions in OpenAI's legacy schema, as lm-eval's `local-completions` and other harnesses use it:
every prompt form, n choices per prompt (index = prompt * n + j), echo, log-probs, streamed or not."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..text.tokenizer import Tokenizer
from .jobs import Job, collect, merged, submit, texts
from .protocol import APIError, CompletionBody, constraint, sampling_params, sse, stop_strings

router = APIRouter()


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # as given, when given as text

    def as_text(self, tok: Tokenizer) -> str:
        return self.text if self.text is not None else tok.decode(self.ids)


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    """echo: the prompt comes back before the completion, with its tokens' log-probs (the first token's is null)
    when logprobs is set; max_tokens 0 scores the prompt alone. The prompt's log-probs come from the prefill's own
    forward, chunk by chunk through lm_head."""
    s = request.app.state
    prompts, stop = prompts_of(s.tok, body.prompt), stop_strings(body.stop)
    echo_k = body.logprobs if body.echo else None
    held = await asyncio.to_thread(constraint, body, s.tok, s.vocab_size)
    lp = {"logprobs": body.logprobs, "prompt_logprobs": echo_k, "constraint": held}
    asks = [(p.ids, sampling_params(body, len(p.ids), body.max_tokens, s.max_context, **lp)) for p in prompts]
    choices = [(p, job) for p, jobs in zip(prompts, submit(s.engine, asks, body.n), strict=True) for job in jobs]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": s.model_name}
    if body.stream:
        streams = [
            _choice_stream(s.tok, body, head, i, p, job, stop, s.request_timeout) for i, (p, job) in enumerate(choices)
        ]
        return StreamingResponse(_events(streams), media_type="text/event-stream")
    done = await asyncio.gather(*(collect(s.tok, job, stop, s.request_timeout) for _, job in choices))
    out = []
    for index, ((prompt, _), (text, reason, job)) in enumerate(zip(choices, done, strict=True)):
        prompt_text = prompt.as_text(s.tok)
        text = prompt_text + text if body.echo else text
        choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        if body.logprobs is not None:
            offset = 0 if body.echo else len(prompt_text)
            choice["logprobs"] = _logprobs_of(s.tok, job, prompt, 0, offset, body.echo)
        out.append(choice)
    n_in, n_out = sum(len(p.ids) for p in prompts), sum(job.tokens for _, job in choices)
    usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
    return head | {"object": "text_completion", "choices": out, "usage": usage}


async def _choice_stream(tok, body, head: dict, index: int, prompt: Prompt, job: Job, stop, timeout: float):
    """One choice's chunks; the first carries the echoed prompt, each the log-probs of the tokens since the last."""
    sent, echo, prompt_text = 0, body.echo, prompt.as_text(tok)
    offset = 0 if echo else len(prompt_text)
    async for piece, finish in texts(tok, job, stop, timeout):
        text = prompt_text + piece if echo else piece
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        if body.logprobs is not None:
            choice["logprobs"] = _logprobs_of(tok, job, prompt, sent, offset, echo)
            offset += sum(len(t) for t in choice["logprobs"]["tokens"])
            sent = len(job.ids)
        echo = False
        yield sse(head | {"object": "text_completion", "choices": [choice]})


async def _events(streams):
    """The choices interleaved as they come, then [DONE]; a failed choice sends an error event and ends it there."""
    try:
        async for event in merged(streams):
            yield event
    except RuntimeError as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        return
    yield "data: [DONE]\n\n"


def _logprobs_of(tok: Tokenizer, job: Job, prompt: Prompt, start: int, offset: int, with_prompt: bool) -> dict:
    """The legacy logprobs of the job's tokens from `start` on, after the prompt's with echo."""
    ids, entries = job.ids[start:], job.logprobs[start:]
    if with_prompt:
        ids, entries = prompt.ids + ids, (job.prompt_logprobs or [None] * len(prompt.ids)) + entries
    return _completion_logprobs(tok, ids, entries, offset)


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


def prompts_of(tok: Tokenizer, prompt) -> list[Prompt]:
    """OpenAI's prompt forms: a string, a list of strings, token ids, a list of token-id lists."""
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
        out.append(Prompt(ids, p if isinstance(p, str) else None))
    return out
