"""Distillation on the CPU: trl's GKDTrainer vs qwen3lab (`objective: distill`), same teacher, student and data.

    python bench/distill.py [--steps 8] [--batch 8] [--new-tokens 32] [--lmbda 0,0.5]

The teacher is a random Qwen3 of hidden 512 x 4 layers, the student hidden 256 x 4 (both the real 151,936 vocabulary,
tied embeddings, fp32, saved by transformers with qwen3lab's tokenizer; the teacher's embedding scaled up so that its
distributions are peaked, as a trained model's are). The data: single-turn chats of one token length (trl's forward
takes positions 0..T-1 under its left padding, so rows of one length make both see the same positions), each cut after
its last learned token so that both learn the same tokens. Full fine-tuning, AdamW, beta 0.5, temperature 1;
on-policy completions of --new-tokens tokens at most. Each system runs in its own subprocess (peak RSS is per
process); steps/s is taken after the first step. With lmbda 0 both first steps are off-policy on the same batch:
their losses are printed side by side.
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

STUDENT = SMALL_QWEN3 | {"num_hidden_layers": 4}
TEACHER = STUDENT | {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4}


def setup(folder: Path, n: int) -> None:
    import transformers

    import qwen3lab

    tok = qwen3lab.load_tokenizer()
    for name, shape, seed in (("student", STUDENT, 0), ("teacher", TEACHER, 1)):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, bos_token_id=None, eos_token_id=151645))
        if name == "teacher":
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(4)
        model.save_pretrained(folder / name)
        tok.save(folder / name)
    by_length = {}  # chats of one tokenized length, each cut after its last learned token
    for i in range(20 * n):
        messages = [
            {"role": "user", "content": f"Reverse the digits of {1000 + 37 * i}."},
            {"role": "assistant", "content": str(1000 + 37 * i)[::-1]},
        ]
        enc = tok.encode_chat(messages)
        learned = [t for t, m in enumerate(enc.assistant_mask) if m]
        by_length.setdefault(len(enc.input_ids), []).append((enc.input_ids[: learned[-1] + 1], learned[0], messages))
    chats = max(by_length.values(), key=len)[:n]
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for *_, m in chats))
    trl_rows = [  # the prompt's text is read by trl's collator, the boundary taken from completion_mask
        {
            "input_ids": ids,
            "completion_mask": [int(t >= start) for t in range(len(ids))],
            "prompt": tok.decode(ids[:start]),
        }
        for ids, start, _ in chats
    ]
    (folder / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows))


def run_trl(folder: Path, args, lmbda: float) -> dict:
    import datasets
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Stamp(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.losses = StepTimes(), []

        def on_step_end(self, *a, **k):
            self.times()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    stamp = Stamp()
    rows = [json.loads(line) for line in (folder / "trl.jsonl").read_text().splitlines()]
    trainer = GKDTrainer(
        model=str(folder / "student"),
        teacher_model=str(folder / "teacher"),
        args=GKDConfig(
            output_dir=str(folder / "trl"),
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            lmbda=lmbda,
            beta=0.5,
            temperature=1.0,
            max_new_tokens=args.new_tokens,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            dataloader_drop_last=True,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(folder / "student"),
        callbacks=[stamp],
    )
    trainer.train()
    return {"steps_per_s": stamp.times.steps_per_s(), "first_loss": stamp.losses[0]}


def run_ours(folder: Path, args, lmbda: float) -> dict:
    import qwen3lab
    from qwen3lab.train.report import Reporter

    times, losses = StepTimes(), []
    original = Reporter.log

    def log(self, metrics):
        times()
        losses.append(metrics["loss"])
        original(self, metrics)

    Reporter.log = log
    cfg = {
        "model": str(folder / "student"),
        "out": str(folder / f"ours-{lmbda}"),
        "objective": "distill",
        "data": {"train": str(folder / "chats.jsonl"), "packing": False},
        "steps": args.steps,
        "batch_size": args.batch,
        "progress": False,
        "resume": False,
        "optim": {"lr": 1e-4, "schedule": "constant"},
        "distill": {
            "teacher": str(folder / "teacher"),
            "lmbda": lmbda,
            "beta": 0.5,
            "temperature": 1.0,
            "max_new_tokens": args.new_tokens,
        },
    }
    qwen3lab.train(cfg)
    return {"steps_per_s": times.steps_per_s(), "first_loss": losses[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--lmbda", default="0,0.5")
    ap.add_argument("--systems", default="trl,qwen3lab")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="/tmp/qwen3lab-bench-distill")
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.one:  # a child process: one system at one lmbda, its result as the last line
        name, lmbda = args.one.split(":")
        result = (run_trl if name == "trl" else run_ours)(folder, args, float(lmbda))
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    print(machine())
    print(
        f"distillation: teacher hidden 512 x 4, student 256 x 4, real vocab, fp32; {args.batch} chats a step, "
        f"beta 0.5, on-policy completions of {args.new_tokens} tokens at most, {args.steps} steps"
    )
    folder.mkdir(parents=True, exist_ok=True)
    setup(folder, args.batch)
    for lmbda in args.lmbda.split(","):
        results = {}
        for name in args.systems.split(","):
            cmd = [sys.executable, __file__, "--one", f"{name}:{lmbda}", "--folder", str(folder)]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"lmbda {lmbda} {name:8s} {r['steps_per_s']:.3f} steps/s  peak RSS {r['peak_rss_gib']:.2f} GiB  "
                f"first-step loss {r['first_loss']:.6f}",
                flush=True,
            )
        if "trl" in results and "qwen3lab" in results:
            ours, theirs = results["qwen3lab"], results["trl"]
            print(
                f"lmbda {lmbda} qwen3lab / trl: {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x steps/s, "
                f"{ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}x peak RSS"
            )


if __name__ == "__main__":
    main()
