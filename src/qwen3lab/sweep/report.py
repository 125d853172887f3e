"""`qwen3lab sweep report DIR`: every trial in one table — printed, and as report.csv and report.json — and
report.png: the metric against each varied key, a line per model size, each point the best trial at that value
(over the keys not on the axis)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .runner import all_trials, show_value

COLUMNS = ("parameters", "parameters_non_embedding", "tokens", "steps", "metric", "best", "seconds")


def load_report(out: str | Path) -> tuple[dict, list[dict]]:
    """The sweep's spec (sweep.json) and one flat row per trial, finished ones best first."""
    out = Path(out)
    if not (out / "sweep.json").is_file():
        raise FileNotFoundError(f"{out}: no sweep.json here; pass the out folder of a `qwen3lab sweep`")
    spec = json.loads((out / "sweep.json").read_text())
    rows = []
    for r in all_trials(out):
        row = {"trial": r["trial"], "status": r["status"]} | {k: r["keys"].get(k) for k in spec["parameters"]}
        rows.append(row | {c: r.get(c) for c in COLUMNS} | {"error": r.get("error")})
    sign = 1 if spec["direction"] == "minimize" else -1
    rows.sort(key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0), r["trial"]))
    return spec, rows


def report(out: str | Path) -> str:
    """Write report.csv, report.json and report.png into DIR; return the table as text."""
    out = Path(out)
    spec, rows = load_report(out)
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows)
    if any(r["metric"] is not None for r in rows):
        plot(spec, rows, out / "report.png")
    return table(spec, rows)


def table(spec: dict, rows: list[dict]) -> str:
    head = ["trial", "status", *spec["parameters"], "params (non-emb)", "tokens", spec["metric"], "best", "time"]
    cells = [
        [
            f"{r['trial']:03d}",
            r["status"],
            *[show_value(r[k], spec["parameters"][k]) for k in spec["parameters"]],
            _count(r["parameters_non_embedding"]),
            _count(r["tokens"]),
            _num(r["metric"]),
            _num(r["best"]),
            "-" if r["seconds"] is None else f"{r['seconds']:.0f}s",
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *cells]]
    failed = [f"trial {r['trial']:03d} failed: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n".join(lines + failed)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _count(x) -> str:
    if x is None:
        return "-"
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def plot(spec: dict, rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["metric"] is not None]
    keys = list(spec["parameters"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    sizes = sorted({r["parameters_non_embedding"] for r in done})
    pick = min if spec["direction"] == "minimize" else max
    for ax, key in zip(axes[0], keys, strict=True):
        by_size = key == "model_config" or len(sizes) == 1
        groups = [done] if by_size else [[r for r in done if r["parameters_non_embedding"] == n] for n in sizes]
        xs, labels = _axis(key, done, spec["parameters"][key])
        x_of = {id(r): x for r, x in zip(done, xs, strict=True)}
        for group in groups:
            best = {}
            for r in group:
                best[x_of[id(r)]] = pick(best.get(x_of[id(r)], r["metric"]), r["metric"])
            pts = sorted(best.items())
            label = None if by_size else _count(group[0]["parameters_non_embedding"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        elif key == "model_config" or (min(xs) > 0 and max(xs) / min(xs) >= 10):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels on the decades only
        ax.set_xlabel("non-embedding parameters" if key == "model_config" else key)
        ax.set_ylabel(f"{spec['metric']} (best at each value)")
        if not by_size:
            ax.legend(title="model size", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _axis(key: str, rows: list[dict], parameter: dict) -> tuple[list, list | None]:
    """Each row's x on key's panel, and tick labels for a key whose values are not numbers: the model's size for
    model_config, the value when numeric, else its place among the values."""
    if key == "model_config":
        return [r["parameters_non_embedding"] for r in rows], None
    values = [r[key] for r in rows]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return values, None
    order = sorted({show_value(v, parameter) for v in values})
    return [order.index(show_value(v, parameter)) for v in values], order


def compare_runs(runs: list[str], png: str) -> None:
    """`qwen3lab compare`: a table of runs' final metrics and one PNG overlaying their loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    print(f"{'run':32} {'steps':>6} {'loss':>8} {'eval_loss':>10} {'tokens/s':>9} {'time s':>8}")
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass run folders written by qwen3lab train")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        last = rows[-1]
        ev = [r["eval_loss"] for r in rows if "eval_loss" in r]
        print(
            f"{run:32} {last['step']:>6} {last['loss']:>8.4f} {ev[-1] if ev else float('nan'):>10.4f} "
            f"{last.get('tokens_per_s', float('nan')):>9.0f} {last.get('elapsed', float('nan')):>8.1f}"
        )
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=run)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"loss curves: {png}")
