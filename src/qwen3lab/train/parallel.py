"""What training applies to the single-device model from outside: activation checkpointing and FSDP2; and the
process around it: torchrun ranks and devices (torch.compile and the CPU allocator: model/runtime.py).

The model code knows nothing of these; each wraps the decoder blocks after the model is built.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations.

    The wrapper's state-dict hooks drop its own prefix, so parameter names stay HF's.
    """
    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def unwrap_activation_checkpointing(model: nn.Module) -> None:
    """Undo apply_activation_checkpointing, so module paths are HF's again (for export)."""
    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = getattr(block, "_checkpoint_wrapped_module", block)


# ---- data parallel: torchrun + FSDP2 ----


@dataclass
class Dist:
    """Where this process stands in a torchrun job; rank 0 of world 1 when run as a plain process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over ranks (in fp64, so token counts and loss sums stay exact)."""
        if self.world == 1:
            return list(values)
        return self.all_sum_tensor(torch.tensor(values, dtype=torch.float64)).tolist()

    def all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a CPU tensor over ranks."""
        if self.world == 1:
            return t
        on_device = t.to(_comm_device())
        dist.all_reduce(on_device)
        return on_device.cpu()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: str, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK), if there is one.

    GPUs talk over NCCL, CPU processes over gloo. A rank that dies or never arrives makes the others fail after
    `timeout_s` instead of waiting forever; torchrun also stops the whole job when one worker exits with an error.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, timeout=timedelta(seconds=timeout_s), device_id=dev if dev.type == "cuda" else None
            )
    return Dist(rank, world, local_rank), dev


def apply_fsdp(root: nn.Module, blocks: nn.ModuleList, bf16: bool) -> None:
    """FSDP2: shard every decoder block, then the root (embeddings, final norm, lm_head and whatever else is left).

    Each block's parameters are gathered just before it runs and freed after, gradients are reduce-scattered as
    they appear. With bf16 the gathered parameters and the compute are bf16, gradients are reduced in fp32 and the
    sharded master weights and Adam state stay fp32.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=mp, reshard_after_forward=_reshard_after_forward(i, len(blocks)))
    fully_shard(root, mp_policy=mp)


def _reshard_after_forward(i: int, n: int) -> bool:
    return i < n - 1  # the last block's parameters are needed again at once by the backward: keep them gathered


@contextlib.contextmanager
def gathered(root: nn.Module, blocks: nn.ModuleList):
    """Keep every FSDP2-sharded block gathered for a while, e.g. while generating: hundreds of one-token forwards
    would otherwise all-gather every block each time. The root's own parameters (embeddings, lm_head) are gathered
    by running inside the root's forward. Everything is sharded again on exit. A no-op without FSDP."""
    sharded = [b for b in blocks if isinstance(b, FSDPModule)]
    for b in sharded:
        b.set_reshard_after_forward(False, recurse=False)
        b.unshard()
    try:
        yield
    finally:
        for i, b in enumerate(sharded):
            b.set_reshard_after_forward(_reshard_after_forward(i, len(sharded)), recurse=False)
        reshard(root)


def reshard(root: nn.Module) -> None:
    """Shard every FSDP2 module under root again. A forward without backward leaves the root (and the last block)
    gathered, and while gathered a module's parameters are the gathered tensors: an optimizer built then would
    hold those instead of the shards."""
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
