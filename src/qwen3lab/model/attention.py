"""Attention kernels behind one function, `attend`, and one selection point, `resolve_backend`.

Packed rows hold several documents; a token must see only the earlier tokens of its own document. A dense
`[B, 1, T, T]` mask does that at quadratic memory (a 32k row: 1 GiB of bools, made a float mask in every layer and
kept for the backward) and computes every cross-document block only to throw it away. The backends here never
build a `[T, T]` tensor and skip cross-document work:

  sdpa    per-document causal SDPA over the row's document boundaries (any device; the CPU's choice, since
          FlexAttention has no CPU backward)
  varlen  torch.nn.attention.varlen (FlashAttention's varlen kernel; CUDA, bf16/fp16, torch >= 2.10)
  flex    FlexAttention with a document block mask, built once per batch and used by every layer (CUDA)
  dense   the document mask and one SDPA call: quadratic, kept as the reference the others are tested against

`Documents` holds a batch's boundaries (cu_seqlens), made once per batch by the collate function; nothing per
layer recomputes them.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ATTENTION_BACKENDS

log = logging.getLogger("qwen3lab")

BACKENDS = ATTENTION_BACKENDS


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] (restarting at 0 per document) -> int32 cu_seqlens [docs + 1] over the B*T tokens.

    Every row starts a document, whatever its first position, so no document crosses rows.
    """
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([B * T], device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)


@dataclass
class Documents:
    """The documents of a packed batch [B, T]: boundaries as cu_seqlens over the flattened B*T tokens."""

    cu_seqlens: torch.Tensor  # [docs + 1] int32, on the model's device
    shape: tuple[int, int]  # (B, T)
    backend: str = "auto"  # one of BACKENDS; resolved by the first layer, against its q's device and dtype
    _cache: dict = field(default_factory=dict, repr=False)  # per-batch objects built once: bounds, block mask

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, backend: str = "auto") -> Documents:
        return cls(cu_seqlens_from_position_ids(position_ids), tuple(position_ids.shape), backend)

    @property
    def lengths_per_row(self) -> list[list[int]]:
        """Document lengths of each row, as Python ints (one host sync per batch, not per layer)."""
        if "lengths" not in self._cache:
            B, T = self.shape
            cu = self.cu_seqlens.tolist()
            rows: list[list[int]] = [[] for _ in range(B)]
            for s, e in zip(cu[:-1], cu[1:], strict=True):
                rows[s // T].append(e - s)
            self._cache["lengths"] = rows
        return self._cache["lengths"]

    @property
    def max_len(self) -> int:
        if "max_len" not in self._cache:
            self._cache["max_len"] = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return self._cache["max_len"]

    def doc_ids(self) -> torch.Tensor:
        """[B, T] index of each token's document."""
        B, T = self.shape
        starts = torch.zeros(B * T, dtype=torch.int32, device=self.cu_seqlens.device)
        starts[self.cu_seqlens[1:-1].long()] = 1
        return starts.cumsum(0).view(B, T)


# ---- selection ----


@functools.cache
def _varlen_attn():
    """torch's varlen kernel with causality set (window_size in newer torch, is_causal in older), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    causal = "window_size" in inspect.signature(varlen_attn).parameters
    return functools.partial(varlen_attn, **({"window_size": (-1, 0)} if causal else {"is_causal": True}))


@functools.cache
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # compiled once per process; every layer and every batch reuses the kernel
    return torch.compile(flex_attention, dynamic=False), create_block_mask


_logged: set[tuple[str, str]] = set()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' -> the fastest backend this device and dtype have; a named one is checked. Said once on the log."""
    if name not in BACKENDS:
        raise ValueError(f"attention {name!r}: use one of {', '.join(BACKENDS)}")
    cuda = device.type == "cuda"
    varlen_ok = cuda and _varlen_attn() is not None and dtype in (torch.bfloat16, torch.float16)
    flex_ok = cuda and _flex() is not None
    if name == "auto":
        name = "varlen" if varlen_ok else "flex" if flex_ok else "sdpa"
    elif name == "varlen" and not varlen_ok:
        raise ValueError("attention varlen needs a CUDA device, bf16/fp16 and torch >= 2.10; use auto or sdpa")
    elif name == "flex" and not flex_ok:
        raise ValueError("attention flex needs a CUDA device (FlexAttention has no CPU backward); use auto or sdpa")
    if (name, device.type) not in _logged:
        _logged.add((name, device.type))
        log.info("attention: %s for packed rows on %s (%s)", name, device.type, dtype)
    return name


# ---- kernels: q [B, H, T, D], k and v [B, Hkv, S, D] -> [B, T, H*D] ----


def attend(q, k, v, mask: torch.Tensor | None = None, docs: Documents | None = None) -> torch.Tensor:
    """Attention of q over k/v (GQA by repeating kv heads), returned as [B, T, H*D] for o_proj.

    docs: packed documents (q, k, v all of the batch's T tokens). Else mask: an SDPA bool mask [B, 1, T, S]; else
    plain causal attention, aligned to the end of the keys (T == S: a full forward; T == 1: one decode step sees
    every cached key).
    """
    B, H, T, D = q.shape
    # branches, not expressions: under dynamic shapes (a compiled block) SDPA needs Python bools, not SymBools
    gqa = False
    if k.shape[1] != H:
        gqa = True
    if docs is not None:
        return _attend_packed(q, k, v, docs, gqa)
    S = k.shape[2]
    if mask is None and 1 < T < S:  # a chunk after cached keys: causal from its own offset
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    # without a mask is_causal lets SDPA pick its flash kernel (and T == 1 needs no mask at all)
    causal = False
    if mask is None and T > 1:
        causal = True
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return y.transpose(1, 2).reshape(B, T, H * D)  # [B, H, T, D] -> [B, T, H*D]


@torch.compiler.disable  # a loop over this batch's documents: kept out of compiled blocks' graphs
def _attend_packed(q, k, v, docs: Documents, gqa: bool) -> torch.Tensor:
    if torch.is_autocast_enabled(q.device.type):
        # RoPE's fp32 cos/sin make q and k fp32 under autocast; SDPA would be cast by autocast, the others are not
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if "backend" not in docs._cache:
        docs._cache["backend"] = resolve_backend(docs.backend, q.device, q.dtype)
    return _PACKED[docs._cache["backend"]](q, k, v, docs, gqa)


def _sdpa_per_document(q, k, v, docs: Documents, gqa: bool) -> torch.Tensor:
    B, H, T, D = q.shape
    pieces = []
    # split, not slicing per document: the backward of a split is one concatenation, where each slice's backward
    # would fill a zero tensor the size of the whole row
    # (4-D pieces [1, H, L, D]: SDPA's fused CPU kernels take only those, 3-D ones go to the quadratic math path)
    rows = zip(q.split(1), k.split(1), v.split(1), docs.lengths_per_row, strict=True)
    for *qkv, lengths in rows:
        for qd, kd, vd in zip(*(x.split(lengths, dim=2) for x in qkv), strict=True):
            y = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)  # [1, H, L, D]
            pieces.append(y[0].transpose(0, 1))  # [L, H, D]
    # one copy puts every document back in its place and lays the heads out for o_proj
    return torch.cat(pieces).view(B, T, H * D)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] -> the dense bool mask [B, 1, T, T], True where query t may attend to key s."""
    return _document_mask(Documents.from_position_ids(position_ids).doc_ids())


def _document_mask(doc: torch.Tensor) -> torch.Tensor:
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _dense(q, k, v, docs: Documents, gqa: bool) -> torch.Tensor:
    return attend(q, k, v, mask=_document_mask(docs.doc_ids()))


def _varlen(q, k, v, docs: Documents, gqa: bool) -> torch.Tensor:
    B, H, T, D = q.shape
    varlen_attn = _varlen_attn()

    def tokens_major(x):  # [B, h, T, D] -> [B*T, h, D]
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

    cu, n = docs.cu_seqlens, docs.max_len
    y = varlen_attn(tokens_major(q), tokens_major(k), tokens_major(v), cu, cu, n, n, enable_gqa=gqa)
    return y.view(B, T, H * D)


def _flex_attention(q, k, v, docs: Documents, gqa: bool) -> torch.Tensor:
    B, H, T, D = q.shape
    flex_attention, create_block_mask = _flex()
    if "block_mask" not in docs._cache:  # once per batch: every layer (and the backward) uses the same mask
        doc = docs.doc_ids()

        def same_document_causal(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

        docs._cache["block_mask"] = create_block_mask(same_document_causal, B, None, T, T, device=q.device)
    y = flex_attention(q, k, v, block_mask=docs._cache["block_mask"], enable_gqa=gqa)
    return y.transpose(1, 2).reshape(B, T, H * D)


_PACKED = {"sdpa": _sdpa_per_document, "dense": _dense, "varlen": _varlen, "flex": _flex_attention}
