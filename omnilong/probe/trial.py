"""One trial of `omnilong probe` (run under torchrun by omnilong/probe/run.py, never by hand):
does a stage train at `--seq-len` tokens a row?

Every rank builds the stage's engine as the stage runner does (`runner.build_engine`: ZeRO-3,
LoRA or full, activation checkpointing, tiling and offload as the stage's `train` sets them,
ring attention when sp_size > 1) from `model.path`, then trains through `runner.train_step` one
warm-up step and one measured step, each of `grad_accum_steps` micro-batches of the stage's
micro-batch size, on synthetic rows (omnilong/train/synthetic_rows.py; the video stage's rows
hold the video at `--video`). It writes `rank<N>.json` into `--out`:

- `peak_bytes`: the most memory the process held over the whole trial
  (`peak_memory.process_peak_bytes`: resident memory on CPU, the CUDA allocator's on GPU);
- `seconds`, `tokens`: the measured step's time and the tokens it trained (all ranks);
- `device_bytes`: the GPU's memory (null on CPU);
- or `"oom": true` when the GPU ran out of memory: the rank then exits at once with a failure,
  so torchrun stops the ranks waiting for it;
- or `"error"`: the traceback of any other failure (the probe reports it).

`--peak-function module:function` is for tests: each rank reports `function(seq_len, rank)`
bytes as its peak instead of the measured one (the steps still run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from omnilong import atomic
from omnilong.config import STAGE_NAMES, load_params
from omnilong.torch_compat import silence_deprecated_collective_names

OOM_EXIT = 3


def rank_file(out: Path, rank: int) -> Path:
    return out / f"rank{rank}.json"


def peak_function(spec: str):
    """`module:function` -> the function."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_trial(args: argparse.Namespace) -> dict:
    from omnilong.parallel.mesh import build_mesh
    from omnilong.train.batches import collate
    from omnilong.train.peak_memory import (
        map_large_allocations,
        process_peak_bytes,
        sync,
    )
    from omnilong.train.runner import (
        SequenceParallel,
        StageRun,
        build_engine,
        init_distributed,
        train_step,
    )
    from omnilong.train.synthetic_rows import probe_clip, synthetic_row, video_row

    map_large_allocations()  # before the model: the peak then counts tensors, not heap fragmentation
    params = load_params(args.params)
    stage = params.stages[args.stage]
    family, video_params = params.model.family, params.model.video
    device = init_distributed(params.parallel.timeout_s)
    mesh = build_mesh(stage, timeout_s=params.parallel.timeout_s)
    sp = (SequenceParallel(mesh.sp_group, mesh.sp_rank, mesh.sp_size, params.parallel.ring_attention)
          if mesh.sp_size > 1 else None)
    # Every stage starts from a model of model.path's shapes: measure with that one.
    run = StageRun(args.stage, Path(params.model.path), args.out / "unused_out", args.out / "unused_ckpt")
    engine, _, hf_ds_config = build_engine(params, run, device, ring_attention=sp is not None)
    config = engine.module.model.config
    if args.video:
        row = video_row(args.seq_len, probe_clip(args.video, stage.video_frames, family, config, video_params),
                        family, config)
    else:
        row = synthetic_row(args.seq_len, config.text_config.vocab_size)
    # The micro-batch size the stage trains its last (longest) phase with.
    rows = [row] * stage.micro_batch_size_at(stage.train.max_steps - 1)
    batches = [collate(rows, family=family, model_config=config, video_params=video_params,
                       sp_rank=mesh.sp_rank, sp_size=mesh.sp_size) for _ in range(stage.train.grad_accum_steps)]

    train_step(engine, batches, family, device, sp)  # the optimizer's states and ZeRO-3's buffers appear here
    sync(device)
    started = time.perf_counter()
    tokens = train_step(engine, batches, family, device, sp).tokens
    sync(device)
    seconds = time.perf_counter() - started
    rank = dist.get_rank()
    peak = peak_function(args.peak_function)(args.seq_len, rank) if args.peak_function else process_peak_bytes(device)
    del hf_ds_config  # kept alive until here: transformers reads it while ZeRO-3 is in use
    return {"rank": rank, "peak_bytes": int(peak), "seconds": seconds, "tokens": tokens,
            "device_bytes": torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="Directory for the ranks' records.")
    parser.add_argument("--video", type=Path, default=None, help="The video of the video stage's rows.")
    parser.add_argument("--peak-function", default=None, help="For tests: module:function(seq_len, rank) -> bytes.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    silence_deprecated_collective_names()
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        record = run_trial(args)
    except torch.OutOfMemoryError as exc:
        atomic.write_text(rank_file(args.out, rank), json.dumps({"rank": rank, "oom": True, "error": str(exc)}))
        print(f"[rank {rank}] out of memory at seq_len {args.seq_len}: {exc}", file=sys.stderr, flush=True)
        # The other ranks wait in a collective for this one: exit now, and torchrun stops them.
        os._exit(OOM_EXIT)
    except Exception:
        # What failed, for the probe to report: torchrun's own log ends with its summary, not this.
        atomic.write_text(rank_file(args.out, rank), json.dumps({"rank": rank, "error": traceback.format_exc()}))
        raise
    atomic.write_text(rank_file(args.out, rank), json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
