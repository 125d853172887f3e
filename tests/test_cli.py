"""User mistakes on the command line: each is one line naming what is wrong and a non-zero exit, never a
traceback (--debug or QWEN3LAB_DEBUG=1 shows it)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3lab.cli import main

CHATS = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}] for i in range(8)]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"hi {i}"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    for i in range(4)
]


def refused(argv: list[str]) -> str:
    """The one line `qwen3lab ARGV` exits with."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"qwen3lab {argv[0]}: "), message
    return message


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran",))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Data files, and a finished 2-step SFT run of the tiny preset with its last checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    main(
        [
            "train",
            "--model",
            "tiny",
            "--data.train",
            str(root / "chat.jsonl"),
            "--out",
            str(root / "run"),
            "--steps",
            "2",
            "--save_every",
            "2",
            "--progress",
            "false",
        ]
    )
    return root


def train_args(folder: Path, *more: str) -> list[str]:
    return [
        "train",
        "--model",
        "tiny",
        "--data.train",
        str(folder / "chat.jsonl"),
        "--out",
        str(folder / "run"),
        "--steps",
        "3",
        "--save_every",
        "1",
        "--progress",
        "false",
        *more,
    ]


def test_training_mistakes_are_one_line(folder, tmp_path):
    assert "nope.jsonl" in refused(train_args(folder, "--data.train", str(tmp_path / "nope.jsonl")))
    assert "optim.lr" in refused(train_args(folder, "--optim.lrr", "1"))
    assert "objective: 'dpoo'" in refused(train_args(folder, "--objective", "dpoo"))
    assert "'cosin'" in refused(train_args(folder, "--optim.schedule", "cosin"))
    # the finished run's folder, by a run of another objective and of another model
    pairs = ["--data.train", str(folder / "pairs.jsonl"), "--objective", "dpo"]
    assert "a checkpoint of a sft run" in refused(train_args(folder, *pairs))
    assert "does not fit this run" in refused(train_args(folder, "--model", "demo"))
    assert "does not fit this run" in refused(train_args(folder, "--lora.rank", "4"))


def test_an_old_or_tampered_checkpoint_is_one_line_and_runs_nothing(folder, tmp_path, capfd):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    args = train_args(folder, "--out", str(run))
    state_file = run / "checkpoints" / "step-000002" / "state-rank0.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "data"}, state_file)  # as an older qwen3lab wrote it
    assert "without the data position" in refused(args)
    with open(state_file, "wb") as f:
        pickle.dump(_RunsCode(), f)
    assert "refused: it holds pickled Python objects" in refused(args)
    assert "ran" not in capfd.readouterr().out
    with pytest.raises(ValueError, match="refused"):  # --debug: the exception itself, with its traceback
        main([*args, "--debug"])


def test_inference_and_eval_mistakes_are_one_line(folder, tmp_path):
    missing = str(tmp_path / "nowhere")
    model = str(folder / "run" / "model")
    assert "no such model folder" in refused(["generate", "--model", missing, "--prompt", "hi"])
    assert "no such model folder" in refused(["serve", "--model", missing])
    assert "no such model folder" in refused(["eval", "--model", missing, "--data", str(folder / "chat.jsonl")])
    assert "nope.jsonl" in refused(["eval", "--model", model, "--data", str(tmp_path / "nope.jsonl")])
    assert "reward 'exactmatch'" in refused(
        ["eval", "--model", model, "--data", str(folder / "chat.jsonl"), "--rewards", "exactmatch"]
    )
    assert "unknown task" in refused(["demo", "--tasks", "sorting", "--out", str(tmp_path / "d")])
    assert "no such model folder" in refused(["demo", "--model", missing, "--out", str(tmp_path / "d")])
    # a model folder whose index names a shard that is not there
    broken = tmp_path / "broken"
    (broken).mkdir()
    (broken / "config.json").write_text((folder / "run" / "model" / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00001-of-00002.safetensors, which is missing" in refused(
        ["generate", "--model", str(broken), "--prompt", "hi"]
    )


def test_the_command_prints_one_line_and_exits_non_zero(tmp_path):
    """As a user sees it: stderr holds the message and no traceback; QWEN3LAB_DEBUG=1 brings the traceback back."""
    argv = [sys.executable, "-m", "qwen3lab", "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert "qwen3lab generate: error:" in quiet.stderr and "no such model folder" in quiet.stderr
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=os.environ | {"QWEN3LAB_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr
