"""One id policy for every entry point: ingest, events recorded at run time, and ``compose``.

An id is taken exactly as written — never trimmed, unescaped or otherwise rewritten — so the id a
caller sends is the id the stores hold. One that does not fit the policy is refused with the
reason (ingest quarantines the row; compose answers ``InputError``).
"""

from __future__ import annotations

import re

MAX_ID_CHARS = 128
ID_PATTERN = rf"^[A-Za-z0-9_.@:+\-]{{1,{MAX_ID_CHARS}}}$"  # also the HTTP API's path parameters
_ID = re.compile(ID_PATTERN)


def check_id(value: object, what: str) -> str:
    """``value`` if it is a valid id; else ``ValueError`` saying why (``what``: "user_id", "item_id")."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {type(value).__name__}")
    if not value:
        raise ValueError(f"missing: {what} is empty")
    if not _ID.fullmatch(value):  # not match: "$" also matches before a final newline
        raise ValueError(f"malformed: {what} {value[:40]!r} must be 1-{MAX_ID_CHARS} ASCII letters, digits "
                         "or . _ @ : + - (ids are never rewritten)")
    return value
