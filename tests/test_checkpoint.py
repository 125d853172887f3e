"""Bad model folders and configs fail with a message that names the file, the key and the fix."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen3lab
from qwen3lab.model.config import ConfigError, ModelConfig
from qwen3lab.model.hf import CheckpointError
from qwen3lab.model.runtime import resolve_dtype


@pytest.fixture
def folder(tmp_path):
    model = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=300))
    qwen3lab.save_model(model, tmp_path / "m")
    return tmp_path / "m"


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="qwen2"), "model_type is 'qwen2'"),
        (dict(model_type="qwen3_moe"), "model_type qwen3_moe with num_experts None; it needs > 0"),
        (dict(use_sliding_window=True), "use_sliding_window is true"),
        (dict(head_dim=None), "missing required field(s) head_dim"),
        (dict(rope_theta=None, vocab_size=None), "missing required field(s) vocab_size, rope_theta"),
        (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
        (dict(rope_scaling={"rope_type": "longrope"}), "rope_scaling type 'longrope' is not supported"),
    ],
)
def test_bad_config(folder, change, message):
    edit_config(folder, **change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        qwen3lab.load_model(folder, device="cpu")
    assert "config.json" in str(e.value)


def test_config_round_trip_keeps_unknown_fields(folder):
    edit_config(folder, max_window_layers=7, some_future_field="x")
    cfg = ModelConfig.from_file(folder)
    d = cfg.to_hf_dict()
    assert d["max_window_layers"] == 7 and d["some_future_field"] == "x"
    assert ModelConfig.from_hf_dict(d) == cfg


def test_transformers5_rope_parameters_layout_reads():
    cfg = ModelConfig.from_hf_dict(
        qwen3lab.preset("tiny").to_hf_dict()
        | {"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0}}
    )
    assert cfg.rope_theta == 5e6 and cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0}


def test_invalid_json_names_line(folder):
    (folder / "config.json").write_text('{\n  "model_type": "qwen3",\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json:3: not valid JSON"):
        qwen3lab.load_model(folder, device="cpu")


def test_wrong_shape_names_tensor(folder):
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight has shape \(5, 5\)"):
        qwen3lab.load_model(folder, device="cpu")


def test_missing_and_unexpected_keys_named(folder):
    state = load_file(folder / "model.safetensors")
    del state["model.layers.0.self_attn.q_norm.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        qwen3lab.load_model(folder, device="cpu")
    assert "missing 1 tensor(s): model.layers.0.self_attn.q_norm.weight" in str(e.value)
    assert "unexpected 1 tensor(s): model.layers.0.self_attn.q_proj.bias" in str(e.value)


def test_missing_shard_named(tmp_path):
    model = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=300))
    qwen3lab.save_model(model, tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shards[1].name}, which is missing"):
        qwen3lab.load_model(tmp_path, device="cpu")


def test_no_weights_and_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        qwen3lab.load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(qwen3lab.preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        qwen3lab.load_model(tmp_path, device="cpu")


def test_hub_id_offline_says_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pass its local folder"):
        qwen3lab.load_model("no-such-org/no-such-model-qwen3lab")


def test_resave_with_fewer_shards_removes_stale_ones(tmp_path):
    model = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=300))
    qwen3lab.save_model(model, tmp_path, max_shard_size="50KB")
    qwen3lab.save_model(model, tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    torch.testing.assert_close(qwen3lab.load_model(tmp_path, device="cpu").state_dict(), model.state_dict())


def test_dtype_auto_policy(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu, "bfloat16") == torch.float32
    assert resolve_dtype("auto", cpu, "float32") == torch.float32
    monkeypatch.setattr("qwen3lab.model.runtime.cpu_bf16_is_fast", lambda: False)
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.float32
    assert "multiplies bf16 slower than fp32" in caplog.text
    monkeypatch.setattr("qwen3lab.model.runtime.cpu_bf16_is_fast", lambda: True)
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float33'"):
        resolve_dtype("float33", cpu, "bfloat16")


def test_cpu_bf16_speed_is_measured_only_where_the_hardware_has_bf16(monkeypatch):
    from qwen3lab.model import runtime as checkpoint

    checkpoint.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(checkpoint, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch, "randn", None)  # emulated bf16 is never timed (it would take seconds)
    try:
        assert checkpoint.cpu_bf16_is_fast() is False
    finally:
        checkpoint.cpu_bf16_is_fast.cache_clear()


def test_saved_files_are_readable_by_others(tmp_path):
    from qwen3lab.train.lora import apply_lora, save_peft_adapter

    old = os.umask(0o022)
    try:
        model = qwen3lab.new_model(qwen3lab.preset("tiny"))
        qwen3lab.save_model(model, tmp_path / "model", max_shard_size="2MB")
        apply_lora(model, 2, 4)
        save_peft_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len([f for f in files if f.suffix == ".safetensors"]) > 2
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}


def test_bf16_load_keeps_rope_in_fp32(folder):
    model = qwen3lab.load_model(folder, dtype="bfloat16", device="cpu")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
