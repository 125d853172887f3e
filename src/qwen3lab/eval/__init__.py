"""Evaluation: `qwen3lab eval` (loss, perplexity and scored generations on data; lm-eval tasks) and lm-eval's
`qwen3lab` model type."""
