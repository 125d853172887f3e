"""What training applies to the single-device model from outside: activation checkpointing and FSDP2; and the
process around it: torchrun ranks and devices (torch.compile and the CPU allocator: model/runtime.py).

The model code knows nothing of these; each wraps the decoder blocks after the model is built.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cache, partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ..model.mlp import SparseMoeBlock


def apply_activation_checkpointing(model: nn.Module, offload: bool = False, mlp_tile: int = 0) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations: only each block's input
    is kept between the forward and the backward.

    offload: that kept input lives in host memory (pinned, copied asynchronously on CUDA) until the backward needs
    it. mlp_tile: the MLP of a row longer than this many tokens runs over tiles of it, each checkpointed apart, so
    the [tokens, intermediate] activations are never whole, in the forward or in the recompute (ALST's and
    Unsloth's "tiled MLP"). The wrappers' state-dict hooks drop their own prefix, so parameter names stay HF's.
    """
    layers = model.model.layers
    checkpoint_fn = _offloaded_checkpoint if offload else partial(checkpoint, use_reentrant=False)
    for i, block in enumerate(layers):
        if mlp_tile and not isinstance(block.mlp, SparseMoeBlock):  # experts: [tokens, k x moe_intermediate], small
            block.mlp = checkpoint_wrapper(block.mlp, checkpoint_fn=partial(_tiled, tile=mlp_tile))
        layers[i] = checkpoint_wrapper(block, checkpoint_fn=checkpoint_fn, preserve_rng_state=True)


def unwrap_activation_checkpointing(model: nn.Module) -> None:
    """Undo apply_activation_checkpointing, so module paths are HF's again (for export)."""
    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = block = getattr(block, "_checkpoint_wrapped_module", block)
        block.mlp = getattr(block.mlp, "_checkpoint_wrapped_module", block.mlp)


def _tiled(mlp: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """mlp(x) for x [B, T, hidden], B*T tokens at most `tile` at a time, each tile recomputed in the backward.

    Short rows run whole: the block's own checkpoint already covers them."""
    flat = x.reshape(-1, x.shape[-1])  # [B*T, hidden]
    if flat.shape[0] <= tile or not torch.is_grad_enabled():
        return mlp(x)
    pieces = [checkpoint(mlp, part, use_reentrant=False) for part in flat.split(tile)]
    return torch.cat(pieces).view_as(x)


def _offloaded_checkpoint(fn, *args, **kwargs):
    """A non-reentrant checkpoint whose saved inputs (the block's input; nothing else is saved) go to host memory.

    The checkpoint saves its inputs through the saved-tensor hooks in force when it is called, so these hooks see
    exactly the kept block inputs, and not the recompute's activations (saved under the checkpoint's own hooks)."""
    with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _to_host(t: torch.Tensor):
    """A CUDA tensor is copied to pinned host memory on a side stream, so compute goes on while it copies; a CPU
    tensor is copied too (nothing to gain, but the same path, which is what the CPU tests check)."""
    if t.device.type != "cuda":
        return t.device, t.clone()
    stream = _copy_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before the copy reads it
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # t's memory is not reused until the copy has read it
    return t.device, host


def _from_host(packed) -> torch.Tensor:
    device, host = packed
    if device.type != "cuda":
        return host
    torch.cuda.current_stream(device).wait_stream(_copy_stream(device))  # the offload copy has finished
    return host.to(device, non_blocking=True)


@cache
def _copy_stream(device: torch.device):
    return torch.cuda.Stream(device)


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
