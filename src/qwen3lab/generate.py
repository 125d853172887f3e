"""Generation over a preallocated KV cache: prefill, then one token at a time; sampling; stop ids and strings.

Batches of prompts with different lengths are left-padded into one cache: every row writes the same cache slots,
and each row's positions start at its first real token, with a mask that hides its padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .tokenizer import Tokenizer

IM_END, ENDOFTEXT = 151645, 151643


class KVCache:
    """Keys and values of every layer, [layers, B, kv_heads, max_len, head_dim], filled from slot 0 on."""

    def __init__(self, cfg, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # slots filled by earlier forwards
        # each layer's own views, made once; not its index: a compiled block then sees tensors, not a constant per layer
        self.layers = [_LayerCache(self, self.k[i], self.v[i]) for i in range(cfg.num_hidden_layers)]

    def __getitem__(self, layer: int) -> _LayerCache:
        return self.layers[layer]


@dataclass
class _LayerCache:
    cache: KVCache
    k: torch.Tensor  # [B, kv_heads, max_len, head_dim]
    v: torch.Tensor

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write this forward's keys/values [B, kv_heads, T, D] after the filled slots; return all filled slots."""
        start, T = self.cache.length, k.shape[2]
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        return self.k[:, :, : start + T], self.v[:, :, : start + T]


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the text
    stop_ids: list[int] | None = None  # None: the model's eos ids plus <|im_end|> and <|endoftext|>


@dataclass
class Generation:
    ids: list[int]  # generated ids, the stop id excluded
    text: str
    finish_reason: str  # "stop" (eos id or stop string) or "length"
    prompt_tokens: int = 0


def default_stop_ids(model) -> list[int]:
    """The eos ids of config and generation_config, and always both chat ends: base checkpoints list only
    <|endoftext|>, and a chat-tuned model that ends its turn with <|im_end|> would otherwise never stop."""
    ids = []
    for source in (model.config.eos_token_id, getattr(model, "generation_config", {}).get("eos_token_id")):
        ids += source if isinstance(source, list) else [source]
    ids += [IM_END, ENDOFTEXT]
    return sorted({i for i in ids if i is not None and i < model.config.vocab_size})


def prepare_for_inference(model, compile: bool) -> None:
    """What the CLI's generate, chat and serve do to a loaded model: compile its blocks if asked (for any length,
    see parallel.apply_compile) and, on the CPU, keep freed memory in the heap (batched prefill of 4 x 512 tokens on
    the 0.6B shape: 7.8 s -> 6.7 s)."""
    from .parallel import apply_compile, keep_freed_cpu_memory

    if model.lm_head.weight.device.type == "cpu":
        keep_freed_cpu_memory()
    if compile:
        apply_compile(model, dynamic=True)


# ---- sampling ----


def process_logits(logits: torch.Tensor, generated: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """logits [B, V] fp32 -> the logits to sample from, after penalty, temperature, top-k, top-p and min-p."""
    if p.repetition_penalty != 1.0 and generated is not None and generated.numel():
        seen = torch.gather(logits, 1, generated)
        seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if p.temperature <= 0:
        return logits
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > p.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if p.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ---- the loop ----


def _as_ids(tok: Tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return tok.encode_chat(prompt, add_generation_prompt=True, assistant_mask=False).input_ids
    return list(prompt)


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], params) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token: an id, -1 when the row just stopped, None once it is done.

    `params` is one SamplingParams for all rows or a list with one per row (a server batches unrelated requests).
    """
    device = model.lm_head.weight.device
    B = len(prompts)
    per_row = list(params) if isinstance(params, (list, tuple)) else [params] * B
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("empty prompt: give at least one token")
    T = max(lengths)
    max_new = max(p.max_new_tokens for p in per_row)
    max_len = T + max_new
    if max_len > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new}) exceeds the model's "
            f"max_position_embeddings={model.config.max_position_embeddings}"
        )
    pad = torch.tensor([T - n for n in lengths], device=device)  # left padding per row
    padded = min(lengths) < T
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, T - len(p) :] = torch.tensor(p, device=device)
    default_stops = default_stop_ids(model)
    stops = [set(p.stop_ids if p.stop_ids is not None else default_stops) for p in per_row]
    budget = [p.max_new_tokens for p in per_row]
    shared = all(p == per_row[0] for p in per_row)  # one vectorised sampling call for the whole batch
    generators = [torch.Generator(device).manual_seed(p.seed) if p.seed is not None else None for p in per_row]
    cache = KVCache(model.config, B, max_len, device, model.lm_head.weight.dtype)
    slots = torch.arange(max_len, device=device)
    history = ids if any(p.repetition_penalty != 1.0 for p in per_row) else None
    done = [False] * B

    x, start = ids, 0
    for step in range(max_new):
        n = x.shape[1]
        q_slots = slots[start : start + n]
        positions = (q_slots[None, :] - pad[:, None]).clamp(min=0)  # [B, n]
        k_slots = slots[: start + n]
        mask = None  # no padding: the causal kernel, no [n, S] mask (a 32k-token prompt would need GiBs)
        if padded:  # [B, 1, n, S]: causal over slots, and never a row's own left padding
            mask = (k_slots[None, None, None, :] <= q_slots[None, None, :, None]) & (
                k_slots[None, None, None, :] >= pad[:, None, None, None]
            )
        hidden = model(x, positions, mask, return_hidden=True, kv_cache=cache)
        cache.length = start + n
        logits = model.lm_head(hidden[:, -1]).float()  # [B, V]
        if shared:
            token = sample(process_logits(logits, history, per_row[0]), per_row[0], generators[0])
        else:
            token = torch.stack(
                [
                    sample(process_logits(logits[r : r + 1], None if history is None else history[r : r + 1], p), p, g)[
                        0
                    ]  # fmt: skip
                    for r, (p, g) in enumerate(zip(per_row, generators, strict=True))
                ]
            )
        out = []
        for r, t in enumerate(token.tolist()):
            if done[r]:
                out.append(None)
            elif t in stops[r]:
                out.append(-1)
                done[r] = True
            else:
                out.append(t)
                if step + 1 >= budget[r]:
                    done[r] = True
        yield out
        if all(done):
            return
        if history is not None:
            history = torch.cat([history, token[:, None]], 1)
        x, start = token[:, None], start + n


def generate(model, tok: Tokenizer, prompts, params: SamplingParams | None = None, **kw) -> list[Generation]:
    """Generate for one prompt or a batch. A prompt is text, token ids, or a list of chat messages (rendered with
    the generation prompt). Returns one Generation per prompt."""
    params = params or SamplingParams(**kw)
    # one prompt: text, ids [int, ...] or messages [{...}, ...]; a batch: a list of those
    single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], (int, dict)))
    batch = [prompts] if single else list(prompts)
    ids = [_as_ids(tok, p) for p in batch]
    outs: list[list[int]] = [[] for _ in batch]
    reasons = ["length"] * len(batch)
    texts = [""] * len(batch)
    active = [True] * len(batch)
    for step in generate_ids(model, ids, params):
        for r, t in enumerate(step):
            if t is None or not active[r]:
                continue
            if t == -1:
                reasons[r], active[r] = "stop", False
                continue
            outs[r].append(t)
            if params.stop:
                text = tok.decode(outs[r])
                cut = _find_stop(text, params.stop)
                if cut is not None:
                    texts[r], reasons[r], active[r] = text[:cut], "stop", False
        if not any(active):
            break
    results = []
    for r in range(len(batch)):
        text = texts[r] if reasons[r] == "stop" and params.stop and texts[r] else tok.decode(outs[r])
        results.append(Generation(outs[r], text, reasons[r], len(ids[r])))
    return results[0] if single else results


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


class TextStream:
    """Token ids in, text pieces out: a piece never ends inside a multi-byte character, and nothing from a stop
    string on is ever given out (text that could still begin one is held back).

    O(1) per token, whatever the length (reasoning traces run to tens of thousands of tokens): each step decodes only
    the ids since the last complete piece, and stop strings are searched for in the new text and the few characters
    before it that could begin one.
    """

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, stop
        self.hold = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of `text`; decoding restarts at `prefix`
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of text given out

    def _pending(self) -> tuple[str, bool]:
        """Text of the ids after `read`, and whether it is complete (not ending inside a character)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        complete = len(after) > len(before) and not after.endswith("\ufffd")
        return after[len(before) :], complete

    def add(self, token: int) -> tuple[str, bool]:
        """The new piece (maybe empty) and whether a stop string was reached."""
        self.ids.append(token)
        new, complete = self._pending()
        if not complete:  # an incomplete UTF-8 sequence: wait for the rest of the character
            return "", False
        self.prefix, self.read = self.read, len(self.ids)
        search_from = max(len(self.text) - self.hold + 1, 0)  # a stop string may begin in the held-back tail
        self.text += new
        cut = _find_stop(self.text[search_from:], self.stop)
        cut = None if cut is None else search_from + cut
        ready = cut if cut is not None else len(self.text) - max(self.hold - 1, 0)
        piece = self.text[self.sent : ready] if ready > self.sent else ""
        self.sent += len(piece)
        return piece, cut is not None

    def flush(self) -> str:
        """What is left once generation ends without a stop string."""
        new, _ = self._pending()
        self.text += new
        self.prefix = self.read = len(self.ids)
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece


def stream(model, tok: Tokenizer, prompt, params: SamplingParams | None = None, **kw) -> Iterator[str]:
    """Text pieces of one generation as they come (see TextStream)."""
    params = params or SamplingParams(**kw)
    text = TextStream(tok, params.stop)
    for step in generate_ids(model, [_as_ids(tok, prompt)], params):
        if step[0] is None or step[0] == -1:
            break
        piece, stopped = text.add(step[0])
        if piece:
            yield piece
        if stopped:
            return
    tail = text.flush()
    if tail:
        yield tail
