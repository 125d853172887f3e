"""torchrun + FSDP2 on 2 CPU processes (gloo): the same losses and weights as one process with the same global
batch, resume from the sharded checkpoint after a rank dies, LoRA, export loadable by transformers."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import hf_small
from safetensors.torch import load_file

import qwen3lab
from qwen3lab.train import train

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # processes under torchrun's launcher
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
    hf_small(bos_token_id=151643, eos_token_id=151643).save_pretrained(root / "base")
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


def torchrun(setup, out, *flags, fail_after=0, config="run.yaml", nproc=2, env=None):
    env = {**os.environ, "QWEN3LAB_TEST_FAIL_AFTER": str(fail_after), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(WORKER)]
    cmd += ["train", str(setup / config), "--out", str(out), "--batch_size", "2", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def single(setup, out, **keys):
    return train({**yaml.safe_load((setup / "run.yaml").read_text()), "out": str(out), "batch_size": 4, **keys})


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return [m["loss"] for m in metrics(run)]


def weights(run):
    return load_file(Path(run) / "model" / "model.safetensors")


def test_two_ranks_match_one_process_through_a_crash_and_resume(setup):
    one = single(setup, setup / "one")
    two = setup / "two"
    failed = torchrun(setup, two, fail_after=4)  # rank 0 dies after step 4; the checkpoint is at step 3
    assert failed.returncode != 0
    assert "injected failure of rank 0 after step 4" in failed.stdout + failed.stderr
    assert sorted(p.name for p in (two / "checkpoints" / "step-000003").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "state-rank0.pt",
        "state-rank1.pt",
    ]
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
    tokens = ["<|im_start|>", "<|im_end|>"]  # trained token rows too: buffers and a delta outside the model
    one = single(setup, setup / "lora-one", steps=3, lora={"rank": 4, "alpha": 8, "train_tokens": tokens})
    two = setup / "lora-two"
    run = torchrun(
        setup, two, "--steps", "3", "--lora.rank", "4", "--lora.alpha", "8", "--lora.train_tokens", json.dumps(tokens)
    )
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
    ckpt = run / "checkpoints" / "step-000004"  # the last step's, which a longer rerun continues from
    (ckpt / "__1_0.distcp").unlink()
    failed = torchrun(setup, run, "--steps", "6")
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    assert out.count("checkpoint shard __1_0.distcp is missing") == 2  # both ranks stop, neither waits
    shutil.rmtree(ckpt)  # the remedy the message names: the run resumes from the checkpoint before
    assert torchrun(setup, run, "--steps", "6").returncode == 0


def objective_config(setup, name, **keys):
    """A config for DPO or GRPO on the module's model, written next to run.yaml; returns its file name."""
    config = {"model": str(setup / "base"), "progress": False, "objective": name, **keys}
    (setup / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return f"{name}.yaml"


@pytest.mark.parametrize("lora", [False, True], ids=["full-ref-copy", "lora-precompute"])
def test_dpo_under_fsdp_matches_one_process(setup, lora):
    """Pairs shared out over ranks: the losses, DPO's metrics and the weights of one process with the same global
    batch. Full fine-tuning shards a frozen reference copy beside the policy; LoRA precomputes the reference with
    each rank taking its share."""
    from test_dpo import PAIRS

    (setup / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 2))
    keys = {"data": {"train": str(setup / "pairs.jsonl")}, "steps": 3, "optim": {"lr": 5e-3, "schedule": "constant"}}
    keys |= {"lora": {"rank": 4, "alpha": 8}, "dpo": {"ref": "precompute"}} if lora else {"dpo": {"ref": "model"}}
    config = objective_config(setup, "dpo", **keys)
    name = "dpo-lora" if lora else "dpo-full"
    one = train({**yaml.safe_load((setup / config).read_text()), "out": str(setup / f"{name}-one"), "batch_size": 4})
    two = setup / f"{name}-two"
    run = torchrun(setup, two, config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert a[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and a[-1]["loss"] < a[0]["loss"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], abs=1e-5), key
    if lora:
        np.testing.assert_allclose(np.load(two / "ref_logps.npy"), np.load(one / "ref_logps.npy"), atol=1e-5)
    wa, wb = weights(one), weights(two)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0, msg=name)


def test_grpo_under_fsdp_rolls_out_on_every_rank_and_resumes_exactly(setup):
    """Each rank rolls out its share of the prompts with the whole model gathered, then trains on them sharded; a
    sharded frozen reference gives the KL; old log-probs for two iterations; rewards scaled by the std of the batch
    over both ranks; the sampler correction's ratios. Rank 0 dies after step 3: the resumed run logs the
    uninterrupted run's losses and rewards."""
    rows = [{"prompt": [{"role": "user", "content": f"Reverse {n}"}], "answer": str(n)[::-1]} for n in range(10, 18)]
    (setup / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo = {
        "num_generations": 4,
        "max_completion_length": 6,
        "rewards": ["test_grpo:even_ids", "exact_match"],
        "beta": 0.04,
        "num_iterations": 2,
        "scale_rewards": "batch",
        "sampler_correction": "token_truncate",
    }
    config = objective_config(
        setup,
        "grpo",
        data={"train": str(setup / "prompts.jsonl")},
        steps=4,
        grad_accum=2,
        save_every=2,
        optim={"lr": 1e-3},
        grpo=grpo,
    )
    straight, crashed = setup / "grpo-straight", setup / "grpo-crashed"
    run = torchrun(setup, straight, config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    a = metrics(straight)
    assert len(a) == 4 and all(m["grad_norm"] > 0 and m["kl"] >= 0 for m in a) and a[-1]["kl"] > 0
    assert ["rewards/test_grpo:even_ids" in m for m in a] == [True, False, True, False]  # steps that rolled out
    # the engine's log-probs on the gathered model are the sharded trainer's
    assert all(m["sampling/importance_sampling_ratio"] == pytest.approx(1, abs=1e-3) for m in a[::2])
    samples = (straight / "completions.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * 4  # rank 0 alone writes: G samples of its first prompt per rollout micro-batch
    assert torchrun(setup, crashed, config=config, fail_after=3).returncode != 0
    resumed = torchrun(setup, crashed, config=config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = metrics(crashed)
    for key in ("loss", "reward", "reward_std", "kl", "completion_length"):
        assert [m.get(key, 0) for m in b] == pytest.approx([m.get(key, 0) for m in a], abs=1e-6), key
    exported = transformers.AutoModelForCausalLM.from_pretrained(crashed / "model")
    assert exported.config.num_hidden_layers == 2


def test_distill_under_fsdp_matches_one_process_and_resumes_on_policy(setup, tok):
    """The teacher sharded beside the student: off-policy, the losses and weights of one process with the same global
    batch; with on-policy micro-batches (each rank samples its share with the whole student gathered), rank 0 dies
    after step 3 and the resumed run logs the uninterrupted run's losses."""
    from test_distill import save_pair

    save_pair(setup, tok)  # teacher/ (hidden 64) and chat.jsonl beside the module's model
    distill = {"teacher": str(setup / "teacher"), "beta": 0.5, "lmbda": 0.0, "max_new_tokens": 6}
    keys = dict(data={"train": str(setup / "chat.jsonl"), "packing": False}, steps=3, optim={"lr": 5e-3})
    config = objective_config(setup, "distill", **keys, distill=distill)
    one = train({**yaml.safe_load((setup / config).read_text()), "out": str(setup / "distill-one"), "batch_size": 4})
    run = torchrun(setup, setup / "distill-two", config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(setup / "distill-two") == pytest.approx(losses(one), abs=1e-5)
    wa, wb = weights(one), weights(setup / "distill-two")
    for name in wa:  # Adam's step is lr-sized wherever a gradient is ~0 (grad norm 2e-3 at step 1): the reduction's
        # float order moves a few such elements by up to 2e-5 (measured; mean 4e-8)
        torch.testing.assert_close(wb[name], wa[name], atol=1e-4, rtol=0, msg=name)

    keys |= dict(steps=4, grad_accum=2, save_every=2)
    config = objective_config(setup, "distill", **keys, distill=distill | {"lmbda": 0.5})
    straight, crashed = setup / "distill-straight", setup / "distill-crashed"
    assert torchrun(setup, straight, config=config).returncode == 0
    assert 0 < sum(m["on_policy"] for m in metrics(straight)) < 4
    assert torchrun(setup, crashed, config=config, fail_after=3).returncode != 0
    resumed = torchrun(setup, crashed, config=config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("loss", "on_policy"):
        assert [m.get(key) for m in metrics(crashed)] == pytest.approx([m.get(key) for m in metrics(straight)]), key


def test_each_rank_loads_only_its_shards(tmp_path, tok):
    """The model is built on the meta device and each rank reads the rows of its own shards from the safetensors
    files: its RSS grows by at most 0.65 x the full fp32 model + 100 MB while loading (a full copy per rank, as
    before, grew by more than the whole model)."""
    cfg = transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=512,
        intermediate_size=3072,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151643,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    size = sum(p.numel() for p in model.parameters()) * 4
    assert size > 450e6  # a few hundred MB in fp32 (above 286 MB a full copy per rank cannot pass)
    model.save_pretrained(tmp_path / "base", max_shard_size="100MB")
    del model
    tok.save(tmp_path / "base")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    config = {"model": str(tmp_path / "base"), "data": {"train": str(tmp_path / "data.jsonl")}, "progress": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {"QWEN3LAB_TEST_LOAD_RSS": str(tmp_path)}
    run = torchrun(tmp_path, tmp_path / "out", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        rss = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        growth = rss["peak"] - rss["before"]
        assert growth <= 0.65 * size + 100e6, (
            f"rank {rank} grew by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
        )


def rows_taken(path):
    return [row for line in Path(path).read_text().splitlines() for row in json.loads(line)]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(setup, tmp_path, before, after):
    """A run saved by `before` ranks resumes on `after`: DCP reshards the weights and Adam state (the resumed weights
    are the saved ones), the data continues at the rows the saved run had taken (none skipped or repeated, although
    the global batch changed), training finishes and the export loads in transformers."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run, log = tmp_path / "run", tmp_path / "rows.jsonl"
    flags = ("--steps", "4", "--save_every", "2", "--data.shuffle", "true")
    failed = torchrun(setup, run, *flags, fail_after=3, nproc=before, env={"QWEN3LAB_TEST_ROWS": str(log)})
    assert failed.returncode != 0 and (run / "checkpoints" / "step-000002").is_dir()
    saved_rows = rows_taken(log)[: 2 * 2 * before]  # the two steps in the checkpoint, 2 rows per rank each
    log.unlink()
    weights_only = tmp_path / "weights-only"  # the same checkpoint resumed and exported at once
    shutil.copytree(run, weights_only)
    assert torchrun(setup, weights_only, "--steps", "2", nproc=after).returncode == 0
    dcp_to_torch_save(run / "checkpoints" / "step-000002", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)["model"]
    for name, t in weights(weights_only).items():
        torch.testing.assert_close(t, saved[f"model.{name}"], atol=0, rtol=0, msg=name)

    resumed = torchrun(setup, run, *flags, nproc=after, env={"QWEN3LAB_TEST_ROWS": str(log)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed with {after} ranks from a checkpoint of {before}" in resumed.stderr
    taken = saved_rows + rows_taken(log)
    assert len(taken) == 2 * 2 * before + 2 * 2 * after and len(set(map(tuple, taken))) == len(taken)
    from qwen3lab.train.batching import epoch_order

    assert [r[0] for r in taken] == epoch_order(len(CHATS), 0, 0, True)[: len(taken)]  # in order, none skipped
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    transformers.AutoModelForCausalLM.from_pretrained(run / "model")


def two_nodes(setup, out, locals_, *flags, fail_after=0):
    """Two torchrun agents, one process each, meeting over c10d as two machines would; node i checkpoints into its
    own local folder locals_[i], the run folder `out` is shared."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "QWEN3LAB_TEST_FAIL_AFTER": str(fail_after), "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            "qwen3lab-test",
            str(WORKER),
            "train",
            str(setup / "run.yaml"),
            "--out",
            str(out),
            "--batch_size",
            "2",
            "--checkpoint_dir",
            str(locals_[node]),
            "--dist_timeout",
            "60",
            *flags,
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


def test_two_nodes_with_node_local_checkpoints(setup, tmp_path):
    """Checkpoints on each node's own disk: every rank writes its shard and state into its node's folder, rank 0
    the metadata, which each node's folder gets a copy of; the shared run folder holds no checkpoint. A crash after
    step 3 resumes from step 2 on both nodes onto one process's losses and weights."""
    out, locals_ = tmp_path / "shared", [tmp_path / "node0", tmp_path / "node1"]
    flags = ("--steps", "4", "--save_every", "2")
    crashed = two_nodes(setup, out, locals_, *flags, fail_after=3)
    assert any(code != 0 for code, _ in crashed)
    for node in (0, 1):
        assert sorted(p.name for p in (locals_[node] / "step-000002").iterdir()) == [
            ".metadata",
            f"__{node}_0.distcp",
            f"state-rank{node}.pt",
        ]
    assert not (out / "checkpoints").exists()
    resumed = two_nodes(setup, out, locals_, *flags)
    assert all(code == 0 for code, _ in resumed), resumed[0][1][-3000:] + resumed[1][1][-3000:]
    one = single(setup, tmp_path / "one", steps=4)
    assert losses(out) == pytest.approx(losses(one), abs=1e-5)
    a, b = weights(one), weights(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
