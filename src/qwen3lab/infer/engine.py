"""The generation engine, used by `generate()`, `stream()`, the chat, the server and RL rollouts: continuous
batching — a row joins the running batch at the next decode step and leaves it the step it finishes.

The KV cache has one slot per row, [layers, max_batch, kv_heads, capacity, head_dim]. Running rows hold slots
0..n-1 — a row that leaves is replaced by the last one, whose cache is copied into its slot — so each decode step
works on views of the first n slots, every row at its own length (no left padding: positions are plain cache
indices). New prompts are prefilled by forwards of their own, in chunks of columns: several short prompts together,
right-padded (a real token never sees the padding after it, so plain causal attention needs no mask), a long one
alone. The capacity grows (doubling, up to the model's context) as rows get longer.

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

from ..model.head import logprobs_topk
from .sampling import SamplingParams, default_stop_ids, process_logits, sample

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

    def cancel(self) -> None:
        """Stop generating for this request (a stop string was found, or its client went away)."""
        self.cancelled = True


# The model calls `layer_cache.update(k, v)` inside each (maybe compiled) block. These hold only tensor views made
# outside the block, never Python ints, so a compiled block sees shapes, not a constant per row or offset.


def _emit_sampled_logprobs(requests: list[Request], logits: torch.Tensor, tokens: list[int]) -> None:
    """("sampled_logprob", logp) before each token or stop id, for requests whose params ask: the token's log-prob
    under the model's distribution at the sampling temperature (logits [n, V]; before top-k / top-p / min-p cut it,
    as vLLM's processed logprobs), which is what a trainer recomputes."""
    p = requests[0].params
    if not p.sampled_logprobs:
        return
    scaled = logits.float() / p.temperature if p.temperature > 0 else logits.float()
    logp = torch.log_softmax(scaled, -1).gather(1, torch.tensor(tokens, device=logits.device)[:, None])
    for request, value in zip(requests, logp[:, 0].tolist(), strict=True):
        request.emit("sampled_logprob", value)


class _PrefillLayer:
    """One layer's slots [rows, kv_heads, end, D] for a prefill chunk that fills their last T positions."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, k, v):  # [rows, kv_heads, T, D] -> [rows, kv_heads, end, D], this chunk's included
        T = k.shape[2]
        self.k[:, :, self.k.shape[2] - T :] = k
        self.v[:, :, self.v.shape[2] - T :] = v
        return self.k, self.v


class _DecodeLayer:
    """One layer's slots [n, kv_heads, width, D] for a decode step: row i writes its new key at positions[i]."""

    def __init__(self, k, v, positions: torch.Tensor):
        self.k, self.v, self.positions = k, v, positions

    def update(self, k, v):  # [n, kv_heads, 1, D] -> [n, kv_heads, width, D]
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, self.positions] = k[:, :, 0]
        self.v[rows, :, self.positions] = v[:, :, 0]
        return self.k, self.v


class EngineFull(RuntimeError):
    """The waiting queue is at its bound: try again shortly (the server answers 503 with Retry-After)."""


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # up to the shorter one
        if x != y:
            break
        n += 1
    return n


def _entries(logps, top_ids, top_logps, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Tensors [N], [N, >= k], [N, >= k] -> per position (log-prob, [(id, log-prob)] of the k most likely)."""
    top = [list(zip(i[:k], v[:k], strict=True)) for i, v in zip(top_ids.tolist(), top_logps.tolist(), strict=True)]
    return list(zip(logps.tolist(), top, strict=True))


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
        prefill_batch_tokens: int = 2048,
        seed: int | None = None,
    ):
        self.model, self.max_batch, self.prefill_chunk, self.max_waiting = model, max_batch, prefill_chunk, max_waiting
        # Prompts are prefilled together up to this many padded tokens: fuller matmuls and one forward's fixed cost
        # shared, but every row of a batch gets its first token when the batch ends. Measured on the 0.6B shape, 16
        # clients (bench/serve_load.py): 2048 gave 15.8 tok/s, TTFT p50 17.3 s, p99 19.0 s; 256 gave 13.3 tok/s,
        # p50 9.9 s, p99 20.5 s.
        self.prefill_batch_tokens = prefill_batch_tokens
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
        self.running: list[Request] = []
        self._thread = None
        # prompt ids -> its cache (k, v [layers, kv_heads, len, D]), least recently used first
        self.prefixes: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self.prefix_cache_tokens, self.min_prefix = prefix_cache_tokens, min_prefix
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

    def run_until_idle(self) -> None:
        while self.running or self._held or not self.waiting.empty():
            self.step(block=False)

    def metrics(self, window: float = 10.0) -> dict:
        """Rows running, requests waiting, tokens generated in all and per second over the last `window` seconds,
        prompt tokens computed and taken from the prefix cache."""
        with self._lock:
            since = time.monotonic() - window
            recent = sum(1 for t in self._recent if t > since)
        return {
            "running": len(self.running),
            "waiting": self.waiting.qsize(),
            "generated_tokens_total": self.generated_total,
            "tokens_per_second": recent / window,
            "prompt_tokens_total": self.prefilled_total + self.prefix_hit_total,
            "prefix_cache_hit_tokens_total": self.prefix_hit_total,
        }

    # ---- one engine step: admit waiting rows, then decode every running row by one token ----

    @torch.inference_mode()
    def step(self, block: bool = False) -> None:
        try:
            self._admit(block and not self.running)
            self._drop_cancelled()
            if self.running:
                self._decode()
        except Exception as e:  # a failure ends the requests in flight with an error, never the engine
            log.exception("generation failed")
            for request in self.running:
                request.emit("error", f"{type(e).__name__}: {e}")
            self.running.clear()

    def _admit(self, block: bool) -> None:
        """Take waiting groups while their rows fit, and prefill them."""
        groups, rows = [], len(self.running)
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
                groups.append(group)
                rows += len(group)
        # a prompt whose log-probs are asked for is computed whole
        hits = [(0, None) if g[0].params.prompt_logprobs is not None else self._prefix_hit(g[0].ids) for g in groups]
        fresh = sorted((g for g, (m, _) in zip(groups, hits, strict=True) if not m), key=lambda g: len(g[0].ids))
        batches, batch = [], []
        for group in fresh:  # similar lengths together, at most prefill_batch_tokens padded tokens per forward
            if batch and (len(batch) + 1) * len(group[0].ids) > self.prefill_batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(group)
        if batch:
            batches.append(batch)
        work = [(b, 0, None) for b in batches] + [([g], m, kv) for g, (m, kv) in zip(groups, hits, strict=True) if m]
        for batch, start, kv in work:
            try:
                self._prefill(batch, start, kv)
            except Exception as e:
                log.exception("prefill failed")
                for request in (r for g in batch for r in g):
                    request.emit("error", f"{type(e).__name__}: {e}")

    def _prefix_hit(self, ids: list[int]) -> tuple[int, tuple | None]:
        """The longest kept prefix of these ids (at most all but the last token, whose logits are needed)."""
        best, hit = 0, None
        for key, kv in self.prefixes.items():
            n = min(_common_prefix(ids, key), len(ids) - 1)
            if n > best:
                best, hit = n, (key, kv)
        if best < self.min_prefix:
            return 0, None
        self.prefixes.move_to_end(hit[0])
        return best, hit[1]

    def _prefill(self, groups: list[list[Request]], start: int, kv) -> None:
        """Prefill the prompts of these groups together (right-padded), their first rows taking the next slots; the
        group's other rows get a copy. `start` slots come from the prefix cache's kv."""
        prompts = [g[0].ids for g in groups]
        lengths = [len(p) for p in prompts]
        T, B, first = max(lengths), len(groups), len(self.running)
        self._grow(T + 1)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, device=self.device)
        if kv is not None:  # [layers, kv_heads, start, D] -> the first `start` slots of this one row
            self.k[:, first, :, :start], self.v[:, first, :, :start] = kv[0][:, :, :start], kv[1][:, :, :start]
            self.prefix_hit_total += start
        self.prefilled_total += sum(lengths) - start * B
        last = torch.tensor(lengths, device=self.device) - 1
        hidden = torch.empty(B, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
        scored = [[] for _ in groups]  # prompt log-probs asked for: per row, (logp, top ids, top logps) per chunk
        for s in range(start, T, self.prefill_chunk):
            e = min(s + self.prefill_chunk, T)
            positions = torch.arange(s, e, device=self.device).expand(B, -1)
            layers = [_PrefillLayer(k[first : first + B, :, :e], v[first : first + B, :, :e]) for k, v in self._kv()]
            out = self.model(ids[:, s:e], positions, return_hidden=True, kv_cache=layers)  # [B, e - s, hidden]
            ends = ((last >= s) & (last < e)).nonzero()[:, 0]  # rows whose last prompt token is in this chunk
            hidden[ends] = out[ends, last[ends] - s].to(self.dtype)
            for r, group in enumerate(groups):
                k = group[0].params.prompt_logprobs
                if k is not None and s < lengths[r] - 1:  # positions s.. predict tokens s + 1.. of the prompt
                    n = min(e, lengths[r] - 1) - s
                    scored[r].append(
                        logprobs_topk(out[r, :n], self.model.lm_head.weight, ids[r, s + 1 : s + 1 + n], max(k, 1))
                    )
        logits = self.model.lm_head(hidden).float()  # [B, V]
        for r, group in enumerate(groups):
            k = group[0].params.prompt_logprobs
            if k is not None:  # the first token has none: nothing came before it
                entries = [None] + (_entries(*map(torch.cat, zip(*scored[r], strict=True)), k) if scored[r] else [])
                for request in group:
                    request.emit("prompt_logprobs", entries)
        for r in range(B):
            self._keep_prefix(prompts[r], first + r)
        rows = [(group[0], r) for r, group in enumerate(groups)]  # in slots first..first+B-1, then the copies
        for r, group in enumerate(groups):
            for request in group[1:]:
                slot = first + len(rows)
                self.k[:, slot, :, : lengths[r]] = self.k[:, first + r, :, : lengths[r]]
                self.v[:, slot, :, : lengths[r]] = self.v[:, first + r, :, : lengths[r]]
                rows.append((request, r))
        for request, r in rows:
            p = request.params
            request.length = lengths[r]
            request.stops = set(p.stop_ids if p.stop_ids is not None else self.default_stops)
            if p.seed is not None:
                request.generator = torch.Generator(self.device).manual_seed(p.seed)
            if p.repetition_penalty != 1.0:
                request.history = ids[r : r + 1, : lengths[r]]
            self.running.append(request)
        requests, logits = [request for request, _ in rows], logits[[r for _, r in rows]]  # a row per request
        tokens = self._sample(requests, logits)
        self._emit_logprobs(requests, logits, tokens)
        for request, token in zip(requests, tokens, strict=True):
            if request.params.max_new_tokens == 0:  # the prompt's log-probs were all it asked for
                request.emit("end", "length")
                self._remove(request)
            else:
                self._take(request, token)

    def _keep_prefix(self, ids: list[int], slot: int) -> None:
        if self.prefix_cache_tokens < max(len(ids), self.min_prefix):
            return
        key = tuple(ids)
        if key not in self.prefixes:
            self.prefixes[key] = (self.k[:, slot, :, : len(ids)].clone(), self.v[:, slot, :, : len(ids)].clone())
        self.prefixes.move_to_end(key)
        while sum(len(k) for k in self.prefixes) > self.prefix_cache_tokens:
            self.prefixes.popitem(last=False)

    def _kv(self):
        return zip(self.k, self.v, strict=True)

    def _decode(self) -> None:
        n, host_lengths = len(self.running), [r.length for r in self.running]
        width = max(host_lengths) + 1  # the keys a row can see this step, at most
        self._grow(width)
        lengths = torch.tensor(host_lengths, device=self.device)
        x = torch.tensor([[r.next_token] for r in self.running], device=self.device)  # [n, 1]
        mask = None  # rows of one length (one row, a group of rollouts) see every slot: no mask needed
        if min(host_lengths) < width - 1:  # [n, 1, 1, width]: each row its own filled slots and this step's token
            mask = (torch.arange(width, device=self.device)[None, :] <= lengths[:, None])[:, None, None, :]
        layers = [_DecodeLayer(k[:n, :, :width], v[:n, :, :width], lengths) for k, v in self._kv()]
        hidden = self.model(x, lengths[:, None], mask, return_hidden=True, kv_cache=layers)
        logits = self.model.lm_head(hidden[:, -1]).float()  # [n, V]
        running = list(self.running)  # _take may remove rows as it goes
        for request in running:
            request.length += 1
        tokens = self._sample(running, logits)
        self._emit_logprobs(running, logits, tokens)
        for request, token in zip(running, tokens, strict=True):
            self._take(request, token)

    def _emit_logprobs(self, requests: list[Request], logits: torch.Tensor, tokens: list[int]) -> None:
        """("logprob", ...) for the rows that asked, before their token or stop id."""
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if not rows:
            return
        logp = torch.log_softmax(logits[rows], -1)  # [n, V]
        picked = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logp.device))[:, 0]
        k = max(requests[i].params.logprobs for i in rows)
        top = logp.topk(max(k, 1), -1)
        for j, entry in enumerate(_entries(picked, top.indices, top.values, k)):
            request = requests[rows[j]]
            request.emit("logprob", (entry[0], entry[1][: request.params.logprobs]))

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """One token per request from its row of logits [n, V]. Rows that share a SamplingParams object and have
        no generator or history of their own are sampled together; the others one by one."""
        tokens: list[int | None] = [None] * len(requests)
        shared: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            if request.generator is None and request.history is None:
                shared.setdefault(id(request.params), []).append(i)
                continue
            p = request.params
            tokens[i] = int(sample(process_logits(logits[i : i + 1], request.history, p), p, request.generator)[0])
            _emit_sampled_logprobs([request], logits[i : i + 1], tokens[i : i + 1])
            if request.history is not None:
                request.history = torch.cat([request.history, torch.tensor([[tokens[i]]], device=self.device)], 1)
        for rows in shared.values():
            p = requests[rows[0]].params
            picked = sample(process_logits(logits[rows], None, p), p, self.generator).tolist()
            for i, token in zip(rows, picked, strict=True):
                tokens[i] = token
            _emit_sampled_logprobs([requests[i] for i in rows], logits[rows], picked)
        return tokens

    def _take(self, request: Request, token: int) -> None:
        """Hand a sampled token to its request, or end the request (stop id, token budget)."""
        if token in request.stops:
            request.stop_token = token
            request.emit("end", "stop")
            self._remove(request)
            return
        request.emit("token", token)
        request.generated += 1
        self.generated_total += 1
        with self._lock:
            now = time.monotonic()
            self._recent.append(now)
            while self._recent[0] < now - 60:
                self._recent.popleft()
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
            self.running[i] = moved
        self.running.pop()

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_context)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(*old.shape[:3], capacity, old.shape[4], device=self.device, dtype=self.dtype)
            new[:, :, :, : self.capacity] = old
            setattr(self, name, new)
        self.capacity = capacity
