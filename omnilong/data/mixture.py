"""The stage-1 data mixture: which training documents fill the tokens a stage reads, corpus by corpus.

With `stages.<stage>.mixture` set, the packer does not pack every training document once: it
draws documents until each corpus has its weight's share of the tokens the stage's steps read
(`StageParams.tokens_read`: each phase's steps x tokens per step). Each packed length gets the
tokens of the phases that read it, so every row of a length is read at most once: the draw fills
the tokens read with real tokens, and packing adds padding, so each length holds a few more rows
than its phases read (the remainder of its one epoch, `omnilong/train/row_order.py`).

Each corpus is one stream of its training documents, pass after pass, each pass an order drawn
with `seed`; the lengths take from the streams in turn, so a document comes back only once its
corpus is used up: a corpus repeats only when its weight asks for more tokens than it has. A
corpus's tokens overshoot its target by less than one document, and the next length's target
counts from what the previous ones took, so the overshoot does not add up over lengths.

Long-document upsampling (`stages.<stage>.long_documents`, after Fu et al. 2024) orders each pass
by weighted sampling without replacement (Efraimidis-Spirakis: key u^(1/w), largest first), a
document of at least `min_tokens` weighing `factor`, any other 1: long documents come early in
every pass, so a corpus drawn below its size gives them more of its tokens, and its weight is kept.
The longest length draws first: the documents upsampling favours go to the longest contexts
rather than being cut into pieces for a short one.
"""

from __future__ import annotations

import bisect
from collections import Counter

import numpy as np

from omnilong.config import StageName, StageParams
from omnilong.data.prepare import TokenizedStage
from omnilong.data.shards import CorpusDraw, MixtureDraw

# Document lengths, in tokens, that bound the buckets reported per corpus.
LENGTH_EDGES = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20)
LENGTH_BUCKETS = ("0-1K", "1K-4K", "4K-16K", "16K-64K", "64K-256K", "256K-1M", "1M-inf")


class MixtureError(ValueError):
    """A mixture the tokenized stage cannot serve; the message says what to change."""


def length_bucket(length: int) -> str:
    return LENGTH_BUCKETS[bisect.bisect_right(LENGTH_EDGES, length)]


class _CorpusStream:
    """A corpus's training documents, pass after pass, each pass in its own seeded order."""

    def __init__(self, documents: np.ndarray, weights: np.ndarray, seed: list[int]):
        self.documents, self.weights, self.seed = documents, weights, seed
        self.passes, self.order = 0, np.empty(0, dtype=np.int64)
        self.cursor = 0

    def draw(self) -> tuple[int, bool]:
        """The next document and whether the stage drew it before (the stream is in a second pass or later)."""
        if self.cursor == len(self.order):
            keys = np.log(np.random.default_rng([*self.seed, self.passes]).random(len(self.documents))) / self.weights
            self.order = self.documents[np.argsort(-keys, kind="stable")]
            self.passes, self.cursor = self.passes + 1, 0
        self.cursor += 1
        return int(self.order[self.cursor - 1]), self.passes > 1


def draw_mixture(
    tokenized: TokenizedStage, training: list[int], stage_params: StageParams, dp_size: int, seed: int,
    stage: StageName,
) -> dict[int, tuple[list[int], MixtureDraw]]:
    """Per packed length: the training documents drawn for it (numbers in `tokenized`, a repeated
    one listed each time) and the record of the draw."""
    assert stage_params.mixture is not None
    lengths = tokenized.doc_lengths
    corpus_of = np.asarray([entry.corpus for entry in tokenized.index.documents])
    training_array = np.asarray(training, dtype=np.int64)
    upsampling = stage_params.long_documents
    streams, corpus_documents = {}, {}
    for corpus_no, corpus in enumerate(sorted(stage_params.mixture)):
        documents = training_array[corpus_of[training_array] == corpus]
        if not len(documents):
            raise MixtureError(
                f"stages.{stage}.mixture: corpus {corpus!r} has no training document in the tokenized stage "
                f"(run `omnilong data prepare` after changing stages.{stage}.corpora, or lower "
                f"eval.heldout_documents)"
            )
        weights = np.ones(len(documents))
        if upsampling is not None:
            weights[lengths[documents] >= upsampling.min_tokens] = upsampling.factor
        streams[corpus] = _CorpusStream(documents, weights, [seed, corpus_no])
        corpus_documents[corpus] = documents

    tokens_read = stage_params.tokens_read(dp_size)
    taken = dict.fromkeys(streams, 0)
    budget = 0
    draws = {}
    for seq_len in sorted(tokens_read, reverse=True):
        budget += tokens_read[seq_len]
        drawn: list[int] = []
        corpora = {}
        for corpus, stream in streams.items():
            first, repeated = [], []
            while taken[corpus] < stage_params.mixture[corpus] * budget:
                doc, again = stream.draw()
                (repeated if again else first).append(doc)
                taken[corpus] += int(lengths[doc])
            drawn += first + repeated
            corpora[corpus] = _corpus_record(first, repeated, corpus_documents[corpus], lengths, stage_params, corpus)
        drawn_tokens = sum(record.tokens for record in corpora.values())
        corpora = {
            corpus: record.model_copy(update={"share": record.tokens / drawn_tokens if drawn_tokens else 0.0})
            for corpus, record in corpora.items()
        }
        draws[seq_len] = drawn, MixtureDraw(
            tokens_read=tokens_read[seq_len],
            long_documents=None if upsampling is None else upsampling.model_dump(),
            corpora=corpora,
        )
    return draws


def _corpus_record(
    first: list[int], repeated: list[int], training: np.ndarray, lengths: np.ndarray, stage_params: StageParams,
    corpus: str,
) -> CorpusDraw:
    """`first`: the documents drawn for the first time in the stage; `repeated`: those drawn again."""
    picked_lengths = lengths[np.asarray(first + repeated, dtype=np.int64)]
    by_length = Counter()
    for length in picked_lengths.tolist():
        by_length[length_bucket(length)] += length
    upsampling = stage_params.long_documents
    long_tokens = training_long = None
    if upsampling is not None:
        long_tokens = int(picked_lengths[picked_lengths >= upsampling.min_tokens].sum())
        training_lengths = lengths[training]
        training_long = int(training_lengths[training_lengths >= upsampling.min_tokens].sum())
    return CorpusDraw(
        weight=stage_params.mixture[corpus],
        share=0.0,  # known once every corpus is drawn
        tokens=int(picked_lengths.sum()),
        documents=len(first) + len(repeated),
        repeated_documents=len(repeated),
        repeated_tokens=int(lengths[np.asarray(repeated, dtype=np.int64)].sum()),
        training_tokens=int(lengths[training].sum()),
        training_documents=len(training),
        tokens_by_length={bucket: by_length[bucket] for bucket in LENGTH_BUCKETS if by_length[bucket]},
        long_tokens=long_tokens,
        training_long_tokens=training_long,
    )


def combined(draws: list[MixtureDraw]) -> MixtureDraw:
    """The draws of a stage's lengths as one: what the whole stage reads."""
    corpora = {}
    for corpus in draws[0].corpora:
        records = [draw.corpora[corpus] for draw in draws]

        def total(field: str, records=records) -> int | None:
            values = [getattr(record, field) for record in records]
            return None if values[0] is None else sum(values)

        by_length = Counter()
        for record in records:
            by_length.update(record.tokens_by_length)
        corpora[corpus] = records[0].model_copy(update={
            "tokens": total("tokens"), "documents": total("documents"),
            "repeated_documents": total("repeated_documents"), "repeated_tokens": total("repeated_tokens"),
            "tokens_by_length": {bucket: by_length[bucket] for bucket in LENGTH_BUCKETS if by_length[bucket]},
            "long_tokens": total("long_tokens"),
        })
    drawn = sum(record.tokens for record in corpora.values())
    return MixtureDraw(
        tokens_read=sum(draw.tokens_read for draw in draws),
        long_documents=draws[0].long_documents,
        corpora={corpus: record.model_copy(update={"share": record.tokens / drawn if drawn else 0.0})
                 for corpus, record in corpora.items()},
    )


def mixture_metrics(draw: MixtureDraw) -> dict[str, float]:
    """The draw as MLflow metrics: `mixture/<corpus>/<what>`."""
    metrics: dict[str, float] = {"mixture/tokens_read": draw.tokens_read}
    for corpus, record in draw.corpora.items():
        prefix = f"mixture/{corpus}"
        metrics.update({
            f"{prefix}/weight": record.weight, f"{prefix}/share": record.share, f"{prefix}/tokens": record.tokens,
            f"{prefix}/repeated_tokens": record.repeated_tokens,
            **{f"{prefix}/tokens_{bucket}": tokens for bucket, tokens in record.tokens_by_length.items()},
        })
        if record.long_tokens is not None:
            metrics[f"{prefix}/long_share"] = record.long_tokens / record.tokens if record.tokens else 0.0
    return metrics
