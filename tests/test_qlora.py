"""QLoRA (`lora.base_bits: 4`): the frozen base's decoder linears as NF4 with double quantisation (bitsandbytes), the
same bytes and the same model as transformers + BitsAndBytesConfig + peft; its export; its training."""

import json

import pytest
import torch
from helpers import hf_tiny

import qwen3lab
from qwen3lab.train.config import LORA_TARGETS
from qwen3lab.train.lora import apply_lora, lora_modules, save_peft_adapter

pytest.importorskip("bitsandbytes")
from qwen3lab.train.quant import Linear4bit, load_model_4bit  # noqa: E402

# hidden 64 and MLP 128: bitsandbytes' CPU kernel needs every input width to be a whole number of 64-weight blocks
SHAPE = dict(vocab=151936, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("bf16")
    hf_tiny(**SHAPE).to(torch.bfloat16).save_pretrained(folder)
    tok.save(folder)
    return folder


def adapted_4bit(folder, seed=1):
    """Our 4-bit model with LoRA adapters whose B is not zero (so the adapters change the output)."""
    model = load_model_4bit(folder, LORA_TARGETS)
    torch.manual_seed(seed)
    apply_lora(model, 4, 8.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


def test_loaded_straight_into_4bit(bf16_dir):
    """Every decoder linear is NF4 at about half a byte per weight; embeddings and norms keep the checkpoint's
    bf16; nothing of the full-precision linears is left."""
    model = load_model_4bit(bf16_dir, LORA_TARGETS)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    weights = sum(m.in_features * m.out_features for m in layers)
    # per weight: 4 bits, one uint8 absmax per 64 weights, one fp32 scale per 256 absmaxes (the two 256-entry
    # codebooks of each layer are a fixed 2 KiB)
    held = sum(t.numel() * t.element_size() for m in layers for t in (m.packed, m.absmax, m.absmax2))
    assert held / weights == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head for m in model.modules())


def test_4bit_lora_equals_transformers_bitsandbytes_and_peft(bf16_dir, tmp_path, tok):
    """transformers + BitsAndBytesConfig(nf4, double quantisation) quantises the same checkpoint into the same
    weights, bit for bit. Its CPU kernel rounds each 4-bit layer's output to bf16 (measured: a layer differs from
    x @ W.T in fp32 by up to 2^-8 of its scale), so its logits are compared at that tolerance; the same dequantised
    weights in a plain fp32 transformers model, with our adapter through peft, give our logits to fp32 rounding."""
    import bitsandbytes.functional as BF
    import peft
    import transformers

    ours = adapted_4bit(bf16_dir).float()  # computed in fp32, as training on a CPU without fast bf16 does
    save_peft_adapter(ours, tmp_path / "adapter", str(bf16_dir))
    ids = torch.tensor([tok.encode("QLoRA holds the frozen base in four bits; the adapters learn in fp32.")])
    with torch.no_grad():
        want = ours(ids)

    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        bf16_dir, quantization_config=q, device_map="cpu", dtype=torch.float32
    )
    plain = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    ours_layers = {n.removesuffix(".base"): m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(ours_layers) == 7 * ours.config.num_hidden_layers
    for name, layer in ours_layers.items():
        theirs = ref.get_submodule(name).weight
        deq = BF.dequantize_4bit(theirs.data, theirs.quant_state).float()
        assert torch.equal(deq, layer.dequantized(torch.float32)), name  # the same NF4 bytes and scales
        with torch.no_grad():
            plain.get_submodule(name).weight.copy_(deq)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    plain = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
    with torch.no_grad():
        bnb_logits, plain_logits = ref(ids).logits, plain(ids).logits
    torch.testing.assert_close(want, plain_logits, atol=2e-5, rtol=1e-5)
    scale = want.abs().max().item()
    assert (want - bnb_logits).abs().max().item() < 0.03 * scale


def test_export_equals_the_4bit_model_with_its_adapters(bf16_dir, tmp_path, tok):
    """model/: the base dequantised, the adapters merged once, written in the checkpoint's bf16 — our 4-bit model
    with its adapters up to rounding the merged weights to bf16; adapter/ loads in peft (previous test)."""
    from qwen3lab.train.export import export

    ours = adapted_4bit(bf16_dir)
    ids = torch.tensor([tok.encode("The export streams one dequantised, merged weight at a time.")])
    with torch.no_grad():
        want = ours.float()(ids)
    ours = adapted_4bit(bf16_dir)
    export(ours, tok, None, tmp_path, str(bf16_dir))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    exported = qwen3lab.load_model(tmp_path / "model", dtype="float32", device="cpu")
    with torch.no_grad():
        got = exported(ids)
    # bf16 rounding of each merged weight: 2^-9 relative per weight, through 2 layers and the tied head
    assert (got - want).abs().max().item() < 0.01 * want.abs().max().item()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    layer = ours.model.layers[0].mlp.up_proj
    merged = layer.merged_weight().float()
    assert torch.equal(exported.model.layers[0].mlp.up_proj.weight, merged)  # what was written is what was merged


@pytest.mark.slow
def test_4bit_lora_training_tracks_the_bf16_base(tmp_path, tok):
    """The demo's model size and data: a LoRA run on the 4-bit base follows the same run on the bf16 base (first
    loss within 2%, last within 5%), and exports a folder that loads."""
    from qwen3lab.demo import make_tasks, write_jsonl

    folder = tmp_path / "demo-bf16"
    qwen3lab.save_model(qwen3lab.new_model(qwen3lab.preset("demo"), seed=0), folder, dtype=torch.bfloat16)
    tok.save(folder)
    train_set, _ = make_tasks(400, 4, seed=0)
    write_jsonl(tmp_path / "train.jsonl", ({"messages": e.messages} for e in train_set))
    losses = {}
    for bits in (16, 4):
        cfg = {
            "model": str(folder),
            "out": str(tmp_path / f"run{bits}"),
            "steps": 30,
            "batch_size": 2,
            "precision": "fp32",
            "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 512},
            "lora": {"rank": 16, "alpha": 32, "base_bits": bits},
            "optim": {"lr": 2e-3, "warmup_steps": 3},
        }
        run = qwen3lab.train(cfg)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[bits] = [r["loss"] for r in rows]
    first16, first4 = losses[16][0], losses[4][0]
    last16, last4 = losses[16][-1], losses[4][-1]
    assert abs(first4 - first16) <= 0.02 * first16, (first16, first4)
    assert abs(last4 - last16) <= 0.05 * last16, (last16, last4)
    assert last4 < first4 - 1.0  # it learns (random init, 30 steps: about 11.9 -> 10.5 nats)
    assert qwen3lab.load_model(tmp_path / "run4" / "model", dtype="float32", device="cpu") is not None


def test_4bit_moe_base_trains_and_exports_as_transformers_reads_it(tmp_path, tok):
    """Qwen3 MoE on a 4-bit base: every expert's linears NF4, the router kept in the checkpoint's dtype (it is not
    a LoRA target, and top-k picks are sensitive to its rounding); adapters on the experts too. The export is the
    4-bit model with its adapters merged (up to bf16 rounding) in transformers' Qwen3MoeForCausalLM; and a training
    run on such a base logs its balancing loss and writes a folder that loads."""
    import transformers

    from qwen3lab.model.config import preset
    from qwen3lab.train import train
    from qwen3lab.train.export import export

    cfg = preset("tiny-moe", hidden_size=64, moe_intermediate_size=64, intermediate_size=128, head_dim=16)
    qwen3lab.save_model(qwen3lab.new_model(cfg, seed=0).to(torch.bfloat16), tmp_path / "base")
    tok.save(tmp_path / "base")
    ours = load_model_4bit(tmp_path / "base", LORA_TARGETS)
    mlp = ours.model.layers[0].mlp
    assert isinstance(mlp.experts[7].down_proj, Linear4bit) and type(mlp.gate) is torch.nn.Linear
    assert mlp.gate.weight.dtype == torch.bfloat16
    torch.manual_seed(1)
    apply_lora(ours, 4, 8.0, experts=True)
    for m in lora_modules(ours).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    ids = torch.tensor([tok.encode("Experts in four bits, each with its own adapter.")])
    with torch.no_grad():
        want = ours.float()(ids)
    export(ours, tok, None, tmp_path / "out", str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max().item() < 0.01 * want.abs().max().item()

    data = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "Sort 3142"}, {"role": "assistant", "content": "1234"}]}
    data.write_text((json.dumps(chat) + "\n") * 4)
    config = {"model": str(tmp_path / "base"), "out": str(tmp_path / "run"), "steps": 2, "progress": False}
    config |= {"data": {"train": str(data)}, "lora": {"rank": 4, "base_bits": 4}, "moe": {"lora_experts": True}}
    run = train(config)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 2 and all("aux_loss" in m and "expert_load/cv" in m for m in steps)
    assert qwen3lab.load_model(run / "model").config.num_experts == 8
