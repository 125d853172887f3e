"""The flagship at its real size: Qwen3-4B-Base LoRA SFT on this machine, then generation from the export.

    python bench/flagship.py [--dir /tmp/qwen3lab-4b] [--max-length 1024] [--steps 2]

1. A random-weight Qwen3-4B-Base checkpoint (bf16, 3 safetensors shards, made by qwen3lab.save_model, with the
   tokenizer and the patched template) in --dir, made once and reused.
2. `qwen3lab train configs/qwen3-4b-lora.yaml` on it (LoRA rank 16 on every linear layer, the ChatML token rows
   trained, activation checkpointing) with packed rows of --max-length tokens, batch 1: seconds per step and the
   peak RSS of the whole process (load, steps, merge, export).
3. `qwen3lab generate` from the exported model: load time, tokens/s and the peak RSS.
Each stage is its own process, so each peak RSS is its own. Goal: runs on a 24 GiB, 2-core machine with <= 14 GiB.
`--bits 4`: first `configs/qwen3-4b-qlora.yaml` (the base in NF4) at rows of 2,048 tokens, goal <= 5 GiB, then the
bf16-base run at the same length for the steps/s ratio; generation reads the 4-bit run's export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine, synthetic_conversations

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(folder: Path) -> None:
    import torch

    import qwen3lab

    t0 = time.perf_counter()
    model = qwen3lab.new_model(qwen3lab.preset("qwen3-4b-base"), dtype=torch.bfloat16, seed=0)
    qwen3lab.save_model(model, folder, max_shard_size="3GB")
    qwen3lab.load_tokenizer().save(folder)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    print(f"made {folder}: {', '.join(files)} in {time.perf_counter() - t0:.0f} s")


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a stage in its own process: (wall seconds, its peak RSS in GiB)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 2**20


def train_stage(config: str, ckpt: Path, data: Path, out: Path, args):
    """`qwen3lab train CONFIG` on the checkpoint in its own process: (wall s, peak RSS GiB, s per step, metrics)."""
    train = [sys.executable, "-m", "qwen3lab", "train", config, "--model", str(ckpt), "--data.train", str(data)]
    train += ["--data.max_length", str(args.max_length), "--data.eval_fraction", "0", "--batch_size", "1"]
    train += ["--grad_accum", "1", "--steps", str(args.steps), "--out", str(out), "--resume", "false"]
    train += ["--progress", "false"]
    log = out.parent / f"train{'-4bit' if '-4bit' in out.name else ''}.log"
    wall, rss = run(train, log)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [b["elapsed"] - a["elapsed"] for a, b in zip([{"elapsed": 0.0}] + metrics, metrics, strict=False)]
    return wall, rss, step_s, metrics


def report(name: str, args, wall, rss, step_s, metrics, log: Path, goal: float) -> None:
    said = [ln for ln in log.read_text().splitlines() if "weights " in ln or "attention:" in ln or "dtype" in ln]
    print("\n".join(said))
    tokens = metrics[-1]["tokens"] / len(metrics)
    print(
        f"{name} SFT, Qwen3-4B-Base, rows of {args.max_length} tokens ({tokens:.0f} real tokens/step): "
        f"steps {', '.join(f'{s:.1f}' for s in step_s)} s; whole run {wall:.0f} s (load, steps, merge, export); "
        f"peak RSS {rss:.2f} GiB (goal <= {goal})"
    )
    print(f"losses {[round(m['loss'], 4) for m in metrics]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/qwen3lab-4b", help="where the random checkpoint and the run go")
    ap.add_argument("--max-length", type=int, default=None, help="default: 1024; 2048 with --bits 4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--bits", type=int, choices=(16, 4), default=16, help="4: QLoRA, then the bf16-base run beside it")
    ap.add_argument("--make-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoint:
        make_checkpoint(Path(args.make_checkpoint))
        return
    args.max_length = args.max_length or (2048 if args.bits == 4 else 1024)
    print(machine())
    work = Path(args.dir)
    ckpt, out = work / "Qwen3-4B-Base-random", work / "run"  # generation reads the last run's export
    work.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "model.safetensors.index.json").is_file():
        wall, rss = run([sys.executable, __file__, "--make-checkpoint", str(ckpt)], work / "make.log")
        print((work / "make.log").read_text().strip().splitlines()[-1] + f" (peak RSS {rss:.2f} GiB)")
    data = work / "chats.jsonl"
    with open(data, "w") as f:
        for conv in synthetic_conversations(400, seed=0):
            f.write(json.dumps({"messages": conv}) + "\n")

    if args.bits == 4:
        out = work / "run-4bit"
        q_wall, q_rss, q_steps, q_metrics = train_stage("configs/qwen3-4b-qlora.yaml", ckpt, data, out, args)
        report("QLoRA (4-bit base)", args, q_wall, q_rss, q_steps, q_metrics, work / "train-4bit.log", goal=5)
    wall, rss, steps, metrics = train_stage("configs/qwen3-4b-lora.yaml", ckpt, data, work / "run", args)
    report("LoRA (bf16 base)", args, wall, rss, steps, metrics, work / "train.log", goal=14)
    if args.bits == 4:
        ratio = (sum(steps[1:]) / max(len(steps) - 1, 1)) / (sum(q_steps[1:]) / max(len(q_steps) - 1, 1))
        print(f"4-bit / bf16 base: steps/s {ratio:.2f}x (steps after the first), peak RSS {q_rss / rss:.2f}x")

    gen = [
        sys.executable,
        "-m",
        "qwen3lab",
        "generate",
        "--model",
        str(out / "model"),
        "--prompt",
        "Hello, who are",
        "--max-new-tokens",
        str(args.new_tokens),
    ]
    wall_gen, rss_gen = run(gen, work / "generate.log")
    print(f"generate from the export: {wall_gen:.0f} s, {args.new_tokens} new tokens, peak RSS {rss_gen:.2f} GiB")
    print("  " + (work / "generate.log").read_text().strip().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
