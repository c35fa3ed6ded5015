"""Short stable digests of JSON-able values: settings to compare, inputs to resume from."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_digest(value: Any) -> str:
    """16 hex digits of the SHA-256 of `value` as JSON with sorted keys (equal values, equal digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
