"""A frozen LoRA base held in 4 bits (QLoRA, arXiv 2305.14314): NF4 with double quantisation, through bitsandbytes.

Each targeted linear weight of the decoder is stored as bitsandbytes' NF4 (blocks of 64 weights, one absmax each;
the absmaxes themselves 8-bit in blocks of 256): 0.5 bytes per weight plus ~0.13 bits of scales. A forward
dequantises the weight to the input's dtype, multiplies, and drops it; the backward dequantises it again for the
input's gradient (the base is frozen: it has none of its own), so a dequantised weight never outlives its matmul.
Embeddings, the tied head and the norms keep the checkpoint's dtype; adapters stay fp32 (lora.py).

A model folder is loaded straight into 4 bits, tensor by tensor: the full-precision model is never whole in memory.
bitsandbytes is used where transformers and peft use it for QLoRA, so their NF4 and ours are the same bytes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..model.hf import load_model, stored_dtype
from ..model.model import Qwen3

BLOCK, SCALE_BLOCK = 64, 256  # QLoRA's: weights per absmax, absmaxes per second-level scale (double quantisation)


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise ImportError("lora.base_bits: 4 needs bitsandbytes: pip install 'qwen3lab[qlora]'") from None
    return F


class Linear4bit(nn.Module):
    """y = x @ W.T with W [out, in] held as NF4; W is dequantised per call, in the input's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        F = _bnb()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype  # what the checkpoint stored: the export writes it back in this dtype
        packed, state = F.quantize_4bit(weight, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
        # non-persistent: a training checkpoint holds what is trained; the base is read again from its folder
        tensors = dict(packed=packed, absmax=state.absmax, code=state.code, offset=state.offset)
        tensors |= dict(absmax2=state.state2.absmax, code2=state.state2.code)  # the absmaxes' own scales
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] in `dtype` (default: the checkpoint's)."""
        F = _bnb()
        nested = F.QuantState(absmax=self.absmax2, code=self.code2, blocksize=SCALE_BLOCK, dtype=torch.float32)
        state = F.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            blocksize=BLOCK,
            quant_type="nf4",
            dtype=dtype or self.dtype,
            offset=self.offset,
            state2=nested,
        )
        return F.dequantize_4bit(self.packed, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Dequantized.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 (double quantised)"


class _Dequantized(torch.autograd.Function):
    """x @ W.T, W dequantised for the forward and again for the backward (nothing of W is saved between them)."""

    @staticmethod
    def forward(ctx, x, layer: Linear4bit):
        ctx.layer = layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.to(dtype) @ layer.dequantized(dtype).T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(grad.dtype), None


def quantize_linears(model: nn.Module, targets) -> None:
    """Replace each targeted nn.Linear of an in-memory model (e.g. a preset) by its 4-bit form."""
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, child_name, Linear4bit(child.weight.detach()))


@torch.no_grad()
def load_model_4bit(path: str | os.PathLike, targets, device: str | torch.device = "cpu") -> Qwen3:
    """An HF folder loaded with its targeted decoder linears in 4 bits and everything else in the checkpoint's
    dtype, reading and quantising one tensor at a time (peak: the 4-bit model plus one full-precision tensor)."""

    def take(model, name: str, tensor: torch.Tensor) -> bool:
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        if child not in targets or not name.endswith(".weight"):
            return False
        setattr(model.get_submodule(parent), child, Linear4bit(tensor))
        return True

    return load_model(path, dtype=stored_dtype(path), device=device, take=take)


def quantized_layers(model: nn.Module) -> dict[str, Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
