"""What a packed stage holds, in a few lines: printed by `omnilong data pack` and at the end of the pipeline."""

from __future__ import annotations

from pathlib import Path

from omnilong.config import StageParams
from omnilong.data.mixture import combined
from omnilong.data.pack import packed_set_dirs
from omnilong.data.shards import MixtureDraw, read_index


def stage_mixture(stage_dir: Path, stage_params: StageParams) -> MixtureDraw | None:
    """The mixture drawn for all the stage's lengths together (None without a mixture)."""
    draws = [read_index(directory).mixture for directory in packed_set_dirs(stage_dir, stage_params).values()]
    return None if draws[0] is None else combined(draws)


def describe_packed_stage(stage_dir: Path, stage_params: StageParams, shown_as: Path | str) -> list[str]:
    stats = read_index(stage_dir).stats
    total = stats.real_tokens + stats.padding_tokens
    lines = [
        f"  {shown_as}: {stats.documents} documents, {stats.real_tokens:,} tokens "
        f"({stats.trainable_tokens:,} trained on), padding {stats.padding_tokens / total:.1%}"
    ]
    for packed, directory in list(packed_set_dirs(stage_dir, stage_params).items())[1:]:
        scheduled = read_index(directory)
        frames = f", frames {packed.video_frames.name}" if packed.video_frames else ""
        lines.append(f"    {directory.name} (seq_len {packed.seq_len}{frames}): {scheduled.num_rows} rows, "
                     f"{scheduled.stats.documents} documents")
    mixture = stage_mixture(stage_dir, stage_params)
    if mixture is None:
        return lines
    lengths = len(stage_params.packed_lengths)
    drawn = sum(record.tokens for record in mixture.corpora.values())
    upsampling = mixture.long_documents
    lines.append(
        f"    mixture: {drawn:,} tokens drawn for the {mixture.tokens_read:,} the steps read"
        + (f" (over {lengths} lengths)" if lengths > 1 else "")
        + ("" if upsampling is None else
           f", documents of {upsampling['min_tokens']:,}+ tokens weighing x{upsampling['factor']:g}")
    )
    for corpus, record in mixture.corpora.items():
        by_length = ", ".join(f"{bucket} {tokens:,}" for bucket, tokens in record.tokens_by_length.items())
        long_share = "" if record.long_tokens is None else (
            f", long documents {record.long_tokens / max(record.tokens, 1):.1%} of it "
            f"({record.training_long_tokens / max(record.training_tokens, 1):.1%} of the corpus)"
        )
        lines.append(
            f"      {corpus}: {record.share:.1%} (weight {record.weight:.1%}), {record.tokens:,} tokens in "
            f"{record.documents:,} documents, {record.repeated_documents:,} repeated{long_share}; by length {by_length}"
        )
    return lines
