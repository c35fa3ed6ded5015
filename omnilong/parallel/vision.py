"""Sharded vision encoding: a sequence-parallel group splits a batch's frames, then shares the embeddings.

After LongVILA's multi-modal sequence parallelism. With P ranks sharing a sequence:

1. `split_frames` (data side, in the data loader) splits the batch's vision units (whole
   temporal patches or frames, `VideoSpan`) into P contiguous ranges with about equal token
   counts, from the videos' metadata; rank r decodes and preprocesses the frames of range r only.
2. `VideoShard.embed` (inside the model's forward) encodes the rank's range once, all-gathers
   every rank's embeddings (`gather_video_tokens`: its backward is a reduce-scatter, so each
   rank receives the summed gradient, over all ranks, of its own frames' embeddings) and writes
   into this rank's token embeddings the video embeddings of the placeholders that fall in its
   zigzag shard of the row.

The embeddings and gradients are exactly those of unsharded encoding (tests/test_vision_sharding.py).
With P = 1 the same code runs with no communication. Every rank calls the vision tower exactly
once per micro-batch, as ZeRO-3's parameter gathering requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from omnilong.config import Family, VideoTokenParams
from omnilong.models.video_encoders import encode_units, trailing_embedding
from omnilong.models.video_inputs import VideoSpan
from omnilong.torch_compat import all_gather_single, reduce_scatter_single

NOT_VIDEO = -1


def split_units(tokens_per_unit: list[int], parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous, non-empty [start, end) ranges of the units with about equal tokens.

    Range r takes at least one unit, then more while the running token count stays within
    (r + 1) / parts of the total and enough units are left for the later ranges.
    """
    num_units = len(tokens_per_unit)
    if num_units < parts:
        raise ValueError(f"expected at least {parts} vision units to split {parts} ways, given {num_units}")
    total = sum(tokens_per_unit)
    bounds, running, unit = [0], 0, 0
    for part in range(1, parts):
        running, unit = running + tokens_per_unit[unit], unit + 1
        while unit < num_units - (parts - part) and running + tokens_per_unit[unit] <= total * part / parts:
            running, unit = running + tokens_per_unit[unit], unit + 1
        bounds.append(unit)
    bounds.append(num_units)
    return list(zip(bounds[:-1], bounds[1:]))


class _GatherVideoTokens(torch.autograd.Function):
    """All-gather of [n_r, hidden] per rank (n_r may differ) -> [sum n_r, hidden] in rank order.

    Backward: every rank holds the gradient of the whole gathered tensor from its own part of
    the sequence; a reduce-scatter sums them over ranks and returns each rank its own rows.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.counts, ctx.group, ctx.rank = counts, group, dist.get_rank(group)
        padded = _pad_rows(local, max(counts))
        gathered = torch.empty((len(counts) * padded.shape[0], *padded.shape[1:]), dtype=local.dtype, device=local.device)
        all_gather_single(gathered, padded.contiguous(), group=group)
        return torch.cat([gathered[r * padded.shape[0] : r * padded.shape[0] + n] for r, n in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        longest = max(ctx.counts)
        per_rank = torch.split(grad, ctx.counts)
        stacked = torch.cat([_pad_rows(part, longest) for part in per_rank]).contiguous()
        mine = torch.empty((longest, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        reduce_scatter_single(mine, stacked, group=ctx.group)
        return mine[: ctx.counts[ctx.rank]], None, None


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def gather_video_tokens(local: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable all-gather of each rank's video embeddings (counts[r] rows from rank r)."""
    if len(counts) == 1:
        return local
    return _GatherVideoTokens.apply(local, counts, group)


@dataclass(frozen=True)
class FrameSplit:
    """Which units of a batch's videos one rank encodes."""

    unit_ranges: list[tuple[int, int, int]]
    """(video, first unit, end unit) of each run of units this rank encodes, in batch order."""
    tokens_per_rank: list[int]
    """Embeddings each rank's units give, in rank order; one entry when every rank encodes all."""


def split_frames(videos: list[VideoSpan], parts: int = 1, rank: int = 0) -> FrameSplit:
    """Rank `rank`'s share of the units of `videos` (a batch's, in placeholder order) among `parts`.

    Fewer units than ranks: every rank encodes all of them (still exact; nothing is gathered).
    """
    units = [(video, unit) for video, span in enumerate(videos) for unit in range(span.num_units)]
    if len(units) < parts or parts == 1:
        return FrameSplit([(v, 0, span.num_units) for v, span in enumerate(videos)],
                          [sum(span.num_units * span.tokens_per_unit for span in videos)])
    ranges = split_units([videos[v].tokens_per_unit for v, _ in units], parts)
    start, end = ranges[rank]
    unit_ranges = []
    for video, span in enumerate(videos):
        first = sum(other.num_units for other in videos[:video])
        lo, hi = max(start, first), min(end, first + span.num_units)
        if lo < hi:
            unit_ranges.append((video, lo - first, hi - first))
    tokens_per_rank = [sum(videos[units[i][0]].tokens_per_unit for i in range(a, b)) for a, b in ranges]
    return FrameSplit(unit_ranges, tokens_per_rank)


def video_sources(input_ids: torch.Tensor, video_token_id: int, videos: list[VideoSpan]) -> torch.Tensor:
    """[B, L]: for each video placeholder of the whole rows, its row in the gathered video
    embeddings followed by the trailing embedding (LLaVA-OneVision's newline, at the index just
    past the units' embeddings); NOT_VIDEO elsewhere."""
    is_video = input_ids == video_token_id
    expected = sum(span.num_tokens for span in videos)
    if int(is_video.sum()) != expected:
        raise ValueError(
            f"input_ids: {int(is_video.sum())} video placeholders, but the batch's {len(videos)} videos "
            f"give {expected} embeddings"
        )
    unit_tokens = sum(span.num_units * span.tokens_per_unit for span in videos)
    sources, offset = [], 0
    for span in videos:
        sources.append(torch.arange(offset, offset + span.num_units * span.tokens_per_unit))
        sources.append(torch.full((span.trailing_tokens,), unit_tokens))
        offset += span.num_units * span.tokens_per_unit
    source = torch.full(input_ids.shape, NOT_VIDEO, dtype=torch.long)
    source[is_video] = torch.cat(sources) if sources else torch.empty(0, dtype=torch.long)
    return source


@dataclass
class VideoShard:
    """What one rank needs to build its shard's input embeddings for a micro-batch with videos."""

    pieces: list[dict[str, torch.Tensor]]
    """`preprocess_video` outputs of this rank's runs of units (only its own pixels)."""
    tokens_per_rank: list[int]
    """Embeddings each rank's pieces give, in rank order; one entry when not gathered."""
    source: torch.Tensor
    """[B, L_local] `video_sources` of this rank's tokens."""
    group: dist.ProcessGroup | None = None
    """The sequence-parallel group to gather over (None: the default group) when `tokens_per_rank`
    has an entry per rank."""

    def to(self, device: torch.device) -> VideoShard:
        pieces = [{key: value.to(device) for key, value in piece.items()} for piece in self.pieces]
        return VideoShard(pieces, self.tokens_per_rank, self.source.to(device), self.group)

    def embed(self, model: nn.Module, family: Family, video: VideoTokenParams, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L_local, hidden] input embeddings of this rank's tokens, videos merged in."""
        token_embeds = model.get_input_embeddings()(input_ids)
        local = encode_units(model, family, video, self.pieces)
        if local.shape[0] != self.tokens_per_rank[dist.get_rank(self.group) if len(self.tokens_per_rank) > 1 else 0]:
            raise ValueError(
                f"the vision encoder gave {local.shape[0]} embeddings for this rank's frames, the split "
                f"planned {self.tokens_per_rank}"
            )
        videos = gather_video_tokens(local, self.tokens_per_rank, self.group)
        return merge_video_embeddings(model, family, token_embeds, self.source, videos)


def merge_video_embeddings(model: nn.Module, family: Family, token_embeds: torch.Tensor, source: torch.Tensor,
                           unit_embeds: torch.Tensor) -> torch.Tensor:
    """`token_embeds` [B, L, hidden] with each video placeholder replaced by its row of the units'
    embeddings `unit_embeds` followed by the family's trailing embedding, as `source` [B, L]
    (`video_sources`) maps them."""
    trailing = trailing_embedding(model, family)
    videos = unit_embeds if trailing is None else torch.cat([unit_embeds, trailing.to(unit_embeds.dtype)])
    is_video = source != NOT_VIDEO
    return token_embeds.masked_scatter(is_video[..., None], videos[source[is_video]].to(token_embeds.dtype))
