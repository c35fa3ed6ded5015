"""Sequence-tiled MLPs and RMSNorms (omnilong/train/tiling.py) against the untiled model: outputs,
gradients, memory.

Tolerances. fp32 outputs: 1e-6 relative (each token's MLP is the same arithmetic, tiled or not).
fp32 gradients: tiles sum the weight gradients tile by tile, in another order than one matmul
over every token, so both paths are judged against an fp64 truth with the chunked loss's bound
(tests/test_chunked_loss.py): the tiled error, relative to the gradient's largest value, at most
max(1.2 x the untiled error, floor). The chunked loss's floor of 1e-6 is one op; here the
gradients pass back through two whole decoder layers and the untiled fp32 path itself errs up to
1.7e-6, so the floor is 2e-6 (17 fp32 ulps). Measured: tiled at most 1.13e-6. bf16: rtol 1.6e-2 with atol 2e-2 x max|untiled| (the chunked loss's
bf16 bar; bf16 weight gradients are accumulated in bf16 tile after tile).
"""

from __future__ import annotations

import copy

import pytest
import torch

from omnilong.config import LoraParams
from omnilong.train.tiling import tile_count, tile_mlps_and_norms
from tests.test_chunked_loss import largest_tensor_during

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
TILE = 5  # 2 rows of 19 tokens: 38 tokens in 8 tiles, the last one short


def _model(tiny_model_dir, family: str, lora: bool) -> torch.nn.Module:
    from omnilong.models.loading import load_model
    from omnilong.train.lora import add_lora

    model = load_model(tiny_model_dir(family), dtype=torch.float32)
    torch.manual_seed(0)  # PEFT draws A from the global generator
    if lora:
        model = add_lora(model, LoraParams())
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would leave A without a gradient
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model.train()


def _forward_backward(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradients of a fixed random projection of them, for every weight that has one
    (text only: the vision tower has none)."""
    logits = model(input_ids=input_ids).logits
    projection = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (logits * projection.to(logits.dtype)).sum().backward()
    return logits.detach(), {
        name: param.grad for name, param in model.named_parameters() if param.grad is not None
    }


def _input_ids(model) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(0))


def _relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return ((value.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_model_matches_untiled_in_fp32_against_fp64(tiny_model_dir, family, lora):
    untiled = _model(tiny_model_dir, family, lora)
    truth_model = copy.deepcopy(untiled).double()
    tiled = copy.deepcopy(untiled)
    layers = untiled.config.get_text_config().num_hidden_layers
    tiled_modules = tile_mlps_and_norms(tiled, TILE)
    assert (tiled_modules.mlps, tiled_modules.norms) == (layers, 2 * layers + 1)
    input_ids = _input_ids(untiled)

    _, truth_grads = _forward_backward(truth_model, input_ids)
    untiled_logits, untiled_grads = _forward_backward(untiled, input_ids)
    tiled_logits, tiled_grads = _forward_backward(tiled, input_ids)

    torch.testing.assert_close(tiled_logits, untiled_logits, rtol=1e-6, atol=1e-6 * untiled_logits.abs().max().item())
    assert tiled_grads.keys() == untiled_grads.keys()
    tiled_weights = [name for name in tiled_grads if "language_model" in name and (".mlp." in name or "norm" in name)]
    assert tiled_weights and all(tiled_grads[name].abs().max() > 0 for name in tiled_weights)  # they train
    for name, truth in truth_grads.items():
        tiled_error = _relative_error(tiled_grads[name], truth)
        untiled_error = _relative_error(untiled_grads[name], truth)
        assert tiled_error <= max(1.2 * untiled_error, 2e-6), (name, tiled_error, untiled_error)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_model_matches_untiled_in_bf16(tiny_model_dir, family):
    untiled = _model(tiny_model_dir, family, lora=False).to(torch.bfloat16)
    tiled = copy.deepcopy(untiled)
    tile_mlps_and_norms(tiled, TILE)
    input_ids = _input_ids(untiled)
    untiled_logits, untiled_grads = _forward_backward(untiled, input_ids)
    tiled_logits, tiled_grads = _forward_backward(tiled, input_ids)
    for name, reference in [("logits", untiled_logits), *untiled_grads.items()]:
        value = tiled_logits if name == "logits" else tiled_grads[name]
        torch.testing.assert_close(
            value.float(), reference.float(), rtol=1.6e-2, atol=2e-2 * reference.float().abs().max().item(), msg=name
        )


@pytest.mark.parametrize("tile_tokens", [8, "auto"])
def test_no_tensor_of_tokens_by_intermediate(tiny_model_dir, tile_tokens):
    """Forward and backward of a tiled MLP make no tensor larger than its input ([tokens, hidden]),
    a weight or one tile's activation ([tile, intermediate]; `auto`: tiles of hidden tokens)."""
    model = _model(tiny_model_dir, "qwen2_5_vl", lora=False)
    mlp = model.model.language_model.layers[0].mlp
    tokens, hidden_size, intermediate = 256, mlp.hidden_size, mlp.intermediate_size  # tokens > hidden
    tile = hidden_size if tile_tokens == "auto" else tile_tokens
    hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)

    def forward_backward() -> None:
        mlp(hidden).sum().backward()

    _, untiled_numel = largest_tensor_during(forward_backward)
    assert untiled_numel >= tokens * intermediate  # the recorder sees the whole activation untiled
    tile_mlps_and_norms(model, tile_tokens)
    op, numel = largest_tensor_during(forward_backward)
    assert numel <= max(tokens * hidden_size, hidden_size * intermediate, tile * intermediate), f"{op} made {numel}"
    assert numel < tokens * intermediate


def test_torch_chunk_cuts_exactly_the_tile_count():
    """TiledMLP tells ZeRO-3 a weight's gradient is complete after the `tile_count`-th piece of
    `torch.chunk`, which can cut fewer pieces than asked (6 rows in 4: 2+2+2): not for this count."""
    for tokens in range(1, 200):
        for tile in range(1, tokens + 1):
            pieces = torch.chunk(torch.empty(tokens), tile_count(tokens, tile))
            assert len(pieces) == tile_count(tokens, tile) and max(map(len, pieces)) <= tile, (tokens, tile)


def _saved_for_backward(function) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while `function()` runs (their storages, deduplicated)."""
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return list(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_norm_keeps_only_its_input_for_backward(tiny_model_dir, family, dtype):
    """Untiled, an RMSNorm keeps its normalised input beside its input (in bf16 float32 copies too);
    tiled, only the input (and the weight): what it saves for backward is counted by saved-tensor hooks."""
    model = _model(tiny_model_dir, family, lora=False).to(dtype)
    norm = model.model.language_model.layers[0].post_attention_layernorm
    hidden = torch.randn(1, 256, norm.weight.shape[0], dtype=dtype, requires_grad=True)
    token_wide = hidden.numel() * hidden.element_size()

    def saved_token_bytes() -> int:
        tensors = _saved_for_backward(lambda: norm(hidden))
        return sum(t.untyped_storage().nbytes() for t in tensors if t.untyped_storage().nbytes() >= token_wide)

    assert saved_token_bytes() >= 2 * token_wide  # the recorder sees the untiled norm's intermediates
    tile_mlps_and_norms(model, 8)
    assert saved_token_bytes() == token_wide
    out = norm(hidden)
    out.sum().backward()  # and backward recomputes the tiles
    assert hidden.grad is not None and norm.weight.grad.abs().max() > 0
