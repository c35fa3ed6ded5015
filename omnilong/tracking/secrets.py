"""What may be printed or logged of parameters: URIs without their passwords and tokens.

`tracking.uri` may carry a password (`https://user:password@host`) or a token in its query, and
any other URI a user sets may too; MLflow keeps logged params and artifacts for anyone who can
read the run, and console output ends up in CI logs.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HIDDEN = "***"
# Names of query parameters and mapping keys whose values are secrets.
SECRET_NAME = re.compile(r"pass|secret|token|api_?key|access_?key|credential|signature|^sig$|^auth", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user info (or the user info, when it is one token) and the
    values of secret-named query parameters replaced by `***`."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{host}" if has_password else f"{HIDDEN}@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [key for key, _ in pairs if SECRET_NAME.search(key)]
    if netloc == parts.netloc and not secret:
        return uri  # unchanged (urlunsplit would also turn sqlite:/// into sqlite:/)
    query = urlencode([(key, HIDDEN if key in secret else value) for key, value in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact(value: Any) -> Any:
    """A copy of a parsed parameter tree (dicts, lists, scalars) with every URI redacted and the
    string value of every secret-named key hidden."""
    if isinstance(value, dict):
        return {key: HIDDEN if isinstance(item, str) and SECRET_NAME.search(str(key)) else redact(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value


def log_redacted_yaml(client, run_id: str, path: Path) -> None:
    """Log the YAML file `path` (params.yaml) as an artifact of that name, redacted; its comments
    are not kept."""
    import yaml

    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / Path(path).name
        copy.write_text(yaml.safe_dump(redact(yaml.safe_load(Path(path).read_text())), sort_keys=False))
        client.log_artifact(run_id, str(copy))
