"""What a training run reports: metrics.jsonl (and TensorBoard / W&B when asked for), the loss plot, and the
progress bar or its plain-line stand-in."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import TrainConfig, train_config_dict


class Reporter:
    """metrics.jsonl always; TensorBoard / W&B when asked for and installed."""

    def __init__(self, out: Path, cfg: TrainConfig, resumed_step: int):
        self.path = out / "metrics.jsonl"
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
        rows = self._read()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / supervised token)")
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
