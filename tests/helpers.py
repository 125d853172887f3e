"""Helpers the tests share: tiny reference models, a server on a free port, a crash at a given step. The reference
packages are imported inside each helper, so a test that needs none of them runs without the test extras."""

import contextlib
import socket
import threading
import time

import pytest
import torch

import qwen3lab


def hf_tiny(vocab=512, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=32, tied=True, seed=0, **kw):
    """A random transformers Qwen3ForCausalLM in fp32, with every weight (norms too) away from its init value."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tied,
        rope_theta=1_000_000.0,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=vocab - 1,
        **kw,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def hf_small(bos_token_id=None, eos_token_id=151645):
    """The training tests' model: a random Qwen3 at transformers' init with the real vocabulary (hidden 32)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).float()


@contextlib.contextmanager
def serving(app):
    """uvicorn serving `app` from a thread on a free loopback port; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def tiny_server_model(folder):
    """The servers' test model: random weights larger than init (varied greedy text), the real vocabulary."""
    hf_tiny(vocab=151936, hidden=64, heads=4, kv_heads=2, head_dim=16, initializer_range=0.3).save_pretrained(folder)
    return qwen3lab.load_model(folder, dtype="float32", device="cpu")


@contextlib.contextmanager
def crash_after_step(monkeypatch, step: int):
    """The training run in the block stops as a crash would, right after it logs `step`."""
    from qwen3lab.train.report import Reporter

    original = Reporter.log

    def log(self, metrics):
        original(self, metrics)
        if metrics["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Reporter, "log", log)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(Reporter, "log", original)
