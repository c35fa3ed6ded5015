"""The rows of a corpus source, in the formats users have, streamed: memory stays flat in its size.

A source is one of
- a JSONL file, plain (`.jsonl`), gzip (`.jsonl.gz`) or zstd (`.jsonl.zst`): decompressed and
  decoded line by line; a row's location is `file:line`;
- a Parquet file (`.parquet`): read a record batch at a time; a row's location is `file: row i`,
  counted from 0 as pyarrow and `datasets` count;
- a Hugging Face `datasets` folder written by `Dataset.save_to_disk` (`state.json` naming its
  Arrow stream files): read a record batch at a time; rows counted across its files from 0, as
  `dataset[i]` counts them.

What a row must hold is the records' business (omnilong/data/schemas.py); here a row is a JSON
value or a mapping of column to Python value. A source that cannot be read raises RecordError
naming the file and the line or row.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import zstandard

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".parquet")
FORMATS = ".jsonl, .jsonl.gz, .jsonl.zst or .parquet files, or `datasets` folders saved with save_to_disk"
BATCH_ROWS = 1024
"""Rows per record batch read from Parquet and Arrow: a batch is what memory holds at once."""
_READ_BYTES = 1 << 20
_ARROW_STATE = "state.json"
_ARROW_DATASET_DICT = "dataset_dict.json"


class RecordError(ValueError):
    """A corpus row that cannot be read or does not match its kind's schema; names file, line or
    row, and field."""


class Row(NamedTuple):
    location: str
    """`file:line` or `file: row i`: where error messages point."""
    number: int
    """The line (from 1) or row (from 0) of the row in its source."""
    value: Any


def _suffix(path: Path) -> str | None:
    return next((suffix for suffix in FILE_SUFFIXES if path.name.endswith(suffix)), None)


def is_arrow_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return path.is_dir() and (path / _ARROW_STATE).is_file()


def is_source(path: Path) -> bool:
    return (path.is_file() and _suffix(path) is not None) or is_arrow_dataset(path)


def sources_in(directory: Path) -> list[Path]:
    """The sources a directory holds (files of a known suffix and `datasets` folders), by name."""
    return sorted(path for path in directory.iterdir() if is_source(path)) if directory.is_dir() else []


def source_stem(path: Path) -> str:
    """The name of a source without its format suffix (`papers` for `papers.jsonl.zst`)."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def check_source(path: Path) -> None:
    """Raise RecordError unless `path` is a source of a known format."""
    if (path / _ARROW_DATASET_DICT).is_file():
        splits = json.loads((path / _ARROW_DATASET_DICT).read_text()).get("splits", [])
        raise RecordError(
            f"{path}: a `datasets` DatasetDict (splits {', '.join(splits)}); give one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    if not is_source(path):
        raise RecordError(f"{path}: not a corpus source; expected one of {FORMATS}")


def iter_rows(path: Path, columns: Iterable[str] | None = None) -> Iterator[Row]:
    """The rows of the source at `path`, streamed. `columns`: the only columns a table row needs
    (the others are not read); None: every column. JSON rows are yielded whole."""
    check_source(path)
    if is_arrow_dataset(path):
        yield from _arrow_rows(path, columns)
    elif _suffix(path) == ".parquet":
        yield from _parquet_rows(path, columns)
    else:
        yield from _jsonl_rows(path)


# --- JSONL, plain or compressed ------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[Row]:
    suffix = _suffix(path)
    compression = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}.get(suffix)
    with open(path, "rb") as raw:
        lines = _zstd_lines(raw) if compression == "zstd" else gzip.open(raw) if compression else raw
        line_no = 0
        while True:
            try:
                line = next(lines, None)
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:  # BadGzipFile is an OSError
                if compression is None:
                    raise RecordError(f"{path}:{line_no + 1}: cannot be read ({exc})") from None
                raise RecordError(
                    f"{path}:{line_no + 1}: the {compression} stream is broken here ({exc}); "
                    f"expected a complete {compression}-compressed JSONL file"
                ) from None
            if line is None:
                return
            line_no += 1
            row = _json_line(path, line_no, line)
            if row is not None:
                yield row


def _json_line(path: Path, line_no: int, raw: bytes) -> Row | None:
    # Bytes decoded line by line, so a line that is not UTF-8 is named like any other bad line.
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "expected one JSON record per line, encoded as UTF-8") from None
    if not line.strip():
        return None
    try:
        return Row(f"{path}:{line_no}", line_no, json.loads(line))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                          "expected one JSON record per line") from None


def _zstd_lines(raw) -> Iterator[bytes]:
    """The lines of a zstd stream of one or more frames; a stream that ends inside a frame is
    broken (zstandard's readers would return the bytes so far as if it were complete)."""
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    pending = b""
    started = False
    while chunk := raw.read(_READ_BYTES):
        while chunk:
            if frame.eof:  # the previous frame ended inside this chunk: the next one starts
                frame = decompressor.decompressobj()
            started = True
            pending += frame.decompress(chunk)
            chunk = frame.unused_data if frame.eof else b""
        *lines, pending = pending.split(b"\n")
        yield from lines
    if started and not frame.eof:
        raise zstandard.ZstdError("the file ends inside a zstd frame (truncated)")
    if pending:
        yield pending


# --- Parquet and Arrow ---------------------------------------------------------------------------

def _table_rows(location: str, batches: Iterator, columns: Iterable[str] | None) -> Iterator[Row]:
    """Rows of record batches, numbered from 0 across them; a batch that cannot be read or
    converted names the row it would have started at."""
    wanted = None if columns is None else list(dict.fromkeys(columns))
    number = 0
    while True:
        try:
            batch = next(batches, None)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError are these
            raise RecordError(f"{location}: row {number}: cannot be read ({exc})") from None
        if batch is None:
            return
        if wanted is not None:
            batch = batch.select([name for name in wanted if name in batch.schema.names])
        try:
            values = batch.to_pylist()
        except UnicodeDecodeError as exc:
            raise RecordError(f"{location}: rows {number} to {number + batch.num_rows - 1}: not UTF-8 text "
                              f"({exc.reason}); expected UTF-8 strings") from None
        for value in values:
            yield Row(f"{location}: row {number}", number, value)
            number += 1


def _parquet_rows(path: Path, columns: Iterable[str] | None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        # Without pre-buffering: pyarrow would otherwise keep every column chunk it has read
        # until the file is closed, and memory would grow with the file.
        table = pq.ParquetFile(path, pre_buffer=False)
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: not a Parquet file ({exc})") from None
    with table:
        names = table.schema_arrow.names
        selected = None if columns is None else [name for name in dict.fromkeys(columns) if name in names]
        yield from _table_rows(str(path), table.iter_batches(batch_size=BATCH_ROWS, columns=selected), columns)


def _arrow_files(folder: Path) -> list[Path]:
    state_path = folder / _ARROW_STATE
    try:
        files = [folder / entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"{state_path}: not the state of a `datasets` folder saved with save_to_disk "
                          f"(expected _data_files, a list of {{filename}}; {exc!r})") from None
    for file in files:
        if not file.is_file():
            raise RecordError(f"{folder}: {file.name}, named in {_ARROW_STATE}, is missing")
    return files


def _arrow_batches(files: list[Path]) -> Iterator:
    """The record batches of `datasets`' Arrow stream files in order, read one at a time (not
    memory-mapped: the pages of a mapped file would stay resident as the file is read)."""
    import pyarrow as pa

    for file in files:
        with pa.OSFile(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except (OSError, ValueError) as exc:
                raise OSError(f"{file.name} is not an Arrow stream file ({exc})") from None
            yield from reader


def _arrow_rows(folder: Path, columns: Iterable[str] | None) -> Iterator[Row]:
    yield from _table_rows(str(folder), _arrow_batches(_arrow_files(folder)), columns)
