"""The LM head's cross-entropy without [tokens x vocab] logits; a plain reference beside it."""

from omnilong.loss.chunked_ce import auto_chunk_tokens
from omnilong.loss.dispatch import linear_cross_entropy
from omnilong.loss.head import ChunkedLMHeadLoss

__all__ = ["ChunkedLMHeadLoss", "auto_chunk_tokens", "linear_cross_entropy"]
