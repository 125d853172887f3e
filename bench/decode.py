"""Decode speed at batch 1: qwen3lab vs transformers `generate`, same random weights and prompt, fp32, this CPU.

    python bench/decode.py [--preset qwen3-0.6b] [--new-tokens 32]

Batch-1 decode reads every weight once per token, so its roof is memory bandwidth / weight bytes; the bench
measures this machine's bandwidth (a large tensor copy) and reports each side as a fraction of that bound. Also
prefill tokens/s and batch-8 decode throughput for qwen3lab.
"""

import argparse
import time

import torch
from common import hf_from_qwen3lab, machine

import qwen3lab
from qwen3lab.generate import SamplingParams, generate_ids


def memory_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of a large copy (read + write), the best of a few tries."""
    a = torch.empty(int(gib * 2**30 / 4), dtype=torch.float32).fill_(1)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    model = qwen3lab.new_model(qwen3lab.preset(args.preset), seed=0).eval()
    hf = hf_from_qwen3lab(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: the embedding counts once
    bound = memory_bandwidth() / weight_bytes  # tokens/s if each token costs one read of the weights

    def ours(batch=1):
        params = SamplingParams(max_new_tokens=n, stop_ids=[])
        t0 = time.perf_counter()
        steps = generate_ids(model, [prompt[0].tolist()] * batch, params)
        next(steps)  # prefill + first token
        t1 = time.perf_counter()
        out = sum(1 for _ in steps)
        return t1 - t0, (time.perf_counter() - t1) / out

    def theirs():
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, eos_token_id=None)
            t1 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
            return t1 - t0, (time.perf_counter() - t1 - (t1 - t0)) / (n - 1)

    ours(), theirs()  # warm up
    prefill_ours, tpot_ours = min(ours() for _ in range(2))
    _, tpot_ref = min(theirs() for _ in range(2))
    _, tpot_b8 = ours(batch=8)
    print(f"# {args.preset}, fp32, prompt {args.prompt_len}, {n} new tokens; {machine()}")
    print(f"weights {weight_bytes / 2**30:.2f} GiB; bandwidth bound {bound:.2f} tokens/s")
    print(f"transformers generate  {1 / tpot_ref:6.2f} tokens/s  ({1 / tpot_ref / bound:5.1%} of bound)")
    print(f"qwen3lab generate      {1 / tpot_ours:6.2f} tokens/s  ({1 / tpot_ours / bound:5.1%} of bound)")
    print(f"ratio qwen3lab / transformers: {tpot_ref / tpot_ours:.2f}x")
    print(f"qwen3lab prefill {args.prompt_len / prefill_ours:.0f} tokens/s; batch-8 decode {8 / tpot_b8:.1f} tokens/s")


if __name__ == "__main__":
    main()
