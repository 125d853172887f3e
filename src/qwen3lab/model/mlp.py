"""The decoder's MLPs: Qwen3's dense SwiGLU, and Qwen3 MoE's sparse block, where a router picks
num_experts_per_tok of num_experts SwiGLU experts for every token.

Numerically transformers' `Qwen3MoeSparseMoeBlock`: router softmax in fp32 over all experts, top-k, renormalised
over the k when norm_topk_prob, the weights cast back to the activation dtype. Parameter names are the hub's
(`mlp.gate.weight`, `mlp.experts.{e}.gate_proj.weight`, ...), so every expert is an ordinary `MLP` of nn.Linear
layers and what works on linear layers (LoRA, FSDP, export) works on experts as it is.

The experts are computed by groups: the (token, expert) pairs are sorted by expert once per layer, each expert's
tokens go through its weights in one matmul, and the weighted results are added back to their tokens. On CUDA the
experts' weights are stacked and run as one `torch._grouped_mm`; elsewhere a loop over the experts that got tokens
(as fast on CPUs, and no stacked copy of the weights). No per-token loop, no dense [tokens, experts, ...] tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: torch.Tensor, k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> the chosen experts' weights [N, k] (the logits' dtype) and their ids [N, k]."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.grouped_mm: bool | None = None  # None: on CUDA only; True / False force it (tests compare the two)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        weights, experts = route(self.gate(x), self.top_k, self.norm_topk_prob)  # [N, k] each
        pairs = experts.flatten()  # [N*k] the chosen expert of each (token, slot)
        order = pairs.argsort(stable=True)  # the pairs sorted by expert
        tokens = order // self.top_k  # [N*k] the token of each sorted pair
        counts = torch.bincount(pairs, minlength=len(self.experts))  # [E] tokens per expert
        grouped = self.grouped_mm if self.grouped_mm is not None else x.is_cuda
        grouped = grouped and type(self.experts[0].gate_proj) is nn.Linear  # LoRA or 4-bit experts: their own calls
        y = (self._grouped if grouped else self._looped)(x[tokens], counts)  # [N*k, H]
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype)).view(shape)

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [N*k, H] sorted by expert -> each expert's rows through that expert."""
        pieces = xs.split(counts.tolist())
        # with gradients every expert runs, on no rows if none came: each then has a (zero) gradient, as FSDP's
        # reduce-scatter of a block needs every rank to hold the same parameters' gradients
        train = torch.is_grad_enabled()
        bucket = _ROW_BUCKET if train and _onednn_bf16(xs) else 1  # not in decoding: its rows are few and repeat
        return torch.cat([self._expert(e, p, bucket) if len(p) or train else p for e, p in enumerate(pieces)])

    def _expert(self, e: int, rows: torch.Tensor, bucket: int) -> torch.Tensor:
        """rows [n, H] through expert e, padded with zero rows to a multiple of `bucket` (see _onednn_bf16)."""
        n = rows.shape[0]
        pad = -n % bucket
        if not pad:
            return self.experts[e](rows)
        return self.experts[e](F.pad(rows, (0, 0, 0, pad)))[:n]

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same as _looped, every expert in one grouped matmul per projection (weights stacked per call)."""
        offsets = counts.cumsum(0).to(torch.int32)

        def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
            w = torch.stack([getattr(e, name).weight for e in self.experts])  # [E, out, in]
            return torch._grouped_mm(inputs, w.to(inputs.dtype).transpose(1, 2), offs=offsets)

        if torch.is_autocast_enabled(xs.device.type):
            xs = xs.to(torch.get_autocast_dtype(xs.device.type))
        h = F.silu(project("gate_proj", xs)) * project("up_proj", xs)
        return project("down_proj", h)


# bf16 matmuls on CPUs run through oneDNN, which builds (JIT-compiles) a kernel for every new shape: an expert's
# row count changes every step, and building them made a training step's matmuls ~10x slower than the same matmuls
# at one shape (bench/moe.py). Padding each expert's rows to a multiple of this keeps the shapes few and cached.
_ROW_BUCKET = 32


def _onednn_bf16(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast
