"""Activation-checkpoint offload (omnilong/train/activation_offload.py): the layer-boundary
checkpoints, and only they, go through `save_on_cpu`, come back for backward, and change nothing.

On this CPU-only machine host and device memory are one: the test runs the offload path (the
hooks pack each checkpoint into a fresh host tensor and unpack it for the recomputation), whose
memory effect is a GPU figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from omnilong.config import ConfigError, parse_params
from omnilong.train.activation_offload import offload_checkpoints

REPO = Path(__file__).resolve().parents[1]


class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """PyTorch's `save_on_cpu`, recording the shape of each tensor it packs and each it unpacks."""

    packed: ClassVar[list[tuple[int, ...]]] = []
    unpacked: ClassVar[list[tuple[int, ...]]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pack, unpack = self.pack_hook, self.unpack_hook

        def record_pack(tensor):
            RecordingSaveOnCpu.packed.append(tuple(tensor.shape))
            return pack(tensor)

        def record_unpack(packed):
            tensor = unpack(packed)
            RecordingSaveOnCpu.unpacked.append(tuple(tensor.shape))
            return tensor

        self.pack_hook, self.unpack_hook = record_pack, record_unpack


def _loss_and_grads(model, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_offloaded_checkpoints_give_identical_loss_and_gradients(tiny_model_dir, family, monkeypatch):
    from omnilong.models.loading import load_model

    def checkpointed_model():
        model = load_model(tiny_model_dir(family), dtype=torch.float32).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    plain, offloaded = checkpointed_model(), checkpointed_model()
    text = offloaded.config.get_text_config()
    assert offload_checkpoints(offloaded) >= text.num_hidden_layers
    input_ids = torch.randint(0, text.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    RecordingSaveOnCpu.packed.clear(), RecordingSaveOnCpu.unpacked.clear()
    loss, grads = _loss_and_grads(offloaded, input_ids)
    # Text only: each decoder layer's input [batch, tokens, hidden] went to host memory, nothing
    # from inside a layer (the checkpoint's own hooks keep those), and each came back once.
    assert RecordingSaveOnCpu.packed == [(2, 24, text.hidden_size)] * text.num_hidden_layers
    assert sorted(RecordingSaveOnCpu.unpacked) == sorted(RecordingSaveOnCpu.packed)

    plain_loss, plain_grads = _loss_and_grads(plain, input_ids)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and any(".layers.0." in name for name in grads)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name


def test_offload_without_checkpointing_is_refused():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["stages"]["stage1"]["train"].update(activation_checkpointing=False, offload_activations=True)
    with pytest.raises(ConfigError, match=r"stages\.stage1\.train\.offload_activations: expected false unless"):
        parse_params(raw)
