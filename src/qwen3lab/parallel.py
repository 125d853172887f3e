"""What is applied to the single-device model from outside: activation checkpointing and torch.compile.

The model code knows nothing of these; each wraps the decoder blocks after the model is built.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations.

    The wrapper's state-dict hooks drop its own prefix, so parameter names stay HF's.
    """
    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def unwrap_activation_checkpointing(model: nn.Module) -> None:
    """Undo apply_activation_checkpointing, so module paths are HF's again (for export)."""
    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = getattr(block, "_checkpoint_wrapped_module", block)


def apply_compile(model: nn.Module) -> None:
    """Compile each decoder block (they share one graph, so it compiles once) and leave the loss eager."""
    for block in model.model.layers:
        block.compile(dynamic=None)
