"""GRPO's loss against trl's GRPOTrainer: the same prompts, injected completions, advantages and old / reference
log-probs give the same loss and gradients for every loss type (sampling is not compared)."""

import re
from dataclasses import replace

import pytest
import torch
from helpers import crash_after_step, hf_small

import qwen3lab
from qwen3lab.train import batching as B
from qwen3lab.train import data as D
from qwen3lab.train.config import GRPOConfig
from qwen3lab.train.net import hidden_states
from qwen3lab.train.objectives.grpo import LOSS_TYPES, grpo_loss, sampler_weights
from qwen3lab.train.objectives.logprob import token_sequences

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

G, PROMPT_LEN, MAX_COMPLETION = 4, 6, 9


def rollout(seed=0):
    """Two prompts of one length (trl's forward takes positions 0..T-1 even under left padding), G completions each
    of varied lengths, advantages, and old / reference log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1000, 150000, (2, PROMPT_LEN), generator=g).repeat_interleave(G, 0)  # [2G, P]
    lengths = torch.randint(2, MAX_COMPLETION + 1, (2 * G,), generator=g)
    completions = torch.randint(1000, 150000, (2 * G, MAX_COMPLETION), generator=g)
    mask = (torch.arange(MAX_COMPLETION)[None] < lengths[:, None]).long()
    completions = completions * mask  # padding id 0 after each completion
    advantages = torch.randn(2 * G, generator=g)
    noise = [0.3 * torch.randn(2 * G, MAX_COMPLETION, generator=g) for _ in range(2)]
    return prompts, completions, mask, advantages, noise


def trl_trainer(folder, tmp_path, cfg: GRPOConfig):
    """trl's GRPOTrainer on the model in `folder` with our GRPO settings."""
    return trl.GRPOTrainer(
        model=str(folder),  # by path: trl loads its reference copy from there
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=trl.GRPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=2 * cfg.num_generations,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            loss_type=cfg.loss_type,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            beta=cfg.beta,
            importance_sampling_level=cfg.importance_sampling_level,
            delta=cfg.delta or None,
            mask_truncated_completions=cfg.mask_truncated_completions,
            use_cpu=True,
            bf16=False,
            report_to=[],
        ),
        train_dataset=datasets.Dataset.from_list([{"prompt": "hi"}] * 4),
        processing_class=transformers.AutoTokenizer.from_pretrained(folder),
    )


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no-kl", "kl"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_and_gradients_equal_trl(tmp_path, tok, loss_type, beta):
    equal_to_trl(tmp_path, tok, loss_type=loss_type, beta=beta)


VARIANTS = {
    "gspo-dapo": dict(importance_sampling_level="sequence"),
    "gspo-grpo-kl": dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04),
    "delta": dict(delta=1.1),
    "cispo-cap-5": dict(loss_type="cispo", epsilon_high=5.0),
}
SAMPLER = dict(sampler_clip_min=0.5, sampler_clip_max=1.5)  # tight, so that some ratios meet each bound
VARIANTS |= {
    "sampler-token-truncate": dict(sampler_correction="token_truncate", **SAMPLER),
    "sampler-token-mask-kl": dict(sampler_correction="token_mask", beta=0.04, **SAMPLER),
    "sampler-sequence-truncate": dict(sampler_correction="sequence_truncate", **SAMPLER),
    "sampler-sequence-mask-grpo": dict(sampler_correction="sequence_mask", loss_type="grpo", **SAMPLER),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS)
def test_gspo_two_sided_clipping_and_cispo_equal_trl(tmp_path, tok, variant):
    """Sequence-level importance sampling (GSPO), delta's two-sided clip, cispo's capped weights: trl's loss and
    gradients on the same injected rollouts."""
    equal_to_trl(tmp_path, tok, **variant)


def equal_to_trl(tmp_path, tok, **keys):
    hf_small().save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    settings = dict(num_generations=G, max_completion_length=MAX_COMPLETION, temperature=0.7, epsilon=0.2)
    cfg = GRPOConfig(**settings | {"epsilon_high": 0.28} | keys)
    loss_type = cfg.loss_type
    trainer = trl_trainer(tmp_path / "m", tmp_path, cfg)
    trainer.current_gradient_accumulation_steps = 1
    hf = trainer.model
    prompts, completions, mask, advantages, (old_noise, ref_noise) = rollout()
    with torch.no_grad():  # old and reference log-probs: the policy's, moved a little (so ratios clip, KL is not 0)
        logits = hf(torch.cat([prompts, completions], 1)).logits[:, PROMPT_LEN - 1 : -1] / cfg.temperature
        logps = logits.log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    old, ref = logps + old_noise, logps + ref_noise
    sampled = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(7))  # the engine's
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    if cfg.sampler_correction != "none":  # the ratio as trl's _generate_and_score_completions makes it
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        diff = (old - sampled) * mask
        ratio = (diff.sum(-1, keepdim=True) if cfg.sampler_correction.startswith("sequence") else diff).exp()
        low, high = cfg.sampler_clip_min, cfg.sampler_clip_max
        if cfg.sampler_correction.endswith("truncate"):
            inputs["importance_sampling_ratio"] = ratio.clamp(min=low, max=high)
        else:
            inputs["importance_sampling_ratio"] = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    hf.train()
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()

    ours = qwen3lab.load_model(tmp_path / "m", dtype="float32", device="cpu")
    examples = [
        (p.tolist() + c[: int(m.sum())].tolist(), [0] * PROMPT_LEN + [1] * int(m.sum()))
        for p, c, m in zip(prompts, completions, mask, strict=True)
    ]
    data = D.TokenizedData.from_examples(examples)
    batch = B.collate_sequences(data, [[0, 1, 2], [3], [4, 5], [6, 7]], tok.pad_token_id)  # packed: order kept
    keep = mask.bool()
    n_tokens, n_seq = int(mask.sum()), 2 * G
    batch |= {
        "advantages": advantages,
        "old_logps": old[keep],
        "ref_logps": ref[keep],
        "num_items": torch.tensor({"dapo": n_tokens, "cispo": n_tokens, "bnpo": 1}.get(loss_type, n_seq)),
    }
    if cfg.sampler_correction != "none":
        batch["sampler_weights"] = sampler_weights(old[keep], sampled[keep], token_sequences(batch), n_seq, cfg)
        got = batch["sampler_weights"]
        want_w = inputs["importance_sampling_ratio"].expand_as(mask)[keep]
        torch.testing.assert_close(got, want_w)
        assert 0 < float((got == (0 if cfg.sampler_correction.endswith("mask") else 1.5)).float().mean()) < 1
    hidden, _ = hidden_states(ours, batch, True, None)
    loss_sum, metrics = grpo_loss(hidden, ours.lm_head.weight, batch, replace(cfg), chunk=5)
    loss = loss_sum / batch["num_items"]
    loss.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    assert 0 < metrics["clip_ratio"] / float(batch["num_items"]) < 1  # some tokens clipped, not all
    with torch.no_grad():  # the entropy metric: the mean entropy of the completion positions' distributions
        logp = (hf(torch.cat([prompts, completions], 1)).logits[:, PROMPT_LEN - 1 : -1] / cfg.temperature).log_softmax(
            -1
        )
        want_entropy = float(-(logp.exp() * logp).sum(-1)[keep].mean())
    assert metrics["entropy"] / float(batch["num_items"]) == pytest.approx(want_entropy, rel=1e-4)
    for name, p in ours.named_parameters():
        ref_grad = dict(hf.named_parameters())[name].grad
        assert float((p.grad - ref_grad).norm() / ref_grad.norm()) < 1e-5, name


def even_ids(prompts, completions, completion_ids, **_):
    """A reward for the tests: the share of even token ids (varies between completions, so advantages do)."""
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]


SEEN: list = []  # what `recording` was handed


def recording(prompts, completions, completion_ids, **_):
    SEEN.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids})
    return [0.0] * len(completions)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
def test_reward_functions_see_what_trl_hands_them(tmp_path, tok, monkeypatch, chat):
    """For the same completion ids, the reward functions get the texts trl's GRPOTrainer decodes for them: no stop
    token in the text (ended by <|im_end|>, by <|endoftext|>, or cut at max_completion_length), think tags kept."""
    import json

    from qwen3lab import train
    from qwen3lab.train.objectives.rollouts import Rollouts

    hf_small().save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    answer = tok.encode("<think>\n\n</think>\n\n3579")
    completion_ids = [answer + [im_end], answer + [endoftext], answer[:6], tok.encode("<tool_call>\n{}") + [im_end]]
    prompt = [{"role": "user", "content": "Sort 9753"}] if chat else "Sort 9753"
    cfg = GRPOConfig(num_generations=4, max_completion_length=len(answer) + 1)

    trainer = trl_trainer(tmp_path / "m", tmp_path, cfg)
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *args, **kw: (completion_ids, None))
    trl_completions = trainer._generate([prompt] * 4)[3]

    monkeypatch.setattr(Rollouts, "_generate", lambda self, rows, step, micro: completion_ids)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt, "answer": "3579"}) + "\n")
    SEEN.clear()
    train(
        {
            "model": str(tmp_path / "m"),
            "out": str(tmp_path / "ours"),
            "objective": "grpo",
            "steps": 1,
            "batch_size": 1,
            "progress": False,
            "data": {"train": str(tmp_path / "p.jsonl")},
            "grpo": {
                "num_generations": 4,
                "max_completion_length": cfg.max_completion_length,
                "rewards": ["test_grpo:recording", "exact_match"],
            },
        }
    )
    assert SEEN[0]["completions"] == trl_completions
    assert SEEN[0]["completion_ids"] == completion_ids and SEEN[0]["prompts"] == [prompt] * 4
    metrics = json.loads((tmp_path / "ours" / "metrics.jsonl").read_text())
    assert metrics["rewards/exact_match"] == 0.5  # the two completions that stopped after "3579"


def test_builtin_rewards_and_advantages():
    from qwen3lab.train.objectives.rewards import exact_match, load_reward, think_format, tool_call_json
    from qwen3lab.train.objectives.rollouts import advantages

    chat = [[{"role": "assistant", "content": c}] for c in ("<think>\nhm\n</think>\n\n42", " 42 ", "41", "<think>x")]
    assert exact_match(None, chat, answer=["42", 42, "42", "42"]) == [1.0, 1.0, 0.0, 0.0]
    assert think_format(None, chat) == [1.0, 0.0, 0.0, 0.0]
    calls = ['<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "<tool_call>{oops}</tool_call>", "no"]
    assert tool_call_json(None, calls) == [1.0, 0.0, None]
    assert load_reward("test_grpo:even_ids") is even_ids
    with pytest.raises(ValueError, match="module:function"):
        load_reward("exactmatch")
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    group = advantages(r, 2, "group")  # trl: (r - group mean) / (group std (Bessel) + 1e-4)
    torch.testing.assert_close(group[:4], (r[:4] - 0.5) / (r[:4].std() + 1e-4))
    assert group[4:].abs().max() == 0  # a group that agrees teaches nothing
    torch.testing.assert_close(advantages(r, 2, "batch")[:4], (r[:4] - 0.5) / (r.std() + 1e-4))
    torch.testing.assert_close(advantages(r, 2, "none")[:4], r[:4] - 0.5)


def test_grpo_run_rolls_out_scores_and_resumes_exactly(tmp_path, tok, monkeypatch):
    """Through the training loop: G completions per prompt from the engine (one prefill each), rewards from a
    `module:function`, sample completions written; a crash and resume gives the uninterrupted run's losses (the
    rollouts are seeded by step)."""
    import json

    from qwen3lab import train

    hf_small().save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Reverse {n}"}], "answer": str(n)[::-1]} for n in range(10, 18)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out, **keys):
        cfg = {
            "model": str(tmp_path / "m"),
            "out": str(out),
            "objective": "grpo",
            "data": {"train": str(prompts)},
            "steps": 4,
            "batch_size": 2,
            "grad_accum": 2,
            "progress": False,
            "optim": {"lr": 1e-3},
            "grpo": {
                "num_generations": 4,
                "max_completion_length": 8,
                "rewards": ["test_grpo:even_ids", "exact_match"],
                "reward_weights": [1.0, 2.0],
                "beta": 0.04,
            },
        } | keys
        train(cfg)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "a")
    # (at step 1 the loss is 0: ratios are 1, KL 0, and advantages sum to 0 over equal-length completions; not
    # its gradient)
    assert all(
        m["grad_norm"] > 0 and "kl" in m and "entropy" in m and "rewards/test_grpo:even_ids" in m for m in straight
    )
    assert all(m["loss"] != 0 and m["kl"] > 0 for m in straight[1:])
    samples = [json.loads(line) for line in (tmp_path / "a" / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 2 * 4 and samples[0]["step"] == 1  # G samples of a prompt per micro-batch

    with crash_after_step(monkeypatch, 3):
        run(tmp_path / "b", save_every=2)
    resumed = run(tmp_path / "b", save_every=2)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], abs=1e-6)
    assert [m["reward"] for m in resumed] == pytest.approx([m["reward"] for m in straight], abs=1e-6)


def test_the_engines_sampled_logprobs_are_the_trainers(tmp_path, tok):
    """With the sampler correction on, the engine reports each sampled token's log-prob at the sampling temperature
    (0.7; top_p 0.95 cuts what is sampled from, not what is compared, as vLLM's processed logprobs) and the trainer
    recomputes it: in fp32 on the same weights they agree, so every ratio is 1 (a misaligned token, a missing
    temperature or the top-p cut would put them apart)."""
    import json

    from qwen3lab import train

    hf_small().save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    rows = [{"prompt": [{"role": "user", "content": f"Reverse {n}"}], "answer": str(n)[::-1]} for n in range(10, 14)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo = {"num_generations": 4, "max_completion_length": 8, "temperature": 0.7, "top_p": 0.95}
    grpo |= {"rewards": ["test_grpo:even_ids"], "sampler_correction": "sequence_mask"}
    keys = {"data": {"train": str(tmp_path / "p.jsonl")}, "steps": 2, "batch_size": 2, "progress": False}
    run = train({"model": str(tmp_path / "m"), "out": str(tmp_path / "o"), "objective": "grpo", "grpo": grpo, **keys})
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["sampling/importance_sampling_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert 0 <= m["sampling/sampling_logp_difference"] < 1e-4


def test_rollouts_held_to_a_json_schema(tmp_path, tok):
    """grpo.response_format: every completion the engine samples for training is JSON valid under the schema."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    from qwen3lab import train
    from qwen3lab.model.config import ConfigError

    hf_small().save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    rows = [{"prompt": [{"role": "user", "content": f"Reverse {n}"}], "answer": str(n)[::-1]} for n in range(10, 14)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    grpo = {"num_generations": 4, "max_completion_length": 24, "rewards": ["test_grpo:even_ids"]}
    keys = {"data": {"train": str(tmp_path / "p.jsonl")}, "steps": 2, "batch_size": 2, "progress": False}
    cfg = {"model": str(tmp_path / "m"), "out": str(tmp_path / "o"), "objective": "grpo", **keys}
    run = train(cfg | {"grpo": grpo | {"response_format": schema}})
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 8  # the completions of each step's first micro-batch
    for sample in samples:
        jsonschema.validate(json.loads(sample["completion"]), schema)
    with pytest.raises(ConfigError, match="grpo.response_format: .*nope"):
        train(cfg | {"out": str(tmp_path / "o2"), "grpo": grpo | {"response_format": {"type": "nope"}}})


@pytest.mark.slow
def test_grpo_with_a_builtin_reward_lifts_a_model_that_answers_right_part_of_the_time(tmp_path, trained_sort):
    """The demo's briefly trained sort model, GRPO on four of its training prompts with exact_match alone: the
    sampled completions score above 0 from the start, and the reward mean rises above that of the same run with
    the learning rate at 0 (the same rollouts at step 1; the policy then stays where it started). Only rewards that
    score real answers can lift it."""
    import json

    from qwen3lab import train
    from qwen3lab.demo import make_tasks

    _, out = trained_sort
    train_set, _ = make_tasks(1500, 25, ("sort",), 0)  # the fixture's training set
    rows = [{"prompt": ex.messages[:-1], "answer": ex.messages[-1]["content"]} for ex in train_set[:4]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def rewards(lr):
        run = train(
            {
                "model": str(out / "model"),
                "out": str(tmp_path / f"lr{lr}"),
                "objective": "grpo",
                "steps": 20,
                "data": {"train": str(tmp_path / "p.jsonl")},
                "batch_size": 4,
                "progress": False,
                "optim": {"lr": lr, "schedule": "constant"},
                "grpo": {
                    "num_generations": 8,
                    "max_completion_length": 16,
                    "temperature": 0.7,
                    "rewards": ["exact_match"],
                },
            }
        )
        return [json.loads(line)["reward"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    learned, still = rewards(1e-4), rewards(0.0)
    assert learned[0] == still[0] > 0
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(learned[10:]) > mean(learned[:5]) and mean(learned[10:]) > mean(still[10:]) + 0.1, (learned, still)


def raising(prompts, completions, **_):
    """A reward that fails as user code does."""
    return [len(c) / 0 for c in completions]


def stringy(prompts, completions, **_):
    return ["0.5" for _ in completions]


@pytest.mark.parametrize(
    "reward,says",
    [
        ("test_grpo:raising", r"reward test_grpo:raising raised at step 1: ZeroDivisionError: division by zero"),
        ("test_grpo:stringy", r"reward test_grpo:stringy returned str '0.5' for completion 0 at step 1; a score is"),
    ],
)
def test_a_misbehaving_reward_stops_the_run_with_one_line_naming_it(tmp_path, caplog, reward, says):
    """`qwen3lab train` with a reward that raises, or returns strings: one line naming the reward, the step and what
    it raised or returned (not a raw traceback, not `could not convert string to float`); the reward's own traceback
    in the log."""
    import json

    from qwen3lab.cli import main

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Sort 9753"}) + "\n")
    args = ["train", "--model", "tiny", "--out", str(tmp_path / "run"), "--objective", "grpo", "--steps", "1"]
    args += ["--batch_size", "1", "--progress", "false", "--data.train", str(tmp_path / "p.jsonl")]
    args += ["--grpo.num_generations", "2", "--grpo.max_completion_length", "4", "--grpo.rewards", reward]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert re.match(rf"qwen3lab train: error: {says}", str(stop.value)), stop.value
    assert "\n" not in str(stop.value)
    if reward.endswith("raising"):
        assert "return [len(c) / 0 for c in completions]" in caplog.text  # the user's line, in the log


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_masked_truncated_completions_learn_nothing_but_still_count_where_trl_counts_them(tok, loss_type):
    """mask_truncated_completions: a completion cut at max_completion_length (no stop token at its end) has no learned
    token; as in trl it still counts in grpo's mean over the batch's completions, not in dapo's token count."""
    from types import SimpleNamespace

    from qwen3lab.train.objectives.rollouts import Rollouts

    im_end = tok.token_to_id("<|im_end|>")
    completions = [[11, 12, im_end], [13, 14, 15, 16], [17, im_end], [18, 19, 20, 21]]  # 2nd and 4th: cut
    rows = [{"ids": [1, 2, 3]}]
    for masked in (False, True):
        g = GRPOConfig(
            num_generations=4, max_completion_length=4, loss_type=loss_type, mask_truncated_completions=masked
        )
        owner = SimpleNamespace(g=g, tok=tok, net=SimpleNamespace(model=qwen3lab.new_model(qwen3lab.preset("tiny"))))
        batch = Rollouts._training_batch(owner, rows, completions, torch.tensor([1.0, 0.0, 0.5, 0.2]), None)
        learned = int((batch["labels"] != -100).sum())
        assert learned == (3 + 2 if masked else 3 + 4 + 2 + 4)
        assert int(batch["num_items"]) == (learned if loss_type == "dapo" else 4)
