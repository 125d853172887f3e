"""What parallel.py applies from outside the model leaves its numbers and names unchanged; the CPU allocator switch."""

import os
import subprocess
import sys

import pytest
import torch

import qwen3lab
from qwen3lab.train import parallel
from qwen3lab.train.loss import lm_loss_sum
from qwen3lab.train.parallel import apply_activation_checkpointing, unwrap_activation_checkpointing


def loss_and_grads(model, ids):
    loss, n = lm_loss_sum(model(ids, return_hidden=True), model.lm_head.weight, torch.roll(ids, -1, 1))
    (loss / n).backward()
    return float(loss.detach()), {
        k.replace("_checkpoint_wrapped_module.", ""): p.grad for k, p in model.named_parameters()
    }


@pytest.mark.parametrize("mode", ["kept", "tiled", "offloaded"])
def test_activation_checkpointing_same_loss_grads_and_names(mode, monkeypatch):
    """Checkpointed blocks (their inputs kept, or offloaded through the hooks CUDA uses; the MLP whole or in tiles
    of 16 of the 48 tokens) give the loss and every gradient of the plain model, under HF's names."""
    ids = torch.randint(0, 1000, (2, 24))
    plain = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=1000), seed=0).train()
    want_loss, want = loss_and_grads(plain, ids)
    model = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=1000), seed=0).train()
    names = list(model.state_dict())
    apply_activation_checkpointing(model, offload=mode == "offloaded", mlp_tile=16 if mode == "tiled" else 0)
    assert list(model.state_dict()) == names  # HF names survive the wrappers
    offloaded, mlp_rows = [], []
    pack = parallel._to_host
    monkeypatch.setattr(parallel, "_to_host", lambda t: offloaded.append(t.shape) or pack(t))
    for block in model.model.layers:
        block.mlp.gate_proj.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[:-1].numel()))
    loss, grads = loss_and_grads(model, ids)
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss)
    torch.testing.assert_close(grads, want)
    L = len(model.model.layers)
    if mode == "offloaded":  # each block's input and its RoPE tables, nothing else
        assert sorted(offloaded).count(torch.Size([2, 24, 64])) == L and len(offloaded) == 3 * L
    else:
        assert offloaded == []
    assert max(mlp_rows) == (16 if mode == "tiled" else 48)  # in the forward and every recompute
    unwrap_activation_checkpointing(model)
    assert [k for k, _ in model.named_parameters()] == list(want)


# what the allocator tests' child processes begin with: torch, and glibc's count of mapped bytes (hblkhd)
MALLINFO = """
import ctypes, torch
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_cpu_memory_serves_tensors_under_256mib_from_the_heap():
    """glibc maps a 40 MB tensor on its own (page faults on every new one) until keep_freed_cpu_memory, then not; a
    300 MB one stays mapped on its own. In a child process: the setting is process-wide."""
    child = (
        MALLINFO
        + """
from qwen3lab.model.runtime import keep_freed_cpu_memory
def mapped_while_holding(mb):
    t = torch.ones(mb * 250_000)
    return libc.mallinfo2().hblkhd >= mb * 1_000_000
print(mapped_while_holding(40))
keep_freed_cpu_memory()
print(mapped_while_holding(40), mapped_while_holding(300))
"""
    )

    def run(**env):
        env = {**os.environ, **env}
        return subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, env=env)

    assert run().stdout.split() == ["True", "False", "True"]
    assert run(QWEN3LAB_KEEP_FREED_MEMORY="0").stdout.split() == ["True", "True", "True"]  # the opt-out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_return_freed_cpu_memory_maps_blocks_glibc_would_keep_in_the_heap():
    """After a 30 MB block is freed, glibc serves a 20 MB tensor from the heap (its threshold has risen), where it
    fragments memory that never shrinks; after return_freed_cpu_memory (cpu_memory: lean) it maps it, so freeing it
    returns it. In child processes: the setting is process-wide."""
    child = (
        MALLINFO
        + """
import sys
from qwen3lab.model.runtime import return_freed_cpu_memory
if sys.argv[1] == "lean":
    return_freed_cpu_memory()
del_me = torch.ones(7_500_000)
del del_me  # glibc raises its mmap threshold to this 30 MB block's size (it does up to 32 MB)
before = libc.mallinfo2().hblkhd
t = torch.ones(5_000_000)
print(libc.mallinfo2().hblkhd - before >= 20_000_000)
"""
    )

    def mapped(policy):
        out = subprocess.run([sys.executable, "-c", child, policy], capture_output=True, text=True, check=True)
        return out.stdout.split() == ["True"]

    assert not mapped("default") and mapped("lean")
