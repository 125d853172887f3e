"""GRPO on the CPU: trl's GRPOTrainer vs qwen3lab (`objective: grpo`) on the same model, prompts and settings.

    python bench/grpo.py [--steps 6] [--generations 8] [--prompts-per-step 4] [--completion 32]

Both run full fine-tuning of the same random small Qwen3 (real vocabulary, hidden 256, 4 layers, fp32, saved by
transformers with qwen3lab's tokenizer), on the same chat prompts, G completions each of --completion tokens at most
(temperature 1, no eos within reach of random weights: both sample the full length), loss dapo, beta 0, AdamW.
Each system runs in its own subprocess (peak RSS is per process); steps/s is taken after the first step (which
carries one-off setup for both). qwen3lab runs as `qwen3lab train` runs by default (--chunk sets `loss_chunk`).
Prints each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from common import SMALL_QWEN3, StepTimes, machine

SHAPE = SMALL_QWEN3 | {"num_hidden_layers": 4}


def setup(folder: Path, n_prompts: int) -> Path:
    import transformers

    import qwen3lab

    cfg = transformers.Qwen3Config(**SHAPE, bos_token_id=None, eos_token_id=151645)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(folder)
    qwen3lab.load_tokenizer().save(folder)
    rows = [
        {"prompt": [{"role": "user", "content": f"Reverse the digits of {1000 + 37 * i}."}], "answer": "x"}
        for i in range(n_prompts)
    ]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def length_mod3(prompts, completions, **_):
    return [float(len(c[-1]["content"]) % 3) for c in completions]  # varies, so advantages are not all 0


def run_trl(folder: Path, prompts: Path, args) -> dict:
    import datasets
    import transformers
    import trl

    class Stamp(transformers.TrainerCallback):
        def __init__(self):
            self.times = StepTimes()

        def on_step_end(self, *a, **k):
            self.times()

    stamp = Stamp()
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    trainer = trl.GRPOTrainer(
        model=str(folder),
        reward_funcs=length_mod3,
        args=trl.GRPOConfig(
            output_dir=str(folder / "trl"),
            per_device_train_batch_size=args.prompts * args.G,
            num_generations=args.G,
            max_completion_length=args.completion,
            max_steps=args.steps,
            learning_rate=1e-5,
            loss_type="dapo",
            beta=0.0,
            temperature=1.0,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1000,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(folder),
        callbacks=[stamp],
    )
    trainer.train()
    return {"steps_per_s": stamp.times.steps_per_s()}


def run_ours(folder: Path, prompts: Path, args) -> dict:
    import qwen3lab
    from qwen3lab.train.report import Reporter

    times = StepTimes()
    original = Reporter.log

    def log(self, metrics):
        times()
        original(self, metrics)

    Reporter.log = log
    grpo = {
        "num_generations": args.G,
        "max_completion_length": args.completion,
        "rewards": ["grpo:length_mod3"],
        "loss_type": "dapo",
    }
    cfg = {
        "model": str(folder),
        "out": str(folder / "ours"),
        "objective": "grpo",
        "data": {"train": str(prompts)},
        "steps": args.steps,
        "batch_size": args.prompts,
        "progress": False,
        "resume": False,
        "optim": {"lr": 1e-5},
        "grpo": grpo,
    } | ({"loss_chunk": args.chunk} if args.chunk else {})
    qwen3lab.train(cfg)
    return {"steps_per_s": times.steps_per_s()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--generations", dest="G", type=int, default=8)
    ap.add_argument("--prompts-per-step", dest="prompts", type=int, default=4)
    ap.add_argument("--completion", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=0, help="qwen3lab's loss_chunk (default: the config's)")
    ap.add_argument("--systems", default="trl,qwen3lab")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="/tmp/qwen3lab-bench-grpo")
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.one:  # a child process: one system, its result as the last line
        sys.path.insert(0, str(Path(__file__).parent))
        prompts = folder / "prompts.jsonl"
        if args.one == "trl":
            result = run_trl(folder, prompts, args)
        else:
            result = run_ours(folder, prompts, args)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    print(machine())
    print(
        f"GRPO, hidden 256 x 4 layers, real vocab, fp32; {args.prompts} prompts x G={args.G} per step, "
        f"{args.completion}-token completions, {args.steps} steps"
    )
    folder.mkdir(parents=True, exist_ok=True)
    setup(folder, args.prompts * args.steps)
    results = {}
    for name in args.systems.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--folder",
            str(folder),
            "--steps",
            str(args.steps),
            "--generations",
            str(args.G),
            "--prompts-per-step",
            str(args.prompts),
            "--completion",
            str(args.completion),
            "--chunk",
            str(args.chunk),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:9s} {r['steps_per_s']:.3f} steps/s  peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    theirs = results.get("trl")
    for name in [n for n in results if n != "trl" and theirs]:
        ours = results[name]
        print(
            f"{name} / trl: {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x steps/s, "
            f"{ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}x peak RSS"
        )


if __name__ == "__main__":
    main()
