"""A small Qwen3 MoE, qwen3lab against transformers' Qwen3MoeForCausalLM: one training step and batch-1 decode.

    python bench/moe.py [--rows 4] [--seq 512] [--steps 3] [--new-tokens 32] [--precision fp32|bf16]
                        [--supervised 1.0] [--hf eager,grouped_mm]

Shape: hidden 512, 8 layers, 8 / 4 heads of head_dim 64, 64 experts of intermediate 256, 8 per token (normalised),
the real 151,936 vocabulary, random fp32 weights saved once and loaded by both. Training: a batch of rows x seq
tokens cut into documents of 128, the last --supervised share of each learned (1.0: every next token, as in
pretraining; 0.5: prompt and completion halves, as in SFT), the load-balancing loss at 0.001 (transformers' per
forward; qwen3lab's per layer), backward and fused AdamW; the time is the fastest step after the first. --precision
bf16: bf16 autocast for both (decode: both load bf16 weights). transformers runs each of --hf's experts
implementations (batched_mm gathers a weight copy per token: out of memory here) and the fastest counts. Decode:
greedy, one prompt of 32 tokens. Each (system, task) runs in its own process, so each peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine

SHAPE = dict(
    vocab_size=151936,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    moe_intermediate_size=256,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    tie_word_embeddings=True,
    torch_dtype="float32",
)
COEF = 0.001
DOC = 128


def batch(rows: int, seq: int, supervised: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [rows, seq], qwen3lab's labels (the next token where learned, else -100) and transformers' (unshifted)."""
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[torch.arange(seq).remainder(DOC).expand(rows, seq) < round(DOC * (1 - supervised))] = -100
    labels[:, -1] = -100  # what transformers' shifted loss leaves out
    hf_labels = labels.roll(1, 1)  # transformers shifts: hf_labels[t + 1] is the target of position t
    hf_labels[:, 0] = -100
    return ids, labels, hf_labels


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_ours(folder: str, args) -> dict:
    import qwen3lab
    from qwen3lab.model.runtime import keep_freed_cpu_memory
    from qwen3lab.train.balance import RouterLogits, balance_loss
    from qwen3lab.train.loss import lm_loss_sum

    keep_freed_cpu_memory()  # as `qwen3lab train` does on CPUs
    model = qwen3lab.load_model(folder, dtype="float32", device="cpu").train()
    router = RouterLogits(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids, labels, _ = batch(args.rows, args.seq, args.supervised)

    def step():
        with autocast(args.precision):  # the head runs on the learned positions only (train/loss.py)
            loss_sum, n = lm_loss_sum(model(ids, return_hidden=True), model.lm_head.weight, labels, 256)
            lm = loss_sum / n
            total = lm + COEF * balance_loss(router.take(), router.top_k)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(lm)

    return _timed(step, args.steps)


def train_hf(folder: str, args, implementation: str) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, experts_implementation=implementation
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids, _, hf_labels = batch(args.rows, args.seq, args.supervised)

    def step():
        with autocast(args.precision):
            out = model(ids, labels=hf_labels, output_router_logits=True)
        out.loss.backward()  # its LM loss + router_aux_loss_coef x its balancing loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss - COEF * out.aux_loss)

    return _timed(step, args.steps)


def _timed(step, steps: int) -> dict:
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    best = min(times[1:]) if len(times) > 1 else times[0]
    return {"s": best, "loss": losses[0], "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def prompt() -> list[int]:
    return torch.randint(0, SHAPE["vocab_size"], (32,), generator=torch.Generator().manual_seed(1)).tolist()


@torch.no_grad()
def decode_ours(folder: str, new_tokens: int, dtype: torch.dtype) -> dict:
    import qwen3lab
    from qwen3lab.generate import generate

    model = qwen3lab.load_model(folder, dtype=dtype, device="cpu")
    tok = qwen3lab.load_tokenizer()
    generate(model, tok, prompt(), max_new_tokens=4, stop_ids=[])  # warm-up
    t0 = time.perf_counter()
    out = generate(model, tok, prompt(), max_new_tokens=new_tokens, stop_ids=[])
    return _decoded(out.ids, time.perf_counter() - t0)


@torch.no_grad()
def decode_hf(folder: str, new_tokens: int, implementation: str, dtype: torch.dtype) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, experts_implementation=implementation
    ).eval()
    ids = torch.tensor([prompt()])
    model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return _decoded(out[0, ids.shape[1] :].tolist(), time.perf_counter() - t0)


def _decoded(ids: list[int], seconds: float) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"s": seconds, "tok_s": len(ids) / seconds, "ids": ids, "rss_gib": rss}


def child(args) -> dict:
    system, task, folder = args.one
    if task == "train":
        return train_ours(folder, args) if system == "qwen3lab" else train_hf(folder, args, system)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if system == "qwen3lab":
        return decode_ours(folder, args.new_tokens, dtype)
    return decode_hf(folder, args.new_tokens, system, dtype)


def run(system: str, task: str, folder: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--one", system, task, folder]
    cmd += ["--rows", str(args.rows), "--seq", str(args.seq), "--steps", str(args.steps)]
    cmd += ["--new-tokens", str(args.new_tokens), "--precision", args.precision, "--supervised", str(args.supervised)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{system} {task}: failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}", flush=True)
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    what = f"{r['rows'] * r['seq'] / r['s']:,.0f} tok/s" if task == "train" else f"{r['tok_s']:.1f} tok/s"
    extra = f", loss {r['loss']:.5f}" if task == "train" else ""
    print(f"  {system:10s} {task:6s} {r['s']:7.2f} s  {what}  peak RSS {r['rss_gib']:.2f} GiB{extra}", flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--supervised", type=float, default=1.0, help="the learned share of each 128-token document")
    ap.add_argument("--hf", default="eager,grouped_mm", help="transformers' experts implementations to run")
    ap.add_argument("--tasks", default="train,decode")
    ap.add_argument("--one", nargs=3, metavar=("SYSTEM", "TASK", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(child(args) | {"rows": args.rows, "seq": args.seq}))
        return
    import qwen3lab

    print(machine())
    cfg = qwen3lab.ModelConfig(**SHAPE)
    print(f"shape: {cfg.num_parameters():,} parameters, {cfg.num_parameters(active=True):,} active per token")
    print(f"{args.precision}, {args.rows} x {args.seq} tokens, {args.supervised:.0%} of each document learned")
    implementations = args.hf.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "moe")
        qwen3lab.save_model(qwen3lab.new_model(cfg, seed=0), folder)
        results = {}
        for task in args.tasks.split(","):
            print(f"{task}:")
            for system in ("qwen3lab", *implementations):
                results[(system, task)] = run(system, task, folder, args)
    summary(results, implementations)


def summary(results: dict, implementations: list[str]) -> None:
    ours_t, ours_d = results.get(("qwen3lab", "train")), results.get(("qwen3lab", "decode"))
    hf_t = [(r["s"], s) for s in implementations if (r := results.get((s, "train")))]
    hf_d = [(r["s"], s) for s in implementations if (r := results.get((s, "decode")))]
    if ours_t and hf_t:
        best = results[(min(hf_t)[1], "train")]
        print(
            f"training: {best['s'] / ours_t['s']:.2f}x transformers' tokens/s (its fastest: {min(hf_t)[1]}), "
            f"peak RSS {ours_t['rss_gib'] / best['rss_gib']:.2f}x; first loss {ours_t['loss']:.6f} vs "
            f"{best['loss']:.6f} (goals >= 2x, <= 0.7x, equal)"
        )
    if ours_d and hf_d:
        best = results[(min(hf_d)[1], "decode")]
        same = "identical" if best["ids"] == ours_d["ids"] else "DIFFERENT"
        print(
            f"decode: {ours_d['tok_s'] / best['tok_s']:.2f}x transformers' tokens/s (its fastest: {min(hf_d)[1]}), "
            f"peak RSS {ours_d['rss_gib'] / best['rss_gib']:.2f}x; greedy tokens {same} (goal >= 1.5x)"
        )


if __name__ == "__main__":
    main()
