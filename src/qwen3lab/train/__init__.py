"""Training: one loop (loop.py) over one step for every objective — SFT, DPO, GRPO (objectives/) — with the run
built once (build.py); data, batching, loss, optimizers, LoRA, FSDP2, checkpoints, export and reporting beside it."""

from .loop import train

__all__ = ["train"]
