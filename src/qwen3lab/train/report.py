"""What a training run reports: metrics.jsonl (and TensorBoard / W&B when asked for), the loss plot, and the
progress bar or its plain-line stand-in."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import TrainConfig, train_config_dict

# What each objective's plot shows: panels of (y label, [(metric, legend)]), what its users watch.
PANELS = {
    "sft": [("loss (nats / supervised token)", [("loss", "train"), ("eval_loss", "eval")])],
    "dpo": [
        ("DPO loss (nats / pair)", [("loss", "train"), ("eval_loss", "eval")]),
        (
            "implicit reward (nats)",
            [
                ("rewards/margins", "margin: chosen - rejected"),
                ("rewards/chosen", "chosen"),
                ("rewards/rejected", "rejected"),
            ],
        ),
        ("share of pairs", [("rewards/accuracies", "accuracy: chosen above rejected")]),
    ],
    "distill": [("divergence from the teacher (nats / learned token)", [("loss", "train"), ("eval_loss", "eval")])],
    "grpo": [
        ("reward (sampled completions)", [("reward", "mean"), ("reward_std", "std")]),
        ("tokens", [("completion_length", "completion length")]),
    ],
}


class Reporter:
    """metrics.jsonl always; TensorBoard / W&B when asked for and installed."""

    def __init__(self, out: Path, cfg: TrainConfig, resumed_step: int):
        self.path, self.objective = out / "metrics.jsonl", cfg.objective
        if resumed_step == 0:
            self.path.unlink(missing_ok=True)
        else:  # drop lines past the checkpoint, which the resumed run writes again
            kept = [ln for ln in self._read() if ln.get("step", 0) <= resumed_step]
            self.path.write_text("".join(json.dumps(ln) + "\n" for ln in kept))
        self.sinks = []
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
            self.sinks.append(lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items() if k != "step"])
        if "wandb" in cfg.report_to:
            import wandb

            wandb.init(project="qwen3lab", config=train_config_dict(cfg), dir=str(out))
            self.sinks.append(lambda m: wandb.log(m, step=m["step"]))

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for sink in self.sinks:
            sink(metrics)

    def plot(self, png: Path) -> None:
        """The objective's panels side by side (PANELS), each in its own units."""
        rows = self._read()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = PANELS[self.objective]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (ylabel, series) in zip(axes[0], panels, strict=True):
            for key, legend in series:
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), "o-" if key.startswith("eval") else "-", label=legend)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)


class Progress:
    """A live bar on a terminal. Elsewhere (a log file, CI, nohup) one plain line every ~5% of the run, where a bar
    would write two carriage-return updates per step into a single line."""

    def __init__(self, total: int, initial: int):
        self.total, self.start, self.t0 = total, initial, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
        self.every = max(1, total // 20)

    def update(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
            self.bar.update(1)
            return
        step = m["step"]
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / (step - self.start) * (self.total - step)
        print(
            f"train step {step}/{self.total}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
            f"tok/s {m['tokens_per_s']:.0f}  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the loop ----
