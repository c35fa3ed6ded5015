"""Activation-checkpoint offload: the layer-boundary checkpoints wait for backward in host memory.

With activation checkpointing, each decoder layer keeps only its input (the layer-boundary
checkpoint, [tokens, hidden]) and recomputes the rest in backward. PyTorch's non-reentrant
checkpoint stores that input as an autograd saved tensor *outside* its own saved-tensor hooks,
so running each checkpointed call under `torch.autograd.graph.save_on_cpu` moves exactly the
checkpoints to (pinned, on CUDA) host memory and brings them back when backward recomputes the
layer; inside the layer the checkpoint's own hooks, innermost, still decide.
"""

from __future__ import annotations

from functools import wraps

import torch
from torch import nn


def _offloaded(checkpoint_fn):
    @wraps(checkpoint_fn)
    def call(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return checkpoint_fn(*args, **kwargs)

    return call


def offload_checkpoints(model: nn.Module) -> int:
    """Offload the inputs of every checkpointed layer of `model`; returns how many layers.

    Call after `gradient_checkpointing_enable` (it sets each layer's checkpoint function).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [
        module for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
    ]
    if not layers:
        raise ValueError("train.offload_activations: no checkpointed layer (is activation_checkpointing on?)")
    for layer in layers:
        layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func)
    return len(layers)
