"""Per-rank vision-encoder peak memory with sharded encoding over P=2 ranks against P=1.

One step's vision work on one long video: decode-free (frames drawn once, in every process
alike), preprocess this rank's frames, encode them, gather every rank's embeddings
(omnilong/parallel/vision.py; nothing to gather at P=1), and backpropagate a loss over the
gathered embeddings through the tower. The model is a Qwen2.5-VL built from a config with a
vision tower of `--vision-hidden` x `--vision-depth` layers (random weights: memory does not depend on
them), frames of `--encoder-side` pixels. Each configuration runs in fresh processes (2 gloo ranks, or 1); the peak is
benchmarks/measure.py's (resident memory above the level before the step on CPU, the CUDA
allocator's peak on GPU), the pixel inputs included.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.multiprocessing as mp

from benchmarks.measure import PeakMemory, free_port

SEED = 0


@dataclass(frozen=True)
class EncoderSetup:
    frames: int
    side: int  # frames are side x side pixels
    vision_hidden: int
    vision_depth: int


def _model(args: EncoderSetup):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 512, "bos_token_id": None, "eos_token_id": None}
    vision = {"depth": args.vision_depth, "hidden_size": args.vision_hidden, "intermediate_size": 4 * args.vision_hidden,
              "num_heads": max(1, args.vision_hidden // 64), "out_hidden_size": text["hidden_size"], "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [args.vision_depth - 1]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, video_token_id=500, image_token_id=501,
                              vision_start_token_id=502, vision_end_token_id=503)
    torch.manual_seed(SEED)
    return Qwen2_5_VLForConditionalGeneration(config).float()


def _frames(args: EncoderSetup) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(0, 256, (args.frames, args.side, args.side, 3), dtype=np.uint8)


def _rank_step(rank: int, world: int, port: int, args: EncoderSetup, queue) -> None:
    import torch.distributed as dist

    from omnilong.config import VideoTokenParams
    from omnilong.models.video_encoders import encode_units
    from omnilong.models.video_inputs import preprocess_video, video_span
    from omnilong.parallel.vision import gather_video_tokens, split_frames

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    video = VideoTokenParams.model_validate({"qwen2_5_vl": {"min_pixels": 28 * 28, "max_pixels": args.side**2}})
    model, frames = _model(args), _frames(args)
    span = video_span("qwen2_5_vl", model.config, video, args.frames, args.side, args.side)
    split = split_frames([span], world, rank)
    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    started = time.perf_counter()
    pieces = [preprocess_video("qwen2_5_vl", frames[a * span.frames_per_unit : b * span.frames_per_unit], model.config, video)
              for _, a, b in split.unit_ranges]
    local = encode_units(model, "qwen2_5_vl", video, pieces)
    gathered = gather_video_tokens(local, split.tokens_per_rank, None)
    gathered.square().mean().backward()
    seconds = time.perf_counter() - started
    queue.put((rank, meter.peak_above_baseline(), seconds, int(local.shape[0]), int(gathered.shape[0])))
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, args: EncoderSetup) -> list[tuple]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_step, args=(rank, world, port, args, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results = sorted(queue.get(timeout=1800) for _ in range(world))
    for process in processes:
        process.join(timeout=120)
        if process.exitcode != 0:
            raise RuntimeError(f"a rank of the P={world} run exited with {process.exitcode}")
    return results


def encoder_memory(args: EncoderSetup) -> dict:
    runs = {world: _run(world, args) for world in (1, 2)}
    for world, results in runs.items():
        for rank, peak, seconds, local, gathered in results:
            print(f"P={world} rank {rank}: {local:6d} of {gathered} embeddings encoded here, peak "
                  f"{peak / 2**20:8.1f} MiB, {seconds:6.2f} s", flush=True)
    peak = {world: max(result[1] for result in results) for world, results in runs.items()}
    seconds = {world: max(result[2] for result in results) for world, results in runs.items()}
    return {
        "memory_ratio_p2_over_p1": peak[2] / peak[1],
        "time_ratio_p2_over_p1": seconds[2] / seconds[1],
        "peak_mib_per_rank": {f"p{world}": round(value / 2**20, 1) for world, value in peak.items()},
        "seconds": {f"p{world}": round(value, 3) for world, value in seconds.items()},
        "embeddings": runs[1][0][4],
        "setup": asdict(args),
        "device": "cpu (gloo)",
    }
