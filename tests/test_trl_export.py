"""An exported tokenizer folder passes trl's assistant-only-loss path, with the labels qwen3lab's mask gives."""

import pytest
import torch

import qwen3lab

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!", "reasoning_content": "greet"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "<think>\ncheck\n</think>\n\nYes."},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Rain."},
    ],
]


def test_trl_sft_labels_equal_qwen3lab_assistant_mask(tmp_path):
    tok = qwen3lab.load_tokenizer()
    tok.save(tmp_path / "model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    cfg = transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    trainer = trl.SFTTrainer(
        model=transformers.Qwen3ForCausalLM(cfg),
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "out"),
            assistant_only_loss=True,
            per_device_train_batch_size=len(CONVERSATIONS),
            max_length=512,
            report_to=[],
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS]),
        processing_class=hf_tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    expected = {}
    for conv in CONVERSATIONS:
        enc = tok.encode_chat(conv)
        expected[tuple(enc.input_ids)] = [
            t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_mask, strict=True)
        ]
    seen = 0
    for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n = int(attn.sum())
        key = tuple(ids[:n].tolist())
        assert key in expected, "trl tokenised a conversation differently from qwen3lab"
        assert labels[:n].tolist() == expected[key]
        assert torch.all(labels[n:] == -100)
        seen += 1
    assert seen == len(CONVERSATIONS)
