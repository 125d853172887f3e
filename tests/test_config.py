"""The training config is checked in full before anything is loaded: each mistake is one ConfigError naming the
key, the value and what it may be. The model folder here has no weights, so a check that came after loading would
fail on the weights instead."""

import json

import pytest

import qwen3lab
from qwen3lab.model.config import ConfigError
from qwen3lab.train import train
from qwen3lab.train.config import check_train_config, load_train_config

BAD = [
    ({"objective": "ppo"}, r"objective: 'ppo' is not one of sft, dpo, grpo"),
    ({"dpo": {"ref": "copy"}, "objective": "dpo"}, r"dpo.ref: 'copy' is not one of auto, model, precompute"),
    ({"precision": "fp16"}, r"precision: 'fp16' is not one of auto, bf16, fp32"),
    ({"attention": "flash"}, r"attention: 'flash' is not one of"),
    ({"optim": {"name": "sgd"}}, r"optim.name: 'sgd' is not one of adamw, muon"),
    ({"optim": {"schedule": "cosin"}}, r"optim.schedule: 'cosin' is not one of cosine, linear, constant, wsd"),
    ({"objective": "grpo", "grpo": {"loss_type": "ppo"}}, r"grpo.loss_type: 'ppo' is not one of dapo"),
    ({"objective": "grpo", "grpo": {"scale_rewards": "std"}}, r"grpo.scale_rewards: 'std' is not one of"),
    ({"data": {"pack_order": "random"}}, r"data.pack_order: 'random' is not one of best_fit, shuffled"),
    ({"lora": {"train_tokens": ["<|im_end|>"]}}, r"lora.train_tokens: needs lora.rank > 0"),
    ({"lora": {"rank": 4, "targets": ["qkv_proj"]}}, r"lora.targets: \['qkv_proj'\] not among q_proj"),
    ({"dpo": {"ref": "precompute"}}, r"dpo.ref: 'precompute' applies to objective: dpo only \(this run is sft\)"),
    ({"objective": "grpo", "grpo": {"num_generations": 1}}, r"grpo.num_generations: 1; it must be >= 2"),
    (
        {"objective": "grpo", "grpo": {"rewards": ["exact_match"], "reward_weights": [1.0, 2.0]}},
        r"grpo.reward_weights: 2 weights for 1 rewards",
    ),
    ({"objective": "grpo", "grpo": {"rewards": ["exactmatch"]}}, r"grpo.rewards: 'exactmatch'; use a built-in"),
    ({"batch_size": 0}, r"batch_size: 0; it must be >= 1"),
    ({"data": {"eval_fraction": 1.5}}, r"data.eval_fraction: 1.5; it must be in \[0, 1\)"),
    ({"optim": {"decay_fraction": 0.0, "schedule": "wsd"}}, r"optim.decay_fraction: 0.0; it must be in \(0, 1\]"),
    ({"report_to": ["mlflow"]}, r"report_to: \['mlflow'\] not among tensorboard, wandb"),
    ({"attention": "flex", "device": "cpu"}, r"attention: flex needs a CUDA device"),
    ({"data": {"train": ""}}, r"data.train: give a JSONL"),
    ({"lora": {"rank": 16, "base_bits": 8}}, r"lora.base_bits: 8 is not one of 16, 4"),
    ({"lora": {"base_bits": 4}}, r"lora.base_bits: 4 quantises a frozen base; it needs lora.rank > 0"),
    ({"cpu_memory": "fast"}, r"cpu_memory: 'fast' is not one of auto, keep, lean"),
    ({"activation_checkpointing": "offlaod"}, r"activation_checkpointing: expected bool, got 'offlaod'"),
    ({"activation_checkpointing": "offload", "device": "cpu"}, r"activation_checkpointing: offload moves GPU memory"),
    ({"mlp_tile": -1}, r"mlp_tile: -1; it must be >= 0"),
    ({"moe": {"lora_router": True}}, r"moe.lora_router: applies to LoRA \(lora.rank > 0\)"),
    ({"data": {"mix": ["a.jsonl:2"]}}, r"data.mix: replaces data.train; give one or the other"),
    ({"data": {"train": "", "mix": ["a.jsonl:0"]}}, r"data.mix\[0\]: weight '0'; it must be a number > 0"),
    ({"data": {"train": "", "mix": [{"file": "a.jsonl"}]}}, r"data.mix\[0\]: \{'file': 'a.jsonl'\}; give \{path"),
    ({"data": {"train": "", "mix": ["a/x.jsonl", "b/x.jsonl"]}}, r"data.mix\[1\]: a second source named 'x'"),
    ({"data": {"train": "", "mix": ["a.jsonl"]}, "objective": "dpo"}, r"data.mix: mixes SFT .* objective dpo"),
    ({"moe": {"lora_router": True}, "lora": {"rank": 4}, "objective": "dpo"}, r"moe.lora_router: .* dpo.ref: model"),
    (
        {"moe": {"lora_router": True}, "lora": {"rank": 4}, "objective": "grpo", "grpo": {"beta": 0.04}},
        r"moe.lora_router: GRPO's KL reference .* beta 0",
    ),
]


@pytest.fixture(scope="module")
def weightless(tmp_path_factory):
    """A model folder with config.json and the tokenizer, and no weights; and a data file."""
    folder = tmp_path_factory.mktemp("weightless")
    qwen3lab.save_model(qwen3lab.new_model(qwen3lab.preset("tiny")), folder / "m")
    for f in (folder / "m").glob("*.safetensors*"):
        f.unlink()
    qwen3lab.load_tokenizer().save(folder / "m")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (folder / "d.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    return folder


def good(folder, tmp_path) -> dict:
    return {"model": str(folder / "m"), "out": str(tmp_path / "run"), "data": {"train": str(folder / "d.jsonl")}}


@pytest.mark.parametrize("keys, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_config_fails_before_anything_loads(weightless, tmp_path, keys, message):
    config = good(weightless, tmp_path)
    for section, value in keys.items():
        config[section] = config[section] | value if isinstance(value, dict) and section in config else value
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "run").exists()  # not even the run folder was made


def test_a_good_config_on_that_folder_fails_on_its_weights(weightless, tmp_path):
    """The control: what the bad configs would have hit had anything been loaded first."""
    from qwen3lab.model.hf import CheckpointError

    config = good(weightless, tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        train(config)


def test_muon_under_torchrun_is_refused_before_loading(weightless):
    cfg = load_train_config(None, {"model": str(weightless / "m"), "data.train": "d.jsonl", "optim.name": "muon"})
    check_train_config(cfg, world=1)
    with pytest.raises(ConfigError, match="optim.name: muon orthogonalises whole matrices"):
        check_train_config(cfg, world=2)
    cfg = load_train_config(None, {"model": str(weightless / "m"), "data.train": "d.jsonl", "lora.rank": 4})
    cfg.lora.base_bits = 4
    with pytest.raises(ConfigError, match="lora.base_bits: 4 runs on one process for now"):
        check_train_config(cfg, world=2)


def test_the_shipped_configs_pass_the_check(tmp_path):
    from pathlib import Path

    import qwen3lab

    qwen3lab.save_model(qwen3lab.new_model(qwen3lab.preset("tiny")), tmp_path / "m")  # distillation reads configs
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        keys = {"data.train": "given.jsonl"}
        if load_train_config(path).objective == "distill":
            keys |= {"model": str(tmp_path / "m"), "distill.teacher": str(tmp_path / "m")}
        check_train_config(load_train_config(path, keys))
