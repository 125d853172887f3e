"""Objectives beyond SFT, on the one training loop: DPO (dpo.py) and GRPO (grpo.py, its rollouts.py and
rewards.py). Each turns a micro-batch into a summed loss and summed metrics.

Their losses are functions of the log-probs of completion tokens. These are computed without a [tokens, vocab]
logits tensor and with one forward and one backward of the model (`logprob.logprob_loss`): a pass through lm_head
without gradient gives each completion token's log-prob; autograd on the objective — a small function of those N
numbers — gives its gradient with respect to each of them; a second pass, the chunked cross-entropy weighted by minus
those gradients (loss.lm_loss_sum), carries exactly that gradient into the hidden states and lm_head.
"""
