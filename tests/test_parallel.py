"""What parallel.py applies from outside the model leaves its numbers and names unchanged; the CPU allocator switch."""

import os
import subprocess
import sys

import pytest
import torch

import qwen3lab
from qwen3lab.train.loss import lm_loss_sum
from qwen3lab.train.parallel import apply_activation_checkpointing, unwrap_activation_checkpointing


def test_activation_checkpointing_same_loss_grads_and_names():
    ids = torch.randint(0, 1000, (2, 24))
    labels = torch.roll(ids, -1, 1)
    results = []
    for checkpointing in (False, True):
        model = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=1000), seed=0).train()
        names = list(model.state_dict())
        if checkpointing:
            apply_activation_checkpointing(model)
            assert list(model.state_dict()) == names  # HF names survive the wrapper
        loss, n = lm_loss_sum(model(ids, return_hidden=True), model.lm_head.weight, labels)
        (loss / n).backward()
        results.append((float(loss), {k: p.grad.clone() for k, p in model.named_parameters()}))
        if checkpointing:
            unwrap_activation_checkpointing(model)
            assert [k for k, _ in model.named_parameters()] == [k for k in results[0][1]]
    assert results[0][0] == results[1][0]
    g0, g1 = results[0][1], results[1][1]
    torch.testing.assert_close(dict(zip(g0, g1.values(), strict=True)), g0)


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
def test_keep_freed_cpu_memory_serves_big_tensors_from_the_heap():
    """glibc maps a 100 MB tensor on its own (page faults on every new one) until keep_freed_cpu_memory, then not.
    In a child process: the setting is process-wide."""
    child = (
        MALLINFO
        + """
from qwen3lab.model.runtime import keep_freed_cpu_memory
def mapped_while_holding_100mb():
    t = torch.ones(25_000_000)
    return libc.mallinfo2().hblkhd
print(mapped_while_holding_100mb() >= 100_000_000)
keep_freed_cpu_memory()
print(mapped_while_holding_100mb() >= 100_000_000)
"""
    )

    def run(**env):
        env = {**os.environ, **env}
        return subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, env=env)

    assert run().stdout.split() == ["True", "False"]
    assert run(QWEN3LAB_KEEP_FREED_MEMORY="0").stdout.split() == ["True", "True"]  # the opt-out


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
