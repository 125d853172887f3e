"""Distillation (objective: distill), as Qwen3 made its small models from its big ones: on each learned position the
student learns the teacher's whole next-token distribution — the generalized Jensen-Shannon divergence of trl's
GKDTrainer (beta 0: forward KL(teacher || student), 1: reverse KL(student || teacher), between: JSD_beta), both
distributions at `temperature` — on the data's completions (off-policy) or on completions the student samples
itself (on-policy: a share `lmbda` of the micro-batches, sampled by the engine, scored by the teacher token by token).

Student and teacher logits are taken chunk by chunk through their own lm_heads, with the gradient with respect to
the student's logits written in closed form in the same pass (loss.head_loss): never a [tokens, vocab] tensor of
either model whole. With `top_k`, the teacher's k most likely tokens (renormalised) stand for its distribution.
"""

from __future__ import annotations

import importlib.util
import math
import random

import torch

from ...infer.sampling import SamplingParams
from ...model.config import PRESETS, ConfigError, ModelConfig, preset
from ...model.head import block, fp32_logits
from ...model.hf import resolve_folder
from .. import batching as B
from .. import data as D
from ..loss import head_loss, supervised
from ..parallel import Dist
from .rollouts import generating, sample


def check_config(cfg, world: int) -> None:
    """The teacher exists and shares the student's vocabulary (its config read, nothing loaded)."""
    dc = cfg.distill
    if not dc.teacher:
        raise ConfigError("distill.teacher: give the teacher's HF folder (a Qwen3 with the student's tokenizer)")
    try:
        teacher = ModelConfig.from_file(resolve_folder(dc.teacher))
        student = preset(cfg.model) if cfg.model in PRESETS else ModelConfig.from_file(resolve_folder(cfg.model))
    except (OSError, ValueError) as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"distill.teacher: {dc.teacher} has a vocabulary of {teacher.vocab_size}, the student "
            f"{student.vocab_size}; distillation compares their distributions token by token: use one tokenizer"
        )
    if dc.top_k and dc.beta != 0:
        raise ConfigError(
            f"distill.top_k: {dc.top_k} keeps only the teacher's top tokens, which forward KL (distill.beta: 0) "
            f"can learn from; beta {dc.beta} needs the teacher's whole distribution (top_k: 0)"
        )
    if dc.teacher_bits == 4 and (world > 1 or importlib.util.find_spec("bitsandbytes") is None):
        raise ConfigError("distill.teacher_bits: 4 runs on one process and needs bitsandbytes (qwen3lab[qlora])")


def divergence(student_logits, teacher_logits, beta: float, temperature: float = 1.0, top_k: int = 0, grad=True):
    """student_logits(), teacher_logits() make [n, V] logits (blocks this function owns) -> the divergence at each
    position [n] and its gradient with respect to the student's logits [n, V] (None without grad), as trl's
    generalized_jsd_loss computes the divergence. Written in place where it can, in seven reused [n, V] blocks
    (model/head.py block)."""
    s = _log_softmax(student_logits(), temperature, "student_logp")  # [n, V]
    if top_k:  # forward KL to the teacher's top k, renormalised over them (config: beta 0 only)
        top, ids = teacher_logits().topk(top_k, -1)  # [n, k]
        t = torch.log_softmax(top.float() / temperature, -1)
        p_t = t.exp()
        value = (p_t * (t - s.gather(1, ids))).sum(-1)
        return value, s.exp_().scatter_add_(1, ids, -p_t).div_(temperature) if grad else None
    t = _log_softmax(teacher_logits(), temperature, "teacher_logp")
    p_s = torch.exp(s, out=block("p_s", *s.shape, s.device))
    if beta == 0:  # KL(teacher || student): d/dz = (p_s - p_t) / T
        p_t = torch.exp(t, out=block("p_t", *t.shape, t.device))
        value = t.sub_(s).mul_(p_t).sum(-1)
        return value, p_s.sub_(p_t).div_(temperature) if grad else None
    if beta == 1:  # KL(student || teacher): d/dz_j = p_s_j (u_j - KL) / T, u = log p_s - log p_t
        u = s.sub_(t)
        value = (p_s * u).sum(-1)
        return value, p_s.mul_(u.sub_(value[:, None])).div_(temperature) if grad else None
    # JSD_beta = beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta p_t + (1 - beta) p_s; its derivative
    # in p_s is (1 - beta) log(p_s / m), through the softmax: p_s_j (g_j - sum_k p_s_k g_k) / T
    m = torch.add(s, math.log1p(-beta), out=block("m", *s.shape, s.device))
    m = torch.logaddexp(m, torch.add(t, math.log(beta), out=block("p_t", *t.shape, t.device)), out=m)
    p_t = torch.exp(t, out=block("p_t", *t.shape, t.device))
    value = beta * t.sub_(m).mul_(p_t).sum(-1)
    del t, p_t
    g = s.sub_(m).mul_(1 - beta)  # (1 - beta) (log p_s - log m)
    del m
    value += (p_s * g).sum(-1)
    if not grad:
        return value, None
    return value, p_s.mul_(g.sub_((p_s * g).sum(-1, keepdim=True))).div_(temperature)


def _log_softmax(logits, temperature: float, role: str):
    """log_softmax(logits / temperature) [n, V] in role's block (model/head.py block)."""
    x = logits if temperature == 1 else logits.div_(temperature)
    return torch.log_softmax(x, -1, out=block(role, *x.shape, x.device))


def distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, cfg, chunk: int, extra_rows=None):
    """The divergence summed over the learned positions of a micro-batch (the loop divides by their number, so the
    step's loss is trl's mean over tokens). hidden / teacher_hidden [B, T, H_s] / [B, T, H_t] of the same batch;
    weight / teacher_weight their lm_heads; cfg: the run's distill settings. -> (loss sum, {})."""
    h, _, weight = supervised(hidden, weight, labels)
    h_t, _, w_t = supervised(teacher_hidden, teacher_weight, labels)
    if h.shape[0] == 0:
        return hidden.sum() * 0.0, {}

    def per_chunk(logits, rows, need_grad):
        teacher_logits = lambda: fp32_logits(h_t[rows], w_t, role="teacher_logits")  # noqa: E731
        value, grad = divergence(logits, teacher_logits, cfg.beta, cfg.temperature, cfg.top_k, need_grad)
        return value.sum(), value, grad

    # chunks of half the cross-entropy's: divergence() holds seven [n, vocab] blocks where it holds two
    return head_loss(h, weight, per_chunk, max(1, chunk // 2), extra_rows)[0], {}


def prompt_of(ids, labels) -> list[int]:
    """An example's prompt: its tokens before the last learned span (the conversation up to the last assistant turn,
    its generation prompt included), or all of it when nothing is learned (a prompt file's rows)."""
    learned = (labels != D.IGNORE).nonzero()[0]
    if len(learned) == 0:
        return ids.tolist()
    gaps = (learned[1:] != learned[:-1] + 1).nonzero()[0]
    start = learned[gaps[-1] + 1] if len(gaps) else learned[0]  # label t is token t + 1: the span starts there
    return ids[: start + 1].tolist()


class OnPolicy:
    """The student's own completions of a micro-batch's prompts, for the share lmbda of micro-batches (`wants`,
    drawn from (seed, step, micro-batch) alone, so every rank and a resumed run draw alike)."""

    def __init__(self, cfg, tok, net, autocast, d: Dist):
        self.cfg, self.dc, self.tok, self.net, self.autocast, self.d = cfg, cfg.distill, tok, net, autocast, d
        self.counts = {"micro": 0, "sampled": 0, "lengths": []}

    def draw(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of `step` is the student's own (counted for the on_policy metric)."""
        sampled = random.Random(f"{self.cfg.seed}/{step}/{micro}").random() < self.dc.lmbda
        self.counts["micro"] += 1
        self.counts["sampled"] += int(sampled)
        return sampled

    @torch.no_grad()
    def batch(self, data, rows: list[list[int]], step: int, micro: int) -> dict:
        """This rank's rows (lists of example indices) with the data's completions replaced by the student's, as a
        micro-batch. Under FSDP2 every rank gathers the model, whatever its share."""
        dc, model = self.dc, self.net.model
        prompts = [prompt_of(*data.example(i)) for row in rows for i in row]
        params = SamplingParams(max_new_tokens=dc.max_new_tokens, temperature=dc.temperature, top_p=dc.top_p)
        seed = hash((self.cfg.seed, step, micro, self.d.rank)) % 2**62
        completions = generating(self.net, self.autocast, lambda: sample(model, prompts, 1, params, seed))
        self.counts["lengths"] += [len(c) for c in completions]
        examples = [(p + c, [0] * len(p) + [1] * len(c)) for p, c in zip(prompts, completions, strict=True) if c]
        if not examples:
            return B.empty_batch(self.tok.pad_token_id)
        sampled = D.TokenizedData.from_examples(examples)
        longest = max(self.cfg.data.max_length, int(sampled.lengths().max()))
        return B.collate(sampled, B.make_rows(sampled, longest, self.cfg.data.packing), self.tok.pad_token_id)

    def pop_metrics(self) -> dict[str, float]:
        """The share of micro-batches the student sampled, and its completions' mean length, since the last call."""
        c = self.counts
        micro, sampled, n, total = self.d.all_sum(c["micro"], c["sampled"], len(c["lengths"]), sum(c["lengths"]))
        self.counts = {"micro": 0, "sampled": 0, "lengths": []}
        out = {"on_policy": sampled / max(micro, 1)}
        if n:
            out["completion_length"] = total / n
        return out
