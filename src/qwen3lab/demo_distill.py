"""`qwen3lab demo --distill`: strong-to-weak distillation on the demo's tasks, as Qwen3 made its small models.

The teacher is the demo's model (runs/demo/model, or this demo's from a run before, else trained first by `run_demo`);
the student has half its width (hidden 64) and starts from one random init. Three ways at one step budget and one
schedule (two stages: three quarters of the steps, then the last quarter at a lower rate): on the data alone (SFT);
on the teacher's distributions over the data's answers throughout (off-policy distillation, forward KL); and
off-policy first, then half on the student's own completions scored token by token by the teacher (reverse KL) in
the last stage. Held-out exact match of each, printed and plotted beside the teacher's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .demo import DEFAULT_TASKS, _fmt, _tools, accuracy, held_out_rows, make_tasks, run_demo, write_jsonl

STUDENT = {"hidden_size": 64, "intermediate_size": 192}  # the demo preset at half its width
ON_POLICY_STAGE = {"lmbda": 0.5, "beta": 1.0}  # half the micro-batches the student's own, reverse KL (LOG.md)
# each way's last stage: None trains on the data (SFT); else distillation's settings there (forward KL before it)
WAYS = {
    "SFT on the data": None,
    "off-policy distillation": {"lmbda": 0.0},
    "off-, then on-policy": ON_POLICY_STAGE,
}


def run_distill_demo(
    out: str = "runs/demo-distill",
    steps: int = 600,
    teacher: str | None = None,
    seed: int = 0,
    n_train: int = 4000,
    n_eval: int = 50,
    log=print,
) -> dict:
    """Distil the demo's model into a student of half its width three ways at one step budget; compare them."""
    from . import load_model, load_tokenizer, new_model, preset, save_model, train

    t0, out_dir, tok = time.perf_counter(), Path(out), load_tokenizer()
    for trained in ("runs/demo/model", out_dir / "teacher" / "model"):  # the demo's, or this demo's of a run before
        if teacher is None and Path(trained, "config.json").is_file():
            teacher = str(trained)
    if teacher is None:
        log("the teacher: the demo's model, trained first")
        teacher = run_demo(out=str(out_dir / "teacher"), seed=seed, n_train=n_train, n_eval=n_eval, log=log)["model"]
    train_set, held_out = make_tasks(n_train, n_eval, DEFAULT_TASKS, seed)  # the teacher's tasks (run_demo's sets)
    write_jsonl(out_dir / "data" / "train.jsonl", ({"messages": e.messages} | _tools(e) for e in train_set))
    write_jsonl(out_dir / "data" / "held_out.jsonl", held_out_rows(held_out))
    teacher_acc = accuracy(load_model(teacher, dtype=torch.float32, device="cpu"), tok, held_out)
    log(f"teacher {teacher} (hidden 128): held-out exact match {_fmt(teacher_acc)}")
    init = out_dir / "student-init"
    save_model(new_model(preset("demo", **STUDENT), seed=seed), init)
    tok.save(init)
    log(f"student: hidden 64, {steps} steps each way from one random init (the last quarter at a lower rate)")
    results = {"teacher": {"model": teacher, "accuracy": teacher_acc}}
    for i, (way, last) in enumerate(WAYS.items()):
        first_steps = steps * 3 // 4
        config = {
            "model": str(init),
            "out": str(out_dir / f"student-{i}"),
            "seed": seed,
            "resume": False,
            "batch_size": 2,
            "progress": False,
            "data": {"train": str(out_dir / "data" / "train.jsonl"), "max_length": 512, "pack_order": "shuffled"},
            "optim": {"name": "muon", "lr": 1e-3, "muon_lr": 2e-3, "warmup_steps": steps // 15},
            "stages": [
                {"name": "first", "steps": first_steps},
                {"name": "last", "steps": steps - first_steps, "optim": {"lr": 3e-4, "warmup_steps": 0}},
            ],
        }
        if last is not None:
            config |= {"objective": "distill", "distill": {"teacher": teacher, "beta": 0.0, "max_new_tokens": 64}}
            config["stages"][0]["distill"], config["stages"][1]["distill"] = {"lmbda": 0.0}, last
        started = time.perf_counter()
        run = train(config)
        acc = accuracy(load_model(run / "model", dtype=torch.float32, device="cpu"), tok, held_out)
        results[way] = {"accuracy": acc, "seconds": time.perf_counter() - started, "model": str(run / "model")}
        log(f"{way:24s} held-out exact match {_fmt(acc)}  ({results[way]['seconds']:.0f}s)")
    results["seconds"] = time.perf_counter() - t0
    (out_dir / "distill_results.json").write_text(json.dumps(results, indent=2))
    plot_ways(out_dir / "distill.png", {k: v["accuracy"] for k, v in results.items() if k != "seconds"})
    log(f"saved: {out_dir / 'distill.png'} (held-out exact match per task); done in {results['seconds']:.0f}s")
    return results


def plot_ways(png: Path, accuracies: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(accuracies.values())))
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    width = 0.8 / len(accuracies)
    for k, (name, acc) in enumerate(accuracies.items()):
        ax.bar([t + k * width for t in range(len(tasks))], [100 * acc[t] for t in tasks], width, label=name)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("a student of half the teacher's width, one step budget")
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=110)
    plt.close(fig)
