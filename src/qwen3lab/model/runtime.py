"""How a model runs on this machine: the dtype policy (is bf16 native and fast here?), the default device,
torch.compile of the decoder blocks, and the CPU allocator. Training and serving both use these.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import time

import torch
from torch import nn

log = logging.getLogger("qwen3lab")


# ---- dtype policy ----


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 matmul is emulated and
    hundreds of times slower than fp32, a trap users fall into when a checkpoint says bfloat16."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 at least as fast as fp32, measured once per process (~50 ms).

    The flags alone do not tell: with AMX bf16 ran ~4x faster than fp32 here, with AVX512-BF16 but no AMX it ran
    at 167 GFLOP/s against fp32's 249, and without either it is emulated (~400x slower), so it is not even tried.
    """
    if not cpu_has_native_bf16():
        return False

    def seconds(dtype):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b  # warm-up: oneDNN builds its kernel on the first call
        t0 = time.perf_counter()
        for _ in range(8):
            a @ b
        return time.perf_counter() - t0

    fp32, bf16 = min(seconds(torch.float32) for _ in range(3)), min(seconds(torch.bfloat16) for _ in range(3))
    log.info("CPU matmul 512^3: bf16 %.2f ms, fp32 %.2f ms", bf16 / 8e-3, fp32 / 8e-3)
    return bf16 <= fp32


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """'auto' -> the checkpoint's dtype where the device computes it natively, else float32 (and say why)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use 'auto', 'float32' or 'bfloat16'")
        return resolved
    wanted = getattr(torch, checkpoint_dtype, torch.float32)
    if wanted == torch.float32:
        return wanted
    if device.type == "cuda" and wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.info("dtype auto: this GPU has no bf16; computing in float16")
        return torch.float16
    if device.type == "cpu" and not cpu_bf16_is_fast():
        log.info(
            "dtype auto: computing in float32 — the checkpoint is %s but this CPU multiplies bf16 slower than fp32 "
            "(measured; without AVX512-BF16/AMX bf16 is emulated, hundreds of times slower)",
            checkpoint_dtype,
        )
        return torch.float32
    log.info("dtype auto: %s, the checkpoint's dtype, computed natively on %s", checkpoint_dtype, device.type)
    return wanted


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- compile and memory ----


def apply_compile(model: nn.Module, dynamic: bool | None = None) -> None:
    """Compile each decoder block (they share one graph, so it compiles once) and leave the loss eager.

    dynamic=True compiles for any sequence and cache length at once, as generation needs (a prompt, then one token
    at a time over a growing cache); None lets a second shape trigger the one dynamic recompile.
    """
    for block in model.model.layers:
        block.compile(dynamic=dynamic)


def _mallopt(**settings: int) -> bool:
    """glibc's mallopt by name (malloc.h's numbers); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): its allocator has no such switches
        return False
    numbers = {"trim_threshold": -1, "mmap_threshold": -3, "mmap_max": -4, "arena_max": -8}
    for name, value in settings.items():
        mallopt(numbers[name], value)
    return True


def keep_freed_cpu_memory() -> None:
    """On glibc, serve CPU tensors under 256 MiB from one heap and keep freed memory for reuse instead of unmapping
    it; larger ones are mapped on their own and unmapped when freed.

    PyTorch's CPU allocator is plain malloc, and glibc maps every block over 32 MiB afresh and unmaps it on free,
    so each such block of a training step is page-faulted and zeroed by the kernel again. Measured on the demo (2
    cores, 80 steps): 19 s of system time and 2250 tokens/s before keeping freed memory, 1 s and 3340 tokens/s
    after. Blocks of 256 MiB and more stay mapped on their own, and the loss's [chunk, vocab] blocks are made once
    per pass over lm_head (model/head.py reused_blocks): allocated and freed chunk by chunk in a kept heap they
    fragmented it (bench/grpo.py: peak RSS 2.9 GiB against 1.5 GiB alive; bench/sft.py 3.24 -> 1.77 GiB and 930 ->
    1021 tokens/s with `loss_chunk` 128). Process-wide, so it is called where qwen3lab owns the process's CPU
    work; QWEN3LAB_KEEP_FREED_MEMORY=0 turns it off (e.g. when sharing the process with other memory-hungry work).
    """
    if os.environ.get("QWEN3LAB_KEEP_FREED_MEMORY", "1") == "0":
        return
    # a fixed mmap threshold (glibc's own rises to 32 MiB as blocks are freed); freed heap is not given back to the
    # kernel; one heap for all threads, so a block freed by one is reused by the others
    _mallopt(mmap_threshold=256 << 20, trim_threshold=2**31 - 1, arena_max=1)


def return_freed_cpu_memory() -> None:
    """On glibc, map each CPU block over 128 KiB on its own and unmap it when freed, so the peak RSS is the tensors
    alive at the peak (`cpu_memory: lean`, the default for a 4-bit base).

    glibc's own threshold rises to 32 MiB as blocks are freed, and the blocks under it (a [2048 x 2560] fp32 block
    input is 20 MiB) fragment a heap that never shrinks. A QLoRA step of Qwen3-4B at 2,048 tokens (bench/flagship.py)
    peaked at 4.5 GiB this way, 7.5 GiB with glibc's defaults and 8.9 GiB keeping freed memory — at the price of
    page-faulting each large block afresh (the first step 76-94 s against 57).
    """
    _mallopt(mmap_threshold=128 * 1024)


def prepare_for_inference(model, compile: bool) -> None:
    """What the CLI's generate, chat and serve do to a loaded model: compile its blocks if asked (for any length,
    see apply_compile) and, on the CPU, keep freed memory in the heap (batched prefill of 4 x 512 tokens on
    the 0.6B shape: 7.8 s -> 6.7 s)."""
    if model.lm_head.weight.device.type == "cpu":
        keep_freed_cpu_memory()
    if compile:
        apply_compile(model, dynamic=True)
