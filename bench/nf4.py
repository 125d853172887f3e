"""NF4 with double quantisation for a frozen LoRA base, on this CPU: bitsandbytes against torchao.

    python bench/nf4.py [--tokens 2048] [--shape 9728x2560]

One Qwen3-4B MLP projection (gate/up: 9728 x 2560), bf16 weights. For each library: bytes per weight held, seconds
to quantise, the dequantised weight's error against the bf16 weight (and whether the two libraries agree), and the
seconds of a forward and backward (the input's gradient: the base is frozen) for `--tokens` rows, beside the same
layer dense in bf16 and in fp32. Prints the machine.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from common import best_of, machine


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def bnb_side(w: torch.Tensor):
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    held = tensor_bytes(packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset)

    def quantise():
        BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantised():
        return BF.dequantize_4bit(packed, state)

    def linear(x):
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)

    return held, quantise, dequantised, linear


def torchao_side(w: torch.Tensor):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    nf4 = to_nf4(w, 64, 256)
    held = tensor_bytes(nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_mean, nf4.nf4)
    return held, lambda: to_nf4(w, 64, 256), nf4.get_original_weight, lambda x: linear_nf4(x, nf4)


def qwen3lab_side(w: torch.Tensor):
    """qwen3lab's Linear4bit: bitsandbytes' NF4, dequantised per call in the input's dtype, then one matmul."""
    from qwen3lab.train.quant import Linear4bit

    layer = Linear4bit(w)
    held = tensor_bytes(*layer.buffers())
    return held, lambda: Linear4bit(w), layer.dequantized, layer


def dense_side(w: torch.Tensor, dtype):
    w = w.to(dtype)
    return tensor_bytes(w), lambda: None, lambda: w, lambda x: x.to(dtype) @ w.T


def fwd_bwd(linear, x):
    def run():
        x.grad = None
        linear(x).float().sum().backward()

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--shape", default="9728x2560")
    args = ap.parse_args()
    out_f, in_f = map(int, args.shape.split("x"))
    print(f"# {machine()}")
    print(f"# one {out_f} x {in_f} linear layer, bf16 weights; forward + input gradient for {args.tokens} rows")
    torch.manual_seed(0)
    w = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
    x = torch.randn(args.tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
    sides = {"bitsandbytes": bnb_side, "torchao": torchao_side, "qwen3lab": qwen3lab_side}
    dequant = {}
    for name, make in sides.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            held, quantise, dequantised, linear = make(w)
            dequant[name] = dequantised().float()
            error = (dequant[name] - w.float()).abs()
            t_q = best_of(quantise, 1)
            t = best_of(fwd_bwd(linear, x), 2)
        print(
            f"{name:13} {8 * held / w.numel():.3f} bits/weight  quantise {t_q:.2f} s  |error| mean {error.mean():.2e} "
            f"max {error.max():.2e}  forward+backward {t * 1e3:.0f} ms"
        )
    for other in ("torchao", "qwen3lab"):
        diff = (dequant["bitsandbytes"] - dequant[other]).abs()
        print(f"dequantised: bitsandbytes vs {other}: identical {bool(diff.max() == 0)}, max |diff| {diff.max():.2e}")
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.detach().to(dtype).requires_grad_()
        _, _, _, linear = dense_side(w, dtype)
        t = best_of(fwd_bwd(linear, xd), 2)
        bits = 8 * w.to(dtype).element_size()
        print(f"dense {str(dtype).removeprefix('torch.'):8} {bits:.3f} bits/weight  forward+backward {t * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
