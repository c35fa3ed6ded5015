"""One rank of `benchmarks/context_memory.py`'s "ours": the stage runner's own engine and step.

Run under torchrun by context_memory.py (never by hand): `--spec` names a JSON file with the
params (a validated params.yaml mapping), the saved model of each layer count and the lengths.
For each layer count the rank builds the engine with `runner.build_engine` (ZeRO-3, LoRA or full,
activation checkpointing, ring attention when sp_size > 1, the train options passed through),
trains one warm-up step (the optimizer's states and ZeRO-3's buffers are made once, not per
length), then one step per length on a synthetic packed row (one document) through
`runner.train_step`, measuring this rank's peak memory of the whole step. It writes
`rank<N>.json` into `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.measure import peak_per_length, release
from omnilong.torch_compat import silence_deprecated_collective_names
from omnilong.train.synthetic_rows import synthetic_row


def measure_layers(params, model_dir: str, lengths: list[int], warmup_len: int, device: torch.device) -> dict:
    from omnilong.parallel.mesh import build_mesh
    from omnilong.train.batches import collate
    from omnilong.train.runner import (
        SequenceParallel,
        StageRun,
        build_engine,
        train_step,
    )

    stage = params.stages["stage1"]
    mesh = build_mesh(stage, timeout_s=params.parallel.timeout_s)
    sp = (SequenceParallel(mesh.sp_group, mesh.sp_rank, mesh.sp_size, params.parallel.ring_attention)
          if mesh.sp_size > 1 else None)
    run = StageRun("stage1", Path(model_dir), Path(model_dir) / "unused_out", Path(model_dir) / "unused_ckpt")
    engine, _, hf_ds_config = build_engine(params, run, device, ring_attention=sp is not None)
    config = engine.module.model.config
    family = params.model.family

    def step(seq_len: int) -> None:
        batch = collate([synthetic_row(seq_len, config.text_config.vocab_size)], family=family,
                        model_config=config, video_params=params.model.video)
        train_step(engine, [batch], family, device, sp)

    step(warmup_len)
    # One GPU, one rank: nothing waits on a rank that ran out of memory.
    rows = peak_per_length(step, lengths, device, f"[rank {dist.get_rank()}] ours")
    engine.destroy()
    del hf_ds_config  # kept alive until here: transformers reads it while ZeRO-3 is in use
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    silence_deprecated_collective_names()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())

    from omnilong.config import ParallelParams, parse_params
    from omnilong.train.runner import init_distributed

    device = init_distributed(ParallelParams.model_validate(spec["params"].get("parallel", {})).timeout_s)
    results = {}
    for layers, model_dir in spec["model_dirs"].items():
        raw = {**spec["params"], "model": {**spec["params"]["model"], "path": model_dir}}
        params = parse_params(raw, source=str(args.spec))
        results[layers] = measure_layers(params, model_dir, spec["lengths"], spec["warmup_len"], device)
        release(device)  # this layer count's engine is gone: its memory too
    rank = dist.get_rank()
    (args.out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
