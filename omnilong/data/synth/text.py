"""Stage-1 text: long documents cut from source code and documentation found on this machine.

The sources are the standard library of the running interpreter (or `text.source_dirs`): its
`.py` files give code documents as they are and documentation-like documents made of their
docstrings and comments; `.rst`/`.txt` files give documentation as they are. Documents
alternate between the two kinds. A file longer than a document is cut at line boundaries from
a random line; shorter files are concatenated with the next files of the same directory.

Everything depends only on the seed and the source files: the walk is sorted and every choice
comes from one seeded generator. Runs of 7 or more digits are masked, because the text NIAH
evaluation hides 7-digit needles that must never occur in training data.
"""

from __future__ import annotations

import ast
import io
import os
import random
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omnilong.config import TextSynthParams
from omnilong.data.schemas import TextRecord

DocKind = Literal["code", "prose"]
DOC_KINDS: tuple[DocKind, ...] = ("code", "prose")

LONG_NUMBER = re.compile(r"\d{7,}")
SOURCE_SUFFIXES = frozenset({".py", ".rst", ".txt"})
# Test suites and their data files (sample mailboxes, broken encodings, huge fixtures), other
# environments' packages and build artefacts are not text we want to train on.
EXCLUDED_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "test",
        "tests",
        "testing",
        "testdata",
        "test_data",
        "idle_test",
    }
)
# Build-time configuration of this particular interpreter (`config-3.11-<platform>/`,
# `_sysconfigdata*.py`): absolute paths of the machine it was built on.
EXCLUDED_DIR_PREFIXES = (".", "config-")
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
# A comment paragraph shorter than this is a marker (`# noqa`, `# XXX`), not documentation.
MIN_COMMENT_WORDS = 4


def mask_long_numbers(text: str) -> str:
    """Replace every digit of a run of 7 or more digits by `#`; the length is unchanged."""
    return LONG_NUMBER.sub(lambda match: "#" * len(match.group()), text)


def cut_at_lines(text: str, min_chars: int, max_chars: int) -> str:
    """The longest prefix of `text` of at most `max_chars` characters that ends at a line end.

    A line is cut in the middle only when whole lines would give fewer than `min_chars`
    characters (a single very long line).
    """
    if len(text) <= max_chars:
        return text
    end = text.rfind("\n", 0, max_chars) + 1
    return text[: end if end >= min_chars else max_chars]


@dataclass(frozen=True)
class SourceFile:
    path: Path
    """Where to read it; never written into the corpus (it is machine-specific)."""
    name: str
    """`<root label>/<path relative to the root>`, the name used inside the corpus."""
    family: str
    """The directory it is in, as `<root label>/<relative dir>`: files concatenated together."""


@dataclass(frozen=True)
class TextDoc:
    """A stage-1 document; the instruction synthesiser builds its contexts from these."""

    id: str
    source: str
    kind: DocKind
    text: str

    def to_record(self) -> TextRecord:
        return TextRecord(id=self.id, source=self.source, text=self.text)


def source_roots(params: TextSynthParams) -> list[tuple[str, Path]]:
    """(label, directory) pairs to read; the label replaces the machine-specific path in the corpus."""
    if not params.source_dirs:
        return [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    roots = []
    for directory in params.source_dirs:
        path = Path(directory)
        if not path.is_dir():
            raise ValueError(
                f"data.synth.text.source_dirs: expected existing directories, {directory!r} is not one"
            )
        roots.append((path.resolve().name or "source", path))
    return roots


def find_source_files(roots: list[tuple[str, Path]]) -> list[SourceFile]:
    """Candidate files of every root, in sorted order, without reading them."""
    files = []
    for label, root in roots:
        for directory, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_DIR_PREFIXES)
            )
            relative_dir = Path(directory).relative_to(root).as_posix()
            family = label if relative_dir == "." else f"{label}/{relative_dir}"
            for filename in sorted(filenames):
                if Path(filename).suffix in SOURCE_SUFFIXES and not filename.startswith(EXCLUDED_FILE_PREFIXES):
                    files.append(SourceFile(Path(directory) / filename, f"{family}/{filename}", family))
    return files


def read_source(path: Path) -> str | None:
    """The file's text, or None for binary or non-UTF-8 files."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def python_prose(source: str, module: str) -> str:
    """Docstrings (headed by the qualified name they document) and comment paragraphs, in source order."""
    try:
        tree = ast.parse(source)
        comment_tokens = [
            tok for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT
        ]
    except (SyntaxError, ValueError, tokenize.TokenError):
        return ""
    items: list[tuple[int, str]] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        items.append((0, f"Module {module}:\n{module_doc}"))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    items.append((node.lineno, f"{kind} {qualname}:\n{doc}"))
                visit(node.body, f"{qualname}.")

    visit(tree.body, f"{module}.")
    paragraph: list[str] = []
    last_line = -2
    for tok in comment_tokens + [None]:
        if tok is None or tok.start[0] != last_line + 1:
            if len(" ".join(paragraph).split()) >= MIN_COMMENT_WORDS:
                items.append((last_line - len(paragraph) + 1, "\n".join(paragraph)))
            paragraph = []
        if tok is not None:
            paragraph.append(tok.string.lstrip("#").strip())
            last_line = tok.start[0]
    items.sort(key=lambda item: item[0])
    return "\n\n".join(text for _, text in items)


class _Pieces:
    """The text each file contributes to a document of each kind, read lazily and cached:
    most files of a large source tree are never needed."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, DocKind], str] = {}

    def get(self, file: SourceFile, kind: DocKind) -> str:
        key = (file.name, kind)
        if key not in self._cache:
            self._cache[key] = self._make(file, kind)
        return self._cache[key]

    @staticmethod
    def _make(file: SourceFile, kind: DocKind) -> str:
        source = read_source(file.path)
        if source is None or not source.strip():
            return ""
        if file.path.suffix != ".py":
            return f"File: {file.name}\n\n{source.strip()}\n\n" if kind == "prose" else ""
        if kind == "code":
            return f"# File: {file.name}\n{source.rstrip()}\n\n"
        module = file.name.partition("/")[2].removesuffix(".py").replace("/", ".")
        prose = python_prose(source, module)
        return f"Docstrings and comments of {file.name}\n\n{prose}\n\n" if prose else ""


class _DocumentMaker:
    """Makes documents of one kind from a seeded choice of directory, then of a file in it.

    Choosing the directory first keeps large directories (e.g. the generated codec tables of
    `encodings/`) from dominating the corpus.
    """

    def __init__(self, kind: DocKind, files: list[SourceFile], pieces: _Pieces, params: TextSynthParams):
        self.kind, self.pieces, self.params = kind, pieces, params
        self.families: dict[str, list[SourceFile]] = {}
        for file in files:
            if kind == "prose" or file.path.suffix == ".py":
                self.families.setdefault(file.family, []).append(file)
        # Files that cannot start a document (no text of this kind, or a directory with too
        # little in all); whether one can does not depend on the draw, so they are dropped for good.
        self.starts = {family: list(members) for family, members in self.families.items()}

    def next_document(self, rng: random.Random) -> tuple[str, str] | None:
        """(source, text) of the next document; None when no file can start one any more."""
        while self.starts:
            family = rng.choice(sorted(self.starts))
            start = rng.choice(self.starts[family])
            document = self._document_from(start, rng)
            if document is not None:
                return document
            self.starts[family].remove(start)
            if not self.starts[family]:
                del self.starts[family]
        return None

    def _document_from(self, start: SourceFile, rng: random.Random) -> tuple[str, str] | None:
        first = self.pieces.get(start, self.kind)
        if not first:
            return None
        target = rng.randint(self.params.min_chars, self.params.max_chars)
        if len(first) >= target:
            header, _, body = first.partition("\n")
            # Start at a random line that leaves at least `target` characters, so a file
            # drawn twice gives two different documents.
            line_starts = [0] + [m.end() for m in re.finditer("\n", body)]
            offset = rng.choice([s for s in line_starts if len(body) - s >= target - len(header) - 1] or [0])
            text = f"{header}\n{body[offset:]}"
            source = start.name
        else:
            family = self.families[start.family]
            index = family.index(start)
            texts = [first]
            for file in family[index + 1 :] + family[:index]:
                if sum(map(len, texts)) >= target:
                    break
                texts.append(self.pieces.get(file, self.kind))
            text = "".join(texts)
            if len(text) < self.params.min_chars:
                return None
            source = start.name if len(texts) == 1 else f"{start.family}/"
        return source, mask_long_numbers(cut_at_lines(text, self.params.min_chars, target))


def synthesize_text(params: TextSynthParams, seed: int) -> Iterator[TextDoc]:
    """Yield `params.num_documents` documents alternating code and prose while both last."""
    roots = source_roots(params)
    files = find_source_files(roots)
    rng = random.Random(f"{seed}:text")
    pieces = _Pieces()
    makers = {kind: _DocumentMaker(kind, files, pieces, params) for kind in DOC_KINDS}
    live = list(DOC_KINDS)
    for index in range(params.num_documents):
        document = None
        while document is None and live:
            kind = live[index % len(live)]
            document = makers[kind].next_document(rng)
            if document is None:
                live.remove(kind)
        if document is None:
            raise ValueError(
                f"data.synth.text: no file under {', '.join(str(root) for _, root in roots)} gives a "
                f"document of at least min_chars={params.min_chars} characters"
            )
        source, text = document
        yield TextDoc(id=f"text-{index:05d}-{kind}", source=source, kind=kind, text=text)
