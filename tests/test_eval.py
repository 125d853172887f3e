"""Evaluation: lm-evaluation-harness on a local task set through `qwen3lab serve` (`local-completions`) and
in-process (the `qwen3lab` model type) against its own `hf` backend on the same weights; `qwen3lab eval` on data."""

import json

import pytest
from helpers import serving, tiny_server_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

WORDS = ["cat", "stone", "river", "apple", "mouse", "green"]


def write_tasks(folder):
    """A multiple-choice task (log-likelihoods, acc) and a generate_until task (exact match) on local JSONL."""
    mc = [{"word": w, "choices": [w[::-1], w, w.upper()], "label": 0} for w in WORDS]
    gen = [{"word": w, "answer": w[::-1]} for w in WORDS[:4]]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: 'Reverse {{word}}:'\n"
    (folder / "rev_mc.yaml").write_text(
        f"task: rev_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "rev_gen.yaml").write_text(
        f"task: rev_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def evaluate(model, model_args, folder, **kw):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["rev_mc", "rev_gen"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kw,
    )
    per_item = {t: [s["resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in out["samples"]}
    metrics = {
        t: {k: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k} for t, r in out["results"].items()
    }
    return per_item, metrics


@pytest.mark.slow
def test_lm_eval_through_the_server_and_in_process_equals_its_hf_backend(tmp_path, tok):
    from qwen3lab.eval.lm_eval_model import Qwen3LabLM
    from qwen3lab.serve import create_app

    model = tiny_server_model(tmp_path / "m")
    tok.save(tmp_path / "m")
    write_tasks(tmp_path)
    hf_items, hf_metrics = evaluate(
        "hf", f"pretrained={tmp_path / 'm'},dtype=float32", tmp_path, device="cpu", batch_size=4
    )
    ours_items, ours_metrics = evaluate(Qwen3LabLM(model=model, tokenizer=tok), None, tmp_path)
    with serving(create_app(model, tok, "tiny")) as url:  # the tokenizer comes from the server's own routes
        api_items, api_metrics = evaluate("local-completions", f"base_url={url}/v1/completions,model=tiny", tmp_path)
    assert hf_metrics == ours_metrics == api_metrics
    assert hf_items["rev_gen"] == ours_items["rev_gen"] == api_items["rev_gen"]
    assert any(resps[0][0].strip() for resps in hf_items["rev_gen"])  # something was generated, not all empty
    # perplexity tasks' requests: a whole text in windows of max_length (lm-eval's own windows), as hf scores them
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = [" ".join(WORDS * 3), "Reverse cat: tac"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    hf_lm = HFLM(pretrained=str(tmp_path / "m"), dtype="float32", device="cpu", batch_size=1, max_length=16)
    ours_lm = Qwen3LabLM(model=model, tokenizer=tok, max_length=16)  # windows of 16: the long text takes several
    want, got = hf_lm.loglikelihood_rolling(rolling), ours_lm.loglikelihood_rolling(rolling)
    assert got == pytest.approx(want, abs=1e-4)
    for items in (ours_items, api_items):
        for want, got in zip(hf_items["rev_mc"], items["rev_mc"], strict=True):  # per choice: (log-lik, greedy)
            assert [g[0][1] for g in got] == [w[0][1] for w in want]
            assert [g[0][0] for g in got] == pytest.approx([w[0][0] for w in want], abs=1e-4)


@pytest.mark.slow
def test_lm_eval_scores_a_model_that_stops_as_its_hf_backend_does(tmp_path, trained_sort):
    """The demo's sort model ends each answer with <|im_end|>, so lm-eval's one generated token after an echoed
    prompt is the stop id. Every choice's log-likelihood through the server (which must return an entry for that
    token: lm-eval drops the last one) and in-process equals lm-eval's hf backend; the server's echo, usage and chat
    log-probs count the stop id, streamed or not, and keep it out of the text."""
    import httpx

    import qwen3lab
    from qwen3lab.demo import make_tasks, prompt_ids
    from qwen3lab.eval.lm_eval_model import Qwen3LabLM
    from qwen3lab.serve import create_app

    folder = trained_sort[1] / "model"
    model, tok = qwen3lab.load_model(folder, dtype="float32", device="cpu"), qwen3lab.load_tokenizer(folder)
    held_out = make_tasks(1500, 25, ("sort",), 0)[1][:10]
    docs = []
    for ex in held_out:
        answer = ex.messages[-1]["content"]
        others = {answer[::-1], answer[1:] + answer[0], "".join(sorted(answer, reverse=True))} - {answer}
        docs.append({"context": tok.decode(prompt_ids(tok, ex.messages[:-1])), "choices": [answer, *sorted(others)]})
    (tmp_path / "sort.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "sort_mc.yaml").write_text(
        f"task: sort_mc\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'sort.jsonl'}\noutput_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: 0\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )

    def loglikelihoods(model_type, model_args=None, **kw):
        from lm_eval.tasks import TaskManager

        out = lm_eval.simple_evaluate(
            model=model_type,
            model_args=model_args,
            tasks=["sort_mc"],
            log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path)),
            **kw,
        )
        samples = sorted(out["samples"]["sort_mc"], key=lambda s: s["doc_id"])
        return [[r[0][0] for r in s["resps"]] for s in samples], out["results"]["sort_mc"]["acc,none"]

    want, hf_acc = loglikelihoods("hf", f"pretrained={folder},dtype=float32", device="cpu", batch_size=4)
    assert hf_acc >= 0.5  # the model has learned the task
    got, acc = loglikelihoods(Qwen3LabLM(model=model, tokenizer=tok))
    assert acc == hf_acc
    for w, g in zip(want, got, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    with serving(create_app(model, tok, "sort")) as url:
        got, acc = loglikelihoods("local-completions", f"base_url={url}/v1/completions,model=sort")
        assert acc == hf_acc
        for w, g in zip(want, got, strict=True):
            assert g == pytest.approx(w, abs=1e-4)

        ids = prompt_ids(tok, held_out[0].messages[:-1]) + tok.encode(held_out[0].messages[-1]["content"])
        body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
        assert choice["logprobs"]["tokens"][-1] == "<|im_end|>" and choice["text"] == tok.decode(ids)
        assert choice["logprobs"]["token_logprobs"][-1] > -1.0  # the model's likeliest next token

        chat = {"messages": held_out[0].messages[:-1], "max_tokens": 16, "temperature": 0, "logprobs": True}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert r["choices"][0]["finish_reason"] == "stop" and "<|im_end|>" not in r["choices"][0]["message"]["content"]
        assert content[-1]["token"] == "<|im_end|>" and r["usage"]["completion_tokens"] == len(content)
        streamed = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat | {"stream": True}, timeout=60) as events:
            for line in events.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        streamed += (c.get("logprobs") or {}).get("content") or []
        assert [c["token"] for c in streamed] == [c["token"] for c in content]
        assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-5)


@pytest.mark.slow
def test_qwen3lab_eval_on_data_scores_loss_and_generations_beside_a_baseline(tmp_path, tok, capsys):
    """`qwen3lab eval --data`: the assistant-token loss equals transformers' cross-entropy over the same tokens; exact
    match and a reward score the greedy generations (the same scorers as GRPO's); a --baseline column; the JSON
    holds every generation; and --tasks runs lm-eval in-process."""
    import torch
    import transformers

    from qwen3lab.cli import main
    from qwen3lab.demo import WEATHER_TOOL as TOOL
    from qwen3lab.generate import generate

    model = tiny_server_model(tmp_path / "m")
    tok.save(tmp_path / "m")
    other = tiny_server_model(tmp_path / "b")  # same init, so perturb it: a different baseline
    with torch.no_grad():
        other.lm_head.weight.mul_(0.5)
    qwen3lab_save(other, tok, tmp_path / "b")
    rows = [
        {"messages": [{"role": "user", "content": f"Reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in WORDS[:3]
    ]
    first = generate(model, tok, rows[0]["messages"][:1], max_new_tokens=8).text
    rows[0]["answer"] = first.split("</think>")[-1].strip()  # what the model says: one exact match for certain
    rows.append({"prompt": [{"role": "user", "content": "Say hi"}], "answer": "hi"})  # GRPO's form: generation only
    for row in rows:
        row["task"] = "greet" if "prompt" in row else "reverse"
    ask = [{"role": "user", "content": "Weather at 02139?"}]
    with_tools = tok.encode_chat(ask, tools=[TOOL], add_generation_prompt=True, assistant_mask=False).input_ids
    said = generate(model, tok, with_tools, max_new_tokens=8).text.split("</think>")[-1].strip()
    assert said != generate(model, tok, ask, max_new_tokens=8).text.split("</think>")[-1].strip()
    rows.append({"messages": ask + [{"role": "assistant", "content": said}], "tools": [TOOL], "task": "tool"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_tasks(tmp_path)
    main(
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--baseline",
            str(tmp_path / "b"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--rewards",
            "exact_match",
            "think_format",
            "--max-new-tokens",
            "8",
            "--tasks",
            "rev_mc",
            "--include-path",
            str(tmp_path),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    ours = report["results"]["model"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    total, count = 0.0, 0
    for row in rows[:3] + rows[4:]:
        enc = tok.encode_chat(row["messages"], tools=row.get("tools"))
        ids, mask = torch.tensor([enc.input_ids]), torch.tensor(enc.assistant_mask)
        with torch.no_grad():
            logp = hf(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        total, count = total - float((logp * mask[1:]).sum()), count + int(mask[1:].sum())
    assert ours["loss_tokens"] == count and ours["loss"] == pytest.approx(total / count, rel=1e-5)
    assert ours["generated"] == 5 and ours["exact_match"] == pytest.approx(2 / 5)
    # per task; the tool row's prompt rendered with its tools, as training renders it
    assert (ours["exact_match/reverse"], ours["exact_match/greet"], ours["exact_match/tool"]) == (1 / 3, 0, 1)
    assert "think_format" in ours and 0 <= ours["rev_mc/acc"] <= 1
    assert report["results"]["baseline"]["loss"] != ours["loss"]
    assert report["samples"]["model"][0]["completion"] == first and report["samples"]["model"][0]["exact_match"] == 1
    printed = capsys.readouterr().out
    assert "model (m)" in printed and "baseline (b)" in printed and "delta" in printed and "perplexity" in printed


def qwen3lab_save(model, tok, folder):
    import qwen3lab

    qwen3lab.save_model(model, folder)
    tok.save(folder)
