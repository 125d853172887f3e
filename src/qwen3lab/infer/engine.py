"""The generation engine, used by `generate()`, `stream()`, the chat, the server and RL rollouts: continuous
batching — a row joins the running batch at the next decode step and leaves it the step it finishes.

The KV cache has one slot per row, [layers, max_batch, kv_heads, capacity, head_dim]. Running rows hold slots
0..n-1 — a row that leaves is replaced by the last one, whose cache is copied into its slot — so each decode step
works on views of the first n slots, every row at its own length (no left padding: positions are plain cache
indices). The capacity grows (doubling, up to the model's context) as rows get longer.

Chunked prefill: each step is one forward over the running rows' next tokens and at most `prefill_chunk` less that
many prompt tokens (prefill.py: several short prompts together, a long one a chunk per step, first come first
served, no padding computed), flattened into one row so each weight is read once for both (cache.py's MixedLayer
keeps their attention apart). A 32k-token prompt costs the running rows a larger forward per step, not a stall for
its whole prefill.

Prefix caching: the cache of each prompt prefilled is kept (least recently used first out, `prefix_cache_tokens` in
all), and a new prompt that begins with a kept one — a shared system prompt, a conversation's earlier turns — copies
those slots instead of computing them. The n completions of one prompt (`submit_group`: n > 1, GRPO's G rollouts)
prefill it once and copy its cache to each row.

    engine = Engine(model, max_batch=16)
    request = engine.submit(ids, SamplingParams(...), emit)   # emit(kind, value) from the engine's thread:
    # ("token", id) per generated token, then ("end", "stop" | "length"), or ("error", message); with
    # params.logprobs, ("logprob", (logp, [(id, logp), ...])) before each token and before the "end" of a stop id
    # (request.stop_token: the stop id is sampled like any token, so it has a log-prob, as OpenAI and vLLM report);
    # with params.sampled_logprobs, ("sampled_logprob", logp) likewise, at the sampling temperature;
    # with params.prompt_logprobs, ("prompt_logprobs", [None, (logp, [(id, logp), ...]), ...]) once, before any token
    request.cancel()                                          # the row leaves at the next step
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import speculative
from .cache import decode_inputs, grown
from .draft import Drafter
from .prefill import Prefill
from .rows import emit_logprobs, sample_rows
from .sampling import SamplingParams, default_stop_ids

log = logging.getLogger("qwen3lab")

# ---- requests and the cache as the model sees it ----


@dataclass
class Request:
    ids: list[int]
    params: SamplingParams
    emit: Callable[[str, Any], None]
    cancelled: bool = False
    # engine-side state
    length: int = 0  # cache slots filled
    next_token: int | None = None  # sampled, not yet in the cache
    generated: int = 0
    stop_token: int | None = None  # the stop id that ended it (not emitted as a token)
    stops: set = field(default_factory=set)
    generator: torch.Generator | None = None
    history: torch.Tensor | None = None  # [1, tokens] for the repetition penalty
    matcher: Any = None  # params.constraint's llguidance matcher: where this row is in its grammar
    seen: list[int] | None = None  # prompt and output, where speculative decoding looks its drafts up
    draft_misses: int = 0  # drafting steps in a row that kept no draft, and plain steps to wait (speculative.record)
    draft_wait: int = 0
    drafted: int = 0  # tokens in the draft model's cache (draft.py)

    def cancel(self) -> None:
        """Stop generating for this request (a stop string was found, or its client went away)."""
        self.cancelled = True


class EngineFull(RuntimeError):
    """The waiting queue is at its bound: try again shortly (the server answers 503 with Retry-After)."""


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # up to the shorter one
        if x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(
        self,
        model,
        max_batch: int = 16,
        prefill_chunk: int = 2048,
        capacity: int = 256,
        max_waiting: int = 256,
        prefix_cache_tokens: int = 0,
        min_prefix: int = 16,
        prefill_batch_tokens: int | None = None,
        seed: int | None = None,
        speculate: int = 0,
        draft_model=None,
    ):
        self.model, self.max_batch, self.max_waiting = model, max_batch, max_waiting
        # tokens per step at most (padding counted): a prefill chunk and the running rows' next tokens, one forward
        self.prefill_chunk = prefill_chunk
        # Prompts are prefilled together up to this many padded tokens: fuller matmuls, but every row of a batch gets
        # its first token when the batch ends (0.6B shape, 16 clients, TTFT p50 / p99: 2048 tokens 7.4 / 8.6 s, 512
        # 4.6 / 8.9 s, 256 5.4 / 9.5 s; the same 21.5 tok/s each; bench/serve_load.py)
        self.prefill_batch_tokens = prefill_batch_tokens or prefill_chunk
        cfg = model.config
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.max_context = cfg.max_position_embeddings
        self.capacity = min(capacity, self.max_context)
        shape = (cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros_like(self.k)
        self.default_stops = default_stop_ids(model)
        # rows sampling with one SamplingParams object and no seed of their own draw from this generator together,
        # in one call per step (GRPO's rollouts: a seeded engine, reproducible for the same submissions)
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.waiting: queue.Queue[list[Request]] = queue.Queue()  # groups: one prompt, one or more completions
        self._held: list[Request] | None = None  # a group waiting for enough free rows
        self.pending: list[list[Request]] = []  # groups admitted (their rows counted), not yet prefilling
        self.prefill: Prefill | None = None  # the prompts being prefilled, a chunk per step
        self.running: list[Request] = []  # decoding, in slots 0..n-1
        self._thread = None
        # prompt ids -> its cache (k, v [layers, kv_heads, len, D]), least recently used first
        self.prefixes: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self.prefix_cache_tokens, self.min_prefix = prefix_cache_tokens, min_prefix
        # draft tokens a row proposes per decode step (0: off), by a draft model's forwards or else by prompt lookup
        self.speculate = speculate or (4 if draft_model is not None else 0)
        self.drafter = None if draft_model is None else Drafter(draft_model, model, max_batch, self.capacity)
        self.drafted_total = self.accepted_total = 0
        self.generated_total = 0  # tokens handed out since start
        self.prefilled_total = self.prefix_hit_total = 0  # prompt tokens computed / copied from the prefix cache
        self._recent: collections.deque[float] = collections.deque()  # when each token of the last minute came
        self._lock = threading.Lock()  # _recent is written by the engine's thread, read by the server's

    # ---- the public side ----

    def submit(self, ids: list[int], params: SamplingParams, emit: Callable[[str, Any], None]) -> Request:
        return self.submit_group(ids, [params], [emit])[0]

    def submit_group(self, ids: list[int], params: list[SamplingParams], emits: list) -> list[Request]:
        """Several completions of one prompt (n > 1, GRPO's G rollouts): the prompt is prefilled once and its cache
        copied to each row; each row samples with its own params (and seed)."""
        if len(params) > self.max_batch:
            raise ValueError(f"{len(params)} completions of one prompt, but at most {self.max_batch} rows run at once")
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        longest = max(p.max_new_tokens for p in params)
        if min(p.max_new_tokens for p in params) < 0:
            raise ValueError("max_new_tokens must be 0 or more")
        if len(ids) + longest > self.max_context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({longest}) exceeds the model's "
                f"max_position_embeddings={self.max_context}"
            )
        if self.waiting.qsize() >= self.max_waiting:
            raise EngineFull(f"{self.waiting.qsize()} requests are waiting already (the bound is {self.max_waiting})")
        group = [Request(list(ids), p, emit) for p, emit in zip(params, emits, strict=True)]
        self.waiting.put(group)
        return group

    def start(self) -> Engine:
        """Run the loop in a daemon thread (the server's way); `run_until_idle` drives it in the caller instead."""
        self._thread = threading.Thread(target=self._loop, name="qwen3lab-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            self.step(block=True)

    def busy(self) -> bool:
        return bool(self.running or self.prefill or self.pending or self._held or not self.waiting.empty())

    def run_until_idle(self) -> None:
        while self.busy():
            self.step(block=False)

    def metrics(self, window: float = 10.0) -> dict:
        """Rows running and waiting, tokens generated (all, per second over `window` s), prompt tokens (all, cached)."""
        with self._lock:
            since = time.monotonic() - window
            recent = sum(1 for t in self._recent if t > since)
        prefilling = len(self.prefill.requests) if self.prefill is not None else 0
        return {
            "running": len(self.running) + prefilling,
            "waiting": self.waiting.qsize() + len(self.pending) + (self._held is not None),
            "generated_tokens_total": self.generated_total,
            "tokens_per_second": recent / window,
            "prompt_tokens_total": self.prefilled_total + self.prefix_hit_total,
            "prefix_cache_hit_tokens_total": self.prefix_hit_total,
        }

    # ---- one engine step: admit waiting rows; one forward for a prefill chunk and every running row's next token ----

    @torch.inference_mode()
    def step(self, block: bool = False) -> None:
        try:
            self._admit(block and not (self.running or self.prefill or self.pending))
            self._drop_cancelled()
            job = self._prefill_job()
            if job is not None and self.running:
                self._mixed_step(job)
            elif job is not None:
                self._prefill_step(job)
            elif self.running:
                self._decode()
        except Exception as e:  # a failure ends the requests in flight with an error, never the engine
            log.exception("generation failed")
            for request in self.running + (self.prefill.requests if self.prefill is not None else []):
                request.emit("error", f"{type(e).__name__}: {e}")
            self.running.clear()
            self.prefill = None

    def _admit(self, block: bool) -> None:
        """Take waiting groups while their rows fit (those prefilling and pending count)."""
        rows = len(self.running) + sum(map(len, self.pending))
        rows += len(self.prefill.requests) if self.prefill is not None else 0
        while True:
            group = self._held
            if group is None:
                try:
                    group = self.waiting.get(block=block)
                except queue.Empty:
                    break
            block = False
            group = [r for r in group if not r.cancelled]
            if rows + len(group) > self.max_batch:
                self._held = group  # admitted whole once enough rows have left
                break
            self._held = None
            if group:
                self.pending.append(group)
                rows += len(group)

    def _prefill_job(self) -> Prefill | None:
        """The prompts being prefilled, else the next ones; prompts whose every row was cancelled are dropped."""
        while True:
            self.prefill = self.prefill or self._next_prefill()
            if self.prefill is None or not all(r.cancelled for r in self.prefill.requests):
                return self.prefill
            self.prefill = None

    def _prefill_step(self, job: Prefill) -> None:
        """No row is running: spend the step's prompt-token budget on prefill alone, job after job."""
        budget = self.prefill_chunk
        while job is not None and budget > 0:
            budget -= job.step(self.model, budget)
            if job.finished:
                self.prefill = None
                self._join(job)
                job = self._prefill_job() if budget > 0 and not self.running else None

    def _mixed_step(self, job: Prefill) -> None:
        """One forward for the running rows' next tokens and the prefill's next chunk (the budget less the rows)."""
        n = len(self.running)
        x, running_positions, mask, decode = self._decode_inputs()
        ids, positions, layers = job.chunk(self.prefill_chunk - n, decode, n, mask)
        x = torch.cat([x.view(n), ids])[None]
        positions = torch.cat([running_positions.flatten(), positions])[None]
        hidden = self.model(x, positions, return_hidden=True, kv_cache=layers)  # [1, n + R, hidden]
        job.chunk_done(self.model, hidden[0, n:])
        self._decode_outputs(hidden[0, :n])
        if job.finished:
            self.prefill = None
            self._join(job)

    def _next_prefill(self) -> Prefill | None:
        """The oldest pending group, alone when the prefix cache holds its start; else with the next fresh groups
        that fit in prefill_batch_tokens prompt tokens (padding is not computed, prefill.py, but its attention is:
        at most 4x that padded). A prompt whose log-probs are asked for is computed whole."""
        self.pending = [g for g in ([r for r in g if not r.cancelled] for g in self.pending) if g]
        if not self.pending:
            return None
        first = self.pending.pop(0)
        start, kv = (0, None) if first[0].params.prompt_logprobs is not None else self._prefix_hit(first[0].ids)
        if start:
            self.prefix_hit_total += start
            return Prefill(self.model, [first], start, kv)
        batch, tokens, width = [first], len(first[0].ids), len(first[0].ids)
        for group in self.pending:  # first come, first served
            n, wider = len(group[0].ids), max(width, len(group[0].ids))
            if tokens + n > self.prefill_batch_tokens or (len(batch) + 1) * wider > 4 * self.prefill_batch_tokens:
                continue
            if group[0].params.prompt_logprobs is None and self._prefix_hit(group[0].ids, touch=False)[0]:
                continue  # its own prefill, from the cache
            batch.append(group)
            tokens, width = tokens + n, wider
        self.pending = [g for g in self.pending if all(g is not b for b in batch)]
        return Prefill(self.model, batch)

    def _prefix_hit(self, ids: list[int], touch: bool = True) -> tuple[int, tuple | None]:
        """The longest kept prefix of these ids (at most all but the last token, whose logits are needed)."""
        best, hit = 0, None
        for key, kv in self.prefixes.items():
            n = min(_common_prefix(ids, key), len(ids) - 1)
            if n > best:
                best, hit = n, (key, kv)
        if best < self.min_prefix:
            return 0, None
        if touch:
            self.prefixes.move_to_end(hit[0])
        return best, hit[1]

    def _join(self, job: Prefill) -> None:
        """The prompts are in: each row of their groups takes the next slot, its prompt's cache copied there, and
        samples its first token."""
        self.prefilled_total += sum(job.lengths) - job.start
        logits = self.model.lm_head(job.hidden).float()  # [B, V]
        rows = []  # (request, its prompt's index in the job)
        for r, group in enumerate(job.groups):
            if group[0].params.prompt_logprobs is not None:
                entries = job.prompt_logprobs(r)
                for request in group:
                    request.emit("prompt_logprobs", entries)
            self._keep_prefix(group[0].ids, job.k[:, r], job.v[:, r])
            rows += [(request, r) for request in group]
        self._grow(job.ids.shape[1] + 1)
        for request, r in rows:
            slot, n, p = len(self.running), job.lengths[r], request.params
            self.k[:, slot, :, :n], self.v[:, slot, :, :n] = job.k[:, r, :, :n], job.v[:, r, :, :n]
            request.length = n
            request.stops = set(p.stop_ids if p.stop_ids is not None else self.default_stops)
            if p.seed is not None:
                request.generator = torch.Generator(self.device).manual_seed(p.seed)
            if p.repetition_penalty != 1.0:
                request.history = job.ids[r : r + 1, :n]
            if p.constraint is not None:
                request.matcher = p.constraint.matcher()
            if self.speculate:
                request.seen = list(request.ids)
            self.running.append(request)
        requests, logits = [request for request, _ in rows], logits[[r for _, r in rows]]  # a row per request
        tokens = sample_rows(requests, logits, self.generator)
        emit_logprobs(requests, logits, tokens)
        for request, token in zip(requests, tokens, strict=True):
            if request.params.max_new_tokens == 0:  # the prompt's log-probs were all it asked for
                request.emit("end", "length")
                self._remove(request)
            else:
                self._take(request, token)

    def _keep_prefix(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a prompt's cache (k, v [layers, kv_heads, >= len(ids), D]) for later prompts that begin with it."""
        if self.prefix_cache_tokens < max(len(ids), self.min_prefix):
            return
        key = tuple(ids)
        if key not in self.prefixes:
            self.prefixes[key] = (k[:, :, : len(ids)].clone(), v[:, :, : len(ids)].clone())
        self.prefixes.move_to_end(key)
        while sum(len(k) for k in self.prefixes) > self.prefix_cache_tokens:
            self.prefixes.popitem(last=False)

    def _decode(self) -> None:
        if self.speculate and self._decode_drafts():
            return
        x, positions, mask, layers = self._decode_inputs()
        hidden = self.model(x, positions, mask, return_hidden=True, kv_cache=layers)  # [n, 1, hidden]
        self._decode_outputs(hidden[:, -1])

    def _decode_inputs(self, drafts: list[list[int]] | None = None):
        """The running rows' next tokens, each followed by its drafts: x [n, T], positions [n, T], the mask and the
        cache layers (cache.decode_inputs); T = 1 without drafts."""
        rows, n = self.running, len(self.running)
        drafts = drafts or [[]] * n
        starts = [r.length for r in rows]
        self._grow(max(starts) + 1 + max(map(len, drafts)))
        tokens = [[r.next_token, *d] for r, d in zip(rows, drafts, strict=True)]
        return decode_inputs(tokens, starts, self.k, self.v, slice(0, n))

    def _decode_outputs(self, hidden: torch.Tensor) -> None:
        """hidden [n, hidden] of the running rows' tokens: a token each, sampled and handed out."""
        logits = self.model.lm_head(hidden).float()  # [n, V]
        running = list(self.running)  # _take may remove rows as it goes
        for request in running:
            request.length += 1
        tokens = sample_rows(running, logits, self.generator)
        emit_logprobs(running, logits, tokens)
        for request, token in zip(running, tokens, strict=True):
            self._take(request, token)

    def _decode_drafts(self) -> bool:
        """A decode step that checks the rows' drafts (speculative.py) in one forward of 1 + k positions a row;
        False, and nothing done, when no row has any."""
        rows, n = list(self.running), len(self.running)
        if self.drafter is None:
            drafts, qs = [speculative.drafts_for(r, self.speculate, self.max_context) for r in rows], [None] * n
        else:
            drafts, qs = self.drafter.drafts(rows, self.speculate, self.max_context, self.generator)
        if not any(drafts):
            return False
        x, positions, mask, layers = self._decode_inputs(drafts)
        hidden = self.model(x, positions, mask, return_hidden=True, kv_cache=layers)  # [n, T, hidden]
        takes = [None] * n
        plain = [i for i, d in enumerate(drafts) if not d]  # sampled as in a plain step, from position 0
        if plain:
            logits = self.model.lm_head(hidden[plain, 0]).float()
            tokens = sample_rows([rows[i] for i in plain], logits, self.generator)
            emit_logprobs([rows[i] for i in plain], logits, tokens)
            for i, token in zip(plain, tokens, strict=True):
                takes[i] = [token]
        for i, d in enumerate(drafts):
            if d:
                logits = self.model.lm_head(hidden[i, : 1 + len(d)]).float()
                takes[i] = speculative.verify(logits, d, rows[i].params, rows[i].generator or self.generator, qs[i])
                speculative.record(rows[i], len(takes[i]) - 1)
                rows[i].drafted += min(len(takes[i]) - 1, len(d) - 1)  # the drafts the draft read and the model kept
                self.drafted_total += len(d)
                self.accepted_total += len(takes[i]) - 1
        for request, tokens in zip(rows, takes, strict=True):  # all lengths first: a row that leaves moves another
            request.length += len(tokens)  # its next token and the drafts kept are in the cache now
        for request, tokens in zip(rows, takes, strict=True):
            for token in tokens:
                if request not in self.running:  # ended by an earlier one (stop id, budget)
                    break
                self._take(request, token)
        return True

    def _take(self, request: Request, token: int) -> None:
        """Hand a sampled token to its request, or end the request (stop id, token budget)."""
        if token in request.stops:
            request.stop_token = token
            request.emit("end", "stop")
            self._remove(request)
            return
        if request.matcher is not None and not request.matcher.consume_token(token):
            request.emit("error", f"token {token} breaks the grammar: {request.matcher.get_error()}")
            self._remove(request)
            return
        request.emit("token", token)
        if request.seen is not None:
            request.seen.append(token)
        request.generated += 1
        self.generated_total += 1
        with self._lock:
            now = time.monotonic()
            self._recent.append(now)
            while self._recent[0] < now - 60:
                self._recent.popleft()
        if request.matcher is not None and request.matcher.is_stopped():  # the grammar allows nothing more
            request.emit("end", "stop")
            self._remove(request)
            return
        if request.generated >= request.params.max_new_tokens:
            request.emit("end", "length")
            self._remove(request)
            return
        request.next_token = token

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self._remove(request)

    def _remove(self, request: Request) -> None:
        """Free the row's slot: the last running row moves into it (its cache copied), so rows stay 0..n-1."""
        i, last = self.running.index(request), len(self.running) - 1
        if i != last:
            moved = self.running[last]
            self.k[:, i, :, : moved.length] = self.k[:, last, :, : moved.length]
            self.v[:, i, :, : moved.length] = self.v[:, last, :, : moved.length]
            if self.drafter is not None:
                self.drafter.move(i, last, moved.drafted)
            self.running[i] = moved
        self.running.pop()

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_context)
        self.k, self.v, self.capacity = grown(self.k, capacity), grown(self.v, capacity), capacity
        if self.drafter is not None:
            self.drafter.grow(capacity)
