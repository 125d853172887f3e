"""GRPO's rollouts: prompts -> G sampled completions each -> rewards -> advantages -> one packed training micro-batch.

Completions come from the generation engine with the model as it is at that step: `Engine.submit_group` prefills
each prompt once and copies its cache to its G rows. The engine samples every row of a step in one call, from a
generator seeded by (run seed, step, micro-batch), so a resumed run makes the rollouts an uninterrupted one makes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...infer import grammar
from ...infer.engine import Engine
from ...infer.sampling import SamplingParams, default_stop_ids
from ...model.config import ConfigError
from .. import batching as B
from .. import data as D
from ..parallel import Dist, gathered
from .grpo import sampler_weights
from .logprob import token_sequences
from .rewards import call_reward, load_reward


def load_prompts(path, tok) -> list[dict]:
    """Rows with `prompt` (messages, + `tools`, or a string) and any other columns, passed to the rewards."""
    prompts = []
    for where, row in D.read_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), (list, str)) or not row["prompt"]:
            raise D.DataError(f"{where}: a GRPO row needs 'prompt': a list of messages or a string")
        prompt, tools = row["prompt"], row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        try:
            if isinstance(prompt, list):
                ids = tok.encode_chat(prompt, tools=tools, add_generation_prompt=True, assistant_mask=False).input_ids
            else:
                ids = tok.encode(prompt)
        except D.ChatError as e:
            raise D.DataError(f"{where}: {e}") from None
        prompts.append({"ids": ids, "prompt": prompt, "columns": {k: v for k, v in row.items() if k != "prompt"}})
    if not prompts:
        raise D.DataError(f"{path}: no prompts")
    return prompts


def _recorder(events: list):
    """An engine emit that keeps what it is given."""
    return lambda kind, value: events.append((kind, value))


def advantages(rewards: torch.Tensor, groups: int, scale: str, batch_std: float | None = None) -> torch.Tensor:
    """(r - group mean), divided by (std + 1e-4) of the group or of the batch (Bessel's std, as trl; `batch_std`
    when the batch is spread over ranks), or not."""
    grouped = rewards.view(groups, -1)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        return centred / (grouped.std(1).repeat_interleave(grouped.shape[1]) + 1e-4)
    return centred / ((rewards.std() if batch_std is None else batch_std) + 1e-4)


def sample(model, prompts: list[list[int]], G: int, params: SamplingParams, seed: int, logprobs=None, speculate=0):
    """G completions of each prompt from the engine (prompt k's at k*G ... k*G + G - 1): the generated ids, and the
    stop id that ended them (the model learns to stop). One seeded generator for the batch and one SamplingParams
    object: every decode step samples all rows in one call, and the same call gives the same completions (a
    resumed run's). With params.sampled_logprobs, each completion's log-probs as sampled are appended to
    `logprobs`."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    engine = Engine(model, len(prompts) * G, capacity=longest, max_waiting=len(prompts), seed=seed, speculate=speculate)
    events: list[list] = [[] for _ in range(len(prompts) * G)]  # what the engine emitted for each completion
    requests = []
    for k, ids in enumerate(prompts):
        requests += engine.submit_group(ids, [params] * G, [_recorder(events[k * G + c]) for c in range(G)])
    engine.run_until_idle()
    completion_ids = []
    for request, emitted in zip(requests, events, strict=True):
        errors = [v for kind, v in emitted if kind == "error"]
        if errors:
            raise RuntimeError(f"sampling failed: {errors[0]}")
        ids = [v for kind, v in emitted if kind == "token"]
        completion_ids.append(ids + ([request.stop_token] if request.stop_token is not None else []))
        if logprobs is not None:
            logprobs.append([v for kind, v in emitted if kind == "sampled_logprob"])
    return completion_ids


def generating(net, autocast, fn):
    """fn() run on the policy in eval mode with the whole model gathered (FSDP2: once, not per generated token; every
    rank runs the same collectives whatever it generates), inside the root's forward for its own parameters."""
    model = net.model
    training = model.training
    model.eval()
    with gathered(net, model.model.layers), autocast():
        out = net(None, call=fn)
    model.train(training)
    return out


class Rollouts:
    """Makes GRPO micro-batches for the training loop (`batch`) and keeps what it saw for the step's metrics."""

    def __init__(self, cfg, tok, prompts: list[dict], net, autocast, d: Dist, out: Path):
        g = cfg.grpo  # its values checked with the config (config.check_train_config)
        self.cfg, self.g, self.tok, self.prompts, self.net, self.autocast = cfg, g, tok, prompts, net, autocast
        self.rewards = {spec: load_reward(spec) for spec in g.rewards}
        self.weights = list(g.reward_weights) or [1.0] * len(self.rewards)
        self.d = d
        self.samples = out / "completions.jsonl" if d.main else None
        # the same keys on every rank, in one order: the step's metrics are summed over ranks
        keys = ("reward", "completion_length", *(f"rewards/{spec}" for spec in self.rewards))
        if g.sampler_correction != "none":
            keys += ("sampling/importance_sampling_ratio", "sampling/sampling_logp_difference")
        self.sampled_logps: list[list[float]] | None = None  # the last rollouts' log-probs as sampled (_generate)
        self.constraint = None  # grpo.response_format: completions held to a JSON schema on the engine
        if g.response_format:
            try:
                schema = grammar.json_schema(g.response_format)
                self.constraint = grammar.Constraint(tok, schema, net.model.config.vocab_size)
            except grammar.GrammarError as e:
                raise ConfigError(f"grpo.response_format: {e}") from None
        self._metrics: dict[str, list[float]] = {k: [] for k in keys}

    def seed(self, *where: int) -> int:
        return hash((self.cfg.seed, *where)) % 2**62  # ints hash the same in every process

    @torch.no_grad()
    def batch(self, items: list[int], step: int, micro: int) -> dict:
        """Rollouts of these prompts (this rank's share) with the model as it is now, as a micro-batch: `step` is
        the first training step that uses it, `micro` its index within the step (both seed the sampling).

        Under FSDP2 every rank runs the same collectives whatever its share: the gathering of the whole model for
        generation, the batch's reward std, the log-prob forwards."""
        g, G, model = self.g, self.g.num_generations, self.net.model
        rows = [self.prompts[i] for i in items]
        completion_ids = generating(self.net, self.autocast, lambda: self._generate(rows, step, micro))
        # what trl hands its reward functions for a tokenizer without a response schema (Qwen3's): the completion
        # decoded without special tokens, so the stop id that ended it (kept in completion_ids) is not in the text
        texts = [self.tok.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        rewards = self.score(rows, completion_ids, texts, step) if rows else torch.zeros(0)  # [n * G]
        batch_std = None
        if g.scale_rewards == "batch" and self.d.world > 1:
            n, total, squares = self.d.all_sum(len(rewards), float(rewards.sum()), float((rewards**2).sum()))
            batch_std = ((squares - total**2 / n) / max(n - 1, 1)) ** 0.5
        batch = self._training_batch(rows, completion_ids, rewards, batch_std, self.sampled_logps)
        correct = g.sampler_correction != "none"
        if g.beta != 0.0 or g.num_iterations > 1 or correct:
            on_device = {k: v.to(model.lm_head.weight.device) for k, v in batch.items()}
            with self.autocast():
                if g.beta != 0.0:
                    batch["ref_logps"] = self.net(on_device, "reference", g.temperature).cpu()
                if g.num_iterations > 1 or correct:  # the policy that sampled, for every update of this batch
                    batch["old_logps"] = self.net(on_device, "policy", g.temperature).cpu()
        if correct and "sampled_logps" in batch:
            old, sampled = batch["old_logps"], batch.pop("sampled_logps")
            batch["sampler_weights"] = sampler_weights(
                old, sampled, token_sequences(batch), len(batch["advantages"]), g
            )
            self._note("sampling/importance_sampling_ratio", batch["sampler_weights"].tolist())
            self._note("sampling/sampling_logp_difference", (old - sampled).abs().tolist())
        self._note("reward", rewards.tolist())
        self._note("completion_length", [len(ids) for ids in completion_ids])
        if rows:
            self._write_samples(step, rows[0], texts[:G], rewards[:G])
        return batch

    def _generate(self, rows: list[dict], step: int, micro: int) -> list[list[int]]:
        """G completions a row; with the sampler correction, their log-probs as sampled in self.sampled_logps."""
        g, correct = self.g, self.g.sampler_correction != "none"
        params = SamplingParams(
            max_new_tokens=g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            sampled_logprobs=correct,
            constraint=self.constraint,
        )
        prompts, seed = [r["ids"] for r in rows], self.seed(step, micro, self.d.rank)
        self.sampled_logps = [] if correct else None
        return sample(self.net.model, prompts, g.num_generations, params, seed, self.sampled_logps, g.speculate)

    def _training_batch(self, rows, completion_ids, rewards, batch_std, sampled=None) -> dict:
        """prompt + completion per sequence, learned on the completion, packed; advantages per sequence; and the
        completions' log-probs as sampled (`sampled`, one list a completion) in the order of the learned tokens."""
        g, G = self.g, self.g.num_generations
        stops = set(default_stop_ids(self.net.model))
        # mask_truncated_completions: a completion that did not stop (cut at max_completion_length) learns nothing
        learns = [not g.mask_truncated_completions or (ids and ids[-1] in stops) for ids in completion_ids]
        examples = [
            (rows[j // G]["ids"] + ids, [0] * len(rows[j // G]["ids"]) + [int(learns[j])] * len(ids))
            for j, ids in enumerate(completion_ids)
        ]
        keep = [j for j, (_, mask) in enumerate(examples) if any(mask[1:])]  # an empty completion teaches nothing
        if not keep:
            return B.empty_batch(self.tok.pad_token_id, "grpo")
        adv = advantages(rewards, len(rows), g.scale_rewards, batch_std)
        data = D.TokenizedData.from_examples([examples[j] for j in keep])
        longest = max(len(r["ids"]) for r in rows) + g.max_completion_length
        packed = B.pack_best_fit(data.lengths(), max(int(data.lengths().max()), longest))
        batch = B.collate_sequences(data, packed, self.tok.pad_token_id)
        order = [keep[i] for row in packed for i in row]  # sequence s of the batch is completion order[s]
        batch["advantages"] = adv[order]
        if sampled:
            batch["sampled_logps"] = torch.tensor([lp for j in order for lp in sampled[j]])
        n_tokens = int((batch["labels"] != D.IGNORE).sum())
        # grpo and dr_grpo average over every completion, those that learn nothing too (as trl's mean over the batch)
        per = {"dapo": n_tokens, "cispo": n_tokens, "bnpo": 1}
        batch["num_items"] = torch.tensor(per.get(g.loss_type, len(completion_ids)))
        return batch

    def score(self, rows, completion_ids, texts, step: int) -> torch.Tensor:
        """Weighted sum of the reward functions per completion; None counts as nothing (trl's nansum)."""
        G = self.g.num_generations
        chat = isinstance(rows[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        prompts = [rows[j // G]["prompt"] for j in range(len(texts))]
        columns = {
            key: [rows[j // G]["columns"].get(key) for j in range(len(texts))]
            for key in {k for r in rows for k in r["columns"]}
        }
        total = np.zeros(len(texts))
        for (spec, fn), w in zip(self.rewards.items(), self.weights, strict=True):
            kw = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            scores = call_reward(spec, fn, len(texts), f"at step {step}", **kw)
            values = np.array([np.nan if s is None else s for s in scores])
            self._note(f"rewards/{spec}", values[~np.isnan(values)].tolist())
            total += w * np.nan_to_num(values)
        return torch.tensor(total, dtype=torch.float32)

    def _note(self, key: str, values: list[float]) -> None:
        self._metrics.setdefault(key, []).extend(values)

    def pop_metrics(self) -> dict[str, float]:
        """Means (and the reward's std) over the completions of every rank since the last call."""
        sums = []
        for values in self._metrics.values():
            v = np.array(values, dtype=np.float64)
            sums += [len(v), v.sum(), (v**2).sum()]
        sums = self.d.all_sum(*sums)
        out = {}
        for k, key in enumerate(self._metrics):
            n, total, squares = sums[3 * k : 3 * k + 3]
            if n:
                out[key] = total / n
                if key == "reward":
                    out["reward_std"] = max((squares - total**2 / n) / (n - 1), 0.0) ** 0.5 if n > 1 else 0.0
        self._metrics = {k: [] for k in self._metrics}
        return out

    def _write_samples(self, step: int, row: dict, texts: list[str], rewards: torch.Tensor) -> None:
        if self.samples is None:
            return
        with self.samples.open("a", encoding="utf-8") as f:
            for text, reward in zip(texts, rewards.tolist(), strict=True):
                line = {"step": step, "prompt": row["prompt"], "completion": text, "reward": reward}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
