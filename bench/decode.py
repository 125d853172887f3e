"""Decode speed at batch 1: qwen3lab vs transformers `generate`, same random weights and prompt, fp32, this CPU.

    python bench/decode.py [--preset qwen3-0.6b] [--new-tokens 32]

Batch-1 decode reads every weight once per token, so its roof is memory bandwidth / weight bytes. The bench
measures this machine's bandwidth two ways and reports each side as a fraction of both bounds:
- copy: a 1 GiB tensor copy, counted as read + write (STREAM's convention);
- read: a matrix-vector product over a 1 GiB matrix, i.e. the fastest that torch itself streams weights here.
qwen3lab is measured eager and with its decoder blocks compiled (`--compile` of generate/chat/serve). Also prefill
tokens/s and batch-8 decode throughput for qwen3lab.
"""

import argparse
import time

import torch
from common import hf_from_qwen3lab, machine, token_times

import qwen3lab
from qwen3lab.model.runtime import apply_compile


def memory_bandwidth(gib: float = 1.0) -> tuple[float, float]:
    """Bytes/s of a large copy (read + write) and of a large matrix-vector product (read), best of a few tries."""
    a = torch.empty(int(gib * 2**30 / 4), dtype=torch.float32).fill_(1)  # filled: untouched pages read as zeros
    b = torch.empty_like(a).fill_(1)
    x = torch.ones(4096)

    def best(f, nbytes):
        seconds = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            seconds.append(time.perf_counter() - t0)
        return nbytes / min(seconds)

    return best(lambda: b.copy_(a), 2 * a.numel() * 4), best(lambda: torch.mv(a.view(-1, 4096), x), a.numel() * 4)


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
    copy_bw, read_bw = memory_bandwidth()
    # tokens/s if each token costs one read of the weights
    copy_bound, read_bound = copy_bw / weight_bytes, read_bw / weight_bytes
    compiled = qwen3lab.new_model(qwen3lab.preset(args.preset), seed=0).eval()
    apply_compile(compiled, dynamic=True)

    def ours(batch=1, model=model):
        return token_times(model, [prompt[0].tolist()] * batch, n)

    def theirs():
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, eos_token_id=None)
            t1 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
            return t1 - t0, (time.perf_counter() - t1 - (t1 - t0)) / (n - 1)

    t0 = time.perf_counter()
    ours(model=compiled)  # compiles for the prompt and for decoding
    compile_s = time.perf_counter() - t0
    ours(), theirs()  # warm up
    # interleaved, best of 3: the machine is shared and its speed drifts
    runs = [(ours(), ours(model=compiled), theirs()) for _ in range(3)]
    prefill_ours, tpot_ours = min(r[0] for r in runs)
    tpot_compiled = min(r[1][1] for r in runs)
    tpot_ref = min(r[2][1] for r in runs)
    _, tpot_b8 = ours(batch=8)
    print(f"# {args.preset}, fp32, prompt {args.prompt_len}, {n} new tokens; {machine()}")
    print(
        f"weights {weight_bytes / 2**30:.2f} GiB; bandwidth: copy {copy_bw / 1e9:.1f} GB/s -> bound "
        f"{copy_bound:.2f} tokens/s, read {read_bw / 1e9:.1f} GB/s -> bound {read_bound:.2f} tokens/s"
    )
    for name, tpot in (
        ("transformers generate", tpot_ref),
        ("qwen3lab generate", tpot_ours),
        (f"qwen3lab --compile ({compile_s:.0f} s to compile)", tpot_compiled),
    ):
        print(
            f"{name:40s} {1 / tpot:6.2f} tokens/s  ({1 / tpot / copy_bound:4.0%} of copy bound, "
            f"{1 / tpot / read_bound:4.0%} of read bound, {tpot_ref / tpot:.2f}x transformers)"
        )
    print(f"qwen3lab prefill {args.prompt_len / prefill_ours:.0f} tokens/s; batch-8 decode {8 / tpot_b8:.1f} tokens/s")


if __name__ == "__main__":
    main()
