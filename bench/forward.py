"""Forward tokens/s, qwen3lab vs transformers, same random weights, same CPU, fp32.

python bench/forward.py [--preset qwen3-0.6b] [--batch 1] [--seq-len 512]
"""

import argparse

import torch
from common import best_of, hf_from_qwen3lab, machine

import qwen3lab


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = qwen3lab.new_model(qwen3lab.preset(args.preset), dtype=torch.float32, seed=0).eval()
    hf = hf_from_qwen3lab(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
    tokens = ids.numel()
    with torch.inference_mode():
        ours_logits, ref_logits = model(ids), hf(ids).logits
        max_diff = (ours_logits - ref_logits).abs().max().item()
        t_ref = best_of(lambda: hf(ids), args.repeats)
        t_ours = best_of(lambda: model(ids), args.repeats)
    print(f"# {args.preset}, fp32, batch {args.batch} x {args.seq_len} tokens; {machine()}")
    print(f"max |logit difference| {max_diff:.2e}")
    print(f"transformers {tokens / t_ref:10.1f} tokens/s")
    print(f"qwen3lab     {tokens / t_ours:10.1f} tokens/s")
    print(f"ratio qwen3lab / transformers: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
