"""Stages (phases of one run: data, learning rate, RoPE), context extension with YaRN, and branches from a
checkpoint (a wsd decay from the stable phase)."""

import json

import pytest
import torch
from helpers import crash_after_step
from test_prepare import mixed_rows, text_corpus, write

import qwen3lab
from qwen3lab.model.config import ConfigError
from qwen3lab.train import train
from qwen3lab.train.prepare import prepare


def run(tmp_path, name, **keys):
    config = {"model": "tiny", "out": str(tmp_path / name), "progress": False, "batch_size": 2, "seed": 1}
    config |= {"data": {"max_length": 128}, "optim": {"lr": 1e-3}} | keys
    out = train(config)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def staged(tmp_path):
    """Chats, then a prepared text corpus at a larger RoPE base, a lower rate and its own schedule."""
    chats = write(tmp_path / "chats.jsonl", mixed_rows(30))
    prepare([str(text_corpus(tmp_path / "text.jsonl"))], tmp_path / "text", workers=1)
    return [
        {"name": "chat", "steps": 3, "data": {"train": str(chats)}},
        {
            "name": "long",
            "steps": 3,
            "data": {"train": str(tmp_path / "text"), "max_length": 256},
            "optim": {"lr": 5e-4, "schedule": "wsd", "decay_fraction": 0.5},
            "rope_theta": 2e6,
        },
    ]


@pytest.mark.parametrize("crash_at", [2, 3, 4], ids=["inside-first", "at-boundary", "inside-second"])
def test_a_staged_run_stopped_anywhere_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, staged, crash_at):
    straight = run(tmp_path, "straight", stages=staged, save_every=1)
    assert [m["stage"] for m in straight] == [0, 0, 0, 1, 1, 1]
    # each stage's own schedule: the first cosine from 1e-3, the second wsd at 5e-4 (held, then halfway decayed)
    assert straight[0]["lr"] == pytest.approx(1e-3) and straight[3]["lr"] == straight[4]["lr"] == pytest.approx(5e-4)
    assert straight[5]["lr"] == pytest.approx(5e-4 * (1 - 1 / 2), rel=1e-6)
    with crash_after_step(monkeypatch, crash_at):
        run(tmp_path, "resumed", stages=staged, save_every=1)
    resumed = run(tmp_path, "resumed", stages=staged, save_every=1)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], abs=1e-6)
    config = json.loads((tmp_path / "resumed" / "model" / "config.json").read_text())
    assert (config.get("rope_parameters") or config)["rope_theta"] == 2e6  # the last stage's RoPE, exported


def test_a_yarn_stage_exports_what_transformers_reads_with_the_same_logits_past_32k(tmp_path):
    """Context extension as Qwen documents it for Qwen3 (YaRN, factor 4 over 32,768 positions): the export's config
    carries it, and transformers gives qwen3lab's logits at positions 40,000 and on — where the scaling matters."""
    import transformers

    chats = write(tmp_path / "chats.jsonl", mixed_rows(10))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    stages = [{"steps": 1}, {"steps": 1, "rope_scaling": yarn}]  # each the run's keys and its own changes
    run(tmp_path, "yarn", stages=stages, data={"train": str(chats), "max_length": 128})
    ours = qwen3lab.load_model(tmp_path / "yarn" / "model", dtype="float32", device="cpu")
    assert ours.config.rope_scaling["rope_type"] == "yarn" and ours.config.max_position_embeddings == 131072
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "yarn" / "model", dtype=torch.float32)
    ids, pos = torch.randint(0, 1000, (1, 64)), torch.arange(40_000, 40_064)[None]
    with torch.no_grad():
        got = ours(ids, pos)
        torch.testing.assert_close(got, hf(ids, position_ids=pos).logits, atol=1e-4, rtol=1e-4)
        ours.set_rope(rope_scaling=None)  # the same weights without the scaling: other logits there
        assert not torch.allclose(ours(ids, pos), got, atol=1e-3)


def test_a_wsd_decay_branched_from_a_stable_checkpoint_is_the_run_planned_that_long(tmp_path):
    """A wsd run of 8 steps keeps its checkpoints; a branch from its step 4 (resume_from, its own out folder) with 6
    steps decays over 6's last steps — the same losses and rates as a run planned for 6 steps from the start."""
    chats = write(tmp_path / "chats.jsonl", mixed_rows(30))
    keys = {"data": {"train": str(chats), "max_length": 128}, "optim": {"lr": 1e-3, "schedule": "wsd"}}
    run(tmp_path, "long", steps=8, save_every=1, keep_checkpoints=0, **keys)
    planned = run(tmp_path, "planned", steps=6, **keys)
    branch = run(tmp_path, "branch", steps=6, resume_from=str(tmp_path / "long/checkpoints/step-000004"), **keys)
    assert [m["step"] for m in branch] == [5, 6]
    assert [m["lr"] for m in branch] == pytest.approx([m["lr"] for m in planned[4:]])
    assert [m["loss"] for m in branch] == pytest.approx([m["loss"] for m in planned[4:]], abs=1e-6)


@pytest.mark.parametrize(
    "stages,says",
    [
        ([{"steps": 2, "lora": {"rank": 4}}], r"stages\[0\].lora.rank: a stage may change steps, data."),
        ([{"name": "a"}], r"stages\[0\]: .*a stage is a mapping with steps"),
        ([{"steps": 2, "data": {"pack_order": "x"}}], r"stages\[0\] \(stage0\): data.pack_order: 'x' is not one of"),
    ],
)
def test_stage_mistakes_are_named_before_anything_loads(stages, says):
    from qwen3lab.train.config import check_train_config, load_train_config

    cfg = load_train_config(None, {"model": "tiny", "data.train": "x.jsonl", "stages": stages})
    with pytest.raises(ConfigError, match=says):
        check_train_config(cfg)
