"""Tiled MLPs and RMSNorms under ZeRO-3 on 2 gloo ranks: the runner's engine, tiled or not, gives
the same loss and the same reduced gradients, for both families, full fine-tuning and LoRA.

Each rank builds the engine with `runner.build_engine` (ZeRO-3, activation checkpointing, fp32)
twice from the same seed, with `train.tiled_mlp` off and on (tiles of 7 tokens: 64 tokens cut in
10 tiles, the last one short), feeds its own row, and after backward reads every trainable
weight's full gradient (ZeRO-3 has reduced and partitioned it). A gradient that ZeRO-3 reduced
before the last tile had added its share, or never, would differ by a whole tile's contribution.
Tolerances are tests/test_tiling.py's, whose single-process test holds both paths to an fp64
truth: loss 1e-6 relative; gradients 2e-6 of the gradient's largest value (tile-by-tile sums
round in another order than one matmul).
"""

from __future__ import annotations

import pytest

from tests.conftest import run_ranks

pytestmark = pytest.mark.slow

SEQ_LEN, TILE = 64, 7
SETTINGS = [("qwen2_5_vl", "full"), ("qwen2_5_vl", "lora"), ("llava_onevision", "full"), ("llava_onevision", "lora")]


def _worker(rank: int, port: int, model_dirs: dict[str, str], queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from pathlib import Path

    import torch
    import torch.distributed as dist
    import yaml
    from deepspeed.utils import safe_get_full_grad

    from omnilong.config import parse_params
    from omnilong.train.batches import collate
    from omnilong.train.runner import StageRun, build_engine, init_distributed, step_inputs
    from tests.conftest import REPO

    device = init_distributed(timeout_s=300)
    results = {}
    for family, finetune in SETTINGS:
        per_tiling = {}
        for tiled in (False, True):
            raw = yaml.safe_load((REPO / "params.yaml").read_text())
            raw["model"].update(path=model_dirs[family], family=family)
            raw["parallel"]["nproc_per_node"] = 2
            for name in ("stage1", "stage2", "stage3"):
                raw["stages"][name]["sp_size"] = 1
            raw["stages"]["stage1"]["train"].update(
                finetune=finetune, precision="fp32", activation_checkpointing=True,
                tiled_mlp={"enabled": tiled, "tile_tokens": TILE},
            )
            params = parse_params(raw)
            model_dir = Path(model_dirs[family])
            torch.manual_seed(0)  # the same LoRA adapters in both engines
            engine, _, hf_ds_config = build_engine(
                params, StageRun("stage1", model_dir, model_dir / "out", model_dir / "ckpt"), device,
                ring_attention=False,
            )
            config = engine.module.model.config
            vocab = config.get_text_config().vocab_size
            input_ids = torch.randint(0, vocab, (SEQ_LEN,), generator=torch.Generator().manual_seed(rank))
            row = {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": torch.arange(SEQ_LEN),
                   "doc_lens": torch.tensor([SEQ_LEN])}
            batch = collate([row], family=family, model_config=config, video_params=params.model.video)
            inputs = step_inputs(batch, family, device, None)
            loss_sum, _ = engine(**inputs.model_kwargs)
            engine.backward(loss_sum)
            grads = {name: safe_get_full_grad(param).clone() for name, param in engine.module.named_parameters()
                     if param.requires_grad}
            per_tiling[tiled] = (float(loss_sum.detach()), grads)
            engine.destroy()
            del hf_ds_config
        results[(family, finetune)] = _compare(per_tiling[False], per_tiling[True])
    queue.put((rank, results))  # plain numbers: tensors would be shared through this process's memory
    dist.destroy_process_group()


def _compare(plain: tuple, tiled: tuple) -> dict:
    """Losses, and per weight the tiled gradient's error relative to the plain one's largest value
    (None where the plain gradient is zero: then whether the tiled one is exactly zero too)."""
    import torch

    (plain_loss, plain_grads), (tiled_loss, tiled_grads) = plain, tiled
    errors = {}
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        errors[name] = ((tiled_grads[name] - grad).abs().max().item() / scale if scale
                        else torch.equal(tiled_grads[name], grad))
    return {"losses": (plain_loss, tiled_loss), "same_names": plain_grads.keys() == tiled_grads.keys(),
            "errors": errors}


def test_tiled_engine_matches_untiled_under_zero3_on_two_ranks(tiny_model_dir):
    model_dirs = {family: str(tiny_model_dir(family)) for family, _ in SETTINGS}
    for rank, results in run_ranks(_worker, 2, model_dirs):
        assert results.keys() == set(SETTINGS)
        for setting, compared in results.items():
            plain_loss, tiled_loss = compared["losses"]
            assert abs(tiled_loss - plain_loss) <= 1e-6 * abs(plain_loss), (rank, setting, tiled_loss, plain_loss)
            errors = compared["errors"]
            assert compared["same_names"] and errors
            # LoRA's A starts behind a zero B: no gradient, tiled or not (True: both exactly zero).
            zero = {name for name, error in errors.items() if isinstance(error, bool)}
            assert all(errors[name] for name in zero), (rank, setting)
            tiled = [name for name in errors if name not in zero and "language_model" in name
                     and (".mlp." in name or "norm" in name)]
            assert tiled, setting  # the tiled modules' weights (or their adapters) have gradients
            worst = max((error, name) for name, error in errors.items() if name not in zero)
            assert worst[0] <= 2e-6, (rank, setting, worst)

