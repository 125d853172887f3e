"""The demo's ablation: assistant-only loss vs loss on every token, packing vs padding, Muon vs AdamW, on the demo
task set.

    .venv/bin/python bench/demo_ablation.py [--steps N]

Same model, data, seed and step count in every arm; prints held-out exact match per task, training tokens/s and
wall time. Tokens/s counts every real (non-padding) token the model reads.
"""

import argparse
import json

from qwen3lab.demo import run_demo

ARMS = {  # name: (data settings, optimizer settings)
    "assistant-only, packed, Muon (default)": ({}, {}),
    "all tokens, packed, Muon": ({"assistant_only": False}, {}),
    "assistant-only, padded, Muon": ({"packing": False}, {}),
    "assistant-only, packed, AdamW": ({}, {"name": "adamw"}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: configs/demo.yaml's")
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args()
    results = {}
    for i, (name, (data_keys, optim_keys)) in enumerate(ARMS.items()):
        print(f"== {name}", flush=True)
        results[name] = run_demo(
            out=f"{args.out}/{i}", steps=args.steps, data_keys=data_keys, optim_keys=optim_keys, log=lambda *_: None
        )
    tasks = list(next(iter(results.values()))["after"])
    print(f"\n| arm | {' | '.join(tasks)} | mean | train tokens/s | train time |")
    print("|---" * (len(tasks) + 4) + "|")
    for name, r in results.items():
        acc = r["after"]
        cells = " | ".join(f"{acc[t]:.0%}" for t in tasks)
        mean = sum(acc.values()) / len(acc)
        print(f"| {name} | {cells} | {mean:.0%} | {r['tokens_per_s']:.0f} | {r['train_seconds']:.0f} s |")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
