"""Text in and out: the exact Qwen3 tokenizer (offline), the training chat template with its generation spans, and
parsing what the assistant wrote (thinking, tool calls)."""

from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
