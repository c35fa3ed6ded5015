"""The model's LM head and its loss as one module: what the training step calls on hidden states.

The module references the model's own `lm_head` (as a child, read at call time), so the weight
keeps one owner, and a head tied to the input embeddings stays tied: its gradient from the loss
is accumulated by autograd into the shared parameter beside the embedding's own.

Under DeepSpeed ZeRO-3 a module's forward gathers the partitioned parameters it owns directly,
not its children's. Make this module part of what `deepspeed.initialize` gets (a container
holding the model and this module, rather than an attribute of the Hugging Face model, whose
state dict would then list the head twice) and mark it a ZeRO-3 leaf,
`deepspeed.utils.set_z3_leaf_modules(container, [ChunkedLMHeadLoss])`: its forward then gathers
the head's weight once for the whole chunk loop and releases it after. The backward itself
needs no weight; the gradients were made in forward.
"""

from __future__ import annotations

import torch
from torch import nn

from omnilong.config import LossParams
from omnilong.loss.dispatch import linear_cross_entropy


class ChunkedLMHeadLoss(nn.Module):
    def __init__(self, lm_head: nn.Linear, params: LossParams, *, ignore_index: int = -100):
        super().__init__()
        self.lm_head = lm_head
        self.params = params
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, H] and labels [N], already shifted -> (loss summed over valid tokens, their count)."""
        return linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            labels,
            self.lm_head.bias,
            ignore_index=self.ignore_index,
            chunk_tokens=self.params.chunk_tokens,
            memory_budget_bytes=self.params.memory_budget_mb * 2**20,
            label_smoothing=self.params.label_smoothing,
            z_loss=self.params.z_loss,
            softcap=self.params.softcap,
            impl=self.params.impl,
        )
