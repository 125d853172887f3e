"""What structured output costs: generated tokens/s with every row held to a JSON schema vs the same rows free, same
model, same prompts, sampled at temperature 1 (a random model's greedy text repeats itself); each free row generates
as many tokens as its held twin did.

    python bench/structured.py [--shape qwen3-0.6b] [--rows 1,16] [--tokens 256]

Each row's grammar gives a bitmask of its allowed tokens per step (llguidance, ~0.1 ms a row), which the engine turns
into -inf on the row's logits before sampling. Reported: tokens/s both ways and their ratio, and the time the masks
took per row and step. fp32 on the CPU; the demo shape (`--shape demo`) shows the cost where a step is cheapest.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine

import qwen3lab
from qwen3lab.infer import grammar, rows
from qwen3lab.infer.engine import Engine
from qwen3lab.infer.sampling import SamplingParams

# an order: long enough that rows keep generating, bounded so a random model's output ends
SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "minItems": 8,
            "maxItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 999},
                    "size": {"enum": ["S", "M", "L", "XL"]},
                },
                "required": ["name", "qty", "size"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}


def run(model, prompts, new_tokens: list[int], constraint) -> tuple[float, list[int]]:
    """Seconds, and tokens per row, for the prompts generated together, each row with its own seed and budget."""
    engine = Engine(model, max_batch=len(prompts), capacity=256)
    counts = [0] * len(prompts)
    for i, (ids, budget) in enumerate(zip(prompts, new_tokens, strict=True)):

        def emit(kind, value, i=i):
            counts[i] += kind == "token"

        params = SamplingParams(max_new_tokens=budget, temperature=1.0, seed=i, stop_ids=[], constraint=constraint)
        engine.submit(ids, params, emit)
    t = time.perf_counter()
    engine.run_until_idle()
    return time.perf_counter() - t, counts


class MaskClock:
    """Time spent in rows.constrain (the masks), and how many row-steps it handled."""

    def __init__(self):
        self.seconds, self.rows, self.original = 0.0, 0, rows.constrain

    def __call__(self, requests, logits):
        t = time.perf_counter()
        out = self.original(requests, logits)
        self.seconds += time.perf_counter() - t
        self.rows += sum(r.matcher is not None for r in requests)
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    print(machine())
    torch.manual_seed(0)
    model = qwen3lab.new_model(qwen3lab.preset(args.shape), seed=0).eval()
    tok = qwen3lab.load_tokenizer()
    t = time.perf_counter()
    held = grammar.Constraint(tok, grammar.json_schema(SCHEMA), model.config.vocab_size)
    print(f"{args.shape}, fp32; the grammar's tokenizer and the schema compiled in {time.perf_counter() - t:.2f} s")
    clock = MaskClock()
    rows.constrain = clock
    for n in (int(x) for x in args.rows.split(",")):
        prompts = [tok.encode(f"Order {i}: write it as JSON.") for i in range(n)]
        run(model, prompts, [4] * n, held)  # warm-up, untimed
        clock.seconds = clock.rows = 0
        held_s, lengths = run(model, prompts, [args.tokens] * n, held)
        # the free rows generate as many tokens as the held ones did (a held row ends when its JSON does), so both
        # runs decode the same number of rows at every step
        free_s, _ = run(model, prompts, lengths, None)
        held_n = free_n = sum(lengths)
        free, constrained = free_n / free_s, held_n / held_s
        print(
            f"{n:3d} rows  free {free:7.1f} tok/s ({free_n} tokens)  JSON schema {constrained:7.1f} tok/s ({held_n} "
            f"tokens)  ratio {constrained / free:.2f}x  masks {1000 * clock.seconds / max(clock.rows, 1):.2f} ms "
            "per row and step",
            flush=True,
        )


if __name__ == "__main__":
    main()
