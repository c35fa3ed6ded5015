"""Sequence-tiled MLPs and RMSNorms, applied to a transformers model from outside (as ring attention is).

The MLP of a decoder layer holds the widest activation of the layer: gate and up projections of
[tokens, intermediate] each (intermediate ~5x hidden). An RMSNorm keeps its normalised input for
backward beside its output (in bf16 also float32 copies of its input: four hidden-widths more
per token). Tiled, each runs over tiles of the tokens without keeping anything for backward but
its input, and backward recomputes it tile by tile, so no [tokens, intermediate] tensor and no
norm intermediate exists whole. The mechanism is DeepSpeed's own `TiledMLP` (ALST), which also
tells ZeRO-3 to reduce the weights' gradients only after the last tile has added its share; it
serves any per-token module. Its spec is the module's own, untiled forward, which each tile calls.

Every rank must run the same number of tiles (under ZeRO-3 each MLP tile's forward gathers the
weights, a collective): the runner's packed rows give every rank the same tokens per micro-batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

# The language model's decoder-layer MLPs and RMSNorms (the two per layer and the final one), in
# both families and under PEFT's wrapper; the vision towers' are left alone.
_LANGUAGE_MODEL_MLP = re.compile(r"(^|\.)language_model\.layers\.\d+\.mlp$")
_LANGUAGE_MODEL_NORM = re.compile(
    r"(^|\.)language_model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)$"
)


@dataclass(frozen=True)
class TiledModules:
    mlps: int
    norms: int


def tile_count(tokens: int, tile_tokens: int) -> int:
    """Tiles of at most `tile_tokens` tokens. TiledMLP cuts with `torch.chunk(x, tiles)` and
    marks ZeRO-3's gradients ready at its `tiles`-th piece: `torch.chunk` must cut exactly this
    many, which it does for a count of this form (tests/test_tiling.py checks it)."""
    return math.ceil(tokens / tile_tokens)


def _untiled(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The module's class forward, not the instance's tiled one: the untransformed module.
    return type(module).forward(module, x)


def tiled_forward(module: nn.Module, tile_tokens: int | None, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a per-token module and x [..., tokens, hidden] over tiles of `tile_tokens`
    tokens (None: the hidden size)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    rows = x.reshape(-1, x.shape[-1])  # [batch * tokens, hidden]: each token is computed alone
    tiles = tile_count(rows.shape[0], tile_tokens or x.shape[-1])
    if tiles <= 1:
        return _untiled(module, x)
    trainable = [p for p in module.parameters() if p.requires_grad]  # LoRA's adapters, or the weights
    out = TiledMLP.apply(_untiled, module, rows, tiles, trainable)
    return out.view(*x.shape[:-1], out.shape[-1])


def tile_mlps_and_norms(model: nn.Module, tile_tokens: int | str) -> TiledModules:
    """Make the language model's MLPs and RMSNorms run tiled; returns how many of each.

    `tile_tokens` "auto" is the hidden size: one tile's [tile, intermediate] activation is then
    the size of one MLP weight, which is gathered whole anyway (DeepSpeed ALST's choice).
    """
    tile = None if tile_tokens == "auto" else int(tile_tokens)
    named = list(model.named_modules())
    mlps = [module for name, module in named if _LANGUAGE_MODEL_MLP.search(name)]
    norms = [module for name, module in named if _LANGUAGE_MODEL_NORM.search(name)]
    if not mlps or not norms:
        raise ValueError(
            f"train.tiled_mlp: found no language_model.layers.N.mlp or RMSNorm in {type(model).__name__}"
        )
    for module in mlps + norms:
        module.forward = partial(tiled_forward, module, tile)
    return TiledModules(mlps=len(mlps), norms=len(norms))
