"""Short stable digests of JSON-able values: settings to compare, inputs to resume from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def json_digest(value: Any) -> str:
    """16 hex digits of the SHA-256 of `value` as JSON with sorted keys (equal values, equal digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def code_digest() -> str:
    """16 hex digits of a hash of OmniLong's own code: what it made with other code is made again."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]
