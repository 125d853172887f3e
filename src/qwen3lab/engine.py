"""Continuous batching: a row joins the running batch at the next decode step and leaves it the step it finishes.

The KV cache has one slot per row, [layers, max_batch, kv_heads, capacity, head_dim]. Running rows hold slots
0..n-1 — a row that leaves is replaced by the last one, whose cache is copied into its slot — so each decode step
works on views of the first n slots, every row at its own length (no left padding: positions are plain cache
indices). A new row's prompt is prefilled into its slot by forwards of its own, in chunks, with the causal kernel
and no mask. The capacity grows (doubling, up to the model's context) as rows get longer.

    engine = Engine(model, max_batch=16)
    request = engine.submit(ids, SamplingParams(...), emit)   # emit(kind, value) from the engine's thread:
    # ("token", id) per generated token, then ("end", "stop" | "length"), or ("error", message)
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

from .generate import SamplingParams, default_stop_ids, process_logits, sample

log = logging.getLogger("qwen3lab")


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
    stops: set = field(default_factory=set)
    generator: torch.Generator | None = None
    history: torch.Tensor | None = None  # [1, tokens] for the repetition penalty

    def cancel(self) -> None:
        """Stop generating for this request (a stop string was found, or its client went away)."""
        self.cancelled = True


class _PrefillLayer:
    """One layer's cache seen by a prefill forward of the row in `slot`, writing from `start` on."""

    def __init__(self, k, v, slot: int, start: int):
        self.k, self.v, self.slot, self.start = k, v, slot, start

    def update(self, k, v):  # [1, kv_heads, T, D] -> every filled slot of this row, this chunk's included
        end = self.start + k.shape[2]
        self.k[self.slot, :, self.start : end] = k[0]
        self.v[self.slot, :, self.start : end] = v[0]
        return self.k[self.slot : self.slot + 1, :, :end], self.v[self.slot : self.slot + 1, :, :end]


class _DecodeLayer:
    """One layer's cache seen by a decode step of rows 0..n-1, each writing its new key at its own length."""

    def __init__(self, k, v, rows: torch.Tensor, positions: torch.Tensor, width: int):
        self.k, self.v, self.rows, self.positions, self.width = k, v, rows, positions, width

    def update(self, k, v):  # [n, kv_heads, 1, D] -> [n, kv_heads, width, D]
        n = len(self.rows)
        self.k[self.rows, :, self.positions] = k[:, :, 0]
        self.v[self.rows, :, self.positions] = v[:, :, 0]
        return self.k[:n, :, : self.width], self.v[:n, :, : self.width]


class EngineFull(RuntimeError):
    """The waiting queue is at its bound: try again shortly (the server answers 503 with Retry-After)."""


class Engine:
    def __init__(
        self, model, max_batch: int = 16, prefill_chunk: int = 2048, capacity: int = 256, max_waiting: int = 256
    ):
        self.model, self.max_batch, self.prefill_chunk, self.max_waiting = model, max_batch, prefill_chunk, max_waiting
        cfg = model.config
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.max_context = cfg.max_position_embeddings
        self.capacity = min(capacity, self.max_context)
        shape = (cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros_like(self.k)
        self.default_stops = default_stop_ids(model)
        self.waiting: queue.Queue[list[Request]] = queue.Queue()  # groups: one prompt, one or more completions
        self._held: list[Request] | None = None  # a group waiting for enough free rows
        self.running: list[Request] = []
        self._thread = None
        self.generated_total = 0  # tokens handed out since start
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
        """Rows running, requests waiting, tokens generated in all and per second over the last `window` seconds."""
        with self._lock:
            since = time.monotonic() - window
            recent = sum(1 for t in self._recent if t > since)
        return {
            "running": len(self.running),
            "waiting": self.waiting.qsize(),
            "generated_tokens_total": self.generated_total,
            "tokens_per_second": recent / window,
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
        while True:
            group = self._held
            if group is None:
                try:
                    group = self.waiting.get(block=block)
                except queue.Empty:
                    return
            block = False
            group = [r for r in group if not r.cancelled]
            if len(self.running) + len(group) > self.max_batch:
                self._held = group  # admitted whole once enough rows have left
                return
            self._held = None
            if not group:
                continue
            try:
                self._prefill(group)
            except Exception as e:
                log.exception("prefill failed")
                for request in group:
                    request.emit("error", f"{type(e).__name__}: {e}")

    def _prefill(self, group: list[Request]) -> None:
        ids = torch.tensor(group[0].ids, device=self.device)
        for request in group:
            p = request.params
            request.stops = set(p.stop_ids if p.stop_ids is not None else self.default_stops)
            if p.seed is not None:
                request.generator = torch.Generator(self.device).manual_seed(p.seed)
            if p.repetition_penalty != 1.0:
                request.history = ids[None]
        self._grow(len(ids) + 1)
        slot = len(self.running)
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk][None]
            positions = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            layers = [_PrefillLayer(self.k[i], self.v[i], slot, start) for i in range(len(self.k))]
            hidden = self.model(chunk, positions, return_hidden=True, kv_cache=layers)
        logits = self.model.lm_head(hidden[:, -1]).float()  # [1, V]
        for i, request in enumerate(group):
            if i:  # the prompt's cache, copied to this completion's row
                self.k[:, slot + i, :, : len(ids)] = self.k[:, slot, :, : len(ids)]
                self.v[:, slot + i, :, : len(ids)] = self.v[:, slot, :, : len(ids)]
            request.length = len(ids)
            self.running.append(request)
        for request in group:
            self._take(request, self._sample(request, logits))

    def _decode(self) -> None:
        n, host_lengths = len(self.running), [r.length for r in self.running]
        width = max(host_lengths) + 1  # the keys a row can see this step, at most
        self._grow(width)
        lengths = torch.tensor(host_lengths, device=self.device)
        rows = torch.arange(n, device=self.device)
        x = torch.tensor([[r.next_token] for r in self.running], device=self.device)  # [n, 1]
        # [n, 1, 1, width]: each row sees its own filled slots and this step's token
        mask = (torch.arange(width, device=self.device)[None, :] <= lengths[:, None])[:, None, None, :]
        layers = [_DecodeLayer(self.k[i], self.v[i], rows, lengths, width) for i in range(len(self.k))]
        hidden = self.model(x, lengths[:, None], mask, return_hidden=True, kv_cache=layers)
        logits = self.model.lm_head(hidden[:, -1]).float()  # [n, V]
        running = list(self.running)  # _take may remove rows as it goes
        for request in running:
            request.length += 1
        for i, request in enumerate(running):
            self._take(request, self._sample(request, logits[i : i + 1]))

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        p = request.params
        token = int(sample(process_logits(logits, request.history, p), p, request.generator)[0])
        if request.history is not None:
            request.history = torch.cat([request.history, torch.tensor([[token]], device=self.device)], 1)
        return token

    def _take(self, request: Request, token: int) -> None:
        """Hand a sampled token to its request, or end the request (stop id, token budget)."""
        if token in request.stops:
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
