"""qwen3lab: a fast, hackable pure-PyTorch implementation of the Qwen3 dense models, for training experiments."""

import logging
import sys

from . import generate as generate  # the module: qwen3lab.generate.generate(model, tok, prompt)
from .model import ModelConfig, Qwen3, load_model, new_model, preset, save_model
from .text import Tokenizer, load_tokenizer
from .train import train

__version__ = "0.1.0"
__all__ = [
    "ModelConfig",
    "Qwen3",
    "Tokenizer",
    "load_model",
    "load_tokenizer",
    "new_model",
    "preset",
    "save_model",
    "train",
]

# Like transformers, the library says what it decided (dtype chosen, template swapped) on stderr by default;
# `logging.getLogger("qwen3lab").setLevel(logging.WARNING)` quiets it.
_log = logging.getLogger("qwen3lab")
if not _log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("qwen3lab: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False
