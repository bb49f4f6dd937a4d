"""Recorded streams: accepted chunks kept on disk, one directory of safetensors shards per hook.

    DIR/.lock                                   held (flock) by the one process recording here
    DIR/<hook>/shard-<UTC>-<writer>-<NNNNNN>.safetensors
    DIR/<hook>/.tmp-shard-…                      a shard being written (readers skip it)

A shard holds one tensor, `acts` [rows, d], in the chunks' wire dtype, and in its metadata
the index of the chunks it holds (`saestream.chunks`, a JSON list: producer, run, seq,
source, row, n, checksum, ts per chunk). Shard and index are one file, written under a
temporary name, fsynced and renamed: a shard exists whole, with its index, or not at all, so
a crash loses at most the rows not yet written and never leaves a half shard behind.

Shard names sort in recording order (start time of the writing process, its id, then a
counter), and rows within a shard are in arrival order, so a reader that walks the shards
in name order sees each producer's chunks in the order they were received. Both the
consumer side (recording, `saestream train --input`) and the producer side (`saestream
replay`) use this module; it knows files, not sockets.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import stat
import struct
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from saestream.common import bounded_json
from saestream.common.errors import UserError
from saestream.common.files import NotRegularFile, check_writable_dir, open_regular
from saestream.common.logs import shown
from saestream.common.wire import (
    DTYPES,
    ITEMSIZE,
    MAX_STR_LEN,
    WORD_DTYPES,
    DecodeLimits,
    WireError,
    all_finite,
    check_source,
    crc32,
)

FORMAT = "saestream-recording-1"
"""Value of the `saestream.format` metadata key of every shard."""
TENSOR = "acts"
SHARD_RE = re.compile(r"^shard-[0-9TZ]+-[0-9a-f]{8}-\d{6,}\.safetensors$")
TMP_PREFIX = ".tmp-shard-"
LOCK_NAME = ".lock"
MAX_SHARD_CHUNKS = 4096
"""A shard is closed after this many chunks, whatever its rows: keeps the index of small
chunks with the producer's few provenance fields near a megabyte."""
MAX_HEADER_BYTES = 64 << 20
INDEX_BYTES = 16 << 20
"""A shard is also closed before its index's JSON would pass this many bytes: written into
the header as a JSON string, quotes and backslashes escaped, it at most doubles, so the
header stays under MAX_HEADER_BYTES, which readers refuse to pass. Without it, 4,096 chunks
whose `source` fills the wire's 64 KiB header made a shard no reader would open."""
_HOOK_DIR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_WIRE_DTYPE = {v: k for k, v in _ST_DTYPE.items()}
_ENTRY_KEYS = ("producer", "run", "seq", "source", "row", "n", "checksum", "ts")
_INT64 = 1 << 63


class RecordingError(UserError):
    """A recording that cannot be read (wrong format, missing tensor, wrong shapes, a bad
    checksum, NaN): a one-line error naming the file, exit 2 at the CLI edge."""


def hook_dir_name(hook: str) -> str:
    """The directory a hook is recorded in: the hook's own name, which must be usable as one
    (letters, digits, `._+-`; module paths like `model.layers.20` are)."""
    if not _HOOK_DIR_RE.match(hook) or hook in (".", ".."):
        raise UserError(f"hook {hook!r:.100} cannot be recorded: its name is not usable as a "
                        "directory name (letters, digits and . _ + - only)")
    return hook


# ---------------------------------------------------------------------------------------------
# writing


class RecordingLock:
    """Exclusive use of a recording directory for this process: two writers appending to
    the same shards' directory would remove each other's temporary files.

    :param hooks: the hooks to be recorded: their directories, where they exist, are
        checked (`check_hook_dirs`) before anything in them is touched.
    Raises UserError (one line) for anything in the way: a directory that is not writable,
    another process recording into it, a `.lock` that is not a regular file, a hook's
    directory that is not a writable directory, a stale temporary that cannot be removed.
    """

    def __init__(self, root: Path, flag: str, hooks: Collection[str] = ()) -> None:
        root = Path(root)
        check_writable_dir(root, flag)
        self.root = root
        self._fh = _open_lock_file(root, flag)  # held until release(): the lock
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise UserError(f"{flag} {root}: another process is recording into it") from None
        try:
            check_hook_dirs(root, hooks, flag)
            self.stale = remove_stale_temporaries(root, flag)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if not self._fh.closed:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def _open_lock_file(root: Path, flag: str) -> BinaryIO:
    """`root/.lock`, opened (created if missing) for flock: a regular file, or UserError.
    Non-blocking open, so a FIFO in its place fails (ENXIO) instead of waiting forever."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UserError(f"{flag} {root}: cannot open its lock file {LOCK_NAME} "
                        f"({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{flag} {root}: its lock file {LOCK_NAME} is not a regular file "
                        "(remove it)")
    return os.fdopen(fd, "ab")


def check_hook_dirs(root: Path, hooks: Collection[str], flag: str) -> None:
    """UserError (one line) unless every hook's directory `root/<hook>` that exists is a
    directory where a shard can be written: checked at start-up, before a socket is bound,
    so a misnamed or read-only hook directory is not found shard after lost shard."""
    for hook in hooks:
        path = Path(root) / hook_dir_name(hook)
        if not path.exists() and not path.is_symlink():
            continue  # made when its first shard is written (the root is writable)
        if not path.is_dir():
            raise UserError(f"{flag} {root}: {path.name} (where hook {shown(hook)} is "
                            "recorded) is not a directory")
        check_writable_dir(path, flag)


def remove_stale_temporaries(root: Path, flag: str = "--record") -> list[Path]:
    """Delete half-written shards an interrupted writer left (only under the lock).
    UserError when one cannot be removed: its directory is not writable, so no shard
    could be written there either."""
    stale = [p for p in Path(root).glob(f"*/{TMP_PREFIX}*") if p.is_file()]
    for p in stale:
        try:
            p.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(f"{flag} {root}: cannot remove {p.name}, left in {p.parent} by an "
                            f"interrupted recording ({exc.strerror or exc}); the directory "
                            "must be writable") from None
    return stale


class Entry(NamedTuple):
    """One chunk of a shard, as its index records it."""

    producer: str
    run: str
    seq: int
    source: dict[str, Any]
    row: int
    """First row of the chunk in the shard."""
    n: int
    checksum: int
    """zlib.crc32 of the chunk's raw bytes (the wire checksum when the whole chunk was kept)."""
    ts: float


class Written(NamedTuple):
    """A shard now complete on disk."""

    path: Path
    rows: int
    nbytes: int


class Lost(NamedTuple):
    """A shard that could not be written: its rows are not in the recording."""

    rows: int
    error: OSError
    entries: list[Entry]
    """The chunks it held (their positions are not recorded after all)."""


class ShardWriter:
    """One hook's shards: accepted chunks are held until `shard_tokens` rows are in hand,
    then written as one shard (`add` returns it). `flush` writes what is held.

    A chunk whose dtype or model differs from those held first closes the current shard (a
    shard has one dtype and one model). A write that fails is reported as `Lost` and its rows
    are dropped: a broken disk must not grow the memory held without bound.
    """

    def __init__(self, hook_dir: Path, hook: str, shard_tokens: int, writer: str,
                 started: str) -> None:
        self.dir, self.hook = Path(hook_dir), hook
        self.shard_tokens = shard_tokens
        self.writer, self.started = writer, started
        self.counter = 0
        self._words: list[np.ndarray] = []
        self._entries: list[Entry] = []
        self._index: list[str] = []
        """The entries' JSON, joined into the index when the shard is written."""
        self._index_bytes = 0
        self._index_values = 1  # the list's own `[`
        self._rows = 0
        self._dtype: str | None = None
        self._model: str | None = None
        self._d: int | None = None

    @property
    def pending_rows(self) -> int:
        return self._rows

    def add(self, words: np.ndarray, dtype: str, model: str,
            entry: Entry) -> list[Written | Lost]:
        """Hold one chunk ([n, d] unsigned words of the wire dtype, C-contiguous)."""
        written: list[Written | Lost] = []
        if self._rows and (dtype, model, words.shape[1]) != (self._dtype, self._model, self._d):
            written += self.flush()
        placed = entry._replace(row=self._rows)
        text = json.dumps(placed._asdict(), separators=(",", ":"))
        values = bounded_json.count_values(text) + 1  # and the comma before it
        if self._rows and (self._index_bytes + len(text) + 1 > INDEX_BYTES
                           or self._index_values + values > bounded_json.MAX_VALUES):
            written += self.flush()  # the index readers accept is full: this chunk starts one
            placed = entry._replace(row=0)
            text = json.dumps(placed._asdict(), separators=(",", ":"))
        self._dtype, self._model, self._d = dtype, model, int(words.shape[1])
        self._words.append(words)
        self._entries.append(placed)
        self._index.append(text)
        self._index_bytes += len(text) + 1
        self._index_values += values
        self._rows += int(words.shape[0])
        if self._rows >= self.shard_tokens or len(self._entries) >= MAX_SHARD_CHUNKS:
            written += self.flush()
        return written

    def flush(self) -> list[Written | Lost]:
        """Write the rows held as one shard (nothing when none are held)."""
        if not self._rows:
            return []
        words, entries, rows, index = self._words, self._entries, self._rows, self._index
        self._words, self._entries, self._rows, self._index = [], [], 0, []
        self._index_bytes, self._index_values = 0, 1
        self.counter += 1
        name = f"shard-{self.started}-{self.writer}-{self.counter:06d}.safetensors"
        assert self._dtype is not None and self._model is not None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            nbytes = write_shard(self.dir / name, words, self._dtype, meta={
                "saestream.format": FORMAT, "saestream.hook": self.hook,
                "saestream.model": self._model, "saestream.dtype": self._dtype,
                "saestream.chunks": "[" + ",".join(index) + "]",
            })
        except OSError as exc:
            return [Lost(rows, exc, entries)]
        return [Written(self.dir / name, rows, nbytes)]


def new_writer_id() -> tuple[str, str]:
    """(writer id, start stamp): the parts of this process's shard names."""
    return uuid.uuid4().hex[:8], time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def write_shard(path: Path, words: Sequence[np.ndarray], dtype: str,
                meta: dict[str, str]) -> int:
    """Write `words` (row blocks of one width) as the tensor `acts` of a safetensors file,
    atomically: temporary name, fsync, rename, fsync of the directory. Returns its bytes."""
    rows = sum(int(w.shape[0]) for w in words)
    d = int(words[0].shape[1])
    nbytes = rows * d * ITEMSIZE[dtype]
    header = {TENSOR: {"dtype": _ST_DTYPE[dtype], "shape": [rows, d],
                       "data_offsets": [0, nbytes]}, "__metadata__": meta}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(TMP_PREFIX + path.name.removeprefix("shard-"))
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for w in words:
                fh.write(memoryview(np.ascontiguousarray(w)).cast("B"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return 8 + len(head) + nbytes


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class Shard:
    """One complete shard: where its rows are in the file, and its index."""

    path: Path
    hook: str
    model: str
    dtype: str
    rows: int
    d: int
    offset: int
    """Byte offset of the rows in the file."""
    entries: list[Entry]
    _map: np.ndarray | None = None

    def words(self) -> np.ndarray:
        """The rows as unsigned words [rows, d], memory-mapped copy-on-write (writable for
        torch, never written back)."""
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=WORD_DTYPES[self.dtype], mode="c",
                                      offset=self.offset, shape=(self.rows, self.d))
            except (OSError, ValueError) as exc:
                raise RecordingError(f"{self.path}: cannot map its rows ({exc})") from None
        return self._map

    def chunk(self, entry: Entry) -> np.ndarray:
        return self.words()[entry.row : entry.row + entry.n]

    def check(self, entry: Entry) -> None:
        """RecordingError unless the chunk's bytes match its checksum and are all finite."""
        if crc32(self.chunk(entry)) != entry.checksum:
            raise RecordingError(f"{self.what(entry)}: checksum mismatch (the file is corrupt)")
        self.check_values(entry)

    def check_values(self, entry: Entry) -> None:
        """RecordingError unless the chunk's values are all finite (a fraction of the cost
        of `check`: no checksum)."""
        if not all_finite(self.chunk(entry), self.dtype):
            raise RecordingError(f"{self.what(entry)}: NaN or infinite value")

    def what(self, entry: Entry) -> str:
        """The chunk, for an error: its file, first row, recorded producer and seq."""
        return (f"{self.path}: chunk at row {entry.row} (producer {entry.producer!r:.100}, "
                f"seq {entry.seq})")


def _fail(path: Path, why: str) -> RecordingError:
    return RecordingError(f"{path}: not a saestream recording shard ({why})")


def read_shard(path: Path) -> Shard:
    """Parse and check a shard's header and index (not its rows). Raises RecordingError for
    every malformed shard, and for what the wire could not carry when it is replayed."""
    try:
        with _open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(8)
            if len(raw) < 8:
                raise _fail(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _fail(path, f"header length {n} exceeds the file ({size} bytes)")
            header = bounded_json.loads(fh.read(n))
    except RecursionError:
        raise _fail(path, "its header is nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) \
            from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("saestream.format") != FORMAT:
        raise _fail(path, f"no `saestream.format: {FORMAT}` in its metadata")
    info = header.get(TENSOR)
    if not isinstance(info, dict):
        raise RecordingError(f"{path}: no tensor {TENSOR!r} (has "
                             f"{shown(', '.join(sorted(header)), 100)})")
    wire_dtype = info.get("dtype")
    dtype = _WIRE_DTYPE.get(wire_dtype) if isinstance(wire_dtype, str) else None
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype is None or dtype != meta.get("saestream.dtype"):
        raise RecordingError(f"{path}: tensor {TENSOR!r} has dtype {shown(wire_dtype, 20)}, "
                             f"not the recorded {shown(meta.get('saestream.dtype'), 20)}")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(type(s) is int and s >= 1 for s in shape)):
        raise RecordingError(f"{path}: tensor {TENSOR!r} has shape {shown(shape, 60)}, "
                             "expected [rows, d]")
    rows, d = shape
    nbytes = rows * d * ITEMSIZE[dtype]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or offsets[1] - offsets[0] != nbytes or offsets[0] < 0
            or 8 + n + offsets[1] > size):
        raise RecordingError(f"{path}: tensor {TENSOR!r} of shape {shape} does not fit its "
                             f"bytes (data_offsets {shown(offsets, 60)}, file of {size} bytes)")
    hook, model = meta.get("saestream.hook"), meta.get("saestream.model")
    if not _wire_str(hook) or not _HOOK_DIR_RE.match(hook) or hook in (".", ".."):
        raise _fail(path, f"hook {shown(hook, 100)} in its metadata is not a hook name "
                    "(letters, digits and . _ + -, at most 200)")
    if not _wire_str(model):
        raise _fail(path, f"model {shown(model, 100)} in its metadata is not a non-empty "
                    f"str of at most {MAX_STR_LEN} chars")
    entries = _read_index(path, meta, rows)
    return Shard(path, hook, model, dtype, rows, d, 8 + n + offsets[0], entries)


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (through symlinks), else
    RecordingError; never blocks on a FIFO or a device named like a shard (`open_regular`)."""
    try:
        return os.fdopen(open_regular(path), "rb")
    except NotRegularFile as exc:
        raise _fail(path, exc.kind if exc.kind == "a directory" else "not a regular file") \
            from None


def _wire_str(value: object) -> bool:
    """A producer, run, model or hook the wire carries: a non-empty str of at most
    MAX_STR_LEN characters."""
    return type(value) is str and 0 < len(value) <= MAX_STR_LEN


def _bounded_scalar(value: object) -> bool:
    """A `source` value the replayer can put back on the wire: ints within int64 (msgpack
    has no larger), strs no longer than a whole wire header may be (a recorded chunk's came
    within one). Everything else is `check_source`'s to judge."""
    if type(value) is int:
        return -_INT64 <= value < _INT64
    if type(value) is str:
        return len(value) <= DecodeLimits.max_header_nbytes
    return True


def _entry_problem(e: Any) -> str | None:
    """What is wrong with one index entry's fields (types and the wire's ranges), or None."""
    if not isinstance(e, dict) or set(e) != set(_ENTRY_KEYS):
        return f"not a map of {', '.join(_ENTRY_KEYS)}"
    for key in ("producer", "run"):
        if not _wire_str(e[key]):
            return f"{key} is not a non-empty str of at most {MAX_STR_LEN} chars"
    for key, top in (("seq", _INT64), ("checksum", 1 << 32), ("row", None), ("n", None)):
        if type(e[key]) is not int or e[key] < 0 or (top is not None and e[key] >= top):
            return f"{key} is not an int >= 0" + (f" and < 2**{top.bit_length() - 1}"
                                                 if top is not None else "")
    if not isinstance(e["source"], dict):
        return "source is not a map"
    ts = e["ts"]
    if not ((type(ts) is float and math.isfinite(ts))
            or (type(ts) is int and abs(ts) < _INT64)):
        return "ts is not a finite number"
    return None


def _read_index(path: Path, meta: dict[str, Any], rows: int) -> list[Entry]:
    """The chunks' index: entries that tile the rows [0, rows) in order."""
    try:
        raw = bounded_json.loads(meta.get("saestream.chunks", ""))
    except RecursionError:
        raise RecordingError(f"{path}: its chunk index is nested too deeply") from None
    except bounded_json.TooManyValues as exc:
        raise RecordingError(f"{path}: its chunk index is refused: {exc}") from None
    except (TypeError, ValueError):
        raise RecordingError(f"{path}: its chunk index is not JSON") from None
    if not isinstance(raw, list) or not raw:
        raise RecordingError(f"{path}: its chunk index is empty")
    entries, row = [], 0
    for i, e in enumerate(raw):
        problem = _entry_problem(e)
        if problem:
            raise RecordingError(f"{path}: chunk index entry {i} is malformed ({problem})")
        try:  # it goes back on the wire when replayed: the wire's rules for provenance
            check_source(e["source"], e["n"])
        except WireError as exc:
            raise RecordingError(f"{path}: chunk index entry {i}: {exc}") from None
        for key, value in e["source"].items():
            if not all(map(_bounded_scalar, value if type(value) is list else [value])):
                raise RecordingError(
                    f"{path}: chunk index entry {i}: source[{shown(key, 50)}] holds an int "
                    f"beyond 64 bits or a str over {DecodeLimits.max_header_nbytes} chars")
        if e["row"] != row or e["n"] < 1:
            raise RecordingError(f"{path}: chunk index entry {i} starts at row {e['row']}, "
                                 f"expected {row}")
        row += e["n"]
        entries.append(Entry(**{k: e[k] for k in _ENTRY_KEYS}))
    if row != rows:
        raise RecordingError(f"{path}: its chunk index covers {row} rows, the tensor holds "
                             f"{rows}")
    return entries


class Recording:
    """A recorded hook directory, read as one dataset: its shards in name (= recording)
    order, their chunks in arrival order. Checks every header on open, rows on demand."""

    def __init__(self, hook_dir: Path) -> None:
        hook_dir = Path(hook_dir)
        if not hook_dir.is_dir():
            what = "not a directory" if hook_dir.exists() else "no such directory"
            raise RecordingError(f"{hook_dir}: {what} (give a recorded hook directory, "
                                 "DIR/<hook>)")
        try:
            names = [p.name for p in hook_dir.iterdir()]
        except OSError as exc:
            raise RecordingError(f"{hook_dir}: cannot list it ({exc.strerror or exc})") from None
        paths = sorted(hook_dir / name for name in names if SHARD_RE.match(name))
        if not paths:
            others = [name for name in names if not name.startswith(".")]
            hint = f" (it holds {shown(', '.join(sorted(others)[:3]))}…)" if others else ""
            raise RecordingError(f"{hook_dir}: no recorded shards (shard-*.safetensors); give a "
                                 f"hook's directory of a recording, DIR/<hook>{hint}")
        self.dir = hook_dir
        self.shards = [read_shard(p) for p in paths]
        first = self.shards[0]
        self.hook, self.model, self.d = first.hook, first.model, first.d
        for s in self.shards[1:]:
            if (s.hook, s.d) != (self.hook, self.d):
                raise RecordingError(f"{s.path}: hook {s.hook} d={s.d}, but {first.path} holds "
                                     f"hook {self.hook} d={self.d}: one hook per directory")
            if s.model != self.model:
                raise RecordingError(f"{s.path}: model {s.model!r:.100}, but {first.path} holds "
                                     f"{self.model!r:.100}: one model per directory")
        self.starts = np.cumsum([0] + [s.rows for s in self.shards])
        self.label = str(hook_dir)

    # -- as a dataset (saestream train --input) ------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.starts[-1]), self.d

    @property
    def n_chunks(self) -> int:
        return sum(len(s.entries) for s in self.shards)

    def rows(self, index: np.ndarray):  # -> torch.Tensor [len(index), d], float32
        """Rows by global index (sorted ascending), as float32."""
        import torch

        cuts = np.searchsorted(index, self.starts)
        parts = []
        for i in np.flatnonzero(np.diff(cuts)):  # the shards this batch touches
            shard, lo, hi = self.shards[i], cuts[i], cuts[i + 1]
            block = np.ascontiguousarray(shard.words()[index[lo:hi] - self.starts[i]])
            signed = torch.from_numpy(block.view(np.int32 if block.itemsize == 4 else np.int16))
            parts.append(signed.view(DTYPES[shard.dtype]).float())
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def check_finite(self) -> None:
        """One pass over every chunk: its checksum and its finiteness (RecordingError)."""
        for shard, entry in self.chunks():
            shard.check(entry)

    # -- as a stream (saestream replay) --------------------------------------------------------

    def chunks(self) -> Iterator[tuple[Shard, Entry]]:
        for shard in self.shards:
            for entry in shard.entries:
                yield shard, entry

