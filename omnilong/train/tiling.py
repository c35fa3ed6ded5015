"""Sequence-tiled MLPs, applied to a transformers model from outside (as ring attention is).

The MLP of a decoder layer holds the widest activation of the layer: gate and up projections of
[tokens, intermediate] each (intermediate ~5x hidden). Tiled, the MLP runs over tiles of the
tokens without keeping anything for backward but its input, and backward recomputes it tile by
tile, so no [tokens, intermediate] tensor exists whole. The mechanism is DeepSpeed's own
`TiledMLP` (ALST), which also tells ZeRO-3 to reduce the weights' gradients only after the last
tile has added its share. Its spec is the module's own, untiled forward, which each tile calls.

Every rank must run the same number of tiles (under ZeRO-3 each tile's forward gathers the
weights, a collective): the runner's packed rows give every rank the same tokens per micro-batch.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import nn

# The decoder layers' MLPs of the language model, in both families (and under PEFT's wrapper).
_LANGUAGE_MODEL_MLP = re.compile(r"(^|\.)language_model\.layers\.\d+\.mlp$")


def tile_count(tokens: int, tile_tokens: int) -> int:
    """Tiles of at most `tile_tokens` tokens. TiledMLP cuts with `torch.chunk(x, tiles)` and
    marks ZeRO-3's gradients ready at its `tiles`-th piece: `torch.chunk` must cut exactly this
    many, which it does for a count of this form (tests/test_tiling.py checks it)."""
    return math.ceil(tokens / tile_tokens)


def _untiled(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The module's class forward, not the instance's tiled one: the untransformed layer.
    return type(mlp).forward(mlp, x)


def tiled_forward(mlp: nn.Module, tile_tokens: int | None, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)` for x [..., tokens, hidden] over tiles of `tile_tokens` tokens (None: hidden)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    rows = x.reshape(-1, x.shape[-1])  # [batch * tokens, hidden]: an MLP treats each token alone
    tiles = tile_count(rows.shape[0], tile_tokens or x.shape[-1])
    if tiles <= 1:
        return _untiled(mlp, x)
    trainable = [p for p in mlp.parameters() if p.requires_grad]  # LoRA's adapters, or the weights
    out = TiledMLP.apply(_untiled, mlp, rows, tiles, trainable)
    return out.view(*x.shape[:-1], out.shape[-1])


def tile_mlps(model: nn.Module, tile_tokens: int | str) -> int:
    """Make each decoder layer's MLP of the language model run tiled; returns how many.

    `tile_tokens` "auto" is the hidden size: one tile's [tile, intermediate] activation is then
    the size of one MLP weight, which is gathered whole anyway (DeepSpeed ALST's choice).
    """
    tile = None if tile_tokens == "auto" else int(tile_tokens)
    mlps = [module for name, module in model.named_modules() if _LANGUAGE_MODEL_MLP.search(name)]
    if not mlps:
        raise ValueError(f"train.tiled_mlp: found no language_model.layers.N.mlp in {type(model).__name__}")
    for mlp in mlps:
        mlp.forward = partial(tiled_forward, mlp, tile)
    return len(mlps)
