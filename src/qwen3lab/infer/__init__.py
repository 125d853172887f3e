"""Inference: the continuous-batching engine, sampling, and streamed detokenisation. Used by generate(), the
chat, the server and GRPO's rollouts; imports nothing from training or serving."""
