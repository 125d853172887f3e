"""Serving under load: continuous batching (qwen3lab's engine) vs the static batcher it replaced vs transformers'.

    python bench/serve_load.py [--shape qwen3-0.6b] [--clients 16,64] [--max-batch 16] [--shared-prefix 0]

N clients arrive staggered (one every --gap seconds; 0: all at once) with mixed prompt lengths (16-256 tokens) and
completion lengths (--new-tokens, 8-128 by default; greedy, no stop id). The same load, weights and prompts go to:
  qwen3lab   engine.Engine (what `qwen3lab serve` runs), rows joining and leaving every step
  static     the batcher `qwen3lab serve` had before: waiting requests join only an empty batch
  no-prefix-cache  the engine without its prefix cache (with --shared-prefix: what reusing a system prompt saves)
  hf-cb      transformers' continuous batching (ContinuousBatchingManager, streaming), on the same weights
Measured at the engine level (HTTP adds the same ~1-2 ms per request to every system): time to first token and
latency (p50 / p99 over requests), and generated tokens per second over the whole run. fp32 on the CPU, or
`--dtype bfloat16` (weights and compute, both systems: what a CPU with AMX serves fastest). Freed memory is kept in
the process's heap as `qwen3lab serve` does (model/runtime.py; process-wide, so transformers' run has it too).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from functools import partial

import torch
from common import hf_from_qwen3lab, machine

import qwen3lab
from qwen3lab.infer.engine import Engine
from qwen3lab.infer.sampling import SamplingParams
from qwen3lab.model.runtime import prepare_for_inference


def workload(n: int, gap: float, vocab: int, shared: int = 0, seed: int = 0, new=(8, 128)) -> list[dict]:
    """n requests, one every `gap` seconds; each prompt begins with the same `shared` tokens (a system prompt);
    completions of new[0]..new[1] tokens."""
    rng = random.Random(seed)
    system = [rng.randrange(1000, vocab - 1000) for _ in range(shared)]
    return [
        {
            "at": i * gap,
            "ids": system + [rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(16, 256))],
            "new": rng.randint(*new),
        }
        for i in range(n)
    ]


class Times:
    """Per request: when it was sent, its first token, its last token, and how many tokens came."""

    def __init__(self, n: int):
        self.sent, self.first, self.last, self.tokens = [0.0] * n, [None] * n, [None] * n, [0] * n
        self.done = threading.Event()
        self.remaining = n
        self.lock = threading.Lock()

    def token(self, i: int) -> None:
        now = time.perf_counter()
        if self.first[i] is None:
            self.first[i] = now
        self.last[i] = now
        self.tokens[i] += 1

    def end(self, i: int) -> None:
        with self.lock:
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def summary(self, t0: float, t1: float) -> dict:
        ttft = sorted(f - s for f, s in zip(self.first, self.sent, strict=True))
        latency = sorted(last - s for last, s in zip(self.last, self.sent, strict=True))

        def pct(xs, p):
            return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

        return {
            "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99),
            "lat_p50": pct(latency, 50),
            "lat_p99": pct(latency, 99),
            "tok_s": sum(self.tokens) / (t1 - t0),
            "tokens": sum(self.tokens),
        }


def drive(load: list[dict], submit) -> dict:
    """Send each request at its arrival time through submit(i, request, times); wait until all are done. One short
    request first, untimed, so no system pays its first-call setup inside the measurement."""
    warm = Times(1)
    submit(0, {"ids": load[0]["ids"], "new": 4}, warm)
    warm.done.wait()
    times = Times(len(load))
    t0 = time.perf_counter()
    for i, r in enumerate(load):
        delay = t0 + r["at"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        times.sent[i] = time.perf_counter()
        submit(i, r, times)
    times.done.wait()
    return times.summary(t0, max(times.last))


def run_engine(model, load, max_batch, cls=Engine, prefix_cache_tokens=8192, prefill_chunk=512) -> dict:
    # as `qwen3lab serve` runs it: 512 prompt tokens a step, in one forward with the running rows' next tokens
    engine = cls(model, max_batch=max_batch, prefix_cache_tokens=prefix_cache_tokens, prefill_chunk=prefill_chunk)
    engine.start()

    def submit(i, r, times):
        def emit(kind, value):
            if kind == "token":
                times.token(i)
            else:
                times.end(i)

        engine.submit(r["ids"], SamplingParams(max_new_tokens=r["new"], stop_ids=[]), emit)

    return drive(load, submit)


class StaticEngine(Engine):
    """How `qwen3lab serve` batched before the continuous engine: waiting requests are taken only when no row is
    running, so a batch runs until its last row ends (rows that finish leave early here, which the old padded batch
    did not do: a slightly stronger baseline than it was)."""

    def _admit(self, block: bool) -> None:
        if not (self.running or self.prefill or self.pending):
            super()._admit(block)


RUNNERS = {
    "qwen3lab": run_engine,  # as `qwen3lab serve` runs it (prefix cache of 8192 tokens)
    "no-prefix-cache": partial(run_engine, prefix_cache_tokens=0),
    "static": partial(run_engine, cls=StaticEngine, prefix_cache_tokens=0),
}


def run_transformers(model, load, max_batch, prefill_chunk=None) -> dict:  # prefill_chunk: the engine's only
    from transformers import GenerationConfig

    hf = hf_from_qwen3lab(model)
    config = GenerationConfig(max_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = hf.init_continuous_batching(generation_config=config)
    manager.start()

    def submit(i, r, times):
        rid = manager.add_request(r["ids"], max_new_tokens=r["new"], streaming=True)

        def follow():
            seen = 0
            for out in manager.request_id_iter(rid):
                got = min(len(out.generated_tokens), r["new"])  # it can hand out one token past max_new_tokens
                for _ in range(got - seen):
                    times.token(i)
                seen = max(seen, got)
            times.end(i)

        threading.Thread(target=follow, daemon=True).start()

    try:
        return drive(load, submit)
    finally:
        manager.stop(block=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between arrivals")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--systems", default="qwen3lab,static,hf-cb", help=f"of {', '.join(RUNNERS)}, hf-cb")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens of system prompt every request begins with")
    ap.add_argument("--new-tokens", default="8-128", help="completion lengths, uniform in this range")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prefill-chunk", type=int, default=512, help="the engine's (serve's --prefill-chunk)")
    args = ap.parse_args()
    print(machine())
    torch.manual_seed(0)
    model = qwen3lab.new_model(qwen3lab.preset(args.shape), seed=0).eval().to(getattr(torch, args.dtype))
    prepare_for_inference(model, compile=False)
    print(
        f"{args.shape}, {args.dtype}, max batch {args.max_batch}, one arrival every {args.gap} s, "
        f"shared prompt prefix {args.shared_prefix} tokens, completions of {args.new_tokens} tokens"
    )
    runners = RUNNERS | {"hf-cb": run_transformers}
    for n in (int(x) for x in args.clients.split(",")):
        new = tuple(int(x) for x in args.new_tokens.split("-"))
        load = workload(n, args.gap, model.config.vocab_size, args.shared_prefix, new=new)
        results = {}
        for name in args.systems.split(","):
            r = results[name] = runners[name](model, load, args.max_batch, prefill_chunk=args.prefill_chunk)
            print(
                f"{n:3d} clients  {name:8s}  TTFT p50 {r['ttft_p50']:6.2f} s  p99 {r['ttft_p99']:6.2f} s   "
                f"latency p50 {r['lat_p50']:6.2f} s  p99 {r['lat_p99']:6.2f} s   {r['tok_s']:6.1f} tok/s "
                f"({r['tokens']} tokens)",
                flush=True,
            )
        ours = results.get("qwen3lab")
        for other in ("hf-cb", "static", "no-prefix-cache"):
            if ours and other in results:
                o = results[other]
                print(
                    f"{n:3d} clients  qwen3lab / {other}: p99 TTFT {ours['ttft_p99'] / o['ttft_p99']:.2f}x, "
                    f"throughput {ours['tok_s'] / o['tok_s']:.2f}x"
                )


if __name__ == "__main__":
    main()
