"""Training: the torchrun entry point, DeepSpeed ZeRO-3 setup, the step, checkpoints and logs."""
