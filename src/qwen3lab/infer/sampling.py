"""What to sample and when to stop: SamplingParams, the logits processors (repetition penalty, temperature, top-k,
top-p, min-p), the sampler, and the default stop ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IM_END, ENDOFTEXT = 151645, 151643


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
    # log-probs under the model's own distribution (before temperature and the other settings), as OpenAI and vLLM
    # report them: of each generated token and the `logprobs` most likely there (None: none); of each prompt token
    # after the first and the `prompt_logprobs` most likely there (None: none)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # the log-prob of each sampled token under the model's distribution at the sampling temperature (before top-k /
    # top-p cut it), as vLLM's processed logprobs: what GRPO's sampler correction compares with the trainer's
    sampled_logprobs: bool = False
    # a grammar.Constraint (a JSON schema, a regex, tool calls): each token is sampled from those it allows
    constraint: Any = None


def default_stop_ids(model) -> list[int]:
    """The eos ids of config and generation_config, and always both chat ends: base checkpoints list only
    <|endoftext|>, and a chat-tuned model that ends its turn with <|im_end|> would otherwise never stop."""
    ids = []
    for source in (model.config.eos_token_id, getattr(model, "generation_config", {}).get("eos_token_id")):
        ids += source if isinstance(source, list) else [source]
    ids += [IM_END, ENDOFTEXT]
    return sorted({i for i in ids if i is not None and i < model.config.vocab_size})


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
    # Inverse CDF: one uniform per row, found in the cumulative probabilities (the first index whose cumulative sum
    # exceeds it, so a token of probability 0 is never picked). torch.multinomial took 3.7 ms per row of 151,936
    # here, and drawing one exponential per token (the "exponential race") 3.5 ms: GRPO's 64 rows, 0.24 s a step.
    cdf = logits.softmax(-1).cumsum(-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
