"""The flagship on a GPU: Qwen3-4B-Base shape in bf16, packed rows of mixed-length documents.

    python bench/gpu.py             # on a CUDA GPU: one run of a few minutes (random weights, nothing downloaded)
    python bench/gpu.py --smoke     # a tiny shape on the CPU: the CI's check that this script runs end to end

1. Packed attention: every backend the device has (varlen, flex, per-document sdpa, dense) gives the outputs and
   q/k/v gradients of the per-document sdpa reference on one packed batch of the 4B attention shape; which one
   `auto` picks.
2. Full fine-tuning (fp32 master weights, bf16 autocast, fused AdamW, activation checkpointing) and LoRA (bf16 base,
   rank 16 on every linear layer, the ChatML token rows trained): tokens/s, MFU against the measured bf16 matmul
   peak, peak memory. FLOPs per token: 6 N (full) or 4 N (LoRA: no weight gradients of the base) over the
   matmul parameters N (the lm_head included), plus causal attention over each document; recomputation not counted.
3. QLoRA (the decoder's linears in NF4, rank 16 on each, the MLP tiled) on one packed row of 4k / 16k / 32k tokens,
   with each checkpointed block's input kept on the GPU or offloaded to pinned host memory: tokens/s, peak memory.
4. Batch-1 decode: tokens/s against the bound of reading every weight once per token at measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch
from common import machine, token_times

import qwen3lab
from qwen3lab.model.attention import BACKENDS, Documents, attend, resolve_backend
from qwen3lab.train.config import OptimConfig
from qwen3lab.train.lora import apply_lora
from qwen3lab.train.net import TrainableTokens, WithLoss
from qwen3lab.train.optim import build_optimizer
from qwen3lab.train.parallel import apply_activation_checkpointing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS on the CPU


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        a @ b
        calls += 1
    sync(device)
    return 2 * n**3 * calls / (time.perf_counter() - t0)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * 5 / (time.perf_counter() - t0)


def packed_batch(rows: int, T: int, vocab: int, max_doc: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of T tokens filled with documents of random lengths (64 .. max_doc), every next token supervised."""
    rng = random.Random(seed)
    ids = torch.randint(0, vocab, (rows, T), generator=torch.Generator().manual_seed(seed))
    pos = torch.zeros(rows, T, dtype=torch.long)
    for r in range(rows):
        t = 0
        while t < T:
            n = min(rng.randint(64, max_doc), T - t)
            pos[r, t : t + n] = torch.arange(n)
            t += n
    labels = ids.roll(-1, 1)
    labels[pos.roll(-1, 1) == 0] = -100  # a document's last token has no next token in it
    cu = Documents.from_position_ids(pos).cu_seqlens
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, "num_tokens": ids.numel()}


def attended_pairs(pos: torch.Tensor) -> int:
    """Query-key pairs of causal attention within documents: sum over tokens of (position + 1)."""
    return int((pos + 1).sum())


def check_backends(cfg, batch, device, dtype) -> None:
    B, T = batch["input_ids"].shape
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, device=device, dtype=dtype, generator=g) for h in (H, Hkv, Hkv))
    cu = batch["cu_seqlens"].to(device)
    results = {}
    for name in BACKENDS[1:]:
        try:
            resolve_backend(name, device, dtype)
        except ValueError as e:
            print(f"  {name:6s} not available here: {e}")
            continue
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        t0 = time.perf_counter()
        y = attend(*leaves, docs=Documents(cu, (B, T), name))
        y.float().square().sum().backward()
        sync(device)
        results[name] = (y.detach().float(), [x.grad.float() for x in leaves], time.perf_counter() - t0)
    ref_y, ref_g, _ = results["sdpa"]
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    for name, (y, grads, seconds) in results.items():
        torch.testing.assert_close(y, ref_y, **tol, msg=lambda m, n=name: f"{n} output: {m}")
        for x, ref in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(x, ref, **tol, msg=lambda m, n=name: f"{n} gradient: {m}")
        print(f"  {name:6s} == per-document sdpa (output and q/k/v gradients); first call {seconds * 1e3:.0f} ms")
    print(f"  auto picks {resolve_backend('auto', device, dtype)} for {dtype} on {device.type}")


def train_steps(cfg, batch, device, base: str, steps: int, peak: float, offload: bool = False) -> None:
    """base: full (fp32 master weights), lora (a bf16 base on GPUs) or qlora (an NF4 base)."""
    reset_peak(device)
    bf16 = device.type == "cuda"
    weights_dtype = torch.bfloat16 if (base != "full" and bf16) else torch.float32  # LoRA: the frozen base in bf16
    model = qwen3lab.new_model(cfg, device=device, dtype=weights_dtype, seed=0).train()
    extra = None
    if base != "full":
        if base == "qlora":
            from qwen3lab.train.config import LORA_TARGETS
            from qwen3lab.train.quant import quantize_linears

            quantize_linears(model, LORA_TARGETS)
            reset_peak(device)  # the bf16 model this was made from is gone; a QLoRA run loads straight into 4 bits
        apply_lora(model, rank=16, alpha=32)
        extra = TrainableTokens(cfg.vocab_size, cfg.hidden_size, [151644, 151645], device=device)
    apply_activation_checkpointing(model, offload=offload, mlp_tile=4096)
    net = WithLoss(model, extra, packing=True, chunk=1024)
    optimizer = build_optimizer(net, OptimConfig(lr=1e-5))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    n_supervised = int((batch["labels"] != -100).sum())
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = net(batch)
        (loss / n_supervised).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    step = min(times[1:]) if len(times) > 1 else times[0]
    tokens = batch["input_ids"].numel()
    n_matmul = cfg.num_parameters(embedding=False) + cfg.vocab_size * cfg.hidden_size  # lm_head as a matmul
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * attended_pairs(batch["position_ids"])
    flops = (6 if base == "full" else 4) * n_matmul * tokens + 3 * attn
    compute = "bf16 autocast" if bf16 else "fp32"
    what = {
        "full": f"full FT (fp32 master, {compute})",
        "lora": f"LoRA r16 ({weights_dtype} base, {compute})",
        "qlora": f"QLoRA r16 (NF4 base, {compute}, {tokens} tokens, block inputs {'offloaded' if offload else 'kept'})",
    }[base]
    print(
        f"  {what}: {step:.3f} s/step, {tokens / step:,.0f} tok/s, MFU {flops / step / peak:.1%}, "
        f"peak memory {peak_memory_gib(device):.1f} GiB, loss {float(loss.detach()) / n_supervised:.3f}"
    )
    del model, net, optimizer


def decode(cfg, device, dtype, new_tokens: int) -> None:
    reset_peak(device)
    model = qwen3lab.new_model(cfg, device=device, dtype=dtype, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (32,)).tolist()
    _, per_token = token_times(model, [prompt], new_tokens, sync=lambda: sync(device))
    weight_bytes = (cfg.num_parameters(embedding=False) + cfg.vocab_size * cfg.hidden_size) * dtype.itemsize
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**27)
    bound = bandwidth / weight_bytes
    print(
        f"  batch-1 decode {dtype}: {1 / per_token:.1f} tok/s; bound {bound:.1f} tok/s "
        f"({weight_bytes / 1e9:.2f} GB of weights per token at {bandwidth / 1e9:.0f} GB/s copy bandwidth): "
        f"{1 / per_token / bound:.0%}"
    )
    del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (CI)")
    ap.add_argument("--shape", default="qwen3-4b-base")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.rows, args.seq, args.steps, args.new_tokens = "tiny", 2, 512, 2, 8
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(machine())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    cfg = qwen3lab.preset(args.shape)
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    print(f"{args.shape}: {cfg.num_parameters():,} parameters; measured {dtype} matmul peak {peak / 1e12:.1f} TFLOP/s")
    batch = packed_batch(args.rows, args.seq, cfg.vocab_size, max_doc=min(2048, args.seq))
    docs = len(batch["cu_seqlens"]) - 1
    print(f"packed batch: {args.rows} rows x {args.seq} tokens, {docs} documents of 64-{min(2048, args.seq)} tokens")
    print("attention backends:")
    check_backends(cfg, batch, device, dtype)
    print("training:")
    for base in ("full", "lora"):
        train_steps(cfg, batch, device, base, args.steps, peak)
    for T in (256, 512) if args.smoke else (4096, 16384, 32768):
        row = packed_batch(1, T, cfg.vocab_size, max_doc=min(2048, T))
        for offload in (False, True):
            train_steps(cfg, row, device, "qlora", 2, peak, offload)
    print("decode:")
    decode(cfg, device, dtype, args.new_tokens)


if __name__ == "__main__":
    main()
