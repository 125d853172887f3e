"""Requests on the engine, as the event loop sees them: each completion a Job fed by the engine's thread, its text
streamed as it comes, several choices merged."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from ..infer.detokenize import TextStream
from ..infer.engine import Engine, EngineFull
from ..infer.sampling import SamplingParams
from ..text.tokenizer import Tokenizer
from .protocol import APIError


class Job:
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


def submit(engine: Engine, prompts: list[tuple[list[int], SamplingParams]], n: int = 1) -> list[list[Job]]:
    """n completions of each prompt (each prompt prefilled once); with a seed, completion i samples with seed + i.
    All or nothing: what no retry can fix is a 400, a full queue a 503, and either leaves nothing in the engine."""
    if n > engine.max_batch:
        raise APIError(f"n={n}, but at most {engine.max_batch} rows run at once (--max-batch)", "n")
    if len(prompts) > engine.max_waiting:
        raise APIError(
            f"{len(prompts)} prompts in one request, but at most {engine.max_waiting} can wait (--max-queue)", "prompt"
        )
    loop, out = asyncio.get_running_loop(), []
    try:
        for ids, params in prompts:
            jobs = [Job(loop) for _ in range(n)]
            each = [
                params if i == 0 or params.seed is None else replace(params, seed=(params.seed + i) % 2**64)
                for i in range(n)
            ]
            for job, request in zip(jobs, engine.submit_group(ids, each, [job.push for job in jobs]), strict=True):
                job.request = request
            out.append(jobs)
    except (EngineFull, ValueError) as e:
        for job in (j for jobs in out for j in jobs):
            job.cancel()
        if isinstance(e, EngineFull):
            raise APIError(f"server busy: {e}; retry shortly", status=503) from None
        raise APIError(str(e), "max_tokens") from None
    return out


class RequestTimeout(RuntimeError):
    pass


async def texts(tok: Tokenizer, job: Job, stop: list[str], timeout: float):
    """Async stream of (text piece, finish_reason or None) for one job (see generate.TextStream). The row leaves the
    engine as soon as this stream ends: at a stop string, when its client goes away, or after `timeout` seconds."""
    text = TextStream(tok, stop)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise RequestTimeout(f"request timed out after {timeout:g} s (--request-timeout)") from None
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


async def merged(streams):
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


async def collect(tok: Tokenizer, job: Job, stop: list[str], timeout: float):
    parts, reason = [], "length"
    try:
        async for piece, finish in texts(tok, job, stop, timeout):
            parts.append(piece)
            reason = finish or reason
    except RuntimeError as e:
        raise APIError(str(e), status=504 if isinstance(e, RequestTimeout) else 500) from None
    return "".join(parts), reason, job  # usage counts generated ids
