"""DPO (objective: dpo) against trl's DPOTrainer (loss_type sigmoid) on the same weights and pairs: loss, rewards
and every gradient, full fine-tuning and LoRA, with the policy already apart from the reference (at equal weights
every implementation gives ln 2)."""

import json

import numpy as np
import pytest
import torch
from helpers import crash_after_step, hf_small

import qwen3lab
from qwen3lab.train import batching as B
from qwen3lab.train import data as D
from qwen3lab.train.lora import apply_lora
from qwen3lab.train.net import WithLoss

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "What is 12 plus 30?"}],
        "chosen": [{"role": "assistant", "content": "42"}],
        "rejected": [{"role": "assistant", "content": "It is 52, I think."}],
    },
    {
        "prompt": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"}],
        "chosen": [{"role": "assistant", "content": "Bonjour !"}],
        "rejected": [{"role": "assistant", "content": "Hello to you."}],
    },
    {  # the implicit form: two whole conversations sharing their prompt
        "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
    },
    {
        "prompt": [{"role": "user", "content": "Reverse 1234"}],
        "chosen": [{"role": "assistant", "content": "4321"}],
        "rejected": [{"role": "assistant", "content": "1234"}],
    },
]
# trl's dataset columns are uniform (its prompt extraction looks at the first row): the implicit pair goes to trl in
# the explicit form that extraction gives, and to qwen3lab as written
TRL_PAIRS = [
    p if "prompt" in p else {"prompt": p["chosen"][:1], "chosen": p["chosen"][1:], "rejected": p["rejected"][1:]}
    for p in PAIRS
]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def trl_step(policy, ref, rows, tmp_path, tok_dir, beta, peft_config=None):
    """trl's loss on one batch of every pair, its logged metrics, and the model holding the gradients it left."""
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=ref,
        peft_config=peft_config,
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=len(rows),
            beta=beta,
            report_to=[],
            use_cpu=True,
            bf16=False,
            max_length=512,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(tok_dir),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    policy = trainer.model.train()
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    metrics = {k: float(np.mean(v)) for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics, policy


def ours_step(model, rows, tmp_path, tok, beta, ref_model=None):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = D.load_preferences(path, tok, 512)
    batch = B.collate_pairs(data, list(range(len(rows))), tok.pad_token_id)
    net = WithLoss(model, None, True, 7, objective="dpo", beta=beta, ref_model=ref_model)
    loss_sum, metrics = net(batch)
    (loss_sum / len(rows)).backward()
    return float(loss_sum) / len(rows), {k: v / len(rows) for k, v in metrics.items()}


def close(a, b, rtol=1e-4, atol=1e-6):
    return abs(a - b) <= atol + rtol * abs(b)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_loss_rewards_and_gradients_equal_trl(tmp_path, tok, lora):
    beta = 0.5
    base = hf_small()
    tok.save(tmp_path / "tok")
    if lora:  # the reference is the same model with its adapters off; random (non-zero) adapters move the policy
        base.save_pretrained(tmp_path / "base")
        config = peft.LoraConfig(init_lora_weights=False, **LORA)
        want_loss, want, policy = trl_step(base, None, TRL_PAIRS, tmp_path, tmp_path / "tok", beta, config)
        ours = qwen3lab.load_model(tmp_path / "base", dtype="float32", device="cpu")
        apply_lora(ours, LORA["r"], LORA["lora_alpha"], targets=LORA["target_modules"])
        adapters = {
            k.replace("base_model.model.", "").replace(".default", ""): v
            for k, v in policy.state_dict().items()
            if "lora_" in k
        }
        ours.load_state_dict(adapters, strict=False)
        grads = {
            k.replace("base_model.model.", "").replace(".default", ""): p.grad
            for k, p in policy.named_parameters()
            if p.requires_grad
        }
        ref = None
    else:  # the reference: the starting weights; the policy: moved away from them
        base.save_pretrained(tmp_path / "ref")
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
        base.save_pretrained(tmp_path / "policy")
        ref_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
        want_loss, want, _ = trl_step(base, ref_hf, TRL_PAIRS, tmp_path, tmp_path / "tok", beta)
        ours = qwen3lab.load_model(tmp_path / "policy", dtype="float32", device="cpu")
        ref = qwen3lab.load_model(tmp_path / "ref", dtype="float32", device="cpu").requires_grad_(False)
        grads = {k: p.grad for k, p in base.named_parameters()}
    got_loss, got = ours_step(ours, PAIRS, tmp_path, tok, beta, ref)
    assert not close(want_loss, np.log(2), rtol=1e-3)  # the policy really is apart from the reference
    assert close(got_loss, want_loss), (got_loss, want_loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert close(got[key], want[key]), (key, got[key], want[key])
    trained = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert set(trained) == set(grads)
    for name, g in trained.items():  # relative to the gradient's size: elements near zero carry rounding alone
        assert float((g - grads[name]).norm() / grads[name].norm()) < 1e-4, name


def run(folder, pairs, out, **keys):
    from qwen3lab import train

    cfg = {
        "model": str(folder),
        "out": str(out),
        "objective": "dpo",
        "data": {"train": str(pairs)},
        "steps": 6,
        "batch_size": 2,
        "progress": False,
        "optim": {"lr": 5e-3, "schedule": "constant"},
    } | keys
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_runs_learn_and_every_reference_agrees(tmp_path, tok, lora, monkeypatch):
    """A DPO run through the training loop: ln 2 at the first step, rewards pulling apart; the precomputed
    reference gives the run the live reference gives (a frozen copy for full fine-tuning, adapters off for LoRA),
    and a crashed precompute run resumes onto the same losses."""
    hf_small().save_pretrained(tmp_path / "base")
    tok.save(tmp_path / "base")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 2))
    keys = {"lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 2e-2, "schedule": "constant"}} if lora else {}
    live = run(tmp_path / "base", pairs, tmp_path / "live", **keys)
    assert live[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert live[-1]["loss"] < 0.65 and live[-1]["rewards/margins"] > 0.05
    pre = run(tmp_path / "base", pairs, tmp_path / "pre", dpo={"ref": "precompute"}, **keys)
    assert [m["loss"] for m in pre] == pytest.approx([m["loss"] for m in live], abs=1e-5)
    assert (tmp_path / "pre" / "ref_logps.npy").is_file()

    with crash_after_step(monkeypatch, 4):
        run(tmp_path / "base", pairs, tmp_path / "resumed", dpo={"ref": "precompute"}, save_every=3, **keys)
    resumed = run(tmp_path / "base", pairs, tmp_path / "resumed", dpo={"ref": "precompute"}, save_every=3, **keys)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in pre], abs=1e-6)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "live" / "model")
    assert exported.config.num_hidden_layers == 2
