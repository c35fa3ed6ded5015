"""Model families (Qwen2.5-VL, LLaVA-OneVision): loading, tiny models, multimodal inputs."""
