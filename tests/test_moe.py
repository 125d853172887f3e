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


# ---- training ----

CHATS = [
    {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
    for a in range(6)
    for b in range(6)
]


def moe_run(tmp_path, name, **keys):
    import json

    from qwen3lab.train import train

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    config = {
        "model": "tiny-moe",
        "out": str(tmp_path / name),
        "data": {"train": str(data), "max_length": 64, "shuffle": False},
        "steps": 3,
        "progress": False,
        "optim": {"lr": 1e-2},
        "moe": {"aux_loss_coef": 1.0},  # large, so a wrong balancing gradient moves the weights visibly
    }
    for key, value in keys.items():
        config[key] = config.get(key, {}) | value if isinstance(value, dict) else value
    run = train(config)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, qwen3lab.load_model(run / "model", dtype="float32", device="cpu").state_dict()


def test_global_balance_over_accumulated_micro_batches_trains_as_one_batch(tmp_path):
    """Global: 2 micro-batches of 2 rows take the steps of one batch of 4 rows (LM loss, balancing loss, weights);
    micro balancing with the same micro-batches is another loss, and moves the weights elsewhere."""
    one, w_one = moe_run(tmp_path, "one", batch_size=4)
    two, w_two = moe_run(tmp_path, "two", batch_size=2, grad_accum=2)
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-5)
        assert b["expert_load/cv"] == pytest.approx(a["expert_load/cv"], rel=1e-5)
    torch.testing.assert_close(w_two, w_one, atol=5e-5, rtol=1e-4)  # Adam magnifies rounding where grads are ~0
    micro, w_micro = moe_run(tmp_path, "micro", batch_size=2, grad_accum=2, moe={"balance": "micro"})
    assert micro[0]["aux_loss"] != pytest.approx(one[0]["aux_loss"], rel=1e-4)
    assert max((w_micro[k] - w_one[k]).abs().max() for k in w_one) > 1e-3
    assert {"expert_load/max_over_mean/layer0", "expert_load/cv/layer1"} <= set(one[0])


def test_lora_on_moe_leaves_experts_and_router_frozen_unless_asked(tmp_path):
    from qwen3lab.train.lora import apply_lora, lora_modules

    model = qwen3lab.new_model(tiny_moe(), seed=0)
    apply_lora(model, 4, 8.0, experts=False)
    names = list(lora_modules(model))
    assert names and not any(".experts." in n for n in names) and not any(n.endswith(".gate") for n in names)
    assert not model.model.layers[0].mlp.gate.weight.requires_grad
    model = qwen3lab.new_model(tiny_moe(), seed=0)
    apply_lora(model, 4, 8.0)
    assert any(".experts.3.down_proj" in n for n in lora_modules(model))
    metrics, _ = moe_run(tmp_path, "lora", lora={"rank": 4}, moe={"lora_experts": True})
    assert metrics[-1]["loss"] < metrics[0]["loss"]


LORA_ROUTER = {"lora": {"rank": 4}, "moe": {"aux_loss_coef": 1.0, "lora_experts": True, "lora_router": True}}


@pytest.mark.slow  # processes under torchrun's launcher
@pytest.mark.parametrize("keys", [{}, LORA_ROUTER], ids=["full", "lora+router"])
def test_global_balance_on_two_ranks_trains_as_one_process(tmp_path, keys):
    """torchrun + FSDP2, 2 gloo ranks x 2 micro-batches of 1 row: the steps of one process with one batch of 4
    rows — LM loss, balancing loss (counts summed over micro-batches and ranks) and exported weights; with LoRA and
    trained routers, the sharded export's adapter folder (routers as modules_to_save) too."""
    import json
    import os
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file

    one, w_one = moe_run(tmp_path, "one", batch_size=4, **keys)
    config = {
        "model": "tiny-moe",
        "data": {"train": str(tmp_path / "chats.jsonl"), "max_length": 64, "shuffle": False},
        "steps": 3,
        "progress": False,
        "optim": {"lr": 1e-2},
        "moe": {"aux_loss_coef": 1.0},
        "batch_size": 1,
        "grad_accum": 2,
    } | keys
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    cmd += ["train", str(tmp_path / "two.yaml"), "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-5)
    w_two = qwen3lab.load_model(tmp_path / "two" / "model", dtype="float32", device="cpu").state_dict()
    torch.testing.assert_close(w_two, w_one, atol=5e-5, rtol=1e-4)
    if keys:
        a_one, a_two = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("one", "two"))
        assert "base_model.model.model.layers.1.mlp.gate.weight" in a_two
        torch.testing.assert_close(a_two, a_one, atol=5e-5, rtol=1e-4)


def test_engine_greedy_and_batched_equal_transformers(tmp_path, tok):
    """The engine on an MoE model: greedy decoding equals transformers' generate, one prompt and a batch."""
    from qwen3lab.generate import generate

    ours = qwen3lab.new_model(preset("tiny-moe"), seed=0).eval()
    qwen3lab.save_model(ours, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    prompts = [[151644, 872, 198, 9707], [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30]]
    batch = generate(ours, tok, prompts, max_new_tokens=24, stop_ids=[])
    for ids, got in zip(prompts, batch, strict=True):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)[0, len(ids) :]
        assert got.ids == ref.tolist()


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_preference_and_rl_objectives_run_on_moe_with_the_balancing_loss(tmp_path, objective):
    import json

    from qwen3lab.train import train

    rows = {
        "dpo": [
            {
                "prompt": c["messages"][:1],
                "chosen": c["messages"][1:],
                "rejected": [{"role": "assistant", "content": "?"}],
            }
            for c in CHATS[:8]
        ],
        "grpo": [{"prompt": c["messages"][:1], "answer": c["messages"][1]["content"]} for c in CHATS[:8]],
    }[objective]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": "tiny-moe",
        "out": str(tmp_path / "run"),
        "objective": objective,
        "data": {"train": str(data), "max_length": 64},
        "steps": 2,
        "batch_size": 2,
        "grad_accum": 2,
        "lora": {"rank": 4},
        "grpo": {"num_generations": 2, "max_completion_length": 4},
        "progress": False,
    }
    run = train(config)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["aux_loss"] > 0 and m["expert_load/max_over_mean"] >= 1 for m in metrics)
    assert (run / "model" / "config.json").is_file()


LORA_VARIANTS = ["attention+dense", "experts-too", "router-too"]


@pytest.mark.parametrize("experts,router", [(False, False), (True, False), (False, True)], ids=LORA_VARIANTS)
def test_lora_export_of_an_moe_loads_in_peft(tmp_path, tok, experts, router):
    """LoRA on attention (the router frozen), the experts too or not, the routers trained whole or not:
    transformers' Qwen3MoeForCausalLM + adapter/ in peft (which converts per-expert adapters to its fused experts,
    and reads the routers as modules_to_save) gives model/'s logits."""
    peft = pytest.importorskip("peft")
    qwen3lab.save_model(qwen3lab.new_model(preset("tiny-moe"), seed=0), tmp_path / "base")
    tok.save(tmp_path / "base")
    lora, moe = {"rank": 4, "alpha": 8.0}, {"lora_experts": experts, "lora_router": router}
    _, trained = moe_run(tmp_path, "run", model=str(tmp_path / "base"), lora=lora, moe=moe)
    base_router = qwen3lab.load_model(tmp_path / "base").model.layers[0].mlp.gate.weight
    assert torch.equal(trained["model.layers.0.mlp.gate.weight"], base_router) != router
    ids = torch.tensor([tok.encode_chat(CHATS[0]["messages"]).input_ids])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)


def test_qwen3lab_eval_on_data_scores_an_moe_model(tmp_path, tok):
    """`qwen3lab eval`'s scorer on an MoE model: the loss on chats equals transformers' mean token loss."""
    import json

    from qwen3lab.eval.evaluation import evaluate_data

    model = qwen3lab.new_model(preset("tiny-moe"), seed=0).eval()
    qwen3lab.save_model(model, tmp_path / "m")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS[:4]))
    metrics, _ = evaluate_data(model, tok, tmp_path / "d.jsonl")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    total, count = 0.0, 0
    for chat in CHATS[:4]:
        enc = tok.encode_chat(chat["messages"])
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_mask, strict=True)]])
        with torch.no_grad():
            out = hf(ids, labels=labels)
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + float(out.loss) * n, count + n
    assert metrics["loss_tokens"] == count and metrics["loss"] == pytest.approx(total / count, rel=1e-5)


def test_task_expert_mutual_information_spans_zero_to_log2_tasks():
    from qwen3lab.demo_moe import mutual_information

    uniform = {t: torch.full((3, 8), 1 / 8) for t in "abcd"}
    assert mutual_information(uniform) == pytest.approx(0.0, abs=1e-6)
    own = {t: torch.nn.functional.one_hot(torch.full((3,), i), 8).float() for i, t in enumerate("abcd")}
    assert mutual_information(own) == pytest.approx(2.0)  # each task its own expert: log2(4) bits
    half = {t: (own[t] + uniform[t]) / 2 for t in "abcd"}
    assert 0 < mutual_information(half) < 2


@pytest.mark.slow
def test_demo_moe_trains_both_balancings_and_draws_the_routing(tmp_path):
    from qwen3lab.demo_moe import run_moe_demo

    lines = []
    results = run_moe_demo(out=str(tmp_path / "demo-moe"), steps=3, log=lines.append)
    for balance in ("global", "micro"):
        r = results[balance]
        assert set(r["accuracy"]) == {"max", "reverse", "sort", "tool"} and r["eval_loss"] > 0
        assert len(r["shares"]["sort"]) == 3 and sum(r["shares"]["sort"][0]) == pytest.approx(1.0)
        assert (tmp_path / "demo-moe" / balance / "model" / "config.json").is_file()
    assert (tmp_path / "demo-moe" / "experts.png").stat().st_size > 0
    assert any(line.startswith("global balancing: held-out exact match") for line in lines)


def test_bf16_rows_padded_for_onednn_give_the_unpadded_results(monkeypatch):
    """Under bf16 on the CPU each expert's rows are padded to a multiple of 32 (oneDNN builds a kernel per shape):
    outputs and gradients as without padding, to bf16 rounding."""
    from qwen3lab.model import mlp

    x = torch.randn(2, 16, 64)
    results, rows = [], []
    for bucket in (1, 32):
        monkeypatch.setattr(mlp, "_ROW_BUCKET", bucket)
        block = qwen3lab.new_model(tiny_moe(), seed=0).model.layers[0].mlp
        for expert in block.experts:
            expert.gate_proj.register_forward_hook(lambda m, args, out, b=bucket: rows.append((b, args[0].shape[0])))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        y.float().square().sum().backward()
        results.append((y.detach().float(), {n: p.grad for n, p in block.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1], results[0], atol=2e-2, rtol=2e-2)
    assert all(n % 32 == 0 for b, n in rows if b == 32) and any(n % 32 for b, n in rows if b == 1)
    assert mlp._onednn_bf16(torch.zeros(1, dtype=torch.bfloat16)) and not mlp._onednn_bf16(torch.zeros(1))


def test_server_greedy_completions_on_moe_equal_transformers(tmp_path, tok):
    """The OpenAI server on an MoE model: temperature-0 completions (one prompt and two in one request, batched by
    the engine) are transformers' greedy continuations, up to the first stop token if one comes."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from helpers import serving

    from qwen3lab.infer.sampling import default_stop_ids
    from qwen3lab.serve import create_app

    ours = qwen3lab.new_model(preset("tiny-moe", initializer_range=0.3), seed=0).eval()  # varied greedy text
    qwen3lab.save_model(ours, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    prompts = [[151644, 872, 198, 9707], [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30]]
    with serving(create_app(ours, tok, "moe")) as url:
        body = {"model": "moe", "prompt": prompts, "max_tokens": 16, "temperature": 0}
        choices = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert len(choices) == 2
    for ids, choice in zip(prompts, sorted(choices, key=lambda c: c["index"]), strict=True):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None)[0, len(ids) :]
        ref = ref.tolist()
        stops = [i for i, t in enumerate(ref) if t in default_stop_ids(ours)]
        if choice["finish_reason"] == "stop":
            ref = ref[: stops[0]]
        else:
            assert not stops
        assert choice["text"] == tok.decode(ref)
