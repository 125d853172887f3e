"""SFT throughput and memory: trl SFTTrainer(assistant_only_loss=True) vs qwen3lab, same CPU, data, shape, batch.

    python bench/sft.py [--steps 12] [--batch-size 8] [--max-length 512]

Each side runs in its own subprocess (so each peak RSS is its own), on the same random weights and the same
synthetic multi-turn chat set; the first --warmup steps are not timed. Shape: Qwen3 layout with the real 151,936
vocabulary, hidden 256, 4 layers, 4 heads / 2 KV heads, head_dim 64, intermediate 768, tied embeddings, fp32.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SMALL_QWEN3, machine, matmul_peak_flops, synthetic_conversations

SHAPE = SMALL_QWEN3 | {"num_hidden_layers": 4}


def prepare(folder: Path, n_conversations: int) -> None:
    """Random weights (saved by transformers), qwen3lab's tokenizer, and the chat data, in one folder."""
    import transformers

    import qwen3lab

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**SHAPE, bos_token_id=151643, eos_token_id=151643)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(folder / "model")
    qwen3lab.load_tokenizer().save(folder / "model")
    with open(folder / "chat.jsonl", "w") as f:
        for conv in synthetic_conversations(n_conversations, seed=1):
            f.write(json.dumps({"messages": conv}) + "\n")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_trl(folder: Path, args) -> dict:
    import datasets
    import transformers
    import trl

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter())

    real_tokens, positions = [], []  # per step: tokens of the data, and positions computed (padding too)

    def counting(collate):
        def inner(examples):
            batch = collate(examples)
            real_tokens.append(int(batch["attention_mask"].sum()))
            positions.append(batch["input_ids"].numel())
            return batch

        return inner

    timer = Timer()
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32),
        args=trl.SFTConfig(
            output_dir=str(folder / "trl"),
            assistant_only_loss=True,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            max_steps=args.steps,
            learning_rate=1e-4,
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
        ),
        train_dataset=datasets.load_dataset("json", data_files=str(folder / "chat.jsonl"), split="train"),
        processing_class=transformers.AutoTokenizer.from_pretrained(folder / "model"),
        callbacks=[timer],
    )
    trainer.data_collator = counting(trainer.data_collator)
    t0 = time.perf_counter()
    trainer.train()
    w = args.warmup
    elapsed = timer.times[-1] - (timer.times[w - 1] if w else t0)
    real = sum(real_tokens[w : args.steps])
    # trl runs the whole model, lm_head included, on every position of the padded batch
    flops = {"body": sum(positions[w : args.steps]) / real, "head": sum(positions[w : args.steps]) / real}
    return {"tokens_per_s": real / elapsed, "peak_rss_gib": peak_rss_gib(), "positions_per_token": flops}


def run_qwen3lab(folder: Path, args) -> dict:
    import qwen3lab
    from qwen3lab.train.config import TrainConfig

    cfg = TrainConfig(
        model=str(folder / "model"), out=str(folder / "q3l"), steps=args.steps, batch_size=args.batch_size
    )
    cfg.data.train, cfg.data.max_length, cfg.optim.lr, cfg.progress = (
        str(folder / "chat.jsonl"),
        args.max_length,
        1e-4,
        False,
    )
    run = qwen3lab.train(cfg)
    from qwen3lab.train.data import load_tokenized

    data = load_tokenized(cfg.data.train, qwen3lab.load_tokenizer(folder / "model"), args.max_length, folder / "cache")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    w = args.warmup
    first = rows[w - 1] if w else {"tokens": 0, "elapsed": 0.0}
    last = rows[-1]
    # packed rows: the decoder on the data's tokens; lm_head (forward and backward) on the supervised ones only
    supervised = data.supervised_tokens() / int(data.lengths().sum())
    return {
        "tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"]),
        "peak_rss_gib": peak_rss_gib(),
        "positions_per_token": {"body": 1.0, "head": supervised},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--only", choices=["trl", "qwen3lab"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.only:  # a child process: one side, one JSON line
        fn = run_trl if args.only == "trl" else run_qwen3lab
        print("RESULT " + json.dumps(fn(Path(args.folder), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args.conversations)
        results = {}
        for side in ("trl", "qwen3lab"):
            cmd = [sys.executable, __file__, "--only", side, "--folder", tmp] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side] = json.loads(line[0][7:])

    body = 4 * (256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 768)  # the decoder's matmul weights
    head = 151936 * 256
    peak = matmul_peak_flops()
    print(f"# SFT, Qwen3 layout hidden 256 x 4 layers, vocab 151936, fp32, batch {args.batch_size} x {args.max_length}")
    print(
        f"# {args.steps} steps ({args.warmup} untimed); {machine()}; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    print("# utilisation: the FLOPs each system performs (6 x matmul weights per position it computes), per second,")
    print("# over the measured peak")
    flops = {}
    for side, r in results.items():
        p = r["positions_per_token"]
        flops[side] = 6 * (body * p["body"] + head * p["head"])  # per real token of the data
        print(
            f"{side:9} {r['tokens_per_s']:9.0f} real tokens/s   peak RSS {r['peak_rss_gib']:6.2f} GiB   "
            f"{flops[side] / 1e6:6.0f} MFLOP per token   utilisation {flops[side] * r['tokens_per_s'] / peak:6.1%}"
        )
    t, q = results["trl"], results["qwen3lab"]
    print(
        f"ratio qwen3lab / trl: tokens/s {q['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
        f"peak RSS {q['peak_rss_gib'] / t['peak_rss_gib']:.2f}x, "
        f"FLOPs per token {flops['qwen3lab'] / flops['trl']:.2f}x (no padding; lm_head on the supervised tokens only)"
    )


if __name__ == "__main__":
    main()
