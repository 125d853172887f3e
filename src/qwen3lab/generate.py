"""Generation for one prompt or a batch, and streamed text: the user's side of engine.Engine.

generate(model, tok, "Once upon a time", max_new_tokens=32)      # -> Generation(ids, text, finish_reason)
generate(model, tok, [messages, "text", [1, 2, 3]], temperature=0.7, seed=0)
generate(model, tok, messages, json_schema={"type": "object", ...})  # output held to the schema (infer/grammar.py)
generate(model, tok, prompt, speculate=4)  # up to 4 drafts a step by prompt lookup (infer/speculative.py)
for piece in stream(model, tok, messages): print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from .infer import grammar
from .infer.detokenize import TextStream
from .infer.engine import Engine
from .infer.sampling import SamplingParams
from .text.tokenizer import Tokenizer

MAX_ROWS = 64  # rows decoded together by generate() at most; more prompts wait for a free row


@dataclass
class Generation:
    ids: list[int]  # generated ids, the stop id excluded
    text: str
    finish_reason: str  # "stop" (eos id or stop string) or "length"
    prompt_tokens: int = 0


# ---- the user's side ----


def _as_ids(tok: Tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return tok.encode_chat(prompt, add_generation_prompt=True, assistant_mask=False).input_ids
    return list(prompt)


class _Collect:
    """One request's tokens as the engine emits them; a stop string ends the request (cancelled at once)."""

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.text = TextStream(tok, stop)
        self.ids: list[int] = []
        self.pieces: list[str] = []  # text not yet given out (stream)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.request, self.prompt_tokens = None, 0

    def __call__(self, kind: str, value) -> None:
        if self.finish_reason is not None:  # ended at a stop string: the budget's "end" may still come
            return
        if kind == "token":
            self.ids.append(value)
            piece, stopped = self.text.add(value)
            self.pieces.append(piece)
            if stopped:
                self.finish_reason = "stop"
                self.request.cancel()
        elif kind == "end":
            self.pieces.append(self.text.flush())
            self.finish_reason = value
        else:
            self.error = value


def _submit(model, tok: Tokenizer, prompts: list, params: SamplingParams, max_rows: int = MAX_ROWS, **spec):
    """spec: speculate=K and / or draft_model=a smaller Qwen3 (Engine's)."""
    ids = [_as_ids(tok, p) for p in prompts]
    longest = max((len(x) for x in ids), default=0) + params.max_new_tokens
    engine = Engine(model, min(len(ids), max_rows), capacity=longest, max_waiting=len(ids), **spec)
    outs = [_Collect(tok, params.stop) for _ in ids]
    for x, out in zip(ids, outs, strict=True):
        out.request = engine.submit(x, params, out)
        out.prompt_tokens = len(x)
    return engine, outs


def _params(model, tok: Tokenizer, params: SamplingParams | None, kw: dict) -> SamplingParams:
    """The params given, or built from keywords; json_schema=... holds the output to that schema."""
    schema = kw.pop("json_schema", None)
    params = params or SamplingParams(**kw)
    if schema is not None:
        held = grammar.Constraint(tok, grammar.json_schema(schema), model.config.vocab_size)
        params = replace(params, constraint=held)
    return params


def _check(out: _Collect) -> None:
    if out.error is not None:
        raise RuntimeError(f"generation failed: {out.error}")


def generate(
    model, tok: Tokenizer, prompts, params: SamplingParams | None = None, max_rows: int = MAX_ROWS, **kw
) -> list[Generation]:
    """Generate for one prompt or a batch. A prompt is text, token ids, or a list of chat messages (rendered with
    the generation prompt). Returns one Generation per prompt (a list for a batch). max_rows: rows decoded together
    at most (more rows: fewer decode steps, each larger)."""
    spec = {k: kw.pop(k) for k in ("speculate", "draft_model") if k in kw}
    params = _params(model, tok, params, kw)
    # one prompt: text, ids [int, ...] or messages [{...}, ...]; a batch: a list of those
    single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], (int, dict)))
    engine, outs = _submit(model, tok, [prompts] if single else list(prompts), params, max_rows, **spec)
    engine.run_until_idle()
    results = []
    for out in outs:
        _check(out)
        results.append(Generation(out.ids, "".join(out.pieces), out.finish_reason, out.prompt_tokens))
    return results[0] if single else results


def stream(model, tok: Tokenizer, prompt, params: SamplingParams | None = None, **kw) -> Iterator[str]:
    """Text pieces of one generation as they come (see TextStream)."""
    spec = {k: kw.pop(k) for k in ("speculate", "draft_model") if k in kw}
    params = _params(model, tok, params, kw)
    engine, (out,) = _submit(model, tok, [prompt], params, **spec)
    while out.finish_reason is None and out.error is None:
        engine.step()
        _check(out)
        yield from (piece for piece in out.pieces if piece)
        out.pieces.clear()
