"""Qwen3 MoE: the hub's layout read and written, logits equal to transformers' Qwen3MoeForCausalLM, experts
computed by groups (grouped matmul == loop), and the load-balancing loss, per micro-batch equal to transformers'
and over a global batch equal to the same tokens as one batch."""

import subprocess
import sys

import pytest
import torch
import transformers

import qwen3lab
from qwen3lab.model.config import ModelConfig, preset
from qwen3lab.model.mlp import SparseMoeBlock
from qwen3lab.train.balance import RouterLogits, balance_loss, layer_loss, selections

CONFIGS = {
    "topk-normalised": dict(norm_topk_prob=True),
    "topk-raw+dense-every-2nd": dict(norm_topk_prob=False, decoder_sparse_step=2),
    "mlp-only-layer-0+k1": dict(mlp_only_layers=[0], num_experts_per_tok=1, num_experts=4),
}


def tiny_moe(**kw) -> ModelConfig:
    return preset("tiny-moe", vocab_size=1000, num_hidden_layers=3, **kw)


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS)
def test_logits_equal_transformers_both_ways(kw, tmp_path):
    cfg = tiny_moe(**kw)
    ours = qwen3lab.new_model(cfg, seed=0)
    qwen3lab.save_model(ours, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert [type(b.mlp).__name__ for b in hf.model.layers] == [
        "Qwen3MoeSparseMoeBlock" if cfg.is_sparse(i) else "Qwen3MoeMLP" for i in range(3)
    ]
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    # and a folder transformers wrote (it holds experts fused in memory and writes the hub's per-expert layout)
    torch.nn.init.normal_(hf.model.layers[0].mlp.experts.gate_up_proj if cfg.is_sparse(0) else hf.lm_head.weight)
    hf.save_pretrained(tmp_path / "hf")
    back = qwen3lab.load_model(tmp_path / "hf", dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_grouped_matmul_equals_the_loop_over_experts():
    """The CUDA path (torch._grouped_mm over stacked weights) runs on the CPU too: outputs and every gradient equal
    the loop's."""
    cfg = tiny_moe()
    x = torch.randn(2, 16, cfg.hidden_size)
    results = []
    for grouped in (False, True):
        model = qwen3lab.new_model(cfg, seed=0)
        block = model.model.layers[0].mlp
        block.grouped_mm = grouped
        y = block(x)
        y.square().sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in block.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    assert len(results[0][1]) > 1 + 3  # the router and several experts got gradients


@pytest.mark.parametrize("masked", [False, True])
def test_micro_balance_loss_equals_transformers(masked):
    """One layer's router logits: the same value and gradient as transformers' load_balancing_loss_func, padding
    left out through the attention mask."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    E, k = 8, 2
    logits = torch.randn(2 * 12, E, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(12) < torch.tensor([[12], [7]])).long() if masked else None  # [2, 12]
    ours = layer_loss(logits, k, None if mask is None else mask.flatten())
    (g_ours,) = torch.autograd.grad(ours, logits)
    theirs = load_balancing_loss_func((logits,), E, k, mask)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs.to(ours.dtype))
    torch.testing.assert_close(g_ours, g_theirs)


def test_global_balance_over_micro_batches_is_the_one_batch_loss():
    """Counts summed over 2 micro-batches: their losses add up to the 2-layer loss of the whole batch as one, value
    and gradient; the micro-batch loss does not."""
    E, k = 8, 2
    logits = [torch.randn(40, E, dtype=torch.float64, requires_grad=True) for _ in range(2)]  # 2 layers
    whole = balance_loss(logits, k)
    parts = [[x[:25] for x in logits], [x[25:] for x in logits]]  # micro-batches of 25 and 15 tokens
    counts = [sum(selections(p[i], k) for p in parts) for i in range(2)]
    split = sum(balance_loss(p, k, counts=counts, tokens=40) for p in parts)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(torch.autograd.grad(split, logits), torch.autograd.grad(whole, logits))
    assert abs(float(sum(balance_loss(p, k) for p in parts) / 2 - whole)) > 1e-6  # micro is another loss


def test_router_logits_are_collected_from_outside_the_model():
    model = qwen3lab.new_model(tiny_moe(decoder_sparse_step=2), seed=0)  # layer 1 sparse only
    hooks = RouterLogits(model)
    model(torch.randint(0, 1000, (2, 5)))
    (logits,) = hooks.take()
    assert logits.shape == (10, 8) and logits.requires_grad and hooks.top_k == 2
    hooks.remove()
    model(torch.randint(0, 1000, (2, 5)))
    assert hooks.take() == []


def test_presets_count_total_and_active_parameters():
    """The published sizes: Qwen3-30B-A3B (30.5B total, 3.3B active) and Qwen3-235B-A22B (235B, 22B)."""
    a3b, a22b = preset("qwen3-30b-a3b"), preset("qwen3-235b-a22b")
    assert round(a3b.num_parameters() / 1e9, 1) == 30.5 and round(a3b.num_parameters(active=True) / 1e9, 1) == 3.4
    assert round(a22b.num_parameters() / 1e9) == 235 and round(a22b.num_parameters(active=True) / 1e9) == 22
    # the count is the model's
    model = qwen3lab.new_model(tiny_moe(), seed=0)
    assert sum(p.numel() for p in model.parameters()) == tiny_moe().num_parameters()
    out = subprocess.run(
        [sys.executable, "-m", "qwen3lab", "info", "qwen3-30b-a3b"], capture_output=True, text=True, check=True
    ).stdout
    assert "qwen3_moe" in out and "active parameters" in out and f"{a3b.num_parameters(active=True):,}" in out


def test_dense_configs_are_written_without_moe_fields():
    dense = preset("tiny").to_hf_dict()
    assert dense["model_type"] == "qwen3" and "num_experts" not in dense and "norm_topk_prob" not in dense
    moe = tiny_moe().to_hf_dict()
    assert moe["model_type"] == "qwen3_moe" and moe["architectures"] == ["Qwen3MoeForCausalLM"]
    assert ModelConfig.from_hf_dict(moe).to_hf_dict() == moe
    assert isinstance(qwen3lab.new_model(tiny_moe()).model.layers[0].mlp, SparseMoeBlock)
