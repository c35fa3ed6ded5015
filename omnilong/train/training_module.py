"""The module DeepSpeed trains: a model family's language model and its LM-head loss, composed.

The model's own forward would materialise [tokens, vocab] logits; instead the decoder's hidden
states go to the loss head (omnilong/loss), which applies the LM head a chunk at a time. The
head is a child of this module, so under ZeRO-3 its partitioned weight is gathered where the
loss runs and its gradient reaches the partition. Nothing here changes the model's code.
"""

from __future__ import annotations

import torch
from torch import nn

from omnilong.config import Family, LossParams
from omnilong.loss.head import ChunkedLMHeadLoss
from omnilong.train.batches import MicroBatch


def document_positions(doc_lens: list[list[int]], seq_len: int) -> torch.Tensor:
    """[B, L] positions restarting at 0 for each document and for the padding after them."""
    rows = []
    for lens in doc_lens:
        pieces = [torch.arange(n) for n in lens]
        pieces.append(torch.arange(seq_len - sum(lens)))
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


def language_model_positions(family: Family, position_ids: torch.Tensor, doc_lens: list[list[int]]) -> torch.Tensor:
    """Position ids in the form each family's decoder reads packed rows from.

    Qwen2.5-VL takes [4, B, L]: row 0 the per-document text positions, from which transformers
    builds the block-diagonal (no cross-document) mask, then the three mRoPE rows. Text rows
    are packed 1-D ([B, L]); their mRoPE rows are those positions repeated. LLaVA-OneVision's
    Qwen2 decoder takes [B, L] and finds the documents from where the positions restart.
    """
    if family == "llava_onevision":
        return position_ids
    text = document_positions(doc_lens, position_ids.shape[-1]).to(position_ids.device)
    mrope = position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), mrope])


def model_inputs(batch: MicroBatch, family: Family) -> dict[str, torch.Tensor]:
    """The keyword arguments of `TrainingModule` for a micro-batch of whole (unsharded) rows."""
    positions = language_model_positions(family, batch.position_ids, batch.doc_lens)
    return {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": positions, **batch.videos}


class TrainingModule(nn.Module):
    def __init__(self, model: nn.Module, family: Family, loss: LossParams):
        super().__init__()
        self.model = model
        self.family = family
        self.loss_head = ChunkedLMHeadLoss(model.lm_head, loss)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L_local]
        labels: torch.Tensor,  # [B, L_local], already shifted
        position_ids: torch.Tensor,
        **multimodal: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss summed over this rank's valid tokens, their count)."""
        # The decoder without the LM head; under LoRA, that of the model PEFT wraps.
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden_BLH = model.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **multimodal
        ).last_hidden_state
        return self.loss_head(hidden_BLH.flatten(0, 1), labels.flatten())
