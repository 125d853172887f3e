"""Packed attention backends against the same documents run as separate rows, and the causal paths of generation."""

import numpy as np
import pytest
import torch
from helpers import hf_tiny

import qwen3lab
from qwen3lab.model.attention import Documents, cu_seqlens_from_position_ids, resolve_backend
from qwen3lab.train.batching import collate
from qwen3lab.train.data import TokenizedData
from qwen3lab.train.loss import IGNORE, lm_loss_sum

CPU_BACKENDS = ["sdpa", "dense"]  # varlen and flex are CUDA-only: bench/gpu.py checks them on a GPU


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attn")
    hf_tiny(vocab=512, hidden=64, heads=4, kv_heads=2, head_dim=16).save_pretrained(folder)
    return qwen3lab.load_model(folder, dtype="float32", device="cpu")


def _docs(seed=0):
    """Two packed rows: documents of 7, 20, 13 tokens, and of 15, 9 tokens plus 16 tokens of padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[7, 20, 13], [15, 9]]
    docs = [[torch.randint(0, 512, (n,), generator=g) for n in row] for row in lengths]
    labels = [
        [torch.where(torch.rand(n, generator=g) < 0.7, torch.randint(0, 512, (n,), generator=g), IGNORE) for n in row]
        for row in lengths
    ]
    return docs, labels


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_loss_and_grads_equal_separate_rows(model, backend):
    docs, labels = _docs()
    T = 40
    ids = torch.zeros(2, T, dtype=torch.long)
    lab = torch.full((2, T), IGNORE)
    pos = torch.zeros(2, T, dtype=torch.long)
    for r, (row, row_labels) in enumerate(zip(docs, labels, strict=True)):
        n = sum(len(d) for d in row)
        ids[r, :n], lab[r, :n] = torch.cat(row), torch.cat(row_labels)
        pos[r, :n] = torch.cat([torch.arange(len(d)) for d in row])
        pos[r, n:] = torch.arange(T - n)
    cu = cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 7, 27, 40, 55, 64, 80]
    model.train()
    model.attn_implementation = backend
    try:
        packed = _loss_and_grads(
            model,
            lambda: lm_loss_sum(model.forward_packed(ids, pos, True, cu_seqlens=cu), model.lm_head.weight, lab)[0],
        )
    finally:
        model.attn_implementation = "auto"

    def separate():
        total = 0
        for row, row_labels in zip(docs, labels, strict=True):
            for d, dl in zip(row, row_labels, strict=True):
                total = total + lm_loss_sum(model(d[None], return_hidden=True), model.lm_head.weight, dl[None])[0]
        return total

    ref = _loss_and_grads(model, separate)
    model.eval()
    torch.testing.assert_close(packed[0], ref[0], atol=1e-5, rtol=1e-5)
    assert packed[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(packed[1][name], ref[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_backends_agree_and_cross_document_attention_differs(model):
    docs, _ = _docs(1)
    ids = torch.cat(docs[0])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs[0]])[None]
    outs = {}
    with torch.no_grad():
        for backend in CPU_BACKENDS:
            model.attn_implementation = backend
            outs[backend] = model.forward_packed(ids, pos)
        model.attn_implementation = "auto"
        causal = model(ids, pos)
    torch.testing.assert_close(outs["sdpa"], outs["dense"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(causal, outs["sdpa"], atol=1e-3)  # the documents really are kept apart


def test_collate_makes_the_boundaries_of_its_positions():
    lengths = [5, 3, 8, 2, 6]
    ids = np.arange(sum(lengths), dtype=np.int32)
    data = TokenizedData(ids, ids.copy(), np.cumsum([0] + lengths))
    batch = collate(data, [[0, 1], [2], [3, 4]], pad_id=0)  # rows of 8, 8, 8 tokens: no padding
    assert batch["cu_seqlens"].tolist() == cu_seqlens_from_position_ids(batch["position_ids"]).tolist()
    batch = collate(data, [[0], [2, 3], [4]], pad_id=0)  # rows of 5, 10, 6: padded to 10
    assert batch["cu_seqlens"].tolist() == [0, 5, 10, 18, 20, 26, 30]
    assert batch["cu_seqlens"].tolist() == cu_seqlens_from_position_ids(batch["position_ids"]).tolist()
    assert batch["cu_seqlens"].dtype == torch.int32


def test_documents_bounds_are_per_row():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    d = Documents.from_position_ids(pos)
    assert d.lengths_per_row == [[3, 2], [2, 3]]
    assert d.max_len == 3
    assert d.doc_ids().tolist() == [[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]


def test_backend_selection():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("dense", cpu, torch.float32) == "dense"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("varlen", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="use one of"):
        resolve_backend("flash", cpu, torch.float32)


def test_chunked_prefill_after_cache_is_causal(model):
    """A chunk of several tokens after cached keys (the causal mask aligned to the end of the keys)."""
    from qwen3lab.infer.cache import PrefillLayer

    ids = torch.randint(0, 512, (1, 30))
    cfg = model.config
    k = torch.zeros(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 30, cfg.head_dim)
    v = torch.zeros_like(k)
    with torch.no_grad():
        full = model(ids)
        layers = list(zip(k, v, strict=True))
        first = model(ids[:, :18], kv_cache=[PrefillLayer(a[:, :, :18], b[:, :, :18]) for a, b in layers])
        second = model(ids[:, 18:], torch.arange(18, 30)[None], kv_cache=[PrefillLayer(a, b) for a, b in layers])
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)
