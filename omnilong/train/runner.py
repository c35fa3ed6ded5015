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
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from omnilong.config import STAGE_KIND, STAGE_NAMES, Params, StageName, load_params
from omnilong.parallel.mesh import build_mesh
from omnilong.parallel.timeout import (
    abort_nccl_on_timeout,
    as_timedelta,
    bound_every_group,
    naming_stalled_collectives,
)
from omnilong.torch_compat import silence_deprecated_collective_names
from omnilong.train import checkpoint, rng
from omnilong.train.batches import IGNORE_INDEX, MicroBatch, StepBatches
from omnilong.train.deepspeed_config import deepspeed_config, resolve_precision
from omnilong.train.faults import kill_if_asked, nonfinite_loss_asked, stall_if_asked
from omnilong.train.nonfinite import NonFiniteStreak, check_gradients, skip_update
from omnilong.train.schedule import lr_factor
from omnilong.train.step_log import StepLogger
from omnilong.train.training_module import (
    TrainingModule,
    language_model_positions,
    model_inputs,
    video_shard,
)
from omnilong.train.video_faults import VideoFaults


@dataclass(frozen=True)
class StageRun:
    """What one invocation trains: a stage of params.yaml, from a model, into a directory."""

    stage: StageName
    init_dir: Path
    out_dir: Path
    ckpt_dir: Path
    variant: str | None = None
    """Pipeline variant (e.g. `no-stage2`): its models register under their own name."""


def init_distributed(timeout_s: float) -> torch.device:
    """The default process group (NCCL on this rank's GPU, else gloo); its collectives wait at
    most `timeout_s` for a peer (omnilong/parallel/timeout.py)."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        abort_nccl_on_timeout()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=as_timedelta(timeout_s))
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_engine(params: Params, run: StageRun, device: torch.device, *, ring_attention: bool):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from omnilong.models.loading import load_model

    stage = params.stages[run.stage]
    train = stage.train
    on_gpu = device.type == "cuda"
    ds_config = deepspeed_config(train, data_parallel_size=dist.get_world_size(), on_gpu=on_gpu,
                                 hpz_partition_size=params.parallel.hpz_partition_size)
    # While this object lives, from_pretrained builds the model partitioned (zero.Init):
    # no rank ever holds all the weights.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if resolve_precision(train, on_gpu) == "bf16" else torch.float32
    model = load_model(run.init_dir, dtype=dtype, rope_theta=params.model.rope_theta)
    # from_pretrained returns eval mode, where transformers' layers skip activation checkpointing
    # (and dropout, LoRA's included): a model that trains is in training mode.
    model.train()
    if ring_attention:
        from omnilong.parallel.hf_adapter import register_ring_attention

        # Applied from outside: the language model's causal attention becomes ring attention;
        # the vision tower's non-causal calls stay local (see hf_adapter).
        model.set_attn_implementation(register_ring_attention())
    if train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    memory_savers = []
    if train.offload_activations:
        from omnilong.train.activation_offload import offload_checkpoints

        memory_savers.append(f"the checkpoints of {offload_checkpoints(model)} layers offloaded to host memory")
    if train.tiled_mlp.enabled:
        from omnilong.train.tiling import tile_mlps_and_norms

        tiled = tile_mlps_and_norms(model, train.tiled_mlp.tile_tokens)
        memory_savers.append(f"the MLPs of {tiled.mlps} layers and {tiled.norms} RMSNorms tiled "
                             f"({train.tiled_mlp.tile_tokens} tokens a tile)")
    if memory_savers and dist.get_rank() == 0:
        print(f"[{run.stage}] " + "; ".join(memory_savers), flush=True)
    if train.finetune == "lora":
        from omnilong.train.lora import add_lora

        model = add_lora(model, train.lora)
    module = TrainingModule(model, params.model.family, stage.loss, params.model.video)
    prepare_for_zero3(module)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    # DeepSpeed made its data-parallel group (a clone of the world) with torch's default timeout.
    bound_every_group(params.parallel.timeout_s)
    return engine, ds_config, hf_ds_config


def prepare_for_zero3(module: TrainingModule) -> None:
    """Tell ZeRO-3 which partitioned weights `module` reads outside their owners' forward."""
    import deepspeed

    from omnilong.loss.head import ChunkedLMHeadLoss

    model = module.base_model
    if module.family == "llava_onevision":
        # The video merge reads LLaVA-OneVision's `image_newline` outside the forward of the
        # module that owns it: ZeRO-3 must gather it for this module's forward instead.
        deepspeed.zero.register_external_parameter(module, model.model.image_newline)
    if not getattr(model.config, "tie_word_embeddings", False):
        # The loss reads the head's weight without calling the head: gather it at the loss.
        # A head tied to the embeddings is not marked: ZeRO-3 then leaves a stray gradient on the
        # shared parameter and fails its step; unmarked, the shared weight is gathered with the
        # embeddings (tests/test_train_stage.py checks both cases against the reference loss).
        deepspeed.utils.set_z3_leaf_modules(module, [ChunkedLMHeadLoss])


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group, for sharding each micro-batch."""

    group: dist.ProcessGroup
    rank: int
    size: int
    backend: str


@dataclass
class StepInputs:
    """One micro-batch as this rank feeds it to the model: its shard of the sequence when
    sequence-parallel, and the ring-attention context that shard needs."""

    model_kwargs: dict[str, torch.Tensor]
    attention: contextlib.AbstractContextManager

    @property
    def num_valid(self) -> int:
        return int((self.model_kwargs["labels"] != IGNORE_INDEX).sum())


def step_inputs(batch: MicroBatch, family, device: torch.device, sp: SequenceParallel | None) -> StepInputs:
    # Positions and shifted labels are those of the full rows: computed before any sharding.
    if sp is None:
        kwargs = model_inputs(batch, family)
        attention: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        from omnilong.parallel.attention import sharding_scheme
        from omnilong.parallel.hf_adapter import ring_attention_context
        from omnilong.parallel.sample import shard_sample
        from omnilong.parallel.zigzag import SequenceLayout

        layout = SequenceLayout(batch.input_ids.shape[1], sp.size, sharding_scheme(sp.backend, batch.doc_lens))
        positions = language_model_positions(family, batch.position_ids, batch.doc_lens)
        shard = shard_sample(batch.input_ids, batch.labels, positions, batch.doc_lens, layout, sp.rank)
        kwargs = {"input_ids": shard.inputs, "labels": shard.labels, "position_ids": shard.position_ids}
        if batch.videos:
            # The loader decoded only this rank's share of the frames (StepBatches).
            kwargs["video"] = video_shard(batch, layout, sp.rank, sp.group)
        attention = ring_attention_context(shard.documents, sp.group, sp.backend)
    return StepInputs({key: value.to(device) for key, value in kwargs.items()}, attention)


def loader_workers(num_workers: int) -> dict:
    """DataLoader settings: videos decode in `num_workers` processes, at most two steps ahead
    (bounded memory); 0 decodes in the training process."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "prefetch_factor": 2, "persistent_workers": True}


def _all_reduce(value: float, device: torch.device, op=dist.ReduceOp.SUM) -> float:
    """`value` combined over every rank by `op` (summed by default)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


@dataclass(frozen=True)
class StepResult:
    loss: float
    """The step's loss per valid token (summed over every rank and micro-batch)."""
    tokens: float
    """Tokens the step trained on, over every rank."""
    grad_norm: float
    """Global gradient norm before clipping; NaN for a skipped step."""
    skipped: bool
    """The loss or a gradient was non-finite: no rank updated anything (omnilong/train/nonfinite.py)."""


def train_step(
    engine, batches: list[MicroBatch], family, device: torch.device, sp: SequenceParallel | None = None,
    *, inject_nonfinite: bool = False,
) -> StepResult:
    """One optimizer step over this rank's micro-batches.

    The loss is normalised by the valid tokens of the whole step, summed over every rank (each
    counts its own shard) and micro-batch; see the module docstring for the scaling. A non-finite
    loss or gradient on any rank skips the update on every rank. `inject_nonfinite` (tests only)
    makes this rank's loss NaN.
    """
    world, accumulation = dist.get_world_size(), len(batches)
    inputs = [step_inputs(batch, family, device, sp) for batch in batches]
    global_valid = _all_reduce(sum(step.num_valid for step in inputs), device)
    # Every rank of a sequence-parallel group reads the same rows: count them once.
    global_tokens = _all_reduce(sum(b.num_tokens for b in batches), device) / (sp.size if sp else 1)
    scale = world * accumulation / max(global_valid, 1.0)
    loss_sum_local = 0.0
    for index, step in enumerate(inputs):
        # Backward runs ring attention too (and recomputes checkpointed layers): same context.
        with step.attention:
            loss_sum, _ = engine(**step.model_kwargs)
            if inject_nonfinite and index == 0:
                loss_sum = loss_sum * float("nan")
            engine.backward(loss_sum * scale)
        loss_sum_local += float(loss_sum.detach())
        if index < accumulation - 1:
            engine.step()  # accumulates only: DeepSpeed steps the optimizer at the boundary
    gradients = check_gradients(engine, loss_sum_local, device)
    if gradients.finite:
        engine.step()
    else:
        skip_update(engine)
    loss = _all_reduce(loss_sum_local, device) / max(global_valid, 1.0)
    return StepResult(loss, global_tokens, gradients.grad_norm, skipped=not gradients.finite)


def train_stage(params: Params, run: StageRun, params_file: Path) -> None:
    from omnilong.data.pack import packed_set_dirs
    from omnilong.data.shards import PackedShards
    from omnilong.train.export import export_hf_model

    timeout_s = params.parallel.timeout_s
    device = init_distributed(timeout_s)
    stage = params.stages[run.stage]
    train = stage.train
    mesh = build_mesh(stage, timeout_s=timeout_s)
    sp = (
        SequenceParallel(mesh.sp_group, mesh.sp_rank, mesh.sp_size, params.parallel.ring_attention)
        if mesh.sp_size > 1 else None
    )

    packed_dir = Path(params.data.packed_dir) / run.stage
    # Every row trains: the held-out documents were packed apart (`heldout/`).
    datasets = {packed: PackedShards(directory) for packed, directory in packed_set_dirs(packed_dir, stage).items()}
    seed = params.seed + train.seed
    rng.seed_all(seed)  # the same on every rank: LoRA's initial weights agree
    engine, ds_config, hf_ds_config = build_engine(params, run, device, ring_attention=sp is not None)
    rng.seed_all(seed + 1 + dist.get_rank())  # each rank its own dropout
    model_config = engine.module.model.config

    inputs = checkpoint.resume_inputs(params, run.stage, run.init_dir, dist.get_world_size())
    resumed = checkpoint.resume(engine, run.ckpt_dir, inputs=inputs)
    start_step = resumed["next_step"] if resumed else 0

    logger = StepLogger(
        params, run, ds_config=ds_config, params_file=params_file,
        resumed_run_id=resumed.get("mlflow_run_id") if resumed else None,
        committed=resumed.get("step_metrics") if resumed else None,
    )
    logger.start(start_step)
    batches = StepBatches(
        datasets, stage.packed_set_at, stage.micro_batch_size_at, num_steps=train.max_steps,
        grad_accum_steps=train.grad_accum_steps,
        dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, sp_rank=mesh.sp_rank, sp_size=mesh.sp_size,
        seed=seed,
        family=params.model.family, model_config=model_config, video_params=params.model.video,
    )
    step_data = torch.utils.data.DataLoader(
        batches, sampler=range(start_step, train.max_steps), batch_size=None,
        **loader_workers(params.data.loader_workers),
    )
    video_faults = VideoFaults(batches, device, resumed.get("video_faults") if resumed else None)
    skipped_rows, step_data = 0, iter(step_data)
    if resumed:
        # After iter(), which draws the loader's seed from torch's generator: from here each rank
        # draws what it drew at this step before the crash.
        rng.restore(resumed["rng"])
    nonfinite = NonFiniteStreak(train.max_nonfinite_steps, resumed.get("nonfinite") if resumed else None)
    for step in range(start_step, train.max_steps):
        with naming_stalled_collectives(f"step {step}", timeout_s):
            started = time.perf_counter()  # waiting for the data counts in the step's time
            # Rows whose frames failed to decode on any rank are replaced alike on every rank.
            data = video_faults.agree(step, next(step_data))
            for reason in data.skipped:
                print(f"[rank {dist.get_rank()}] step {step}: skipped a row: {reason}", file=sys.stderr, flush=True)
            skipped_rows += len(data.skipped)
            stall_if_asked(step)
            kill_if_asked(step)
            result = train_step(engine, data.micro_batches, params.model.family, device, sp,
                                inject_nonfinite=nonfinite_loss_asked(step, dist.get_rank()))
            nonfinite.count(result.skipped)
            most_frames = None
            if STAGE_KIND[run.stage] == "video":  # what the phase's frame setting gave the videos, for the log
                most_frames = max((count for batch in data.micro_batches for count in batch.frame_counts), default=0)
                most_frames = int(_all_reduce(most_frames, device, op=dist.ReduceOp.MAX))
            logger.step(
                step, seq_len=stage.seq_len_at(step), loss=result.loss, lr=engine.get_lr()[0], tokens=result.tokens,
                seconds=time.perf_counter() - started, grad_norm=result.grad_norm,
                # Every rank of a sequence-parallel group skips the same rows: count them once.
                skipped_rows=int(_all_reduce(skipped_rows, device)) // mesh.sp_size,
                update_skipped=result.skipped, nonfinite_steps=nonfinite.total, video_frames=most_frames,
            )
            nonfinite.stop_if_too_many(step, train.max_steps)
            next_step = step + 1
            if next_step % train.checkpoint_every == 0 or next_step == train.max_steps:
                checkpoint.save(
                    engine, run.ckpt_dir, next_step=next_step, keep=train.keep_checkpoints,
                    state={"resume_inputs": inputs, "mlflow_run_id": logger.run_id, "step_metrics": logger.pending,
                           "video_faults": video_faults.state(), "nonfinite": nonfinite.state()},
                )
                logger.flush()  # the checkpoint committed: its steps are never redone

    with naming_stalled_collectives("export", timeout_s):
        export_hf_model(engine, run, params)
    del hf_ds_config  # kept alive until here: transformers reads it while ZeRO-3 is in use
    # No collective after the export: the others do not wait while rank 0 registers (uploads)
    # the model, which can take longer than parallel.timeout_s. Flushes what is still buffered.
    logger.finish()
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
    silence_deprecated_collective_names()
    args = parse_args(argv)
    params = load_params(args.params, check_paths=False)
    run = StageRun(args.stage, args.init, args.out, args.checkpoints, args.variant)
    train_stage(params, run, args.params)


if __name__ == "__main__":
    main()
