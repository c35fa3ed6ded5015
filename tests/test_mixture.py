"""The stage-1 mixture: per-corpus shares of the tokens a stage reads, drawn from hand-made token
documents of four corpora (no tokenizer: the packer works on token ids)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from omnilong.config import ConfigError, Params, parse_params
from omnilong.data.pack import PackError, heldout_dir, packed_set_dirs, pack_stage
from omnilong.data.pack_inputs import INPUTS_FILE
from omnilong.data.packed_summary import describe_packed_stage, stage_mixture
from omnilong.data.prepare import DocumentEntry, TokenizedDocument
from omnilong.data.shards import PackedShards
from omnilong.train.row_order import RowOrder
from tests.test_pack import hand_documents, hand_params, write_hand_stage

WEIGHTS = {"code": 0.3, "papers": 0.2, "web": 0.3, "books": 0.2}
# (corpus, documents, shortest, longest): papers holds ~12K tokens, less than its 0.2 of the ~164K read.
CORPORA = [("code", 1000, 20, 300), ("papers", 80, 50, 250), ("web", 1000, 20, 300), ("books", 500, 100, 900)]
SCHEDULE = [{"from_step": 0, "seq_len": 256}, {"from_step": 80, "seq_len": 512}]


def corpus_documents(corpora: list[tuple[str, int, int, int]], seed: int = 0) -> list[TokenizedDocument]:
    """`count` documents of random tokens for each (corpus, count, shortest, longest), lengths uniform."""
    rng = np.random.default_rng(seed)
    documents = []
    for corpus, count, shortest, longest in corpora:
        for _ in range(count):
            length = int(rng.integers(shortest, longest + 1))
            documents.append(TokenizedDocument(
                DocumentEntry(id=f"doc{len(documents)}", corpus=corpus),
                rng.integers(1, 1000, size=length).astype(np.int32), np.ones(length, dtype=bool),
            ))
    return documents


def mixture_params(tmp_path: Path, *, seed: int = 1234, schedule=SCHEDULE, seq_len: int = 512, max_steps: int = 200,
                   weights=WEIGHTS, long_documents=None) -> Params:
    raw = hand_params(tmp_path, seq_len=seq_len).model_dump(mode="json")
    raw["seed"] = seed
    raw["stages"]["stage1"].update(
        corpora=list(weights), mixture=weights, long_documents=long_documents, context_schedule=schedule,
        train={**raw["stages"]["stage1"]["train"], "max_steps": max_steps},
    )
    return parse_params(raw)


def packed_corpus_tokens(shard_set: Path, corpus_of: list[str]) -> tuple[Counter, Counter]:
    """Tokens per corpus in a shard set's rows, and how often each document starts in them."""
    tokens, starts = Counter(), Counter()
    index = json.loads((shard_set / "index.json").read_text())
    for shard in index["shards"]:
        arrays = {name: np.load(shard_set / "shards" / shard["name"] / f"{name}.npy")
                  for name in ("doc_lens", "doc_index", "doc_start")}
        for length, doc, start in zip(arrays["doc_lens"], arrays["doc_index"], arrays["doc_start"]):
            tokens[corpus_of[doc]] += int(length)
            starts[int(doc)] += int(start == 0)
    return tokens, starts


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The four corpora packed once with the mixture: (params, documents)."""
    tmp_path = tmp_path_factory.mktemp("mixture")
    params = mixture_params(tmp_path)
    documents = corpus_documents(CORPORA)
    write_hand_stage(params, "stage1", documents)
    pack_stage(params, "stage1")
    return params, documents


def test_each_corpus_gets_its_weight_within_a_point_and_only_the_short_one_repeats(mixed):
    params, documents = mixed
    stage = params.stages.stage1
    stage_dir = Path(params.data.packed_dir) / "stage1"
    corpus_of = [d.entry.corpus for d in documents]
    longest = {corpus: longest for corpus, _, _, longest in CORPORA}
    tokens_read = stage.tokens_read(dp_size=2)
    assert tokens_read == {256: 80 * 256 * 2, 512: 120 * 512 * 2}

    [heldout] = PackedShards(stage_dir).index.heldout_split.documents
    starts_over_lengths = Counter()
    for (seq_len, _), shard_set in packed_set_dirs(stage_dir, stage).items():
        draw = PackedShards(shard_set).index.mixture
        assert draw.tokens_read == tokens_read[seq_len]
        tokens, starts = packed_corpus_tokens(shard_set, corpus_of)
        starts_over_lengths.update(starts)
        for corpus, weight in WEIGHTS.items():
            record = draw.corpora[corpus]
            assert record.tokens == tokens[corpus]  # the record is what the rows hold
            # Within one document of the weight's share of the tokens this length's phases read.
            assert abs(record.tokens - weight * tokens_read[seq_len]) < longest[corpus]
            assert sum(record.tokens_by_length.values()) == record.tokens
    assert heldout not in starts_over_lengths

    mixture = stage_mixture(stage_dir, stage)
    total = sum(tokens_read.values())
    assert mixture.tokens_read == total
    for corpus, weight in WEIGHTS.items():
        record = mixture.corpora[corpus]
        assert record.weight == weight
        assert abs(record.share - weight) < 0.01, (corpus, record.share)
        assert 0 <= record.tokens - weight * total < longest[corpus]
    # A corpus repeats only when its weight asks for more than it has: papers (~12K tokens for ~33K).
    papers = mixture.corpora["papers"]
    assert papers.training_tokens < 0.2 * total
    assert papers.repeated_documents > 0 and papers.repeated_tokens == papers.tokens - papers.training_tokens
    for corpus in ("code", "web", "books"):
        assert mixture.corpora[corpus].repeated_documents == 0
        assert all(starts_over_lengths[doc] == 1 for doc, c in enumerate(corpus_of)
                   if c == corpus and doc in starts_over_lengths)
    assert max(starts_over_lengths[doc] for doc, c in enumerate(corpus_of) if c == "papers") == 3

    summary = "\n".join(describe_packed_stage(stage_dir, stage, "packed/stage1"))
    assert f"{sum(r.tokens for r in mixture.corpora.values()):,} tokens drawn for the {total:,}" in summary
    assert f"papers: {papers.share:.1%} (weight 20.0%)" in summary
    assert f"{papers.repeated_documents:,} repeated" in summary


def test_every_row_of_a_mixture_is_read_at_most_once(mixed):
    params, _ = mixed
    stage = params.stages.stage1
    datasets = {packed: PackedShards(d) for packed, d in packed_set_dirs(Path(params.data.packed_dir) / "stage1",
                                                                          stage).items()}
    order = RowOrder({packed: len(d) for packed, d in datasets.items()}, stage.packed_set_at,
                     stage.micro_batch_size_at, num_steps=stage.train.max_steps, grad_accum_steps=1, dp_size=2,
                     seed=params.seed)
    read = Counter()
    for step in range(stage.train.max_steps):
        packed = stage.packed_set_at(step)
        for dp_rank in range(2):
            for position in order.positions(step, 0, dp_rank):
                assert position < len(datasets[packed])  # still the first epoch
                read[packed, order.row_at(packed, position)] += 1
    assert set(read.values()) == {1}


def test_the_draw_is_fixed_by_the_seed(mixed, tmp_path):
    params, documents = mixed
    packed = Path(params.data.packed_dir) / "stage1"

    def files(directory: Path) -> dict[Path, bytes]:
        """The packed files (the record of the inputs names each project's own paths)."""
        return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
                if p.is_file() and p.name != INPUTS_FILE}

    def drawn(directory: Path) -> Counter:
        """How often each document starts in the rows at seq_len."""
        return packed_corpus_tokens(directory, [d.entry.corpus for d in documents])[1]

    again = mixture_params(tmp_path / "same", seed=params.seed)
    write_hand_stage(again, "stage1", documents)
    pack_stage(again, "stage1")
    assert files(Path(again.data.packed_dir) / "stage1") == files(packed)
    other = mixture_params(tmp_path / "other", seed=params.seed + 1)
    write_hand_stage(other, "stage1", documents)
    pack_stage(other, "stage1")
    assert drawn(Path(other.data.packed_dir) / "stage1") != drawn(packed)


def test_long_document_upsampling_raises_the_long_share_and_keeps_the_weights(tmp_path):
    # 5% of each corpus's documents are long (1100-1500 tokens): ~38% of its tokens. Half of it is drawn.
    documents = corpus_documents([("a", 1425, 20, 200), ("b", 1425, 20, 200), ("a", 75, 1100, 1500),
                                  ("b", 75, 1100, 1500)])
    upsampled = {"min_tokens": 1100, "factor": 8}
    long_shares = {}
    for long_documents in (None, upsampled):
        params = mixture_params(tmp_path / str(bool(long_documents)), schedule=[], seq_len=2048, max_steps=60,
                                weights={"a": 0.5, "b": 0.5}, long_documents=long_documents)
        write_hand_stage(params, "stage1", documents)
        pack_stage(params, "stage1")
        mixture = stage_mixture(Path(params.data.packed_dir) / "stage1", params.stages.stage1)
        for record in mixture.corpora.values():
            assert abs(record.share - 0.5) < 0.01
            assert record.repeated_documents == 0
        long_tokens = {corpus: sum(tokens for bucket, tokens in record.tokens_by_length.items() if bucket != "0-1K")
                       for corpus, record in mixture.corpora.items()}
        long_shares[bool(long_documents)] = {c: long_tokens[c] / r.tokens for c, r in mixture.corpora.items()}
        if long_documents:
            assert mixture.long_documents == upsampled
            assert all(r.long_tokens == long_tokens[c] for c, r in mixture.corpora.items())
            corpus_share = {c: r.training_long_tokens / r.training_tokens for c, r in mixture.corpora.items()}
    for corpus in ("a", "b"):
        assert abs(long_shares[False][corpus] - corpus_share[corpus]) < 0.1  # a plain draw: the corpus's own share
        assert long_shares[True][corpus] > long_shares[False][corpus] + 0.2


def test_a_mixed_corpus_without_training_documents_is_refused_by_name(tmp_path):
    params = mixture_params(tmp_path)
    write_hand_stage(params, "stage1", corpus_documents([("code", 50, 20, 300), ("web", 50, 20, 300),
                                                         ("books", 50, 20, 300)]))
    with pytest.raises(PackError, match="stages.stage1.mixture: corpus 'papers' has no training document"):
        pack_stage(params, "stage1")


def test_a_phase_that_never_trains_is_refused_with_a_mixture(tmp_path):
    schedule = [{"from_step": 0, "seq_len": 256}, {"from_step": 80, "seq_len": 384}, {"from_step": 200, "seq_len": 512}]
    with pytest.raises(ConfigError, match=r"stages.stage1.context_schedule.2.from_step: expected below "
                                          r"train.max_steps \(200\)"):
        mixture_params(tmp_path, schedule=schedule)


# Shard-file checksums the packer wrote before the mixture existed (commit 7e9acda), for the input of
# `test_without_a_mixture_every_training_token_is_packed_as_before`: (shard set, shard, file) -> CRC-32.
BEFORE_MIXTURE: dict[tuple[str, str, str], str] = {
    ('heldout', '00000', 'doc_index.npy'): '66e7116a',
    ('heldout', '00000', 'doc_lens.npy'): '1b7f8b38',
    ('heldout', '00000', 'doc_offsets.npy'): 'a99d77cb',
    ('heldout', '00000', 'doc_start.npy'): '8b4b3cc4',
    ('heldout', '00000', 'input_ids.npy'): 'dfcb5149',
    ('heldout', '00000', 'labels.npy'): '35a2d391',
    ('heldout', '00000', 'position_ids.npy'): '0abf8095',
    ('len32', '00000', 'doc_index.npy'): '4c61d8dd',
    ('len32', '00000', 'doc_lens.npy'): '3236acad',
    ('len32', '00000', 'doc_offsets.npy'): 'e48c29bc',
    ('len32', '00000', 'doc_start.npy'): 'ad4c3796',
    ('len32', '00000', 'input_ids.npy'): '8c703476',
    ('len32', '00000', 'labels.npy'): '0b0c654a',
    ('len32', '00000', 'position_ids.npy'): '528db453',
    ('stage', '00000', 'doc_index.npy'): '21c19f6d',
    ('stage', '00000', 'doc_lens.npy'): '8909d5f6',
    ('stage', '00000', 'doc_offsets.npy'): '40751383',
    ('stage', '00000', 'doc_start.npy'): 'dd79d7e4',
    ('stage', '00000', 'input_ids.npy'): 'f7e9c167',
    ('stage', '00000', 'labels.npy'): '2939a0a8',
    ('stage', '00000', 'position_ids.npy'): '63b6b08e',
}


def test_without_a_mixture_every_training_token_is_packed_as_before(tmp_path):
    raw = hand_params(tmp_path, seq_len=64).model_dump(mode="json")
    raw["stages"]["stage1"]["context_schedule"] = [{"from_step": 0, "seq_len": 32}, {"from_step": 4, "seq_len": 64}]
    params = parse_params(raw)
    documents = hand_documents([int(n) for n in np.arange(1, 200, 7)])
    write_hand_stage(params, "stage1", documents)
    pack_stage(params, "stage1")

    stage_dir = Path(params.data.packed_dir) / "stage1"
    [heldout] = PackedShards(stage_dir).index.heldout_split.documents
    training_tokens = sum(len(d.token_ids) for i, d in enumerate(documents) if i != heldout)
    checksums = {}
    shard_sets = {"len32": stage_dir / "len32", "stage": stage_dir, "heldout": heldout_dir(stage_dir)}
    for name, shard_set in shard_sets.items():
        index = PackedShards(shard_set).index
        assert index.mixture is None
        if name != "heldout":
            assert index.stats.real_tokens == training_tokens
        checksums.update({(name, shard.name, file): checksum.crc32
                          for shard in index.shards for file, checksum in shard.files.items()})
    assert checksums == BEFORE_MIXTURE


def test_a_format_3_index_reads_as_one_without_a_mixture(tmp_path):
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([10, 20, 30]))
    pack_stage(params, "stage1")
    index_path = Path(params.data.packed_dir) / "stage1" / "index.json"
    index = json.loads(index_path.read_text())
    assert index["format_version"] == 4
    del index["mixture"]
    index_path.write_text(json.dumps({**index, "format_version": 3}))
    assert PackedShards(index_path.parent).index.mixture is None


def test_the_mixture_is_logged_to_mlflow(mixed, tmp_path):
    from mlflow import MlflowClient

    from omnilong.train.step_log import log_packed_mixture

    params, _ = mixed
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("mixture", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    stage_dir = Path(params.data.packed_dir) / "stage1"
    log_packed_mixture(client, run_id, stage_dir, params.stages.stage1)

    mixture = stage_mixture(stage_dir, params.stages.stage1)
    metrics = client.get_run(run_id).data.metrics
    for corpus, record in mixture.corpora.items():
        assert metrics[f"mixture/{corpus}/weight"] == record.weight
        assert metrics[f"mixture/{corpus}/share"] == pytest.approx(record.share)
        assert metrics[f"mixture/{corpus}/tokens"] == record.tokens
        assert metrics[f"mixture/{corpus}/repeated_tokens"] == record.repeated_tokens
        for bucket, tokens in record.tokens_by_length.items():
            assert metrics[f"mixture/{corpus}/tokens_{bucket}"] == tokens
    logged = json.loads((tmp_path / "artifacts" / run_id / "artifacts" / "packed_mixture.json").read_text())
    assert logged == mixture.model_dump(mode="json")

