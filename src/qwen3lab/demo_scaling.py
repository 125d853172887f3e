"""`qwen3lab demo --scaling`: a scaling law fitted on the demo's data in minutes on a CPU, then tested on a shape
it never saw.

Five small Qwen3 shapes (hidden 32 to 96 and 2 to 6 layers, heads of 16, an MLP of 3x hidden) x three learning
rates x two token budgets are one `qwen3lab sweep` (runs/demo-scaling/sweep.yaml: its trials run as processes, one
per core). `qwen3lab scaling` fits L(N, D) = E + A / N^alpha + B / D^beta to the best trial at each (N, D), and the
loss-optimal learning rate as a power law. A sixth, larger shape, held out of the fit, is then trained at the
learning rate the fit predicts for it — and at the grid's three, to see whether a grid search at that size would
have done better — and its measured eval loss is set against the prediction, at both budgets.

The loss is over every token of the chats, not the assistant's alone: the digits a user gives are unpredictable,
which is the law's irreducible E, while a deterministic answer's loss falls to zero, and learning an algorithm comes
in steps rather than as a power law.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from .demo import DEFAULT_TASKS, _tools, make_tasks, write_jsonl
from .sweep.report import load_report, report
from .sweep.runner import load_sweep, run_sweep
from .sweep.scaling import describe, plot, prediction, scaling, target_parameters

# (hidden size, layers). Narrow: a step's cost is mostly the 151,936-way softmax and lm_head, which grow with the
# width but not the depth, so depth buys parameters cheaply.
SHAPES = [(32, 2), (48, 3), (64, 4), (80, 5), (96, 6)]  # (hidden size, layers): width and depth grow together
HELD_OUT = (128, 8)  # 2.4x the parameters of the largest shape in the fit
LRS = [0.015, 0.03, 0.06]  # Muon's and AdamW's (muon_lr 0: the same rate); short runs want high rates
# the two token budgets: packed rows of 256 tokens, one per step (from ~150 steps on every shape here reaches the
# loss of the unpredictable digits, and size no longer shows)
STEPS = [30, 90]


def shape(hidden: int, layers: int) -> dict:
    """A Qwen3 shape at this width and depth: heads of 16, two query heads per KV head (one KV head for an odd
    number), MLP 3x the width."""
    heads = hidden // 16
    return {
        "hidden_size": hidden,
        "intermediate_size": 3 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2 if heads % 2 == 0 else 1,
        "head_dim": 16,
    }


def base_config(data: Path, seed: int) -> dict:
    return {
        "model": "demo",  # its tokenizer and template; model_config gives each trial its shape
        "seed": seed,
        "batch_size": 1,
        "log_every": 10,
        "data": {
            "train": str(data / "train.jsonl"),
            "eval": str(data / "eval.jsonl"),
            "max_length": 256,
            "pack_order": "shuffled",
            "assistant_only": False,
        },
        "optim": {"name": "muon", "muon_lr": 0.0, "warmup_steps": 5, "min_lr_ratio": 0.1},
    }


def write_sweep(folder: Path, parameters: dict, config: dict | None = None) -> Path:
    spec = {"base": "../base.yaml" if config else "base.yaml", "out": str(folder), "parameters": parameters}
    path = folder / "sweep.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec | ({"config": config} if config else {}), sort_keys=False))
    return path


def run_scaling_demo(
    out: str = "runs/demo-scaling",
    seed: int = 0,
    parallel: int = 0,
    shapes=tuple(SHAPES),
    held_out=HELD_OUT,
    lrs=tuple(LRS),
    steps=tuple(STEPS),
    n_train: int = 4000,
    n_eval: int = 15,
    bootstrap: int = 200,
    log=print,
) -> dict:
    """The sweep, the fit, the held-out shape at the predicted learning rate and at the grid's; returns the results."""
    t0, out_dir = time.perf_counter(), Path(out)
    train_set, held = make_tasks(n_train, n_eval, DEFAULT_TASKS, seed)
    write_jsonl(out_dir / "data" / "train.jsonl", ({"messages": e.messages} | _tools(e) for e in train_set))
    write_jsonl(out_dir / "data" / "eval.jsonl", ({"messages": e.messages} | _tools(e) for e in held))
    (out_dir / "base.yaml").write_text(yaml.safe_dump(base_config(out_dir / "data", seed), sort_keys=False))
    parallel = parallel or min(len(os.sched_getaffinity(0)), 8)
    parameters = {"model_config": [shape(*s) for s in shapes], "optim.lr": list(lrs), "steps": list(steps)}
    n = len(shapes) * len(lrs) * len(steps)
    log(
        f"sweep: {len(shapes)} shapes x {len(lrs)} learning rates x {len(steps)} token budgets = {n} trials, "
        f"{parallel} at a time"
    )
    run_sweep(load_sweep(write_sweep(out_dir, parameters)), parallel)
    report(out_dir)
    _, rows = load_report(out_dir)
    fit = scaling(rows, "minimize", "non_embedding", bootstrap)
    log(describe(fit, "eval_loss"))

    results = held_out_check(out_dir, fit, held_out, lrs, steps, parallel, log)
    results["seconds"] = time.perf_counter() - t0
    (out_dir / "scaling_results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"saved: {out_dir / 'scaling.png'}, {out_dir / 'report.png'}; done in {results['seconds']:.0f}s")
    return results


def held_out_check(out_dir: Path, fit: dict, held_out, lrs, steps, parallel: int, log) -> dict:
    """The held-out shape trained at the fit's learning rate at the largest budget (and at the grid's three, to
    compare), and at the smallest budget (where more of the loss is left to learn); prediction against measurement."""
    target = target_parameters(json.dumps(shape(*held_out)), out_dir)
    budgets = sorted(set(fit["points"]["D"]))  # tokens seen at each step budget (the same data, the same packing)
    pred, short = prediction(fit, target, budgets[-1]), prediction(fit, target, budgets[0])
    lr, short_lr = pred["optima"]["optim.lr"], short["optima"]["optim.lr"]
    log(describe(fit, "eval_loss", pred, f"hidden {held_out[0]}, {held_out[1]} layers"))
    rates = [lr, *[x for x in lrs if x != lr]]  # the fit's rate may be one of the grid's (an optimum at its edge)
    config = {"model_config": shape(*held_out), "steps": max(steps)}
    run_sweep(load_sweep(write_sweep(out_dir / "held-out", {"optim.lr": rates}, config)), parallel)
    config["steps"] = min(steps)
    run_sweep(load_sweep(write_sweep(out_dir / "held-out-short", {"optim.lr": [short_lr]}, config)), parallel)
    report(out_dir / "held-out")  # its table and plots, as the sweep's
    rows = load_report(out_dir / "held-out")[1]
    at_lr = next(r for r in rows if r["optim.lr"] == lr)
    grid = min((r for r in rows if r["optim.lr"] in lrs), key=lambda r: r["metric"])
    short_measured = load_report(out_dir / "held-out-short")[1][0]["metric"]
    measured, delta = at_lr["metric"], 100 * (at_lr["metric"] - pred["loss"]) / pred["loss"]
    short_delta = 100 * (short_measured - short["loss"]) / short["loss"]
    log(f"held-out shape: predicted eval loss {pred['loss']:.4f}, measured {measured:.4f} ({delta:+.1f}%)")
    gap = 100 * (measured - grid["metric"]) / grid["metric"]
    log(
        f"its learning rate from the fit {lr:.3g}: eval loss {measured:.4f}; the grid's best at that shape "
        f"{grid['optim.lr']:.3g}: {grid['metric']:.4f} ({gap:+.1f}% for the fit's)"
    )
    log(
        f"at the smallest budget ({min(steps)} steps, learning rate {short_lr:.3g}): predicted {short['loss']:.4f}, "
        f"measured {short_measured:.4f} ({short_delta:+.1f}%)"
    )
    marks = [(target, p["D"], p["loss"], "held-out shape, predicted") for p in (pred, short)]
    marks += [(target, p["D"], m, "held-out shape, measured") for p, m in ((pred, measured), (short, short_measured))]
    plot(fit, out_dir / "scaling.png", marks)
    return {
        "predicted": pred["loss"],
        "interval": pred["interval"],
        "measured": measured,
        "delta_percent": delta,
        "lr": lr,
        "grid_best": {"lr": grid["optim.lr"], "eval_loss": grid["metric"]},
        "tokens": {"predicted_at": pred["D"], "measured": at_lr["tokens"]},
        "smallest_budget": {"predicted": short["loss"], "measured": short_measured, "delta_percent": short_delta},
    }
