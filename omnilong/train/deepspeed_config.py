"""The DeepSpeed config, generated from a stage's typed parameters (never written by hand)."""

from __future__ import annotations

from typing import Any

from omnilong.config import TrainParams


def resolve_precision(train: TrainParams, on_gpu: bool) -> str:
    if train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return train.precision


def deepspeed_config(train: TrainParams, *, data_parallel_size: int, on_gpu: bool,
                     hpz_partition_size: int | None = None) -> dict[str, Any]:
    """ZeRO stage 3 with optional CPU offload of optimizer states and parameters, and optional
    hierarchical partitioning over `hpz_partition_size` ranks (ZeRO++ hpZ: one node's ranks).

    The optimizer and the LR schedule are built by the runner (torch AdamW + LambdaLR), so the
    same code runs with and without offload; `zero_force_ds_cpu_optimizer: false` lets ZeRO
    offload drive a torch optimizer.
    """
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        # Tiny models have no parameter above the default thresholds: force real partitioning.
        "stage3_param_persistence_threshold": 0 if not on_gpu else 1e5,
        "reduce_bucket_size": 5e7 if on_gpu else 1e5,
        "stage3_prefetch_bucket_size": 5e7 if on_gpu else 1e5,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if hpz_partition_size is not None:
        zero["zero_hpz_partition_size"] = hpz_partition_size
    precision = resolve_precision(train, on_gpu)
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * data_parallel_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
