"""OmniLong: long-context training of multimodal LLMs (text to 512K tokens, video to 2048 frames)."""

__version__ = "0.1.0"
