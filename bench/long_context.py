"""Long packed rows: one training step (forward + backward + chunked loss) on one row of 2,048-token documents.

    python bench/long_context.py [--lengths 4096,8192,16384,32768] [--doc 2048] [--steps 2]
    python bench/long_context.py --shape qwen3-4b --layers 4 [--lengths 32768]

Three paths on the same model, documents and labels (every token supervised):
  packed      one packed row, attention.py's auto backend (per-document causal SDPA on CPUs), no [T, T] tensor
  dense       one packed row with the dense [1, 1, T, T] document mask (the path before attention.py)
  separate    the same documents as T / doc separate rows of one batch (plain causal attention)
Each (path, T) runs in its own subprocess so each peak RSS is its own; the time is the fastest of --steps steps.
Shape: Qwen3 layout, real 151,936 vocabulary, hidden 256, 8 layers, 4 / 2 heads, head_dim 64, intermediate 768, fp32.

--shape qwen3-4b: Qwen3-4B-Base's width and vocabulary with --layers blocks, as `configs/qwen3-4b-qlora.yaml` trains
it: the decoder's linears in NF4, LoRA rank 16 on each, bf16 autocast where the CPU runs bf16 fast, every block
checkpointed, freed memory returned (the 4-bit default), one AdamW step. Runs with the MLP tiled (mlp_tile 4096) at
--layers and at half of it, and untiled at --layers: the difference between the depths is what one block costs
(its weights, adapters, optimizer state and kept input), from which the 36-block model's peak is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import SMALL_QWEN3, machine

SHAPE = SMALL_QWEN3 | {"num_hidden_layers": 8, "max_position_embeddings": 32768}


def one(path: str, T: int, doc: int, steps: int) -> dict:
    import qwen3lab
    from qwen3lab.model.runtime import keep_freed_cpu_memory
    from qwen3lab.train.loss import lm_loss_sum

    keep_freed_cpu_memory()  # as `qwen3lab train` does on CPUs
    model = qwen3lab.new_model(qwen3lab.ModelConfig(**SHAPE), seed=0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    pos = torch.arange(T).remainder(doc)[None]  # documents of `doc` tokens, positions restarting
    labels[pos.roll(-1, 1) == 0] = -100  # a document's last token has no next token in it
    model.attn_implementation = "dense" if path == "dense" else "auto"

    def step():
        if path == "separate":
            hidden = model(ids.view(-1, doc), return_hidden=True)
            loss, _ = lm_loss_sum(hidden, model.lm_head.weight, labels.view(-1, doc), 256)
        else:
            loss, _ = lm_loss_sum(model.forward_packed(ids, pos, True), model.lm_head.weight, labels, 256)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"path": path, "T": T, "s": min(times), "tok_s": T / min(times), "rss_gib": rss, "loss": losses[0]}


def one_4b(layers: int, T: int, tile: int, doc: int) -> dict:
    import qwen3lab
    from qwen3lab.model.runtime import cpu_bf16_is_fast, return_freed_cpu_memory
    from qwen3lab.train.config import LORA_TARGETS
    from qwen3lab.train.lora import apply_lora
    from qwen3lab.train.loss import lm_loss_sum
    from qwen3lab.train.parallel import apply_activation_checkpointing
    from qwen3lab.train.quant import quantize_linears

    return_freed_cpu_memory()  # cpu_memory: auto is lean for a 4-bit base
    cfg = qwen3lab.preset("qwen3-4b-base", num_hidden_layers=layers)
    model = qwen3lab.new_model(cfg, dtype=torch.bfloat16, seed=0)
    quantize_linears(model, LORA_TARGETS)
    apply_lora(model, 16, 32.0)
    apply_activation_checkpointing(model, mlp_tile=tile)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    pos = torch.arange(T).remainder(doc)[None]
    labels[pos.roll(-1, 1) == 0] = -100
    before = _rss_now()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_is_fast()):
        loss, n = lm_loss_sum(model.forward_packed(ids, pos, True), model.lm_head.weight, labels, 256)
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"layers": layers, "tile": tile, "T": T, "s": seconds, "before_gib": before, "rss_gib": peak}


def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def main_4b(args) -> None:
    """Depths L/2 and L tiled, L untiled, each in its own process; the 36-block peak extrapolated."""
    print(machine())
    T, L = int(args.lengths.split(",")[-1]), args.layers
    runs = {}
    for layers, tile in ((L // 2, 4096), (L, 4096), (L, 0)):
        cmd = [sys.executable, __file__, "--one-4b", str(layers), str(T), str(tile), "--doc", str(args.doc)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{layers} blocks, tile {tile}: failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        r = runs[(layers, tile)] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{layers} blocks of Qwen3-4B, T={T}, MLP {'tiles of ' + str(tile) if tile else 'whole'}: "
            f"{r['s']:.0f} s/step, {r['T'] / r['s']:.0f} tok/s, {r['before_gib']:.2f} GiB before the step, "
            f"{r['rss_gib']:.2f} GiB peak RSS",
            flush=True,
        )
    if (L // 2, 4096) in runs and (L, 4096) in runs:
        lo, hi = runs[(L // 2, 4096)], runs[(L, 4096)]
        per_block = (hi["rss_gib"] - lo["rss_gib"]) / (L - L // 2)
        kept = (hi["rss_gib"] - hi["before_gib"] - lo["rss_gib"] + lo["before_gib"]) / (L - L // 2)
        print(f"one block: {per_block:.3f} GiB of peak, of which {kept * 2**30 / T:.0f} bytes per token in the step")
        print(f"Qwen3-4B (36 blocks) at T={T}, extrapolated peak RSS: {hi['rss_gib'] + (36 - L) * per_block:.2f} GiB")
    if (L, 0) in runs and (L, 4096) in runs:
        whole, tiled = runs[(L, 0)], runs[(L, 4096)]
        print(
            f"tiled MLP at {L} blocks: peak {tiled['rss_gib']:.2f} vs {whole['rss_gib']:.2f} GiB whole, "
            f"time {tiled['s'] / whole['s']:.2f}x"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--doc", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dense-max", type=int, default=16384, help="longest T for the dense mask (32k: OOM on 24 GiB)")
    ap.add_argument("--shape", default="small", choices=("small", "qwen3-4b"))
    ap.add_argument("--layers", type=int, default=4, help="--shape qwen3-4b: blocks of the 4B model")
    ap.add_argument("--one", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--one-4b", nargs=3, type=int, metavar=("LAYERS", "T", "TILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_4b:
        print(json.dumps(one_4b(*args.one_4b, args.doc)))
        return
    if args.shape == "qwen3-4b":
        return main_4b(args)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.doc, args.steps)))
        return
    print(machine())
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {}
    for T in lengths:
        for path in ("packed", "dense", "separate"):
            if path == "dense" and T > args.dense_max:
                continue
            cmd = [sys.executable, __file__, "--one", path, str(T), "--doc", str(args.doc), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{path} T={T}: failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(path, T)] = r
            print(
                f"{path:9s} T={T:6d}  {r['s']:7.2f} s/step  {r['tok_s']:7.0f} tok/s  {r['rss_gib']:6.2f} GiB peak RSS"
                f"  loss {r['loss']:.5f}",
                flush=True,
            )
    print("\n| T | packed (attention.py) | dense mask | separate rows |\n|---|---|---|---|")
    for T in lengths:
        cells = []
        for path in ("packed", "dense", "separate"):
            r = results.get((path, T))
            cells.append(f"{r['s']:.1f} s, {r['rss_gib']:.2f} GiB" if r else "out of memory / not run")
        print(f"| {T:,} | " + " | ".join(cells) + " |")
    packed = {T: results[("packed", T)] for T in lengths if ("packed", T) in results}
    if len(packed) == len(lengths) and len(lengths) > 1:
        lo, hi = lengths[0], lengths[-1]
        print(f"\npacked {hi} peak RSS {packed[hi]['rss_gib']:.2f} GiB (goal <= 10)")
        if hi // 2 in packed:
            ratio = packed[hi]["rss_gib"] / packed[hi // 2]["rss_gib"]
            print(f"packed peak RSS {hi} / {hi // 2}: {ratio:.2f}x (goal <= 2.2)")
        print(f"packed tokens/s {hi} / {lo}: {packed[hi]['tok_s'] / packed[lo]['tok_s']:.0%} (goal >= 75%)")
        for T in lengths:
            if ("separate", T) in results:
                sep = results[("separate", T)]
                print(
                    f"T={T}: packed loss {packed[T]['loss']:.6f} vs separate {sep['loss']:.6f}; "
                    f"time packed / separate {packed[T]['s'] / sep['s']:.2f}x"
                )


if __name__ == "__main__":
    main()
