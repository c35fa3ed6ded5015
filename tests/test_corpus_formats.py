"""Corpus formats: JSONL (plain, gzip, zstd), Parquet and `datasets` folders, written by the libraries
themselves, read as the same records; field mappings; errors that name the file and the row."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from omnilong.config import CorpusFields, parse_params
from omnilong.data import readers
from omnilong.data.prepare import PrepareError, load_tokenized, prepare_corpora
from omnilong.data.schemas import InstructRecord, RecordError, TextRecord, iter_records

TEXTS = [{"id": f"doc-{i}", "source": "test", "text": f"Document {i}: caf\u00e9 \u2192 {'long ' * i}end."}
         for i in range(7)]
CHATS = [
    {"id": f"chat-{i}", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{2 * i}."},
    ]}
    for i in range(5)
]
RECORDS = {"text": TEXTS, "instruct": CHATS}
FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"]


def jsonl_bytes(rows: list) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def write(directory: Path, name: str, fmt: str, rows: list[dict]) -> Path:
    """`rows` in `fmt`, in several gzip members, zstd frames, row groups or Arrow files, so that
    reading crosses their boundaries."""
    directory.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    if fmt == "arrow":
        import datasets

        path = directory / name
        datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=2)
        return path
    path = directory / f"{name}.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(jsonl_bytes(rows[:half])) + gzip.compress(jsonl_bytes(rows[half:])))
    elif fmt == "jsonl.zst":
        compressor = zstandard.ZstdCompressor()
        path.write_bytes(compressor.compress(jsonl_bytes(rows[:half])) + compressor.compress(jsonl_bytes(rows[half:])))
    else:
        path.write_bytes(jsonl_bytes(rows))
    return path


@pytest.mark.parametrize("kind", ["text", "instruct"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_records_jsonl_holds(tmp_path, monkeypatch, kind, fmt):
    monkeypatch.setattr(readers, "BATCH_ROWS", 3)  # batches that do not line up with row groups
    expected = list(iter_records(write(tmp_path / "jsonl", "part", "jsonl", RECORDS[kind]), kind))
    assert len(expected) == len(RECORDS[kind])
    assert list(iter_records(write(tmp_path / fmt, "part", fmt, RECORDS[kind]), kind)) == expected


SHAREGPT = CorpusFields(id_field="uid", messages_field="conversations", role_field="from", content_field="value",
                        roles={"human": "user", "gpt": "assistant"})


def sharegpt(chat: dict, uid: int | str) -> dict:
    """A chat in ShareGPT's layout, with a column our records do not have."""
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    turns = [{"from": roles[m["role"]], "value": m["content"]} for m in chat["messages"]]
    return {"uid": uid, "conversations": turns, "lang": "en"}


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl.zst"])
def test_a_field_mapping_reads_a_users_layout_as_our_records(tmp_path, fmt):
    chats = write(tmp_path, "chats", fmt, [sharegpt(chat, i) for i, chat in enumerate(CHATS)])
    expected = [InstructRecord.model_validate({**chat, "id": str(i)}) for i, chat in enumerate(CHATS)]
    assert list(iter_records(chats, "instruct", SHAREGPT)) == expected

    docs = [{"body": doc["text"], "url": f"https://example.org/{i}"} for i, doc in enumerate(TEXTS)]
    papers = write(tmp_path, "papers", fmt, docs)
    fields = CorpusFields(text_field="body", id_field=None, source_field=None)
    expected = [TextRecord(id=f"{papers.name}:{row}", source=papers.name, text=doc["text"])
                for row, doc in enumerate(TEXTS, start=1 if fmt.startswith("jsonl") else 0)]
    assert list(iter_records(papers, "text", fields)) == expected


def test_our_records_are_read_strictly_without_a_mapping(tmp_path):
    path = write(tmp_path, "docs", "parquet", [{**doc, "url": "https://example.org"} for doc in TEXTS])
    with pytest.raises(RecordError, match=rf"{path}: row 0: not a valid text record \(field url: Extra inputs"):
        list(iter_records(path, "text"))


def test_a_row_missing_a_mapped_field_is_named_by_file_and_row(tmp_path):
    docs = [{"body": "one", "id": "a"}, {"body": "two", "id": "b"}, {"body": None, "id": "c"}]
    fields = CorpusFields(text_field="body", source_field=None)
    for fmt, row in [("parquet", "row 2"), ("arrow", "row 2"), ("jsonl.gz", "3")]:
        path = write(tmp_path / fmt, "docs", fmt, docs)
        where = f"{path}: {row}" if fmt in ("parquet", "arrow") else f"{path}:{row}"
        with pytest.raises(RecordError) as error:
            list(iter_records(path, "text", fields))
        assert str(error.value) == (f"{where}: not a valid text record (field body, the mapping's text_field: "
                                    "missing or null)")
    # A turn without the mapped role key, and a role name the mapping does not know.
    chats = [sharegpt(chat, i) for i, chat in enumerate(CHATS[:3])]
    del chats[1]["conversations"][2]["from"]
    path = write(tmp_path, "chats", "parquet", chats)
    with pytest.raises(RecordError, match=rf"{path}: row 1: .*field conversations\.2\.from, the mapping's role_field"):
        list(iter_records(path, "instruct", SHAREGPT))
    chats = [sharegpt(chat, i) for i, chat in enumerate(CHATS[:3])]
    chats[2]["conversations"][1]["from"] = "bot"
    path = write(tmp_path, "chats", "parquet", chats)
    with pytest.raises(RecordError, match=rf"{path}: row 2: not a valid instruct record \(field messages\.1\.role"):
        list(iter_records(path, "instruct", SHAREGPT))


def test_broken_streams_and_bad_bytes_are_named_by_file_and_line(tmp_path):
    good = jsonl_bytes(TEXTS)
    zstd = zstandard.ZstdCompressor()
    cases = {
        # A second member or frame cut inside its compressed data, before its one line ends: the
        # lines before it are read, then the break is named at that line.
        "cut.jsonl.gz": (gzip.compress(good) + gzip.compress(good[:30] + b"\n")[:-12],
                         ":8: the gzip stream is broken here"),
        "cut.jsonl.zst": (zstd.compress(good) + zstd.compress(good[:30] + b"\n")[:-4],
                          ":8: the zstd stream is broken here"),
        "junk.jsonl.zst": (b"not zstd at all\n", ":1: the zstd stream is broken here"),
        "latin1.jsonl.gz": (gzip.compress(good[:good.index(b"\n") + 1] + b'{"text": "caf\xe9"}\n'),
                            ":2: not UTF-8 text"),
        "latin1.jsonl.zst": (zstd.compress(b'{"text": "caf\xe9"}\n'), ":1: not UTF-8 text"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        read = []
        with pytest.raises(RecordError, match=rf"^{path}:\d+: ") as error:
            read.extend(iter_records(path, "text"))
        assert message in str(error.value)
        line = int(str(error.value).removeprefix(f"{path}:").split(":")[0])
        assert len(read) == line - 1  # every line before the named one was read
    bad_parquet = tmp_path / "docs.parquet"
    bad_parquet.write_bytes(b"PAR1 but nothing else")
    with pytest.raises(RecordError, match=rf"{bad_parquet}: not a Parquet file"):
        list(iter_records(bad_parquet, "text"))


def test_a_dataset_dict_folder_asks_for_one_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXTS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError, match=r"a `datasets` DatasetDict \(splits train\); give one split's folder"):
        list(iter_records(tmp_path / "dd", "text"))
    assert list(iter_records(tmp_path / "dd" / "train", "text")) == [TextRecord(**doc) for doc in TEXTS]


def test_prepare_tokenises_a_mapped_corpus_as_the_same_corpus_in_our_jsonl(tmp_path, tiny_model_dir):
    raw = tmp_path / "raw" / "user"
    write(raw / "ours" / "text", "docs", "jsonl", TEXTS)
    write(raw / "ours" / "instruct", "chats", "jsonl", CHATS)
    write(raw / "theirs" / "text", "docs", "parquet",
          [{"uid": d["id"], "origin": d["source"], "body": d["text"]} for d in TEXTS])
    write(raw / "theirs" / "instruct", "chats", "arrow",
          [sharegpt(c, c["id"]) for c in CHATS])
    theirs = {**SHAREGPT.model_dump(), "text_field": "body", "source_field": "origin"}
    written = {}
    for corpus in ("ours", "theirs"):
        stage = {"corpora": [corpus], "seq_len": 64, "sp_size": 1}
        params = parse_params({
            "model": {"family": "qwen2_5_vl", "path": str(tiny_model_dir("qwen2_5_vl"))},
            "data": {"raw_dir": str(tmp_path / "raw"), "tokenized_dir": str(tmp_path / corpus),
                     "fields": {"theirs": theirs} if corpus == "theirs" else {}},
            "stages": {"stage1": stage, "stage2": stage, "stage3": {**stage, "video_frames": {"num_frames": 2}}},
        })
        # Neither corpus holds videos: prepare stops at stage 3, after writing stages 1 and 2.
        with pytest.raises(PrepareError, match="stages.stage3.corpora"):
            prepare_corpora(params)
        written[corpus] = [load_tokenized(tmp_path / corpus / stage) for stage in ("stage1", "stage2")]
    for ours, theirs in zip(written["ours"], written["theirs"]):
        assert ours.index.num_documents > 0
        assert [d.id for d in theirs.index.documents] == [d.id for d in ours.index.documents]
        np.testing.assert_array_equal(theirs.tokens, ours.tokens)
        np.testing.assert_array_equal(theirs.trainable, ours.trainable)


def test_rows_stream_before_a_damaged_arrow_file_is_reached(tmp_path):
    """Rows come a batch at a time: those of the first Arrow file are read before the second,
    cut short, fails, naming the folder and the row it would have started at."""
    folder = write(tmp_path, "docs", "arrow", TEXTS)
    first, second = sorted(folder.glob("*.arrow"))
    second.write_bytes(second.read_bytes()[:-100])
    rows_in_first = sum(batch.num_rows for batch in pa.ipc.open_stream(first.read_bytes()))
    read = []
    with pytest.raises(RecordError, match=rf"^{folder}: row {rows_in_first}: cannot be read"):
        read.extend(iter_records(folder, "text"))
    assert read == [TextRecord(**doc) for doc in TEXTS[:rows_in_first]]
    second.unlink()
    with pytest.raises(RecordError, match=rf"{folder}: {second.name}, named in state.json, is missing"):
        list(iter_records(folder, "text"))


def test_a_video_corpus_asks_its_questions_in_any_format(tmp_path, tiny_model_dir, tiny_raw_dir):
    """The default corpus's video questions, rewritten as a ShareGPT-style Parquet file beside the
    same videos, pass `data add`'s checks and prepare to the same tokens."""
    from omnilong.data.user_corpus import CorpusError, validate_corpus

    qa = tiny_raw_dir / "default" / "video" / "qa.jsonl"
    questions = [json.loads(line) for line in qa.read_text().splitlines()]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "default").symlink_to(tiny_raw_dir / "default")
    theirs = raw / "user" / "theirs" / "video"
    theirs.mkdir(parents=True)
    for path in (tiny_raw_dir / "default" / "video").iterdir():
        if path.suffix in (".mp4", ".srt"):
            (theirs / path.name).symlink_to(path)
    video_keys = ("video", "start_s", "end_s", "subtitles")
    parquet = write(theirs, "qa", "parquet",
                    [{**sharegpt(q, q["id"]), **{key: q[key] for key in video_keys if key in q}} for q in questions])
    assert validate_corpus(theirs, "video", SHAREGPT) == [parquet]

    written = {}
    for corpus in ("default", "theirs"):
        stage = {"corpora": ["default"], "seq_len": 1024, "sp_size": 1}
        params = parse_params({
            "model": {"family": "qwen2_5_vl", "path": str(tiny_model_dir("qwen2_5_vl"))},
            "data": {"raw_dir": str(raw), "tokenized_dir": str(tmp_path / corpus),
                     "fields": {"theirs": SHAREGPT.model_dump()}},
            "stages": {"stage1": stage, "stage2": stage,
                       "stage3": {**stage, "corpora": [corpus], "video_frames": {"num_frames": 4}}},
        })
        prepare_corpora(params, Path("/"))
        written[corpus] = load_tokenized(tmp_path / corpus / "stage3")
    ours, mapped = written["default"], written["theirs"]
    assert ours.index.num_documents == len(questions)
    assert [d.id for d in mapped.index.documents] == [d.id for d in ours.index.documents]
    np.testing.assert_array_equal(mapped.tokens, ours.tokens)
    np.testing.assert_array_equal(mapped.trainable, ours.trainable)

    write(theirs, "qa", "jsonl", questions)  # two sources of questions: which one is meant?
    with pytest.raises(CorpusError,
                       match=r"one source of their questions, qa in one of .* \(found qa.jsonl, qa.parquet\)"):
        validate_corpus(theirs, "video", SHAREGPT)
