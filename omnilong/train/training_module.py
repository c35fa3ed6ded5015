"""The module DeepSpeed trains: a model family's language model and its LM-head loss, composed.

The model's own forward would materialise [tokens, vocab] logits; instead the decoder's hidden
states go to the loss head (omnilong/loss), which applies the LM head a chunk at a time. The
head is a child of this module, so under ZeRO-3 its partitioned weight is gathered where the
loss runs and its gradient reaches the partition. Nothing here changes the model's code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from omnilong.config import Family, LossParams, VideoTokenParams
from omnilong.loss.head import ChunkedLMHeadLoss
from omnilong.parallel.vision import VideoShard, video_sources
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence
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


def video_shard(batch: MicroBatch, layout: SequenceLayout | None = None, rank: int = 0,
                group: dist.ProcessGroup | None = None) -> VideoShard:
    """The `video` argument of `TrainingModule` for a micro-batch with videos, loaded for
    sequence-parallel rank `rank` of `group` (whole rows: `layout` None)."""
    source = video_sources(batch.input_ids, batch.video_token_id, batch.videos)
    if layout is not None:
        source = shard_sequence(source, layout, rank, dim=1)
    return VideoShard(batch.video_pieces, batch.tokens_per_rank, source, group)


def model_inputs(batch: MicroBatch, family: Family) -> dict:
    """The keyword arguments of `TrainingModule` for a micro-batch of whole (unsharded) rows."""
    positions = language_model_positions(family, batch.position_ids, batch.doc_lens)
    kwargs = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": positions}
    if batch.videos:
        kwargs["video"] = video_shard(batch)
    return kwargs


class TrainingModule(nn.Module):
    def __init__(self, model: nn.Module, family: Family, loss: LossParams, video: VideoTokenParams = VideoTokenParams()):
        super().__init__()
        self.model = model
        self.family = family
        self.video = video
        self.loss_head = ChunkedLMHeadLoss(model.lm_head, loss)

    @property
    def base_model(self) -> nn.Module:
        """The family's model: under LoRA, the one PEFT wraps."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L_local]
        labels: torch.Tensor,  # [B, L_local], already shifted
        position_ids: torch.Tensor,
        video: VideoShard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss summed over this rank's valid tokens, their count)."""
        model = self.base_model
        # Videos are encoded here, not by the model's forward, so a sequence-parallel group can
        # share the frames (omnilong/parallel/vision.py); the decoder gets merged embeddings.
        inputs = {"input_ids": input_ids} if video is None else {"inputs_embeds": video.embed(model, self.family, self.video, input_ids)}
        hidden_BLH = model.model(position_ids=position_ids, use_cache=False, **inputs).last_hidden_state
        return self.loss_head(hidden_BLH.flatten(0, 1), labels.flatten())
