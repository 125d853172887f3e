"""Training: loss parity with trl, packing, LoRA, export to transformers / peft, resume, bad input."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from helpers import hf_small

import qwen3lab
from qwen3lab.model.config import ConfigError
from qwen3lab.train import batching as B
from qwen3lab.train import data as D
from qwen3lab.train import train
from qwen3lab.train.config import TrainConfig, load_train_config
from qwen3lab.train.lora import apply_lora, merge_lora
from qwen3lab.train.loss import lm_loss_sum
from qwen3lab.train.net import micro_batch_loss

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

CHATS = [
    [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": f"{a}+{b}?"},
        {"role": "assistant", "content": str(a + b)},
    ]
    for a, b in [(1, 2), (30, 12), (7, 7), (15, 4), (9, 40), (3, 33)]
] + [
    [
        {"role": "user", "content": "Reverse 'abc'"},
        {"role": "assistant", "content": "cba", "reasoning_content": "read it backwards"},
        {"role": "user", "content": "and 'xy'?"},
        {"role": "assistant", "content": "yx"},
    ]
]
PROMPTS = [{"prompt": f"Q: {a}*2=", "completion": f" {2 * a}"} for a in (3, 11, 25, 40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A small random Qwen3 with the real vocabulary, saved by transformers, with qwen3lab's tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    hf_small(bos_token_id=151643, eos_token_id=151643).save_pretrained(folder)
    tok.save(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trl_first_batch_loss(model_dir, rows, tmp_path, **sft):
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=len(rows),
            max_length=512,
            report_to=[],
            use_cpu=True,
            bf16=False,
            **sft,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=hf_tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return float(trainer.compute_loss(model, batch))


def ours_first_batch_loss(model_dir, rows, tmp_path, tok, all_tokens=False):
    data = D.tokenize_rows(tok, [(f"row {i}", r) for i, r in enumerate(rows)], 512)
    data = data.all_tokens_supervised() if all_tokens else data
    model = qwen3lab.load_model(model_dir, dtype="float32", device="cpu")
    batch = B.collate(data, [[i] for i in range(len(data))], tok.pad_token_id)
    with torch.no_grad():
        loss, n = micro_batch_loss(model, batch, packing=False, chunk=7, extra_tokens=None)
    return float(loss) / n


@pytest.mark.parametrize(
    "rows, sft",
    [
        ([{"messages": c} for c in CHATS], {"assistant_only_loss": True}),
        (PROMPTS, {}),
        # conversational completions: trl applies the completion mask and, with assistant_only_loss, the
        # generation spans too — qwen3lab always does both (the newline after <|im_end|> is never learned)
        ([{"prompt": c[:-1], "completion": c[-1:]} for c in CHATS[:4]], {"assistant_only_loss": True}),
    ],
    ids=["messages-assistant-only", "prompt-completion-text", "prompt-completion-conversational"],
)
def test_first_step_loss_equals_trl(model_dir, tmp_path, tok, rows, sft):
    ref = trl_first_batch_loss(model_dir, rows, tmp_path, **sft)
    ours = ours_first_batch_loss(model_dir, rows, tmp_path, tok)
    assert abs(ours - ref) < 1e-4, (ours, ref)


def test_loss_on_all_tokens_equals_trl_without_assistant_only_loss(model_dir, tmp_path, tok):
    rows = [{"messages": c} for c in CHATS]  # data.assistant_only: false, the ablation's other arm
    ref = trl_first_batch_loss(model_dir, rows, tmp_path, assistant_only_loss=False)
    ours = ours_first_batch_loss(model_dir, rows, tmp_path, tok, all_tokens=True)
    assert abs(ours - ref) < 1e-4, (ours, ref)
    assert abs(ours - ours_first_batch_loss(model_dir, rows, tmp_path, tok)) > 1e-3  # the arms differ


def test_packed_equals_unpacked_loss_and_grads(model_dir, tok):
    data = D.tokenize_rows(tok, [(f"row {i}", {"messages": c}) for i, c in enumerate(CHATS)], 512)
    rows = B.pack_best_fit(data.lengths(), 64)
    assert len(rows) < len(data)  # several examples share a row
    results = []
    for packing, row_list in [(True, rows), (False, [[i] for i in range(len(data))])]:
        model = qwen3lab.load_model(model_dir, dtype="float32", device="cpu")
        loss, n = micro_batch_loss(model, B.collate(data, row_list, tok.pad_token_id), packing, 1024, None)
        (loss / n).backward()
        results.append((float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 and abs(l1 - l2) < 1e-4 * n1
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_best_fit_decreasing_packs_tightly():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]
    bins = B.pack_best_fit(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 26 tokens need at least 3 rows of 10


def test_lora_init_equals_base_and_merge_equals_unmerged(model_dir):
    base = qwen3lab.load_model(model_dir, dtype="float32", device="cpu")
    ids = torch.randint(0, 151936, (2, 12))
    with torch.no_grad():
        ref = base(ids)
        apply_lora(base, rank=4, alpha=8)
        torch.testing.assert_close(base(ids), ref)  # B = 0 at init
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        adapted = base(ids)
        assert not torch.allclose(adapted, ref, atol=1e-4)
        merge_lora(base)
        torch.testing.assert_close(base(ids), adapted, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in base.state_dict())


def run_config(model_dir, data_path, out, **kw):
    cfg = TrainConfig(model=str(model_dir), out=str(out), progress=False, steps=4, batch_size=2, seed=1)
    cfg.data.train = str(data_path)
    cfg.data.max_length = 128
    cfg.optim.lr = 1e-2
    for key, value in kw.items():
        section, _, leaf = key.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, leaf, value)
    return cfg


def test_full_finetune_export_loads_in_transformers(model_dir, tmp_path):
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    run = train(run_config(model_dir, data_path, tmp_path / "run"))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (run / "loss.png").stat().st_size > 0
    gen = json.loads((run / "model" / "generation_config.json").read_text())
    assert 151645 in gen["eos_token_id"] and 151643 in gen["eos_token_id"]
    ours = qwen3lab.load_model(run / "model", dtype="float32", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    ids = torch.randint(0, 151936, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(run / "model")
    assert hf_tok.chat_template == qwen3lab.load_tokenizer(run / "model").chat_template


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("train_tokens", [False, True], ids=["adapters", "adapters+tokens"])
def test_lora_export_merged_and_peft_adapter(model_dir, tmp_path, tok, tied, train_tokens):
    """base + adapter/ in peft gives model/'s logits, trained ChatML rows included (peft's trainable tokens)."""
    peft = pytest.importorskip("peft")
    base_dir = model_dir
    if not tied:
        base_dir = tmp_path / "untied"
        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        cfg.tie_word_embeddings = False
        torch.manual_seed(0)
        transformers.Qwen3ForCausalLM(cfg).save_pretrained(base_dir)
        tok.save(base_dir)
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    keys = {"lora__train_tokens": ["<|im_start|>", "<|im_end|>"]} if train_tokens else {}
    run = train(run_config(base_dir, data_path, tmp_path / "run", lora__rank=4, lora__alpha=8.0, **keys))
    ids = torch.tensor([tok.encode_chat(CHATS[0]).input_ids])  # holds <|im_start|> and <|im_end|>
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, run / "adapter")
    with torch.no_grad():
        want = merged(ids).logits
        torch.testing.assert_close(adapted(ids).logits, want, atol=1e-5, rtol=1e-5)
        untrained = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
        assert not torch.allclose(untrained, want, atol=1e-4)  # the adapter did learn something
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == ([151644, 151645] if train_tokens else None)


def test_lora_train_tokens_moves_only_those_rows(model_dir, tmp_path, tok):
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    cfg = run_config(
        model_dir, data_path, tmp_path / "run", lora__rank=4, lora__train_tokens=["<|im_start|>", "<|im_end|>"]
    )
    run = train(cfg)
    before = qwen3lab.load_model(model_dir, dtype="float32", device="cpu").model.embed_tokens.weight
    after = qwen3lab.load_model(run / "model", dtype="float32", device="cpu").model.embed_tokens.weight
    changed = (before != after).any(1).nonzero().flatten().tolist()
    assert changed == [151644, 151645]


def test_trained_token_rows_equal_a_materialised_embedding(model_dir, tok):
    """The delta on trained rows (embedding and tied logits, never a [vocab, hidden] copy) gives the loss and
    gradients of the old way: the whole embedding with the delta added, used for input and lm_head."""
    from qwen3lab.train.net import TrainableTokens

    data = D.tokenize_rows(tok, [(f"row {i}", {"messages": c}) for i, c in enumerate(CHATS)], 512)
    batch = B.collate(data, [[0, 1, 2], [6]], tok.pad_token_id)
    model = qwen3lab.load_model(model_dir, dtype="float32", device="cpu")
    apply_lora(model, 4, 8.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = [151644, 151645, 198]
    extra = TrainableTokens(151936, 32, ids)
    torch.nn.init.normal_(extra.delta, std=0.5)
    loss, _ = micro_batch_loss(model, batch, True, 64, extra)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} | {"delta": extra.delta.grad}
    model.zero_grad(set_to_none=True)
    extra.delta.grad = None

    weight = model.model.embed_tokens.weight.index_add(0, torch.tensor(ids), extra.delta)
    embeds = torch.nn.functional.embedding(batch["input_ids"], weight)
    hidden = model.forward_packed(batch["input_ids"], batch["position_ids"], True, embeds)
    want_loss, _ = lm_loss_sum(hidden, weight, batch["labels"], 64)
    want_loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None} | {"delta": extra.delta.grad}
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=lambda m, k=name: f"{k}: {m}")
    assert model.model.embed_tokens.weight.grad is None  # frozen: no [vocab, hidden] gradient


@pytest.mark.parametrize("bf16_fast", [False, True], ids=["fp32-compute", "bf16-compute"])
def test_lora_on_bf16_checkpoint_keeps_base_bf16_and_exports_like_fp32(
    model_dir, tmp_path, tok, monkeypatch, bf16_fast
):
    """A bf16 checkpoint: the frozen base stays bf16, adapters and trained rows fp32. Computed in fp32 (bf16 weights
    converted per call), training is the all-fp32 run's and the export equals it within bf16 rounding; computed in
    bf16 (CPUs fast at it), the loss follows the fp32 run and the export is the fp32 merge of its own adapters."""
    from safetensors.torch import load_file

    T = importlib.import_module("qwen3lab.train.build")
    bf16_dir = tmp_path / "bf16"
    qwen3lab.save_model(qwen3lab.load_model(model_dir, dtype="float32", device="cpu").to(torch.bfloat16), bf16_dir)
    tok.save(bf16_dir)
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    keys = dict(lora__rank=4, lora__alpha=8.0, lora__train_tokens=["<|im_start|>", "<|im_end|>"], steps=3)
    monkeypatch.setattr(T, "cpu_bf16_is_fast", lambda: bf16_fast)
    seen = {}
    build = T.build_optimizer

    def record(net, cfg):
        seen.update({n: (p.dtype, p.requires_grad) for n, p in net.named_parameters()})
        return build(net, cfg)

    monkeypatch.setattr(T, "build_optimizer", record)
    run16 = train(run_config(bf16_dir, data_path, tmp_path / "run16", **keys))
    frozen = {n: dt for n, (dt, trained) in seen.items() if not trained}
    trained = {n: dt for n, (dt, trained) in seen.items() if trained}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    assert trained and set(trained.values()) == {torch.float32}, trained
    assert "extra_tokens.delta" in trained
    assert json.loads((run16 / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    run32 = train(run_config(bf16_dir, data_path, tmp_path / "run32", precision="fp32", **keys))

    def losses(run):
        return torch.tensor([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()])

    base = qwen3lab.load_model(bf16_dir, dtype="float32", device="cpu").state_dict()
    m16 = qwen3lab.load_model(run16 / "model", dtype="float32", device="cpu").state_dict()
    m32 = qwen3lab.load_model(run32 / "model", dtype="float32", device="cpu").state_dict()
    assert max(float((m32[k] - base[k]).abs().max()) for k in base) > 1e-2  # far beyond bf16 rounding
    bf16_rounding = dict(rtol=2**-8, atol=1e-6)
    if not bf16_fast:
        torch.testing.assert_close(losses(run16), losses(run32), rtol=1e-5, atol=1e-6)
        for k in base:
            torch.testing.assert_close(m16[k], m32[k], **bf16_rounding, msg=lambda m, k=k: f"{k}: {m}")
        return
    torch.testing.assert_close(losses(run16)[0], losses(run32)[0], rtol=2e-2, atol=0)
    adapter = load_file(run16 / "adapter" / "adapter_model.safetensors")
    for name in (k for k in base if k.endswith("proj.weight")):
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (8.0 / 4)
        torch.testing.assert_close(
            m16[name], (base[name] + delta).bfloat16().float(), **bf16_rounding, msg=lambda m, k=name: f"{k}: {m}"
        )


@pytest.mark.parametrize(
    "keys",
    [{"lora__rank": 4, "lora__dropout": 0.1}, {"optim__name": "muon"}, {"lora__rank": 4, "lora__base_bits": 4}],
    ids=["lora", "muon", "qlora"],
)
def test_resume_gives_the_same_losses(model_dir, tmp_path, monkeypatch, keys):
    if keys.get("lora__base_bits") == 4:
        pytest.importorskip("bitsandbytes")
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    straight = train(run_config(model_dir, data_path, tmp_path / "a", steps=6, **keys))

    from qwen3lab.train.report import Reporter

    original_log = Reporter.log

    def crash_after_step_4(self, metrics):
        original_log(self, metrics)
        if metrics["step"] == 4:
            raise KeyboardInterrupt

    cfg = run_config(model_dir, data_path, tmp_path / "b", steps=6, save_every=3, **keys)
    monkeypatch.setattr(Reporter, "log", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(Reporter, "log", original_log)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-000003"]
    resumed = train(cfg)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(resumed)) == 6
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def test_checkpointed_blocks_and_tiled_mlp_train_as_the_plain_model(model_dir, tmp_path):
    """activation_checkpointing with the MLP in tiles of 32 tokens: the same losses and exported weights."""
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    runs = [
        train(run_config(model_dir, data_path, tmp_path / name, steps=3, **kw))
        for name, kw in (("plain", {}), ("tiled", {"activation_checkpointing": True, "mlp_tile": 32}))
    ]
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    weights = [qwen3lab.load_model(r / "model", dtype="float32", device="cpu").state_dict() for r in runs]
    torch.testing.assert_close(weights[1], weights[0], atol=1e-5, rtol=1e-4)


def test_a_finished_run_continues_to_more_steps(model_dir, tmp_path, caplog):
    """The last step is checkpointed: the same run to 6 steps after a 4-step one continues from step 4 (its data and
    optimizer state), equals a straight 6-step run from step 5 on (constant schedule), and logs each step once."""
    import logging

    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    keys = {"optim__schedule": "constant", "optim__warmup_steps": 0}
    straight = train(run_config(model_dir, data_path, tmp_path / "a", steps=6, **keys))
    train(run_config(model_dir, data_path, tmp_path / "b", steps=4, save_every=3, **keys))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    with caplog.at_level(logging.INFO, logger="qwen3lab"):
        continued = train(run_config(model_dir, data_path, tmp_path / "b", steps=6, save_every=3, **keys))
    assert "continuing from step 4 of a finished run" in caplog.text

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(continued)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(continued)] == pytest.approx([r["loss"] for r in rows(straight)], abs=1e-6)
    assert [r["lr"] for r in rows(continued)] == [r["lr"] for r in rows(straight)]


def test_continuing_a_decayed_schedule_takes_the_new_totals_learning_rate(model_dir, tmp_path):
    """A cosine run continued to a longer total: from the saved step on, the learning rate is the longer cosine's
    (not the old schedule's end, which the optimizer's saved state still holds)."""
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    keys = {"optim__schedule": "cosine", "optim__warmup_steps": 0, "save_every": 4}
    straight = train(run_config(model_dir, data_path, tmp_path / "a", steps=8, **keys))
    train(run_config(model_dir, data_path, tmp_path / "b", steps=4, **keys))
    continued = train(run_config(model_dir, data_path, tmp_path / "b", steps=8, **keys))

    def lrs(run):
        return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert lrs(continued)[4:] == pytest.approx(lrs(straight)[4:], rel=1e-12)
    assert lrs(continued)[3] < lrs(continued)[4]  # the old run had decayed further by its step 4


def test_wsd_schedule_warms_up_holds_then_decays():
    from qwen3lab.train.optim import lr_lambda

    cfg = TrainConfig()
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.decay_fraction, cfg.optim.min_lr_ratio = "wsd", 2, 0.4, 0.1
    f = lr_lambda(cfg, 10)  # the last 4 steps decay linearly towards min_lr_ratio
    assert [f(s) for s in range(10)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325])
    longer = lr_lambda(cfg, 20)  # a longer run holds longer: continuing a stable phase changes nothing before it
    assert [longer(s) for s in range(6)] == [f(s) for s in range(6)]


class _RunsCode:
    """Unpickling this runs code: what a tampered checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("target", ["state-rank0.pt", ".metadata"])
def test_tampered_checkpoint_is_refused_not_executed(model_dir, tmp_path, target):
    import pickle

    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    cfg = run_config(model_dir, data_path, tmp_path / "run", steps=2, save_every=1, lora__rank=4)
    train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"  # the last step's: the one a rerun resumes from
    state = torch.load(checkpoint / "state-rank0.pt", weights_only=True)  # tensors and plain data only
    assert state["step"] == 2 and isinstance(state["rng"]["torch"], torch.Tensor)
    marker = tmp_path / "code-ran"
    with open(checkpoint / target, "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    cfg.steps = 3
    with pytest.raises(ValueError, match=rf"{target}.*refused"):
        train(cfg)
    assert not marker.exists()


def test_grad_accumulation_normalises_by_all_supervised_tokens(model_dir, tmp_path):
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS[:4]])
    one = train(run_config(model_dir, data_path, tmp_path / "one", steps=1, batch_size=4, data__packing=False))
    two = train(
        run_config(model_dir, data_path, tmp_path / "two", steps=1, batch_size=2, grad_accum=2, data__packing=False)
    )
    m1, m2 = (json.loads((run / "metrics.jsonl").read_text()) for run in (one, two))
    # the loss and the gradient norm are scale-sensitive (Adam's first update is not): both must match
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    a = qwen3lab.load_model(one / "model", device="cpu").state_dict()
    b = qwen3lab.load_model(two / "model", device="cpu").state_dict()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_progress_in_a_log_file_is_plain_lines(model_dir, tmp_path, capsys):
    """No TTY (pytest captures stderr): a line per ~5% of the run with loss, lr, tok/s and ETA, no carriage returns."""
    data_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    train(run_config(model_dir, data_path, tmp_path / "run", progress=True, steps=4))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("train step")]
    assert [ln.split()[2] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" loss " in ln and " lr " in ln and " tok/s " in ln and " eta " in ln for ln in lines)


# ---- bad input ----


def test_malformed_jsonl_line_is_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.tokenize_rows(tok, D.read_rows(path), 64)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_file_is_named_by_line_and_column(tmp_path, tok, suffix):
    path = tmp_path / f"latin1{suffix}"
    rows = [{"text": "fine"}, {"text": "café au lait"}]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if suffix == ".json":
        body = "[\n" + body.replace("}\n{", "},\n{") + "]\n"
    path.write_bytes(body.encode("latin-1"))  # é is the single byte 0xe9: not UTF-8
    line = 3 if suffix == ".json" else 2
    with pytest.raises(D.DataError, match=rf"latin1{suffix}:{line}: not UTF-8 \(byte 0xe9 at column 14\)"):
        D.tokenize_rows(tok, D.read_rows(path), 64)


def test_sharegpt_rows_read_as_messages(tmp_path, tok):
    conversations = [
        {"from": "system", "value": "You add numbers."},
        {"from": "human", "value": "1+2?"},
        {"from": "gpt", "value": "3"},
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": conversations}])
    got = D.tokenize_rows(tok, D.read_rows(path), 512)
    want = D.tokenize_rows(tok, [("row", {"messages": CHATS[0]})], 512)
    assert got.ids.tolist() == want.ids.tolist() and got.labels.tolist() == want.labels.tolist()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(D.DataError, match=r"bad.jsonl:1: conversations\[0\] is from 'bot'; ShareGPT turns are"):
        D.tokenize_rows(tok, D.read_rows(bad), 64)


def test_unknown_row_format_names_keys(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(D.DataError, match=r"x.jsonl:1: unknown row format with keys \['answer', 'question'\]"):
        D.tokenize_rows(tok, D.read_rows(path), 64)


def test_bad_conversation_is_named_by_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": CHATS[0]}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(D.DataError, match=r"x.jsonl:2: message 0: unknown role 'bot'"):
        D.tokenize_rows(tok, D.read_rows(path), 64)


def test_rows_truncated_to_nothing_are_dropped_and_counted(tmp_path, tok, caplog):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "x.jsonl", [long_prompt, {"messages": CHATS[0]}])
    data = D.load_tokenized(path, tok, 40, None)
    assert len(data) == 1 and data.dropped == 1
    assert "dropped 1 rows with no supervised token" in caplog.text


def test_empty_dataset_is_an_error(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(D.DataError, match="no trainable examples"):
        D.load_tokenized(path, tok, 64, None)


def test_tokenisation_is_cached(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": c} for c in CHATS])
    first = D.load_tokenized(path, tok, 64, tmp_path / "cache")
    second = D.load_tokenized(path, tok, 64, tmp_path / "cache")
    assert "from cache" in caplog.text
    assert (first.ids == second.ids).all() and (first.labels == second.labels).all()


def test_unknown_config_key_lists_near_matches(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  warmup_step: 10\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml: unknown config key 'optim.warmup_step'; did you mean optim.warmup_steps"
    ):
        load_train_config(path)
    cfg = load_train_config(None, {"optim.lr": "3e-4", "data.packing": "false"})
    assert cfg.optim.lr == 3e-4 and cfg.data.packing is False


def test_parquet_and_datasets_folder(tmp_path, tok):
    ds = datasets.Dataset.from_list([{"messages": c} for c in CHATS])
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    a = D.tokenize_rows(tok, D.read_rows(tmp_path / "x.parquet"), 128)
    b = D.tokenize_rows(tok, D.read_rows(tmp_path / "folder"), 128)
    assert len(a) == len(b) == len(CHATS) and (a.ids == b.ids).all()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_run_on_a_tiny_model(path, tmp_path):
    """Each recipe in configs/, every key as shipped, on the tiny preset and small data for two steps: only the
    sizes change (model, data, steps, lengths, batch)."""
    cfg = load_train_config(path)  # every key is known and typed
    assert cfg.model and cfg.data.train
    rows = {
        "sft": [{"messages": c} for c in CHATS],
        "distill": [{"messages": c} for c in CHATS],
        "dpo": [{"prompt": c[:-1], "chosen": [c[-1]], "rejected": [c[-1] | {"content": "?"}]} for c in CHATS[:6]],
        "grpo": [{"prompt": c[:-1], "answer": c[-1]["content"]} for c in CHATS[:6]],
    }[cfg.objective]
    sizes = {
        "model": "tiny",
        "out": str(tmp_path / "run"),
        "data.train": str(write_jsonl(tmp_path / "d.jsonl", rows)),
        "steps": 2,
        "batch_size": 2,
        "grad_accum": 1,
        "data.max_length": 128,
        "grpo.max_completion_length": 8,
        "progress": False,
    }
    if cfg.objective == "distill":  # a tiny teacher, completions of a few tokens
        qwen3lab.save_model(qwen3lab.new_model(qwen3lab.preset("tiny"), seed=1), tmp_path / "teacher")
        sizes |= {"distill.teacher": str(tmp_path / "teacher"), "distill.max_new_tokens": 8}
    run = train(load_train_config(path, sizes))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and (run / "model" / "config.json").is_file()
    assert (run / "loss.png").is_file()


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_each_objectives_plot_shows_what_its_users_watch(tmp_path, objective, monkeypatch):
    """loss.png: SFT the loss per supervised token; DPO the loss per pair, reward margins and accuracy; GRPO the
    reward mean and the completion length — each in its own units."""
    import matplotlib.axes

    from qwen3lab.train.report import Reporter

    cfg = TrainConfig(objective=objective)
    reporter = Reporter(tmp_path, cfg, 0)
    for step in (1, 2):
        reporter.log(
            {
                "step": step,
                "loss": 0.5,
                "rewards/margins": 0.1 * step,
                "rewards/chosen": 0.1,
                "rewards/rejected": 0.0,
                "rewards/accuracies": 0.5,
                "reward": 0.2 * step,
                "reward_std": 0.1,
                "completion_length": 9.0 + step,
            }
        )
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, text, **kw: labels.append(text))
    reporter.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").is_file()
    assert (
        labels
        == {
            "sft": ["loss (nats / supervised token)"],
            "dpo": ["DPO loss (nats / pair)", "implicit reward (nats)", "share of pairs"],
            "grpo": ["reward (sampled completions)", "tokens"],
        }[objective]
    )


def test_shuffled_packing_covers_every_example_once_within_capacity():
    lengths = [5, 17, 3, 30, 8, 8, 1, 25, 12, 40]
    rows = B.pack_shuffled(lengths, 40, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert rows == B.pack_shuffled(lengths, 40, seed=1) and rows != B.pack_shuffled(lengths, 40, seed=2)
