"""The runner's engine trains in training mode, so activation checkpointing really recomputes.

transformers' `from_pretrained` returns a model in eval mode, and its decoder layers checkpoint
only in training mode: built as loaded, `activation_checkpointing: true` would keep every
layer's activations (benchmarks/context_memory.py measured ~295 KB per token at Qwen2-0.5B's
shapes, 4 layers, instead of the floor's ~23 KB). One gloo rank builds the engine with
`runner.build_engine` and trains one step; each decoder layer's MLP must be entered twice (the
forward, then its layer's recomputation in backward).
"""

from __future__ import annotations

import pytest

from tests.conftest import run_ranks

pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, model_dir: str, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from pathlib import Path

    import torch
    import torch.distributed as dist
    import yaml

    from omnilong.config import parse_params
    from omnilong.train.batches import collate
    from omnilong.train.runner import (
        StageRun,
        build_engine,
        init_distributed,
        train_step,
    )
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["path"] = model_dir
    raw["parallel"]["nproc_per_node"] = 1
    for name in ("stage1", "stage2", "stage3"):
        raw["stages"][name]["sp_size"] = 1
    params = parse_params(raw)
    device = init_distributed(timeout_s=300)
    run = StageRun("stage1", Path(model_dir), Path(model_dir) / "out", Path(model_dir) / "ckpt")
    engine, _, hf_ds_config = build_engine(params, run, device, ring_attention=False)
    calls = [0]
    layers = engine.module.model.model.language_model.layers
    # The layer's own hooks stay outside the checkpoint, and a recomputation stops once it has the
    # tensors backward needs (inside the MLP): count entries into the MLP.
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    seq_len, vocab = 32, engine.module.model.config.text_config.vocab_size
    input_ids = torch.randint(0, vocab, (seq_len,), generator=torch.Generator().manual_seed(0))
    row = {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": torch.arange(seq_len),
           "doc_lens": torch.tensor([seq_len])}
    batch = collate([row], family=params.model.family, model_config=engine.module.model.config,
                    video_params=params.model.video)
    train_step(engine, [batch], params.model.family, device)
    queue.put((rank, engine.module.training, calls[0], len(layers)))
    del hf_ds_config
    dist.destroy_process_group()


def test_engine_trains_in_training_mode_and_recomputes_each_layer(tiny_model_dir):
    [(_, training, layer_forwards, num_layers)] = run_ranks(_worker, 1, str(tiny_model_dir("qwen2_5_vl")))
    assert training
    assert layer_forwards == 2 * num_layers  # forward, and the recomputation in backward
