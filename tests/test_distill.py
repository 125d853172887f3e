"""Distillation (objective: distill): the divergence and its gradient against trl's GKDTrainer.generalized_jsd_loss,
taken chunk by chunk through both lm_heads; runs that sample on-policy on the engine, resume exactly, and read
prompt files."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import crash_after_step, hf_small

from qwen3lab.train.objectives import distill as distill_module
from qwen3lab.train.objectives.distill import distill_loss, divergence, prompt_of

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")


def trl_jsd(student_logits, teacher_logits, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(
        student_logits[None], teacher_logits[None], beta=beta, temperature=temperature, reduction="sum"
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["forward-kl", "jsd", "reverse-kl"])
def test_divergence_and_gradients_equal_trl_through_chunked_heads(beta, temperature):
    """Student and teacher of different widths, real vocabulary: our summed divergence over the learned positions
    (chunks of 5 through each lm_head) and its gradients in the student's hidden states and lm_head equal trl's on
    the full logits; the ignored positions get no gradient."""
    g = torch.Generator().manual_seed(0)
    V, T = 151936, 12
    hidden = torch.randn(1, T, 32, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(V, 32, generator=g)).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(1, T, 48, generator=g), 0.5 * torch.randn(V, 48, generator=g)
    labels = torch.randint(0, V, (1, T), generator=g)
    labels[0, :3] = labels[0, 7] = -100
    keep = labels[0] != -100

    want = trl_jsd((hidden @ weight.T)[0][keep], (teacher_hidden @ teacher_weight.T)[0][keep], beta, temperature)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    cfg = SimpleNamespace(beta=beta, temperature=temperature, top_k=0)
    loss, _ = distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, cfg, chunk=5)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    for got, ref in zip(grads, want_grads, strict=True):  # both are fp32 sums over 151,936 logits: each within
        # ~1.5e-4 of the gradient's scale from the fp64 value (measured), so within 5e-4 of each other
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=5e-4 * float(ref.abs().max()))
    assert grads[0][0, ~keep].abs().max() == 0


def test_top_k_is_forward_kl_to_the_teachers_renormalised_top_tokens():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 1000, generator=g).requires_grad_()
    teacher = 3 * torch.randn(6, 1000, generator=g)
    top, ids = (teacher / 0.8).topk(20, -1)
    p = top.softmax(-1)
    want = (p * (p.log() - (student / 0.8).log_softmax(-1).gather(1, ids))).sum(-1)
    (want_grad,) = torch.autograd.grad(want.sum(), student)
    value, grad = divergence(lambda: student.detach().clone(), lambda: teacher.clone(), 0.0, 0.8, top_k=20)
    torch.testing.assert_close(value, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_prompt_is_everything_before_the_last_learned_span():
    import numpy as np

    ids = np.arange(10)
    labels = np.array([-100, -100, 3, 4, -100, -100, -100, 8, 9, -100])  # label t is token t + 1
    assert prompt_of(ids, labels) == list(range(8))  # tokens 3, 4 and 8, 9 learned: the student writes from 8 on
    assert prompt_of(ids, np.full(10, -100)) == list(range(10))


def save_pair(tmp_path, tok):
    """A student (hf_small, hidden 32) and a wider random teacher (hidden 64), real vocabulary, one tokenizer; and
    chat.jsonl."""
    hf_small().save_pretrained(tmp_path / "student")
    cfg = transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        eos_token_id=151645,
    )
    torch.manual_seed(1)
    teacher = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # a peaked distribution to learn, as a trained teacher's (the init's is near uniform)
        teacher.model.embed_tokens.weight.mul_(10)
    teacher.save_pretrained(tmp_path / "teacher")
    for name in ("student", "teacher"):
        tok.save(tmp_path / name)
    rows = [
        {"messages": [{"role": "user", "content": f"Reverse {n}"}, {"role": "assistant", "content": str(n)[::-1]}]}
        for n in range(10, 26)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def distill_run(tmp_path, out, **keys):
    from qwen3lab import train

    cfg = {
        "model": str(tmp_path / "student"),
        "out": str(out),
        "objective": "distill",
        "data": {"train": str(tmp_path / "chat.jsonl"), "packing": False},
        "steps": 4,
        "batch_size": 2,
        "grad_accum": 2,
        "progress": False,
        "optim": {"lr": 3e-3},
        "distill": {"teacher": str(tmp_path / "teacher"), "lmbda": 0.5, "max_new_tokens": 6, "beta": 0.5},
    }
    for key, value in keys.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section] = cfg.get(section, {}) | {name: value}
        else:
            cfg[key] = value
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_batches_are_the_students_samples_of_the_datas_prompts(tmp_path, tok, monkeypatch):
    """lmbda 1: every micro-batch is sampled by the engine from the prompts of the data's rows (the conversation up
    to its assistant turn), at distill.temperature, at most max_new_tokens each; lmbda 0: none is."""
    save_pair(tmp_path, tok)
    calls = []
    original = distill_module.sample

    def recording(model, prompts, G, params, seed):
        completions = original(model, prompts, G, params, seed)
        calls.append((prompts, params, completions))
        return completions

    monkeypatch.setattr(distill_module, "sample", recording)
    metrics = distill_run(tmp_path, tmp_path / "on", distill__lmbda=1.0, distill__temperature=0.8)
    assert len(calls) == 4 * 2 and all(m["on_policy"] == 1.0 and m["completion_length"] <= 6 for m in metrics)
    prompts, params, completions = calls[0]
    assert len(prompts) == 2 and params.temperature == 0.8 and all(1 <= len(c) <= 6 for c in completions)
    assert tok.decode(prompts[0]).startswith("<|im_start|>user\nReverse ")
    assert tok.decode(prompts[0]).endswith("<|im_start|>assistant\n")
    calls.clear()
    metrics = distill_run(tmp_path, tmp_path / "off", distill__lmbda=0.0)
    assert not calls and all(m["on_policy"] == 0.0 and m["loss"] > 0 for m in metrics)


def test_distill_resumes_exactly_and_learns_from_prompt_files(tmp_path, tok, monkeypatch):
    """A crash and resume gives the uninterrupted run's losses (the on-policy draws and samples are seeded by step);
    a prompt file (no completions) trains on-policy and needs lmbda 1."""
    save_pair(tmp_path, tok)
    straight = distill_run(tmp_path, tmp_path / "a")
    assert 0 < sum(m["on_policy"] for m in straight) / len(straight) < 1  # both kinds of micro-batch
    with crash_after_step(monkeypatch, 3):
        distill_run(tmp_path, tmp_path / "b", save_every=2)
    resumed = distill_run(tmp_path, tmp_path / "b", save_every=2)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-5)

    rows = [{"prompt": [{"role": "user", "content": f"Reverse {n}"}]} for n in range(10, 14)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from qwen3lab.train.data import DataError

    with pytest.raises(DataError, match="distill.lmbda: 1"):
        distill_run(tmp_path, tmp_path / "p0", data__train=str(tmp_path / "prompts.jsonl"))
    metrics = distill_run(tmp_path, tmp_path / "p1", data__train=str(tmp_path / "prompts.jsonl"), distill__lmbda=1.0)
    assert all(m["loss"] > 0 and m["on_policy"] == 1.0 for m in metrics)


def test_distill_config_is_checked_before_anything_loads(tmp_path, tok):
    from qwen3lab.model.config import ConfigError
    from qwen3lab.train.config import check_train_config, load_train_config

    save_pair(tmp_path, tok)
    base = {"model": str(tmp_path / "student"), "objective": "distill", "data.train": "x.jsonl"}
    with pytest.raises(ConfigError, match="distill.teacher: give"):
        check_train_config(load_train_config(None, base))
    with pytest.raises(ConfigError, match="distill.top_k"):
        keys = base | {"distill.teacher": str(tmp_path / "teacher"), "distill.top_k": 8}
        check_train_config(load_train_config(None, keys))
    with pytest.raises(ConfigError, match="vocabulary of 512"):
        hf_tiny_dir = tmp_path / "tiny"
        from helpers import hf_tiny

        hf_tiny().save_pretrained(hf_tiny_dir)
        check_train_config(load_train_config(None, base | {"distill.teacher": str(hf_tiny_dir)}))


@pytest.mark.parametrize("teacher", ["nf4", "moe"])
def test_a_4bit_or_moe_teacher(tmp_path, tok, teacher):
    """The teacher held in 4 bits (its decoder linears NF4): the first step's loss within NF4's error of the 16-bit
    teacher's. A Qwen3 MoE teacher (tiny-moe, qwen3lab's own save) teaches a dense student."""
    import qwen3lab

    save_pair(tmp_path, tok)
    if teacher == "nf4":
        pytest.importorskip("bitsandbytes")
        full = distill_run(tmp_path, tmp_path / "16", steps=1, distill__lmbda=0.0)
        four = distill_run(tmp_path, tmp_path / "4", steps=1, distill__lmbda=0.0, distill__teacher_bits=4)
        assert four[0]["loss"] != full[0]["loss"] and four[0]["loss"] == pytest.approx(full[0]["loss"], rel=0.05)
        return
    qwen3lab.save_model(qwen3lab.new_model(qwen3lab.preset("tiny-moe"), seed=3), tmp_path / "moe")
    tok.save(tmp_path / "moe")
    metrics = distill_run(tmp_path, tmp_path / "from-moe", distill__teacher=str(tmp_path / "moe"))
    assert all(m["loss"] > 0 for m in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]


def test_stages_go_off_policy_then_on_policy_and_resume_inside_either(tmp_path, tok, monkeypatch):
    """Qwen3's order in one run: a stage on the data's completions, then a stage on the student's own (stages with
    distill.lmbda 0, then 1); a crash inside the second stage resumes onto the straight run."""
    save_pair(tmp_path, tok)
    stages = [
        {"name": "off", "steps": 2, "distill": {"lmbda": 0.0}},
        {"name": "on", "steps": 2, "distill": {"lmbda": 1.0}},
    ]
    straight = distill_run(tmp_path, tmp_path / "a", stages=stages, steps=0)
    assert [(m["stage"], m["on_policy"]) for m in straight] == [(0, 0.0), (0, 0.0), (1, 1.0), (1, 1.0)]
    with crash_after_step(monkeypatch, 3):
        distill_run(tmp_path, tmp_path / "b", stages=stages, steps=0, save_every=1)
    resumed = distill_run(tmp_path, tmp_path / "b", stages=stages, steps=0, save_every=1)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-5)
