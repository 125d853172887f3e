"""The Qwen3 model: its config (HF names), the module, attention kernels, HF folders in and out, the log-probs
through its head, and how it runs here (dtype policy, compile, the CPU allocator)."""

from .config import ModelConfig, preset
from .hf import load_model, new_model, save_model
from .model import Qwen3

__all__ = ["ModelConfig", "Qwen3", "load_model", "new_model", "preset", "save_model"]
