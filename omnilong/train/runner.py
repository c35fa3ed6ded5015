"""One training stage under torchrun: DeepSpeed ZeRO-3, packed data, step logs, checkpoints, HF export.

Run as `omnilong train --stage stageN` (which launches torchrun) or directly under torchrun as
`python -m omnilong.train.runner ...`. Every rank runs this; rank 0 also tracks in MLflow.

Loss normalisation: an optimizer step's loss is the sum of token losses over every rank and
micro-batch divided by the global number of valid tokens of the step. DeepSpeed averages
gradients over all ranks (its data-parallel group is the whole world, so ZeRO-3 partitions over
every rank) and divides by the accumulation steps; each micro-batch's loss sum is scaled by
world_size * grad_accum_steps / global_valid_tokens so the result is exactly that gradient.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from omnilong.config import STAGE_NAMES, Params, StageName, load_params
from omnilong.train import checkpoint
from omnilong.train.batches import MicroBatch, micro_batches
from omnilong.train.deepspeed_config import deepspeed_config, resolve_precision
from omnilong.train.schedule import lr_factor
from omnilong.train.step_log import StepLogger
from omnilong.train.training_module import TrainingModule, language_model_positions


@dataclass(frozen=True)
class StageRun:
    """What one invocation trains: a stage of params.yaml, from a model, into a directory."""

    stage: StageName
    init_dir: Path
    out_dir: Path
    ckpt_dir: Path
    variant: str | None = None
    """Pipeline variant (e.g. `no-stage2`): its models register under their own name."""


def training_rows(dataset, heldout_rows: int, packed_dir: Path) -> torch.utils.data.Subset:
    """All rows but the last `heldout_rows` (the packer shuffled them: a random split)."""
    if len(dataset) <= heldout_rows:
        raise ValueError(
            f"{packed_dir}: {len(dataset)} packed rows, but eval.heldout_rows keeps {heldout_rows} "
            f"out of training; add data or lower eval.heldout_rows"
        )
    return torch.utils.data.Subset(dataset, range(len(dataset) - heldout_rows))


def init_distributed() -> torch.device:
    import deepspeed

    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_engine(params: Params, run: StageRun, device: torch.device):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from omnilong.loss.head import ChunkedLMHeadLoss
    from omnilong.models.loading import load_model

    stage = params.stages[run.stage]
    train = stage.train
    on_gpu = device.type == "cuda"
    ds_config = deepspeed_config(train, data_parallel_size=dist.get_world_size(), on_gpu=on_gpu)
    # While this object lives, from_pretrained builds the model partitioned (zero.Init):
    # no rank ever holds all the weights.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if resolve_precision(train, on_gpu) == "bf16" else torch.float32
    model = load_model(run.init_dir, dtype=dtype)
    if train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.finetune == "lora":
        from omnilong.train.lora import add_lora

        model = add_lora(model, train.lora)
    module = TrainingModule(model, params.model.family, stage.loss)
    deepspeed.utils.set_z3_leaf_modules(module, [ChunkedLMHeadLoss])
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, ds_config, hf_ds_config


def _forward_inputs(batch: MicroBatch, family, device: torch.device) -> dict[str, torch.Tensor]:
    inputs = {
        "input_ids": batch.input_ids,
        "labels": batch.labels,
        "position_ids": language_model_positions(family, batch.position_ids, batch.doc_lens),
        **batch.videos,
    }
    return {key: value.to(device) for key, value in inputs.items()}


def _all_reduce_sum(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def train_step(engine, batches: list[MicroBatch], family, device: torch.device) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches -> (loss of the step, tokens of the step).

    The loss is normalised by the valid tokens of the whole step, summed over every rank and
    micro-batch (see the module docstring for why each loss sum is scaled as it is).
    """
    world, accumulation = dist.get_world_size(), len(batches)
    global_valid = _all_reduce_sum(sum(b.num_valid for b in batches), device)
    global_tokens = _all_reduce_sum(sum(b.num_tokens for b in batches), device)
    scale = world * accumulation / max(global_valid, 1.0)
    loss_sum_local = 0.0
    for batch in batches:
        loss_sum, _ = engine(**_forward_inputs(batch, family, device))
        engine.backward(loss_sum * scale)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        loss_sum_local += float(loss_sum.detach())
    return _all_reduce_sum(loss_sum_local, device) / max(global_valid, 1.0), global_tokens


def train_stage(params: Params, run: StageRun, params_file: Path) -> None:
    from omnilong.data.shards import PackedShards, read_index
    from omnilong.train.export import export_hf_model

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = params.stages[run.stage]
    train = stage.train
    if stage.sp_size != 1:
        raise NotImplementedError(
            f"stages.{run.stage}.sp_size: sequence parallelism (ring attention) is not wired into "
            f"the runner yet; set it to 1"
        )
    dp_rank, dp_size = rank, world

    packed_dir = Path(params.data.packed_dir) / run.stage
    dataset = training_rows(PackedShards(packed_dir), params.eval.heldout_rows, packed_dir)
    engine, ds_config, hf_ds_config = build_engine(params, run, device)
    model_config = engine.module.model.config

    inputs_fingerprint = checkpoint.fingerprint(
        stage.model_dump(mode="json"), params.model.model_dump(mode="json"), str(run.init_dir),
        read_index(packed_dir).model_dump(mode="json"),
    )
    resumed = checkpoint.resume(engine, run.ckpt_dir, expected_fingerprint=inputs_fingerprint)
    if resumed is None:
        checkpoint.discard(run.ckpt_dir)
    start_step = resumed["next_step"] if resumed else 0

    logger = StepLogger(
        params, run, ds_config=ds_config, params_file=params_file,
        resumed_run_id=resumed.get("mlflow_run_id") if resumed else None,
    )
    logger.start(start_step)
    for step in range(start_step, train.max_steps):
        started = time.perf_counter()
        batches = micro_batches(
            dataset, step=step, micro_batch_size=train.micro_batch_size, grad_accum_steps=train.grad_accum_steps,
            dp_rank=dp_rank, dp_size=dp_size, seed=params.seed + train.seed,
            family=params.model.family, model_config=model_config, video_params=params.model.video,
        )
        loss, global_tokens = train_step(engine, batches, params.model.family, device)
        logger.step(
            step, loss=loss, lr=engine.get_lr()[0], tokens=global_tokens,
            seconds=time.perf_counter() - started, grad_norm=engine.get_global_grad_norm(),
        )
        next_step = step + 1
        if next_step % train.checkpoint_every == 0 or next_step == train.max_steps:
            checkpoint.save(
                engine, run.ckpt_dir, next_step=next_step,
                state={"fingerprint": inputs_fingerprint, "mlflow_run_id": logger.run_id},
            )

    export_hf_model(engine, run, params)
    del hf_ds_config  # kept alive until here: transformers reads it while ZeRO-3 is in use
    logger.finish()
    dist.barrier()
    dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--init", type=Path, required=True, help="Model directory to start from.")
    parser.add_argument("--out", type=Path, required=True, help="Directory of the stage's outputs.")
    parser.add_argument("--checkpoints", type=Path, required=True, help="DeepSpeed checkpoint directory.")
    parser.add_argument("--variant", default=None, help="Pipeline variant, e.g. no-stage2.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params, check_paths=False)
    run = StageRun(args.stage, args.init, args.out, args.checkpoints, args.variant)
    train_stage(params, run, args.params)


if __name__ == "__main__":
    main()
