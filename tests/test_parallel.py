"""What parallel.py applies from outside the model leaves its numbers and names unchanged."""

import torch

import qwen3lab
from qwen3lab.loss import lm_loss_sum
from qwen3lab.parallel import apply_activation_checkpointing, unwrap_activation_checkpointing


def test_activation_checkpointing_same_loss_grads_and_names():
    ids = torch.randint(0, 1000, (2, 24))
    labels = torch.roll(ids, -1, 1)
    results = []
    for checkpointing in (False, True):
        model = qwen3lab.new_model(qwen3lab.preset("tiny", vocab_size=1000), seed=0).train()
        names = list(model.state_dict())
        if checkpointing:
            apply_activation_checkpointing(model)
            assert list(model.state_dict()) == names  # HF names survive the wrapper
        loss, n = lm_loss_sum(model(ids, return_hidden=True), model.lm_head.weight, labels)
        (loss / n).backward()
        results.append((float(loss), {k: p.grad.clone() for k, p in model.named_parameters()}))
        if checkpointing:
            unwrap_activation_checkpointing(model)
            assert [k for k, _ in model.named_parameters()] == [k for k in results[0][1]]
    assert results[0][0] == results[1][0]
    g0, g1 = results[0][1], results[1][1]
    torch.testing.assert_close(dict(zip(g0, g1.values(), strict=True)), g0)
