"""The model and its loss as one module (WithLoss), which is what the optimizer steps and FSDP2 shards: SFT's
chunked cross-entropy, DPO's loss against its reference, GRPO's, distillation's against its teacher; and the
trained embedding rows of chosen tokens.
"""

from __future__ import annotations

import contextlib

import torch

from ..model.hf import load_sharded
from .lora import lora_disabled
from .loss import IGNORE, lm_loss_sum, token_logprobs
from .objectives.distill import distill_loss
from .objectives.dpo import dpo_loss, sequence_logps
from .objectives.grpo import grpo_loss
from .parallel import apply_fsdp


class TrainableTokens(torch.nn.Module):
    """Train the embedding rows of chosen tokens while the rest stays frozen: a delta on those rows only.

    The delta is added where those tokens occur and, with tied embeddings, to their logits in the loss: never a
    copy of the [vocab, hidden] embedding, and a gradient for those rows alone.
    """

    def __init__(self, vocab_size: int, hidden_size: int, token_ids: list[int], device=None):
        super().__init__()
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"lora.train_tokens: token ids {token_ids} repeat; list each token once")
        self.register_buffer("token_ids", torch.tensor(token_ids, device=device), persistent=False)
        row_of = torch.full((vocab_size,), -1, dtype=torch.long, device=device)  # token id -> its delta row
        row_of[self.token_ids] = torch.arange(len(token_ids), device=device)
        self.register_buffer("row_of", row_of, persistent=False)
        self.delta = torch.nn.Parameter(torch.zeros(len(token_ids), hidden_size, device=device))

    def embed(self, base: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, hidden]: the frozen rows, plus the delta on the trained tokens."""
        row = self.row_of[ids]
        extra = torch.nn.functional.embedding(row.clamp(min=0), self.delta) * (row >= 0).unsqueeze(-1)
        return torch.nn.functional.embedding(ids, base) + extra  # fp32 delta on a bf16 base: summed in fp32


def hidden_states(model, batch, packing: bool, extra_tokens: TrainableTokens | None, upcast=False):
    """Final hidden states [B, T, H] of a micro-batch, and the trained token rows to add to lm_head (or None).
    upcast: the embedding is a bf16 frozen base and the compute is fp32 (see use_bf16_compute)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    embedding, extra_rows = model.model.embed_tokens, None
    if extra_tokens is not None:
        embeds = extra_tokens.embed(embedding.weight, ids)
        if model.config.tie_word_embeddings:
            extra_rows = (extra_tokens.token_ids, extra_tokens.delta)
    else:
        embeds = embedding(ids)
    if upcast:
        embeds = embeds.float()
    if packing:
        return model.forward_packed(ids, pos, True, embeds, batch["cu_seqlens"]), extra_rows
    return model(ids, pos, return_hidden=True, inputs_embeds=embeds), extra_rows


def micro_batch_loss(model, batch, packing: bool, chunk: int, extra_tokens: TrainableTokens | None, upcast=False):
    """Summed loss and supervised-token count of one SFT micro-batch."""
    hidden, extra_rows = hidden_states(model, batch, packing, extra_tokens, upcast)
    return lm_loss_sum(hidden, model.lm_head.weight, batch["labels"], chunk, extra_rows)


class WithLoss(torch.nn.Module):
    """The model and its loss as one module, so FSDP2 (which gathers a module's parameters only while its forward
    runs) has the tied embedding / lm_head gathered for the chunked loss too; and the trained token rows, if any.

    forward(batch) -> (summed loss, summed metrics). The objective is SFT's cross-entropy, DPO's loss against a
    reference (log-probs precomputed in the batch, a frozen copy `ref_model`, or this model with its adapters off),
    GRPO's, or the divergence from a teacher (distill). forward(batch, logps="policy" | "reference") -> the
    supervised tokens' log-probs [N], without grad. forward(None, call=f) -> f(): work on self.model that needs
    the root's parameters, e.g. generation.
    """

    def __init__(
        self,
        model,
        extra_tokens: TrainableTokens | None,
        packing: bool,
        chunk: int,
        upcast=False,
        objective: str = "sft",
        beta: float = 0.1,
        ref_model=None,
        grpo=None,
        teacher=None,
        distill=None,
    ):
        super().__init__()
        self.model, self.extra_tokens, self.packing, self.chunk = model, extra_tokens, packing, chunk
        self.upcast, self.objective, self.beta, self.grpo, self.distill = upcast, objective, beta, grpo, distill
        # the frozen reference and teacher as modules of their own, outside this one's tree (never trained or saved;
        # sharded apart)
        self.__dict__["ref_net"] = None if ref_model is None else WithLoss(ref_model, None, True, chunk)
        self.__dict__["teacher_net"] = None if teacher is None else WithLoss(teacher, None, packing, chunk)

    def forward(self, batch, logps: str | None = None, temperature: float = 1.0, call=None):
        if call is not None:
            return call()
        if logps is not None:
            return self._token_logps(batch, logps == "reference", temperature)
        if self.objective == "sft" and "row_source" in batch:
            return self._loss_by_source(batch)
        if self.objective == "sft":
            return micro_batch_loss(self.model, batch, self.packing, self.chunk, self.extra_tokens, self.upcast)[0], {}
        if self.objective == "distill":
            hidden, extra_rows = hidden_states(self.model, batch, self.packing, self.extra_tokens, self.upcast)
            # inside the teacher's forward: under FSDP2 its lm_head is gathered there
            return self.teacher_net(None, call=lambda: self._distill_loss(hidden, extra_rows, batch))
        ref = batch.get("ref_logps")
        if self.objective == "dpo" and ref is None:
            ref = sequence_logps(self._token_logps(batch, reference=True), batch)
        hidden, extra_rows = hidden_states(self.model, batch, True, self.extra_tokens, self.upcast)
        weight = self.model.lm_head.weight
        if self.objective == "grpo":
            return grpo_loss(hidden, weight, batch, self.grpo, self.chunk, extra_rows)
        return dpo_loss(hidden, weight, batch, ref, self.beta, self.chunk, extra_rows)

    def _loss_by_source(self, batch):
        """SFT's loss on a mixture's rows, and each source's summed loss and learned tokens (metrics source_loss/{s}
        and source_units/{s}: the loop divides one by the other, sources.py)."""
        hidden, extra_rows = hidden_states(self.model, batch, self.packing, self.extra_tokens, self.upcast)
        labels = batch["labels"]
        loss, _, each = lm_loss_sum(hidden, self.model.lm_head.weight, labels, self.chunk, extra_rows, per_token=True)
        rows = batch["row_source"]  # [B]
        source = rows[:, None].expand_as(labels)[labels != IGNORE]  # [N] the source of each learned token
        metrics = {}
        for s in rows.unique().tolist():
            metrics[f"source_loss/{s}"] = float(each[source == s].sum())
            metrics[f"source_units/{s}"] = float((source == s).sum())
        return loss, metrics

    def _distill_loss(self, hidden, extra_rows, batch):
        teacher = self.teacher_net.model
        with torch.no_grad():
            teacher_hidden = hidden_states(teacher, batch, self.packing, None)[0]
        weights = self.model.lm_head.weight, teacher.lm_head.weight
        return distill_loss(
            hidden, weights[0], teacher_hidden, weights[1], batch["labels"], self.distill, self.chunk, extra_rows
        )

    def hidden(self, batch) -> torch.Tensor:
        """Final hidden states [B, T, H] of a batch (e.g. the routing pass of MoE balancing, train/balance.py)."""
        packing = self.packing or self.objective != "sft"
        return hidden_states(self.model, batch, packing, self.extra_tokens, self.upcast)[0]

    @torch.no_grad()
    def _token_logps(self, batch, reference: bool = False, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs [N] of the batch's supervised tokens under this model, or under the reference: the frozen copy,
        else the base model (LoRA adapters and trained token rows off)."""
        if reference and self.ref_net is not None:
            return self.ref_net(batch, "policy", temperature)  # through its forward, for its own FSDP2 gathering
        model, extra_tokens = self.model, None if reference else self.extra_tokens
        with lora_disabled(model) if reference else contextlib.nullcontext():
            hidden, extra_rows = hidden_states(model, batch, True, extra_tokens, self.upcast)
        return token_logprobs(hidden / temperature, model.lm_head.weight, batch["labels"], self.chunk, extra_rows)


def shard(net: WithLoss, source: str | None, device: torch.device, bf16: bool) -> None:
    """FSDP2 over the model and its loss; a model built on the meta device is then filled shard by shard from its
    folder (the rows of each rank's shards only), the adapters and trained token rows from their starting values."""
    initial = {name: t.detach().clone() for name, t in [*net.named_parameters(), *net.named_buffers()] if not t.is_meta}
    apply_fsdp(net, net.model.model.layers, bf16=bf16)
    if net.model.lm_head.weight.is_meta:
        net.to_empty(device=device)
        load_sharded(net, source, initial, prefix="model.")
