"""`qwen3lab eval`: what a checkpoint scores on a data file, and on lm-evaluation-harness tasks, beside a baseline.

On a data file (any format training reads; GRPO's prompt rows too):
- loss / perplexity over the tokens training would learn (the assistant's, with assistant-only loss), summed over
  the file, through the chunked lm_head path;
- generation-scored metrics: greedy completions of each row's prompt (the conversation before its last assistant
  message, or `prompt`), scored by exact match against the row's `answer` (else the last assistant message, or
  `completion`) and by any reward function (train/objectives/rewards.py: one set of scorers for GRPO and for
  evaluation).
On lm-eval tasks: lm_eval.simple_evaluate with the in-process `qwen3lab` model type (lm_eval_model.py).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..generate import generate
from ..infer.sampling import SamplingParams
from ..train import batching as B
from ..train import data as D
from ..train.batching import to_device
from ..train.net import micro_batch_loss
from ..train.objectives.rewards import call_reward, load_reward, text_of

log = logging.getLogger("qwen3lab")


def _prompt_and_answer(row: dict):
    """(prompt to generate from, reference answer), or None for a row with nothing to generate from."""
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            return None
        answer = messages[last] if messages[last].get("tool_calls") else messages[last].get("content")
        return messages[:last], row.get("answer", answer)  # a tool call is matched as a message (exact_match)
    if "prompt" in row:
        completion = row.get("completion")
        reference = row.get("answer", text_of(completion) if completion is not None else None)
        return row["prompt"], reference
    return None


@torch.no_grad()
def data_loss(model, data: D.TokenizedData, max_tokens: int = 4096, chunk: int = 1024) -> tuple[float, int]:
    """Summed loss over the supervised tokens of every example, and their count; examples packed into rows of at
    most max_tokens (each its own document): the loss training computes."""
    total, count = 0.0, 0
    for row in B.make_rows(data, max(max_tokens, int(data.lengths().max())), packing=True):
        batch = to_device(B.collate(data, [row], 0), model.lm_head.weight.device)
        loss, n = micro_batch_loss(model, batch, True, chunk, None)
        total, count = total + float(loss), count + n
    return total, count


MAX_NEW_TOKENS = 256  # `qwen3lab eval --max-new-tokens`'s default


def evaluate_data(
    model, tok, path, rewards: list[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS, max_length: int = 32768
) -> tuple[dict, list[dict]]:
    """Metrics of one model on one data file, and one record per generated row (prompt, completion, scores)."""
    rows = list(D.read_rows(path))
    metrics: dict[str, float] = {}
    supervised = [(where, row) for where, row in rows if not _prompt_only(row)]
    if supervised:
        data = D.tokenize_rows(tok, supervised, max_length)
        if len(data):
            total, count = data_loss(model, data)
            metrics |= {"loss": total / count, "perplexity": math.exp(total / count), "loss_tokens": count}
    try:
        found, records = score_generations(model, tok, rows, rewards, max_new_tokens)
    except D.ChatError as e:
        raise D.DataError(f"{path}: {e}") from None
    metrics |= found
    if not metrics:
        raise D.DataError(f"{path}: no row to score (rows need messages with an assistant answer, or a prompt)")
    return metrics, records


def score_generations(
    model, tok, rows: list[tuple[str, dict]], rewards: list[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS
) -> tuple[dict, list[dict]]:
    """Greedy completions of each row's prompt, scored by the rewards (default: exact_match where rows have an
    answer) -> (metrics, one record per row). Rows with a `task` column are scored per task too (`exact_match/max`)."""
    targets = [(where, row, pa) for where, row in rows if (pa := _prompt_and_answer(row)) is not None]
    if not targets:
        return {}, []
    prompts = [pa[0] for _, _, pa in targets]
    inputs = [  # chat prompts rendered with the row's tools, as training renders them
        tok.encode_chat(p, tools=row.get("tools"), add_generation_prompt=True, assistant_mask=False).input_ids
        if isinstance(p, list)
        else p
        for (_, row, _), p in zip(targets, prompts, strict=True)
    ]
    outs = generate(model, tok, inputs, SamplingParams(max_new_tokens=max_new_tokens))
    completions = [
        [{"role": "assistant", "content": o.text}] if isinstance(p, list) else o.text
        for o, p in zip(outs, prompts, strict=True)
    ]
    columns = {"answer": [pa[1] for _, _, pa in targets]}
    for key in {k for _, row, _ in targets for k in row} - {"messages", "prompt", "completion", "answer"}:
        columns[key] = [row.get(key) for _, row, _ in targets]
    specs = list(rewards) if rewards is not None else (["exact_match"] if any(columns["answer"]) else [])
    metrics, scores = {}, {}
    for spec in specs:
        kw = dict(prompts=prompts, completions=completions, completion_ids=[o.ids for o in outs], **columns)
        scores[spec] = call_reward(spec, load_reward(spec), len(outs), "scoring the generations", **kw)
        groups = {None: scores[spec]}
        for task in dict.fromkeys(columns.get("task", [])):
            groups[task] = [v for v, t in zip(scores[spec], columns["task"], strict=True) if t == task]
        for task, values in groups.items():
            kept = [v for v in values if v is not None]
            if kept:
                metrics[spec if task is None else f"{spec}/{task}"] = float(np.mean(kept))
    metrics["generated"] = len(outs)
    metrics["completion_tokens_mean"] = float(np.mean([len(o.ids) for o in outs]))
    records = [
        {
            "where": where,
            "prompt": prompt,
            "answer": answer,
            "completion": out.text,
            "finish_reason": out.finish_reason,
            **{s: v[i] for s, v in scores.items()},
        }
        for i, ((where, _, (prompt, answer)), out) in enumerate(zip(targets, outs, strict=True))
    ]
    return metrics, records


def _prompt_only(row: dict) -> bool:
    return "prompt" in row and "completion" not in row and "messages" not in row and "text" not in row


def evaluate_tasks(
    model, tok, tasks: list[str], include_path=None, limit=None, num_fewshot=None, batch_tokens: int = 8192
) -> dict:
    """lm-eval tasks on the in-process model: {"task/metric": value} (stderr left out)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("--tasks needs lm-evaluation-harness: pip install lm-eval") from None
    from .lm_eval_model import Qwen3LabLM

    out = lm_eval.simple_evaluate(
        model=Qwen3LabLM(model=model, tokenizer=tok, batch_tokens=batch_tokens),
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=include_path),
        log_samples=False,
    )
    metrics = {}
    for task, result in out["results"].items():
        for key, value in result.items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                metrics[f"{task}/{key.removesuffix(',none')}"] = value
    return metrics


def table(columns: dict[str, dict]) -> str:
    """Metrics as a text table, one column per model (and the difference when there are two)."""
    names = list(columns)
    keys = list(dict.fromkeys(k for c in columns.values() for k in c))
    header = ["metric", *names] + (["delta"] if len(names) == 2 else [])
    lines = [header]
    for key in keys:
        values = [columns[n].get(key) for n in names]
        line = [key] + ["-" if v is None else f"{v:.4g}" for v in values]
        if len(names) == 2:
            a, b = values
            line.append("-" if a is None or b is None else f"{a - b:+.4g}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def run_eval(
    model_dir: str,
    baseline: str | None,
    data: str | None,
    tasks: list[str],
    out: str | None,
    rewards: list[str] | None,
    max_new_tokens: int,
    include_path=None,
    limit=None,
    num_fewshot=None,
    dtype: str = "auto",
) -> dict:
    """Evaluate the model (and the baseline) on the data file and / or tasks; print the table, write the JSON."""
    from ..model.hf import load_model
    from ..model.runtime import prepare_for_inference
    from ..text.tokenizer import load_tokenizer

    if not data and not tasks:
        raise SystemExit("qwen3lab eval: give --data FILE and / or --tasks NAMES")
    results, samples = {}, {}
    for name, folder in [("model", model_dir)] + ([("baseline", baseline)] if baseline else []):
        model = load_model(folder, dtype=dtype).eval()
        prepare_for_inference(model, False)
        tok = load_tokenizer(folder) if (Path(folder) / "tokenizer.json").is_file() else load_tokenizer()
        metrics = {}
        if data:
            found, samples[name] = evaluate_data(model, tok, data, rewards, max_new_tokens)
            metrics |= found
        if tasks:
            metrics |= evaluate_tasks(model, tok, tasks, include_path, limit, num_fewshot)
        results[name] = metrics
        del model
    print(table({f"{n} ({Path(f).name})": results[n] for n, f in [("model", model_dir), ("baseline", baseline)] if f}))
    report = {"model": model_dir, "baseline": baseline, "data": data, "tasks": tasks, "results": results}
    if out:
        Path(out).write_text(json.dumps(report | {"samples": samples}, indent=1, ensure_ascii=False))
        log.info("results and every generation: %s", out)
    return report
