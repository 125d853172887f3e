"""qwen3lab.Qwen3 against transformers' Qwen3ForCausalLM, live, on the same random weights."""

import json

import pytest
import torch
from helpers import hf_tiny

import qwen3lab
from qwen3lab.model.attention import document_mask

transformers = pytest.importorskip("transformers")

SHAPES = {
    "tied-gqa2": dict(tied=True, heads=4, kv_heads=2),
    "untied-gqa1": dict(tied=False, heads=4, kv_heads=4),
    "gqa4-headdim-not-hidden-over-heads": dict(tied=True, hidden=80, heads=8, kv_heads=2, head_dim=16),
    # the 4B layout in miniature: q_proj widens (hidden 64 -> 4 x 32 = 128), as 2560 -> 32 x 128 does
    "4b-like-wide-q": dict(tied=True, hidden=64, heads=4, kv_heads=1, head_dim=32),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers_and_round_trip(tmp_path, shape):
    hf = hf_tiny(**SHAPES[shape])
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    ours = qwen3lab.load_model(tmp_path / "hf", dtype="float32", device="cpu")
    ids = torch.randint(0, hf.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    qwen3lab.save_model(ours, tmp_path / "ours", max_shard_size="100KB")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        torch.testing.assert_close(back.float().eval()(ids).logits, got, atol=0, rtol=0)


def test_yarn_rope_matches_transformers(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    hf = hf_tiny(rope_parameters={"rope_theta": 1_000_000.0, **rope})
    hf.save_pretrained(tmp_path / "hf")
    ours = qwen3lab.load_model(tmp_path / "hf", dtype="float32", device="cpu")
    assert ours.config.rope_scaling["rope_type"] == "yarn"
    ids = torch.randint(0, 512, (1, 80))
    pos = torch.arange(2000, 2080)[None]  # past the original context, where YaRN changes the answer
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pos), hf(ids, position_ids=pos).logits, atol=1e-4, rtol=1e-4)


def test_packed_forward_equals_separate_documents(hf_model_dir):
    _, folder = hf_model_dir
    model = qwen3lab.load_model(folder, dtype="float32", device="cpu")
    docs = [torch.randint(0, 512, (n,)) for n in (7, 20, 13)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model.forward_packed(ids, pos)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    # and the mask really separates them: a plain causal forward over the same row differs
    with torch.no_grad():
        assert not torch.allclose(model(ids, pos)[0], separate, atol=1e-3)


def test_document_mask_shape():
    mask = document_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].tolist()[4] == [False, False, False, True, True]


def test_return_hidden_feeds_lm_head(hf_model_dir):
    _, folder = hf_model_dir
    model = qwen3lab.load_model(folder, dtype="float32", device="cpu")
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 16, 64)
        torch.testing.assert_close(model.lm_head(hidden), model(ids))


def test_4b_base_preset_parameter_count():
    cfg = qwen3lab.preset("qwen3-4b-base")
    with torch.device("meta"):
        model = qwen3lab.Qwen3(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    assert total == 4_022_468_096 == cfg.num_parameters()
    assert total - model.model.embed_tokens.weight.numel() == 3_633_511_936 == cfg.num_parameters(embedding=False)


def test_new_model_is_tied_and_materialised():
    model = qwen3lab.new_model(qwen3lab.preset("tiny"), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    model2 = qwen3lab.new_model(qwen3lab.preset("tiny"), seed=0)
    torch.testing.assert_close(model.state_dict(), model2.state_dict())


def test_saved_folder_has_generation_config_with_both_eos(tmp_path):
    model = qwen3lab.new_model(qwen3lab.preset("tiny"))
    qwen3lab.save_model(model, tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151643, 151645]
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors.index.json").exists()
