"""GRPO's loss against trl's GRPOTrainer: the same prompts, injected completions, advantages and old / reference
log-probs give the same loss and gradients for every loss type (sampling is not compared)."""

from dataclasses import replace

import pytest
import torch

import qwen3lab
from qwen3lab import data as D
from qwen3lab.config import GRPOConfig
from qwen3lab.objectives import LOSS_TYPES, grpo_loss
from qwen3lab.train import hidden_states

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

G, PROMPT_LEN, MAX_COMPLETION = 4, 6, 9


def hf_model():
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=151645)  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).float()


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


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no-kl", "kl"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_and_gradients_equal_trl(tmp_path, tok, loss_type, beta):
    hf_model().save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    cfg = GRPOConfig(num_generations=G, max_completion_length=MAX_COMPLETION, temperature=0.7, loss_type=loss_type,
                     epsilon=0.2, epsilon_high=0.28, beta=beta)  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=str(tmp_path / "m"),  # by path: trl loads its reference copy from there
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2 * G, num_generations=G,
                            max_completion_length=MAX_COMPLETION, temperature=cfg.temperature, loss_type=loss_type,
                            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=beta, use_cpu=True, bf16=False,
                            report_to=[]),  # fmt: skip
        train_dataset=datasets.Dataset.from_list([{"prompt": "hi"}] * 4),
        processing_class=transformers.AutoTokenizer.from_pretrained(tmp_path / "m"),
    )
    trainer.current_gradient_accumulation_steps = 1
    hf = trainer.model
    prompts, completions, mask, advantages, (old_noise, ref_noise) = rollout()
    with torch.no_grad():  # old and reference log-probs: the policy's, moved a little (so ratios clip, KL is not 0)
        logits = hf(torch.cat([prompts, completions], 1)).logits[:, PROMPT_LEN - 1 : -1] / cfg.temperature
        logps = logits.log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    old, ref = logps + old_noise, logps + ref_noise
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
    hf.train()
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()

    ours = qwen3lab.load_model(tmp_path / "m", dtype="float32", device="cpu")
    examples = [(p.tolist() + c[: int(m.sum())].tolist(), [0] * PROMPT_LEN + [1] * int(m.sum()))
                for p, c, m in zip(prompts, completions, mask, strict=True)]  # fmt: skip
    data = D.TokenizedData.from_examples(examples)
    batch = D.collate_sequences(data, [[0, 1, 2], [3], [4, 5], [6, 7]], tok.pad_token_id)  # packed: order kept
    keep = mask.bool()
    n_tokens, n_seq = int(mask.sum()), 2 * G
    batch |= {
        "advantages": advantages,
        "old_logps": old[keep],
        "ref_logps": ref[keep],
        "num_items": torch.tensor({"dapo": n_tokens, "bnpo": 1}.get(loss_type, n_seq)),
    }
    hidden, _ = hidden_states(ours, batch, True, None)
    loss_sum, metrics = grpo_loss(hidden, ours.lm_head.weight, batch, replace(cfg), chunk=5)
    loss = loss_sum / batch["num_items"]
    loss.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    assert 0 < metrics["clip_ratio"] / float(batch["num_items"]) < 1  # some tokens clipped, not all
    for name, p in ours.named_parameters():
        ref_grad = dict(hf.named_parameters())[name].grad
        assert float((p.grad - ref_grad).norm() / ref_grad.norm()) < 1e-5, name
