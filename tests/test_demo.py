"""The demo's task generator, its scorer, and a shortened demo run that learns."""

import json
from pathlib import Path

import pytest

from qwen3lab.demo import DEFAULT_TASKS, DEMO_CONFIG, accuracy, demo_config, make_tasks
from qwen3lab.train.config import load_train_config
from qwen3lab.train.objectives.rewards import exact_match


def test_tasks_are_deterministic_and_held_out_is_disjoint():
    a_train, a_eval = make_tasks(400, 20, seed=3)
    b_train, b_eval = make_tasks(400, 20, seed=3)
    assert [e.messages for e in a_train] == [e.messages for e in b_train]
    assert [e.messages for e in a_eval] == [e.messages for e in b_eval]
    assert [e.messages for e in make_tasks(400, 20, seed=4)[0]] != [e.messages for e in a_train]
    held = {p for e in a_eval for p in e.problems}
    assert not any(e.problems & held for e in a_train)
    assert {e.task for e in a_eval} == set(DEFAULT_TASKS)
    for e in a_train:  # every example renders through the template with something to learn
        assert e.messages[-1]["role"] == "assistant"


def test_scorer_exact_match():
    """The demo scores with GRPO's and `qwen3lab eval`'s exact_match: text after the think block, or a tool call
    (an assistant message as the answer) by its name and arguments."""

    def score(answer, text):
        return exact_match(None, [text], answer=[answer])[0] == 1.0

    assert score("42", "<think>\n\n</think>\n\n42")
    assert not score("42", "<think>\n\n</think>\n\n42.")
    assert not score("42", "41")
    call = {"content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"zip": "02139"}}}]}
    assert score(call, '<tool_call>\n{"name": "get_weather", "arguments": {"zip": "02139"}}\n</tool_call>')
    assert not score(call, '<tool_call>\n{"name": "get_weather", "arguments": {"zip": "02193"}}\n</tool_call>')
    assert not score(call, "<tool_call>\n{broken\n</tool_call>")
    assert not score(call, '<tool_call>\n{"name": "get_weather", "arguments": {"zip": "02139"}}\n</tool_call> Done.')
    assert not score({"content": "42"}, '42<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')


def test_demo_trains_with_configs_demo_yaml():
    """One source: `qwen3lab demo`'s training settings are configs/demo.yaml's, which ships in the package."""
    root = Path(__file__).parents[1]
    assert (root / "configs" / "demo.yaml").resolve() == Path(str(DEMO_CONFIG)).resolve()
    shipped = load_train_config(root / "configs" / "demo.yaml")
    assert demo_config(Path(shipped.out), None, None, shipped.seed, None, {}) == shipped
    shorter = demo_config(Path("x"), 120, None, 1, None, {"data.packing": False})
    assert (shorter.steps, shorter.eval_every, shorter.optim.warmup_steps, shorter.seed) == (120, 12, 12, 1)
    assert shorter.data.train == str(Path("x") / "data" / "train.jsonl") and shorter.data.packing is False


def test_untrained_model_scores_about_zero(tok):
    import qwen3lab

    _, held_out = make_tasks(10, 4, seed=0)
    acc = accuracy(qwen3lab.new_model(qwen3lab.preset("demo"), seed=0), tok, held_out)
    assert set(acc) == set(DEFAULT_TASKS) and max(acc.values()) <= 0.25


@pytest.mark.slow
def test_short_demo_run_learns_and_saves(trained_sort):
    """One task, 120 steps (~40 s): held-out exact match from 0 to well above it."""
    results, out = trained_sort
    assert results["before"]["sort"] <= 0.1
    assert results["after"]["sort"] >= 0.4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < 0.1 * rows[0]["loss"]  # held-out loss falls far below its start (~12 nats)
    assert json.loads((out / "demo_results.json").read_text())["after"] == results["after"]
    assert (out / "demo.png").is_file() and (out / "model" / "tokenizer.json").is_file()
    held_out = [json.loads(line) for line in (out / "data" / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 25 and {r["task"] for r in held_out} == {"sort"}
    from qwen3lab.eval.evaluation import run_eval

    report = run_eval(str(out / "model"), None, str(out / "data" / "held_out.jsonl"), [], None, None, 256)
    assert report["results"]["model"]["exact_match/sort"] == results["after"]["sort"]  # the demo's own number


def test_held_out_answers_use_only_tokens_seen_in_training(tok):
    """A token that never occurs in training cannot be produced by a model trained from scratch (its embedding row is
    only pushed down by the softmax), so a fair held-out split asks only for new combinations of known tokens."""
    train, held_out = make_tasks(400, 20, seed=0)

    def targets(examples):
        return {
            t for e in examples for m in e.messages if m["role"] == "assistant" for t in tok.encode_chat([m]).input_ids
        }

    assert targets(held_out) <= {t for e in train for t in tok.encode_chat(e.messages, tools=e.tools).input_ids}


@pytest.mark.slow
def test_rl_demo_stage_runs_end_to_end(tmp_path):
    """`qwen3lab demo --rl` shortened to a few steps (its learning is measured in the README, a few minutes): the
    SFT stage, GRPO on the task's prompts from the SFT model, results, reward curve and model saved."""
    from qwen3lab.demo import run_rl_demo

    out = tmp_path / "rl"
    results = run_rl_demo(out=str(out), sft_steps=4, rl_steps=2, n_train=200, n_eval=4, log=lambda *_: None)
    assert results["before"] == 0 and results["after"] == 0  # four SFT steps from scratch: nothing learned yet
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward" in r for r in rows)
    assert (out / "rl.png").is_file() and (out / "grpo" / "model" / "config.json").is_file()
    assert json.loads((out / "rl_results.json").read_text())["task"] == "sort"


@pytest.mark.slow
def test_rl_demo_lifts_the_held_out_task(tmp_path):
    """`qwen3lab demo --rl` as the README runs it (~5 min): the short SFT leaves sort well below its ceiling, and
    GRPO with the exact-match reward lifts its held-out greedy accuracy by at least 10 points, the sampled reward
    mean rising with it."""
    from qwen3lab.demo import run_rl_demo

    results = run_rl_demo(out=str(tmp_path / "rl"), log=lambda *_: None)
    assert results["before"] <= 0.6
    assert results["after"] >= results["before"] + 0.10, results
    rows = [json.loads(line) for line in (tmp_path / "rl" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-20:]) / 20 > sum(rewards[:20]) / 20 + 0.05, rewards


@pytest.mark.slow
def test_the_demo_as_shipped_reaches_what_the_readme_says(tmp_path):
    """`qwen3lab demo` with its defaults (~2 min): from 0% to at least 96% held-out exact match on every task."""
    from qwen3lab.demo import run_demo

    results = run_demo(out=str(tmp_path / "demo"), log=lambda *_: None)
    assert max(results["before"].values()) == 0
    assert min(results["after"].values()) >= 0.96, results["after"]
    # and `qwen3lab eval` on the held-out split the demo wrote gives the demo's own numbers: the same rows, scorer and
    # engine settings, so the same computation (equal, not close)
    from qwen3lab.cli import main

    report = tmp_path / "eval.json"
    main(
        ["eval", "--model", results["model"], "--data", str(tmp_path / "demo" / "data" / "held_out.jsonl")]
        + ["--out", str(report)]
    )
    found = json.loads(report.read_text())["results"]["model"]
    assert {task: found[f"exact_match/{task}"] for task in results["after"]} == results["after"]


def test_distill_demo_runs_end_to_end(tmp_path, trained_sort):
    """`qwen3lab demo --distill` shortened to a few steps with the fixture's model as the teacher (its learning is
    measured in docs/benchmarks.md, minutes): the three students trained from one init, scored, plotted."""
    from qwen3lab.demo_distill import WAYS, run_distill_demo

    _, teacher = trained_sort
    out = tmp_path / "distill"
    results = run_distill_demo(str(out), 3, str(teacher / "model"), n_train=100, n_eval=2, log=lambda *_: None)
    assert set(results) == {"teacher", *WAYS, "seconds"}
    on = [json.loads(line) for line in (out / "student-2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in on] == [1, 2, 3] and all("on_policy" in m for m in on)
    assert (out / "distill.png").is_file() and (out / "distill_results.json").is_file()


@pytest.mark.slow
def test_scaling_demo_runs_end_to_end(tmp_path, monkeypatch):
    """`qwen3lab demo --scaling` shrunk to 5 one- and two-layer shapes, 2 rates, 2 budgets of a few steps (its
    prediction is measured in docs/benchmarks.md): the sweep, the fit, the held-out shape at the fit's rate and the
    grid's, the line, the plot."""
    from qwen3lab.demo_scaling import run_scaling_demo

    monkeypatch.chdir(tmp_path)
    lines = []
    shapes = [(32, 1), (32, 2), (64, 1), (64, 2), (96, 1)]
    results = run_scaling_demo(
        "out",
        shapes=shapes,
        held_out=(96, 2),
        lrs=(3e-3, 1e-2),
        steps=(3, 6),
        n_train=200,
        n_eval=2,
        bootstrap=10,
        parallel=2,
        log=lines.append,
    )
    text = "\n".join(lines)
    assert "20 trials, 2 at a time" in text and "10 points (5 sizes x 2 token budgets)" in text
    assert f"measured {results['measured']:.4f}" in text and "held-out shape: predicted eval loss" in text
    trials = json.loads(Path("out/held-out/report.json").read_text())
    assert sorted(t["optim.lr"] for t in trials) == sorted({results["lr"], 3e-3, 1e-2})
    assert all(t["status"] == "done" for t in trials)
    assert results["tokens"]["measured"] == results["tokens"]["predicted_at"]  # the same budget as the fit's largest
    assert Path("out/scaling.png").stat().st_size > 10_000 and Path("out/report.png").is_file()
