"""Scorers of completions: GRPO's reward functions (and, later, evaluation metrics), with trl's signature

    reward(prompts, completions, completion_ids, **columns) -> list[float | None]

completions are strings for text prompts and [{"role": "assistant", "content": ...}] for chat prompts, as trl passes
them; columns are the data row's other fields (a list per field, one entry per completion). None means "does not
apply to this completion" and counts as nothing in the weighted sum. Built-ins by name; others as "module:function".
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import re
import traceback
from collections.abc import Callable

from ...text.chat import parse_assistant

log = logging.getLogger("qwen3lab")
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(.*)$", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def text_of(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def final_answer(completion) -> str:
    """The completion without its think block, stripped."""
    text = text_of(completion)
    m = _THINK.match(text)
    return (m.group(2) if m else text).strip()


def exact_match(prompts, completions, answer=None, **_) -> list[float | None]:
    """1 where the completion answers as the row's `answer` column says, else 0. A text answer is compared with what
    follows the think block (both stripped); an assistant message ({"content", "tool_calls"}) with the completion
    parsed as one: the same content and the same calls (names, and arguments as JSON values)."""
    if answer is None:
        raise ValueError("reward exact_match needs an 'answer' column in the data")
    return [None if a is None else float(_matches(c, a)) for c, a in zip(completions, answer, strict=True)]


def _matches(completion, answer) -> bool:
    if not isinstance(answer, dict):
        return final_answer(completion) == str(answer).strip()
    got = parse_assistant(text_of(completion))
    return got["content"] == (answer.get("content") or "").strip() and _calls(got) == _calls(answer)


def _calls(message: dict) -> list[tuple[str, object]]:
    """(name, arguments) of each call, arguments as JSON values (parse_assistant gives them as a string)."""
    calls = [c["function"] for c in message.get("tool_calls") or []]
    return [(f["name"], json.loads(a) if isinstance(a := f["arguments"], str) else a) for f in calls]


def think_format(prompts, completions, **_) -> list[float]:
    """1 for a closed <think>...</think> block followed by a non-empty answer, else 0."""
    scores = []
    for c in completions:
        m = _THINK.match(text_of(c))
        scores.append(float(bool(m and m.group(2).strip())))
    return scores


def tool_call_json(prompts, completions, **_) -> list[float | None]:
    """For completions that call tools: 1 when every <tool_call> holds JSON with a string "name" and object
    "arguments", else 0; None for completions with no tool call."""
    scores = []
    for c in completions:
        calls = _TOOL_CALL.findall(text_of(c))
        if not calls:
            scores.append(None)
            continue
        ok = True
        for call in calls:
            try:
                body = json.loads(call)
            except json.JSONDecodeError:
                ok = False
                break
            ok = ok and isinstance(body, dict) and isinstance(body.get("name"), str)
            ok = ok and isinstance(body.get("arguments", {}), dict)
        scores.append(float(ok))
    return scores


BUILTIN = {"exact_match": exact_match, "think_format": think_format, "tool_call_json": tool_call_json}


def load_reward(spec: str) -> Callable:
    """A built-in name or "package.module:function"."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"reward {spec!r}: use a built-in ({', '.join(BUILTIN)}) or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


class RewardError(ValueError):
    """A reward function that raised or returned something other than one number (or None) per completion."""


def call_reward(spec: str, fn: Callable, n: int, when: str, **kwargs) -> list[float | None]:
    """fn(**kwargs) checked: n scores, each a real number or None (NaN counts as None, as trl's nansum does).
    Anything else stops the run with one line naming the reward, `when` (e.g. "at step 12") and what it raised
    or returned; the function's own traceback goes to the log first."""
    try:
        scores = fn(**kwargs)
    except Exception as e:
        log.error("reward %s raised %s:\n%s", spec, when, "".join(traceback.format_exception(e)).rstrip())
        raise RewardError(
            f"reward {spec} raised {when}: {type(e).__name__}: {e} (its traceback is in the log above)"
        ) from e
    try:
        scores = list(scores)
    except TypeError:
        raise RewardError(
            f"reward {spec} returned {_short(scores)} {when}; it must return a list of {n} scores"
        ) from None
    if len(scores) != n:
        raise RewardError(f"reward {spec} returned {len(scores)} scores for {n} completions {when}")
    for i, s in enumerate(scores):
        if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Real)):
            raise RewardError(
                f"reward {spec} returned {_short(s)} for completion {i} {when}; a score is a number, or None where "
                "the reward does not apply"
            )
    return [None if s is None or math.isnan(s) else float(s) for s in scores]


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"
