"""lm-evaluation-harness's model type `qwen3lab`: the project's own model and engine, in-process (no HTTP, no
transformers). `qwen3lab eval --tasks ...` uses it; from Python, importing this module registers it:

    import lm_eval, qwen3lab.lm_eval_model
    lm_eval.simple_evaluate(model="qwen3lab", model_args="pretrained=runs/x/model", tasks=["hellaswag"])

Tokenisation is lm-eval's own (TemplateLM: a trailing space of the context moves to the continuation, the whole is
encoded and split), so requests become the same token ids as with its `hf` backend. Log-likelihoods: requests
sharing a context in one row (the context computed once), many rows per forward, and only the continuations'
positions through the chunked lm_head path. generate_until: every request of one generation setting at once on
the continuous-batching engine.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401 (lm-eval imports its own model types only while its registry is empty)
import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..generate import generate
from ..infer.sampling import SamplingParams
from ..model.head import logprobs_topk
from ..model.hf import load_model
from ..model.runtime import prepare_for_inference
from ..text.tokenizer import load_tokenizer


@register_model("qwen3lab")
class Qwen3LabLM(TemplateLM):
    def __init__(
        self,
        pretrained=None,
        model=None,
        tokenizer=None,
        batch_tokens: int = 8192,
        max_length=None,
        dtype: str = "auto",
        device: str | None = None,
        compile: bool = False,
        **_,
    ):
        """pretrained: an HF model folder (or pass a loaded `model` and `tokenizer`). batch_tokens: padded tokens per
        log-likelihood forward at most. max_length: context used (the model's by default)."""
        super().__init__()
        if model is None:
            model = load_model(pretrained, dtype=dtype, device=device)
            prepare_for_inference(model, compile in (True, "True", "true"))
        self.model = model.eval()
        self.tok = tokenizer or load_tokenizer(pretrained)
        self.batch_tokens = int(batch_tokens)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._device = model.lm_head.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tok.fingerprint()

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # Qwen3 adds no BOS

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt)[0]

    # ---- log-likelihoods ----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (summed log-prob of the continuation, greedy?).

        The model sees (context + continuation)[-(max_length + 1):][:-1], as lm-eval's hf backend feeds it. Requests
        that share their context — a multiple-choice question's choices — are scored in one row: the context once,
        then each continuation attending to the context and to itself only (positions continuing the context's),
        so the context is computed once instead of once per choice."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            seq = (ctx + cont)[-(self.max_length + 1) :]
            n = min(len(cont), len(seq) - 1)  # tokens scored (all, unless the continuation alone is too long)
            groups.setdefault(tuple(seq[: len(seq) - n]), []).append((i, seq[len(seq) - n :]))
        rows = []  # (prefix, [(request, continuation)]), each row at most max_length tokens
        for prefix, members in groups.items():
            row, width = [], len(prefix)
            for member in members:
                if row and width + len(member[1]) - 1 > self.max_length:
                    rows.append((list(prefix), row))
                    row, width = [], len(prefix)
                row.append(member)
                width += len(member[1]) - 1
            rows.append((list(prefix), row))
        rows.sort(key=lambda r: -(len(r[0]) + sum(len(c) - 1 for _, c in r[1])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        start = 0
        while start < len(rows):
            width = len(rows[start][0]) + sum(len(c) - 1 for _, c in rows[start][1])  # the longest comes first
            batch = rows[start : start + max(1, self.batch_tokens // max(width, 1))]
            start += len(batch)
            for i, result in self._score(batch):
                results[i] = result
        return results

    @torch.no_grad()
    def _score(self, rows) -> list[tuple[int, tuple[float, bool]]]:
        """rows: (prefix, [(request, continuation)]) -> (request, (log-prob, greedy)) for every continuation.

        A row holds the prefix, then each continuation but its last token; a continuation's first token is
        predicted from the prefix's last position, its others from its own positions. Right-padded; the mask
        [B, 1, T, T] lets a token see the prefix and its own continuation, causally."""
        built = []
        for prefix, members in rows:
            ids, segment, positions, where = list(prefix), [0] * len(prefix), list(range(len(prefix))), []
            for s, (_, cont) in enumerate(members, start=1):
                at = len(ids)
                ids += cont[:-1]
                segment += [s] * (len(cont) - 1)
                positions += range(len(prefix), len(prefix) + len(cont) - 1)
                where.append([len(prefix) - 1] + list(range(at, at + len(cont) - 1)))  # predicting cont's tokens
            built.append((ids, segment, positions, where))
        B, T = len(built), max(len(b[0]) for b in built)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)
        for r, (row_ids, segment, positions, _) in enumerate(built):
            ids[r, : len(row_ids)], seg[r, : len(row_ids)] = torch.tensor(row_ids), torch.tensor(segment)
            pos[r, : len(row_ids)] = torch.tensor(positions)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # key is prefix or of my segment
        mask = (causal & same & (seg[:, None, :] >= 0)) | torch.eye(T, dtype=torch.bool)  # padding sees itself
        hidden = self.model(
            ids.to(self._device), pos.to(self._device), mask[:, None].to(self._device), return_hidden=True
        )
        picked, targets, owners = [], [], []
        for r, (_, members) in enumerate(rows):
            for (i, cont), at in zip(members, built[r][3], strict=True):
                picked.append(hidden[r, at])
                targets += cont
                owners.append((i, len(cont)))
        targets = torch.tensor(targets, device=self._device)
        logps, top_ids, _ = logprobs_topk(torch.cat(picked), self.model.lm_head.weight, targets, 1)
        greedy, logps = (top_ids[:, 0] == targets).tolist(), logps.tolist()
        out, at = [], 0
        for i, n in owners:
            out.append((i, (float(sum(logps[at : at + n])), all(greedy[at : at + n]))))
            at += n
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood in windows of max_length, each predicting its tokens with the most context."""
        out = []
        for (text,) in [r.args for r in requests]:
            windows = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            parts = [(None, *utils.make_disjoint_window(w)) for w in windows]
            out.append(sum(logp for logp, _ in self._loglikelihood_tokens(parts)))
        return out

    # ---- generation ----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless do_sample; the text up to the first of `until` (and the end-of-text token), at most
        max_gen_toks tokens, the context cut from the left to fit."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id])
            until = until + ([eos] if eos not in until else [])
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            key = (tuple(until), max_new, temperature, float(kwargs.pop("top_p", 1.0)))
            groups.setdefault(key, []).append(i)
        out: list[str | None] = [None] * len(requests)
        for (until, max_new, temperature, top_p), members in groups.items():
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=list(until))
            keep = self.max_length - max_new
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in members]
            # all at once, up to 256 rows: measured on the 0.6B shape, 100 prompts x 16 tokens took 19.5 s in one
            # batch of 128 rows and 24-26 s as 64 + 36
            outs = generate(self.model, self.tok, prompts, params, max_rows=256)
            for i, result in zip(members, outs, strict=True):
                out[i] = result.text
        return out
