"""The optimizers against torch's own: the AdamW groups of MuonAdamW == torch AdamW, its Muon groups ==
torch.optim.Muon (which orthogonalises in bf16, hence the tolerance), and Muon routed to the right weights."""

import copy
import json

import pytest
import torch

import qwen3lab
from qwen3lab.train.config import OptimConfig
from qwen3lab.train.optim import MuonAdamW, build_optimizer, orthogonalize, param_groups


def _run(params, opt, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(48, 16), (16, 40), (16,)]]


def test_adamw_groups_equal_torch_adamw():
    ours, ref = _params(), _params()
    _run(ours, MuonAdamW([{"params": ours, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95)))
    _run(ref, torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_muon_groups_match_torch_muon():
    start = _params()[:2]
    ours, ref = copy.deepcopy(start), copy.deepcopy(start)
    _run(ours, MuonAdamW([{"params": ours, "weight_decay": 0.1, "muon": True}], lr=1e-2))
    _run(ref, torch.optim.Muon(ref, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    for a, b, s in zip(ours, ref, start, strict=True):
        ours_delta, ref_delta = a.detach() - s.detach(), b.detach() - s.detach()
        assert (ours_delta - ref_delta).norm() < 0.03 * ref_delta.norm()  # bf16 Newton-Schulz in torch's


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(0)) @ torch.diag(
        torch.logspace(-1.5, 1, 24)
    )  # singular values over 2.5 decades
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.6 and s.max() < 1.25


def test_muon_takes_the_decoder_matrices_only():
    model = qwen3lab.new_model(qwen3lab.preset("tiny"), seed=0)
    decay, no_decay, muon = param_groups(model, 0.0, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in muon["params"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert [names[id(p)] for p in decay["params"]] == ["model.embed_tokens.weight"]
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=2e-3))
    assert isinstance(opt, MuonAdamW) and [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 2e-3]
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)


def test_unknown_optimizer_is_named(tmp_path):
    from qwen3lab.train.config import TrainConfig

    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    (tmp_path / "x.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    cfg = TrainConfig(model="tiny", out=str(tmp_path / "run"), steps=1, progress=False)
    cfg.data.train = str(tmp_path / "x.jsonl")
    cfg.optim.name = "sgd"
    with pytest.raises(ValueError, match="optim.name: 'sgd' is not one of adamw, muon"):
        qwen3lab.train(cfg)
