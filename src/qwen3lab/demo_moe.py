"""`qwen3lab demo --moe`: global-batch against micro-batch load balancing, on a tiny Qwen3 MoE trained from scratch.

The demo's tasks, two chats per micro-batch (the regime arXiv 2501.11873 describes: a micro-batch of a few
sequences, so micro-batch balancing asks every sequence to spread over all experts), 8 micro-batches per step.
The same run twice, `moe.balance: global` and `micro`; for each, held-out exact match, the eval loss, and where each
task's tokens go: the share of its expert selections per expert and layer (a heatmap), how much its busiest expert
takes (1 / experts: even), and the mutual information between task and expert, in bits (0: routing says nothing
about the task; log2(tasks): each task its own experts).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .demo import DEFAULT_TASKS, Example, _tools, accuracy, held_out_rows, make_tasks, write_jsonl


def run_moe_demo(out: str = "runs/demo-moe", steps: int = 200, seed: int = 0, coef: float = 0.01, log=print) -> dict:
    """Train the tiny MoE with global and with micro balancing; compare accuracy, loss and expert specialisation."""
    from . import load_model, load_tokenizer, train

    t0, out_dir, tok = time.perf_counter(), Path(out), load_tokenizer()
    train_set, held_out = make_tasks(4000, 50, DEFAULT_TASKS, seed)
    write_jsonl(out_dir / "data" / "train.jsonl", ({"messages": e.messages} | _tools(e) for e in train_set))
    write_jsonl(out_dir / "data" / "held_out.jsonl", held_out_rows(held_out))
    log(f"a Qwen3 MoE of 8 experts (2 per token) from scratch, {steps} steps of 8 micro-batches of 2 chats")
    results = {}
    for balance in ("global", "micro"):
        config = {
            "model": "demo-moe",
            "out": str(out_dir / balance),
            "seed": seed,
            "resume": False,
            "steps": steps,
            "batch_size": 2,
            "grad_accum": 8,
            "progress": False,
            "data": {"train": str(out_dir / "data" / "train.jsonl"), "packing": False, "eval_fraction": 0.02},
            "optim": {"name": "muon", "lr": 1e-3, "muon_lr": 2e-3, "warmup_steps": steps // 15},
            "moe": {"balance": balance, "aux_loss_coef": coef},
        }
        run = train(config)
        model = load_model(run / "model", dtype=torch.float32, device="cpu")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        shares = routing_shares(model, tok, held_out)
        results[balance] = {
            "accuracy": accuracy(model, tok, held_out),
            "eval_loss": metrics[-1]["eval_loss"],
            "aux_loss": metrics[-1]["aux_loss"],
            "task_expert_bits": mutual_information(shares),
            "busiest_expert_share": float(torch.stack(list(shares.values())).max(-1).values.mean()),
            "shares": {task: s.tolist() for task, s in shares.items()},
        }
        r = results[balance]
        log(
            f"{balance:6s} balancing: held-out exact match {sum(r['accuracy'].values()) / len(r['accuracy']):.0%}, "
            f"eval loss {r['eval_loss']:.4f}, a task's busiest expert takes {r['busiest_expert_share']:.0%} of its "
            f"selections (even: {1 / model.config.num_experts:.1%}), task-expert mutual information "
            f"{r['task_expert_bits']:.2f} bits (max {math.log2(len(shares)):.0f})"
        )
    results["seconds"] = time.perf_counter() - t0
    (out_dir / "moe_results.json").write_text(json.dumps(results, indent=2))
    plot_routing(out_dir / "experts.png", {b: results[b]["shares"] for b in ("global", "micro")})
    log(f"saved: {out_dir / 'experts.png'} (where each task's tokens go, per layer); done in {results['seconds']:.0f}s")
    return results


@torch.no_grad()
def routing_shares(model, tok, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Per task: the share of its tokens' expert selections per layer and expert [layers, E], over the last
    exchange of each held-out chat (its question and answer)."""
    from .train.balance import RouterLogits, selections

    router = RouterLogits(model)
    router.counting = True
    model.eval()
    shares = {}
    for task in dict.fromkeys(ex.task for ex in examples):
        counts = torch.zeros(len(router.blocks), model.config.num_experts)
        for ex in (e for e in examples if e.task == task):
            ids = tok.encode_chat(ex.messages, tools=ex.tools).input_ids
            start = len(tok.encode_chat(ex.messages[:-2], tools=ex.tools, assistant_mask=False).input_ids)
            model(torch.tensor([ids]))
            counts += torch.stack([selections(x[start:], router.top_k) for x in router.take()])
        shares[task] = counts / counts.sum(-1, keepdim=True)
    router.remove()
    return shares


def mutual_information(shares: dict[str, torch.Tensor]) -> float:
    """I(task; expert) in bits, tasks weighted equally, averaged over layers."""
    p = torch.stack(list(shares.values())) / len(shares)  # [tasks, layers, E]: joint of task and expert, per layer
    p_task, p_expert = p.sum(-1, keepdim=True), p.sum(0, keepdim=True)
    terms = torch.where(p > 0, p * (p / (p_task * p_expert)).log2(), torch.zeros_like(p))
    return float(terms.sum((0, 2)).mean())


def plot_routing(png: Path, by_balance: dict[str, dict[str, list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(by_balance.values())))
    layers = len(next(iter(by_balance.values()))[tasks[0]])
    top = max(max(max(row) for row in shares[t]) for shares in by_balance.values() for t in tasks)  # one scale
    fig, axes = plt.subplots(layers, 2, figsize=(10, 1.7 * layers + 1), squeeze=False, layout="constrained")
    for col, (balance, shares) in enumerate(by_balance.items()):
        for layer in range(layers):
            ax = axes[layer][col]
            grid = [shares[t][layer] for t in tasks]  # [tasks, E]
            image = ax.imshow(grid, vmin=0, vmax=top, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(tasks)), tasks)
            ax.set_xticks(range(len(grid[0])))
            ax.set_title(f"{balance} balancing, layer {layer}", fontsize=9)
    axes[-1][0].set_xlabel("expert")
    axes[-1][1].set_xlabel("expert")
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of the task's expert selections (even: 1 / experts)")
    fig.savefig(png, dpi=110)
    plt.close(fig)
