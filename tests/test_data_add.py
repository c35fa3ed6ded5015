"""`omnilong data add`: validate a user's corpus, copy it under data/raw/user/<name>/, track it with DVC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omnilong.data.user_corpus import CorpusError, add_user_corpus


def _run(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    _run("git", "init", "-q", cwd=repo)
    _run(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    monkeypatch.chdir(repo)
    return repo


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_valid_text_corpus_is_copied_and_tracked(dvc_repo, tmp_path):
    source = _write_jsonl(
        tmp_path / "incoming" / "papers.jsonl",
        [{"id": "p1", "source": "arxiv", "text": "Long context."}, {"id": "p2", "source": "arxiv", "text": "More."}],
    )
    target = add_user_corpus(source, "text", None, raw_dir=Path("data/raw"))

    assert target == Path("data/raw/user/papers")
    assert (dvc_repo / target / "text" / "papers.jsonl").read_bytes() == source.read_bytes()
    dvc_file = dvc_repo / "data/raw/user/papers.dvc"
    assert dvc_file.is_file()
    assert "/papers" in (dvc_repo / "data/raw/user/.gitignore").read_text()
    status = _run(sys.executable, "-m", "dvc", "status", "--json", str(dvc_file), cwd=dvc_repo)
    assert json.loads(status) == {}


def test_bad_record_names_file_line_and_field_and_changes_nothing(dvc_repo, tmp_path):
    source = _write_jsonl(
        tmp_path / "incoming" / "chats.jsonl",
        [
            {"id": "c1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"id": "c2", "messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        ],
    )
    with pytest.raises(CorpusError) as excinfo:
        add_user_corpus(source, "instruct", "chats", raw_dir=Path("data/raw"))
    message = str(excinfo.value)
    assert f"{source}:2" in message
    assert "messages.1.role" in message
    assert not (dvc_repo / "data").exists()


def test_video_corpus_with_unreadable_video_is_refused(dvc_repo, tmp_path):
    video_dir = tmp_path / "incoming" / "clips"
    _write_jsonl(
        video_dir / "qa.jsonl",
        [{"id": "v1", "video": "broken.mp4", "messages": [
            {"role": "user", "content": "What happens?"}, {"role": "assistant", "content": "Nothing."}]}],
    )
    (video_dir / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(CorpusError, match="broken.mp4"):
        add_user_corpus(video_dir, "video", "clips", raw_dir=Path("data/raw"))
    assert not (dvc_repo / "data").exists()


def test_cli_exits_2_on_a_bad_kind_and_a_bad_corpus(dvc_repo, tmp_path):
    repo_root = Path(__file__).resolve().parents[1]
    params = repo_root / "params.yaml"
    source = _write_jsonl(tmp_path / "t.jsonl", [{"id": "x", "source": "s"}])  # no "text" field
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for kind, expected in [("text", "field text"), ("audio", "--kind")]:
        result = subprocess.run(
            [sys.executable, "-m", "omnilong.cli", "data", "add", str(source), "--kind", kind, "--params", str(params)],
            cwd=dvc_repo, capture_output=True, text=True, env=env,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr


def test_corpus_in_other_formats_is_copied_as_it_is_and_read_through_its_mapping(dvc_repo, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from omnilong.config import CorpusFields
    from omnilong.data.readers import source_stem
    from omnilong.data.schemas import iter_records

    source = tmp_path / "incoming" / "papers"
    source.mkdir(parents=True)
    rows = [{"body": f"Paper {i}.", "url": f"https://example.org/{i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows[:2]), source / "a.parquet")
    (source / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(row) + "\n" for row in rows[2:3]).encode()))
    datasets.Dataset.from_list(rows[3:]).save_to_disk(str(source / "c"))
    (source / "notes.txt").write_text("not a corpus source")
    fields = {"papers": CorpusFields(text_field="body", id_field=None, source_field=None)}

    target = add_user_corpus(source, "text", None, raw_dir=Path("data/raw"), fields=fields)

    assert target == Path("data/raw/user/papers")
    copied = dvc_repo / target / "text"
    assert sorted(p.name for p in copied.iterdir()) == ["a.parquet", "b.jsonl.zst", "c"]
    for name in ("a.parquet", "b.jsonl.zst"):
        assert (copied / name).read_bytes() == (source / name).read_bytes()
    mapping = fields["papers"]
    texts = [record.text for path in sorted(copied.iterdir()) for record in iter_records(path, "text", mapping)]
    assert texts == [row["body"] for row in rows]
    status = _run(sys.executable, "-m", "dvc", "status", "--json", str(dvc_repo / "data/raw/user/papers.dvc"),
                  cwd=dvc_repo)
    assert json.loads(status) == {}
    # Without its mapping the corpus is not ours: refused, naming the file and the row.
    with pytest.raises(CorpusError, match=r"a\.parquet: row 0: not a valid text record"):
        add_user_corpus(source, "text", "papers2", raw_dir=Path("data/raw"))
    assert source_stem(source / "b.jsonl.zst") == "b" and source_stem(source / "c") == "c"
