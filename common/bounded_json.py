"""JSON from files others may have written, parsed only when what it builds is bounded.

A file of at most 64 MiB is small to read but not to parse: `json.loads` turns each 3-byte
`{}` into a 64-byte dict plus its slot in a list, so 66 MiB of them peaked at 1,667 MiB before
any check could look at what they were. Counting the values first (every one but the first
of each object or array follows a comma) costs a pass over the text, and refused the same
text at a peak of 199 MiB: the text, its UTF-8 and the count's arrays
(`tests/test_bounded_json.py`).

For files whose writer bounds them: a recording shard's header and index (the recorder
closes a shard before its index passes the limit), the producer's state file, a snapshot's
cfg.json and trainer.json, a safetensors header, another format's config. A snapshot's
extra.json (the ledger's provenance of every producer) and an eval.json (per-latent lists)
grow with the run: they are read with `limit=None`, bounded by their size only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

MAX_VALUES = 1 << 20
"""Members and items (each comma separates two; every `{` and `[` counts one more) a
document may hold: a shard header of 4,096 chunks, the most a shard is written with, holds
about 50,000 with our producer's provenance; parsing a million costs at most about 100 MB."""

_CHUNK = 1 << 23
"""Bytes counted at a time: the count's memory is the text's UTF-8 and a few arrays of this
size, whatever the document holds."""


class TooManyValues(ValueError):
    """The document holds more values than its reader accepts."""


def count_values(text: str) -> int:
    """What `json.loads(text)` builds beyond the document itself, in members and items: commas,
    `{` and `[` outside strings (those in strings are text, not structure). An object's
    member is a key and a value: two Python objects for one counted.

    On the text's UTF-8 (where no byte of a multi-byte character is ASCII), its escaped
    backslashes and then its escaped quotes removed (JSON pairs a string's backslashes left
    to right, as `bytes.replace` removes them), every quote toggles being in a string: a
    running count of quotes per byte, `_CHUNK` bytes at a time, in time linear in the text.
    Removing the strings by a pattern instead built an entry per string: 1.2 GB to refuse
    64 MiB of `"":0,` (found by review)."""
    data = text.encode("utf-8", "surrogatepass").replace(b"\\\\", b"").replace(b'\\"', b"")
    count, inside = 0, 0
    for start in range(0, len(data), _CHUNK):
        a = np.frombuffer(data, np.uint8, min(_CHUNK, len(data) - start), start)
        # 1 from an opening quote to the byte before its closing one (uint8 keeps the parity)
        odd = (np.cumsum(a == 34, dtype=np.uint8) + inside) & 1
        structure = (a == 44) | (a == 123) | (a == 91)  # , { [
        count += int(np.count_nonzero(structure & (odd == 0)))
        inside = int(odd[-1])
    return count


def _structure(text: str) -> int:
    return text.count(",") + text.count("{") + text.count("[")


def loads(text: str | bytes, limit: int | None = MAX_VALUES) -> Any:
    """`json.loads(text)`, or TooManyValues (a ValueError, as for any text that is no JSON
    we accept) when it holds more than `limit` values (None: no limit). Bytes must be UTF-8,
    as JSON files and safetensors headers are: `json.loads` would also take UTF-16 and
    UTF-32, whose bytes the count cannot read (U+2200 holds a `"` byte). RecursionError, for
    nesting too deep, passes through as from `json.loads`."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    # strings removed, the count can only fall: most documents need no removal
    if limit is not None and _structure(text) > limit and count_values(text) > limit:
        raise TooManyValues(f"it holds more than {limit:,} JSON values")
    return json.loads(text)
