"""JSON from files others may have written, parsed only when what it builds is bounded.

A file of at most 64 MiB is small to read but not to parse: `json.loads` turns each 3-byte
`{}` into a 64-byte dict plus its slot in a list, so 66 MiB of them peaked at 1.7 GB before
any check could look at what they were. Counting the values first (every one but the first
of each object or array follows a comma) costs a pass over the text, and refused the same
text at a peak of 143 MB (`tests/test_bounded_json.py`).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_VALUES = 1 << 20
"""Values (objects, arrays and the items in them) a document may hold: a shard header of
4,096 chunks, the most a shard is written with, holds about 50,000, a checkpoint's JSON
files far fewer; parsing a million costs at most about 100 MB."""

# A JSON string, escapes included ("unrolled": no backtracking on long strings).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_STRING_BYTES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class TooManyValues(ValueError):
    """The document holds more values than its reader accepts."""


def count_values(text: str | bytes) -> int:
    """Upper bound on the values `json.loads(text)` would build beyond the first: commas,
    `{` and `[` outside strings (those in strings are text, not structure)."""
    if isinstance(text, str):
        bare = _STRING.sub("", text)
        return bare.count(",") + bare.count("{") + bare.count("[")
    raw = _STRING_BYTES.sub(b"", text)
    return raw.count(b",") + raw.count(b"{") + raw.count(b"[")


def loads(text: str | bytes, limit: int = MAX_VALUES) -> Any:
    """`json.loads(text)`, or TooManyValues (a ValueError, as for any text that is no JSON
    we accept) when it holds more than `limit` values. RecursionError, for nesting too deep,
    passes through as from `json.loads`."""
    if count_values(text) > limit:
        raise TooManyValues(f"it holds more than {limit:,} JSON values")
    return json.loads(text)
