"""Fixtures the tests share; helpers they import live in helpers.py."""

import pytest

import qwen3lab


@pytest.fixture
def hf_model_dir(tmp_path):
    """Folder written by transformers' save_pretrained with tiny shards, so the index path is exercised."""
    from helpers import hf_tiny

    model = hf_tiny()
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    return model, tmp_path / "hf"


@pytest.fixture(scope="session")
def trained_sort(tmp_path_factory):
    """The demo's model trained briefly on its sort task (120 steps, ~40 s): it answers held-out problems right most
    of the time and ends its answers with <|im_end|>, which random weights never do. (results, run folder)."""
    from qwen3lab.demo import run_demo

    out = tmp_path_factory.mktemp("trained") / "sort"
    results = run_demo(out=str(out), tasks=("sort",), steps=120, n_train=1500, n_eval=25, log=lambda *_: None)
    return results, out


@pytest.fixture(scope="module")
def tok():
    """The offline Qwen3 tokenizer with qwen3lab's patched template."""
    return qwen3lab.load_tokenizer()


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    """The same tokenizer as transformers loads it from a folder qwen3lab exported."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)
