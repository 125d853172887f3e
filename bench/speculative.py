"""Speculative decoding: batch-1 greedy decode with and without (`--speculate K` drafts a step), by prompt lookup
and, with `--draft-layers N` (or `--draft-model DIR`), by a draft model; the same weights and prompts; the outputs
must be identical, and the tokens/s are compared.

    python bench/speculative.py [--shape qwen3-0.6b | --model runs/demo/model] [--tokens 128] [--speculate 4]
                                [--draft-layers 4 | --draft-model DIR | --train-pair DIR]

`--draft-layers N` makes the draft from the model itself: a Qwen3 of its first N layers, its final norm and its head
(a smaller Qwen3 with the same tokenizer, as a 0.6B drafts for a 4B; no second random model would agree with the
first about anything). `--train-pair DIR` trains a pair that has learned something, with `qwen3lab.train`, from
scratch on the bench's two edits (prompt and edited code), once (kept in DIR): a target of the --shape (0.6B: ~6 min
in bf16 autocast with AMX) and a 2-layer draft of hidden 256 (~30 s). Both learned the same text, so the draft agrees
with most tokens (83-95%): its numbers are the engine's gain where drafts are right, the ceiling a real pair (Qwen3-0.6B
for Qwen3-4B) reaches on its most predictable text.

The prompts are edit-style (a piece of code, then "give it back with one change"): where the model's answer copies
the prompt, lookup finds the drafts and most are accepted. A random-weight model copies nothing: its numbers say what
a step costs and how much of its own (looping) greedy output is found again, not what an edit gains; `--model` runs
a trained model on the same prompts. Also printed: the time of one forward over 1..K+1 positions, which bounds the
gain (K+1 tokens a step at best, for that forward's cost). fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import machine

import qwen3lab
from qwen3lab.infer.cache import DecodeLayer
from qwen3lab.infer.engine import Engine
from qwen3lab.infer.sampling import SamplingParams

TEXT = (
    "def total_price(items, tax_rate, discount=None):\n"
    "    subtotal = 0\n"
    "    for item in items:\n"
    "        if item.quantity <= 0:\n"
    '            raise ValueError(f"{item.name}: quantity must be positive")\n'
    "        subtotal += item.price * item.quantity\n"
    "    if discount is not None:\n"
    "        subtotal -= subtotal * discount.rate\n"
    "    tax = subtotal * tax_rate\n"
    "    return round(subtotal + tax, 2)\n"
    "\n"
    "\n"
    "def receipt(items, tax_rate):\n"
    '    lines = [f"{item.name:<20}{item.quantity:>4} x {item.price:>8.2f}" for item in items]\n'
    "    lines.append(f\"{'total':<20}{total_price(items, tax_rate):>17.2f}\")\n"
    '    return "\\n".join(lines)\n'
)
EDIT_PROMPTS = [
    [{"role": "user", "content": f"Rename subtotal to net in this code and give the whole code back:\n\n{TEXT}"}],
    [{"role": "user", "content": f"Add a docstring to total_price; keep the rest as it is:\n\n{TEXT}"}],
]

EDITS = [  # the answers --train-pair's models learn
    TEXT.replace("subtotal", "net"),
    TEXT.replace(
        "discount=None):\n",
        'discount=None):\n    """The price of the items with tax: the sum of price times quantity, plus its tax."""\n',
    ),
]
DRAFT_SHAPE = {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 768, "num_attention_heads": 4,
               "num_key_value_heads": 2}  # fmt: skip


def train_pair(folder: Path, shape: str) -> tuple[Path, Path]:
    """A target of `shape` and a small draft, trained from scratch on the same edits (once; kept in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "edits.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": m + [{"role": "assistant", "content": a}]}) + "\n"
            for m, a in zip(EDIT_PROMPTS, EDITS, strict=True)
        )
    )
    for name, reshape, steps, lr in (("target", {}, 40, 3e-4), ("draft", DRAFT_SHAPE, 60, 1e-3)):
        if (folder / name / "model" / "config.json").exists():
            continue
        qwen3lab.train(
            {
                "model": shape, "model_config": reshape, "out": str(folder / name), "steps": steps, "batch_size": 2,
                "precision": "bf16", "resume": False, "progress": False, "log_every": 10,
                "data": {"train": str(data), "packing": False, "max_length": 512, "eval_fraction": 0.0},
                "optim": {"name": "adamw", "lr": lr, "warmup_steps": 3, "weight_decay": 0.0},
            }
        )  # fmt: skip
    return folder / "target" / "model", folder / "draft" / "model"


def decode(model, ids, tokens: int, speculate: int, draft=None) -> tuple[list[int], float, Engine]:
    engine = Engine(model, max_batch=1, capacity=len(ids) + tokens + 8, speculate=speculate, draft_model=draft)
    out = []
    engine.submit(ids, SamplingParams(max_new_tokens=tokens), lambda kind, v: out.append(v) if kind == "token" else 0)
    engine.step()  # the prefill, untimed
    t = time.perf_counter()
    engine.run_until_idle()
    return out, time.perf_counter() - t, engine


def forward_costs(model, k: int, context: int = 256) -> list[float]:
    """Seconds for one forward of 1..k+1 positions after `context` cached ones, at batch 1 (a check step's cost)."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, context + k + 1, cfg.head_dim)
    keys, values = torch.zeros(shape), torch.zeros(shape)
    costs = []
    with torch.inference_mode():
        for T in range(1, k + 2):
            positions = torch.arange(context, context + T)[None]
            end = context + T
            layers = [DecodeLayer(a[:, :, :end], b[:, :, :end], positions) for a, b in zip(keys, values, strict=True)]
            times = []
            for _ in range(4):
                t = time.perf_counter()
                hidden = model(torch.ones(1, T, dtype=torch.long), positions, return_hidden=True, kv_cache=layers)
                model.lm_head(hidden[0]).float()
                times.append(time.perf_counter() - t)
            costs.append(min(times[1:]))
    return costs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--model", default=None, help="an HF folder (a trained model) instead of random weights")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=0, help="a draft model of the model's first N layers")
    ap.add_argument("--draft-model", default=None, help="an HF folder: the draft model")
    ap.add_argument("--train-pair", default=None, help="a folder: a target and a draft trained on the edits, once")
    args = ap.parse_args()
    print(machine())
    if args.train_pair:
        args.model, args.draft_model = map(str, train_pair(Path(args.train_pair), args.shape))
    tok = qwen3lab.load_tokenizer(args.model) if args.model else qwen3lab.load_tokenizer()
    if args.model:
        model, name = qwen3lab.load_model(args.model, dtype="float32"), args.model
    else:
        model, name = qwen3lab.new_model(qwen3lab.preset(args.shape), seed=0).eval(), args.shape
    draft = None
    if args.draft_model:
        draft = qwen3lab.load_model(args.draft_model, dtype="float32")
    elif args.draft_layers:
        draft = qwen3lab.new_model(replace(model.config, num_hidden_layers=args.draft_layers)).eval()
        own = draft.state_dict()
        draft.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})
    costs = forward_costs(model, args.speculate)
    print(
        f"{name}, fp32, batch 1; one forward of 1..{args.speculate + 1} positions: "
        + ", ".join(f"{1000 * c:.1f}" for c in costs)
        + " ms"
    )
    if draft is not None:
        draft_cost = forward_costs(draft, 0)[0]
        print(f"draft: {draft.config.num_hidden_layers} layers, one forward of 1 position {1000 * draft_cost:.1f} ms")
    total_plain = total_fast = total_draft = 0.0
    for messages in EDIT_PROMPTS:
        ids = tok.encode_chat(messages, add_generation_prompt=True, assistant_mask=False).input_ids
        plain, t_plain, _ = decode(model, ids, args.tokens, 0)
        fast, t_fast, engine = decode(model, ids, args.tokens, args.speculate)
        assert fast == plain, "speculative decoding changed the greedy output"
        total_plain, total_fast = total_plain + t_plain, total_fast + t_fast
        rate = engine.accepted_total / max(engine.drafted_total, 1)
        line = (
            f"prompt {len(ids):4d} tokens, {len(plain)} generated: plain {len(plain) / t_plain:6.1f} tok/s, "
            f"lookup {len(fast) / t_fast:6.1f} tok/s ({t_plain / t_fast:.2f}x); drafts accepted {rate:.0%} "
            f"({engine.accepted_total} of {engine.drafted_total})"
        )
        if draft is not None:
            drafted, t_draft, engine = decode(model, ids, args.tokens, args.speculate, draft)
            assert drafted == plain, "the draft model changed the greedy output"
            total_draft += t_draft
            rate = engine.accepted_total / max(engine.drafted_total, 1)
            line += f"; draft model {len(drafted) / t_draft:6.1f} tok/s ({t_plain / t_draft:.2f}x, {rate:.0%} kept)"
        print(line, flush=True)
    print(f"all prompts: lookup {total_plain / total_fast:.2f}x, outputs identical")
    if draft is not None:
        print(f"all prompts: draft model {total_plain / total_draft:.2f}x, outputs identical")


if __name__ == "__main__":
    main()
