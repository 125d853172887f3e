"""torchrun + FSDP2 on 2 CPU processes (gloo): the same losses and weights as one process with the same global
batch, resume from the sharded checkpoint after a rank dies, LoRA, export loadable by transformers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import transformers
from safetensors.torch import load_file

import qwen3lab
from qwen3lab.train import train

WORKER = Path(__file__).with_name("dist_worker.py")
CHATS = [
    {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
    for a in range(4)
    for b in range(5)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """A small random Qwen3 (real vocabulary) saved by transformers, a data file, and a config for 5 steps."""
    root = tmp_path_factory.mktemp("dist")
    cfg = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(root / "base")
    tok.save(root / "base")
    (root / "data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    config = {
        "model": str(root / "base"),
        "data": {"train": str(root / "data.jsonl"), "packing": False, "eval_fraction": 0.0},
        "steps": 5,
        "save_every": 3,
        "progress": False,
        "optim": {"lr": 1e-3},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def torchrun(setup, out, *flags, fail_after=0):
    env = {**os.environ, "QWEN3LAB_TEST_FAIL_AFTER": str(fail_after), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    cmd += ["train", str(setup / "run.yaml"), "--out", str(out), "--batch_size", "2", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def single(setup, out, **keys):
    return train({**yaml.safe_load((setup / "run.yaml").read_text()), "out": str(out), "batch_size": 4, **keys})


def losses(run):
    return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(Path(run) / "model" / "model.safetensors")


def test_two_ranks_match_one_process_through_a_crash_and_resume(setup):
    one = single(setup, setup / "one")
    two = setup / "two"
    failed = torchrun(setup, two, fail_after=4)  # rank 0 dies after step 4; the checkpoint is at step 3
    assert failed.returncode != 0
    assert "injected failure of rank 0 after step 4" in failed.stdout + failed.stderr
    assert sorted(p.name for p in (two / "checkpoints" / "step-000003").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state-rank0.pt", "state-rank1.pt",
    ]  # fmt: skip
    resumed = torchrun(setup, two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
    assert len(losses(two)) == 5
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    # the consolidated export is an ordinary HF folder
    hf = transformers.AutoModelForCausalLM.from_pretrained(two / "model", dtype=torch.float32)
    ids = torch.tensor([[151644, 872, 198, 16, 10, 17, 30]])
    ours = qwen3lab.load_model(two / "model", dtype="float32", device="cpu")
    torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_lora_under_fsdp_matches_one_process(setup):
    one = single(setup, setup / "lora-one", steps=3, lora={"rank": 4, "alpha": 8})
    two = setup / "lora-two"
    run = torchrun(setup, two, "--steps", "3", "--lora.rank", "4", "--lora.alpha", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    a, b = weights(one), weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    assert (
        load_file(two / "adapter" / "adapter_model.safetensors").keys()
        == load_file(one / "adapter" / "adapter_model.safetensors").keys()
    )


def test_missing_shard_is_a_clear_error_on_every_rank(setup):
    run = setup / "broken"
    assert torchrun(setup, run, "--steps", "4").returncode == 0
    ckpt = run / "checkpoints" / "step-000003"
    (ckpt / "__1_0.distcp").unlink()
    failed = torchrun(setup, run, "--steps", "4")
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    assert out.count("checkpoint shard __1_0.distcp is missing") == 2  # both ranks stop, neither waits
    shutil.rmtree(ckpt)  # the remedy the message names; with no checkpoint left the run starts over
    assert torchrun(setup, run, "--steps", "4").returncode == 0
