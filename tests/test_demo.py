"""The demo's task generator, its scorer, and a shortened demo run that learns."""

import json

from qwen3lab.demo import DEFAULT_TASKS, accuracy, make_tasks, score


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
    assert score({"content": "42"}, "<think>\n\n</think>\n\n42")
    assert not score({"content": "42"}, "<think>\n\n</think>\n\n42.")
    assert not score({"content": "42"}, "41")
    call = {"content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]}
    assert score(call, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>')
    assert not score(call, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert not score(call, "<tool_call>\n{broken\n</tool_call>")


def test_untrained_model_scores_about_zero(tok):
    import qwen3lab

    _, held_out = make_tasks(10, 4, seed=0)
    acc = accuracy(qwen3lab.new_model(qwen3lab.preset("demo"), seed=0), tok, held_out)
    assert set(acc) == set(DEFAULT_TASKS) and max(acc.values()) <= 0.25


def test_short_demo_run_trains_and_saves(tmp_path):
    from qwen3lab.demo import run_demo

    results = run_demo(out=str(tmp_path / "demo"), steps=60, n_train=600, n_eval=3, lr=3e-3, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < 0.3 * rows[0]["loss"]  # held-out loss falls far below its start (~12 nats)
    assert set(results["after"]) == set(DEFAULT_TASKS)
    assert json.loads((tmp_path / "demo" / "demo_results.json").read_text())["after"] == results["after"]
    assert (tmp_path / "demo" / "demo.png").is_file() and (tmp_path / "demo" / "model" / "tokenizer.json").is_file()
