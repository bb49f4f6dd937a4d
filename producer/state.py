"""The producer's state file: where in its shard to continue, so a restart resumes there.

Positions are counted in the shard's token stream: `tokens_done` = (shard contexts done) *
(tokens emitted per context) + (tokens emitted from the next context), within `epoch`. The
position is what the consumer has committed (when one answers on the control channel), else
what has been sent. The file also keeps the producer's id, where each consumer run first
took its stream (`origins`), and the current `--max-tokens` budget, so a restart after a
crash finishes that budget instead of starting a new one. Written atomically (temp file,
fsync, rename) on exit, every `--state-every` seconds, and at once when a new consumer run
takes the stream.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saestream.common import bounded_json
from saestream.common.files import FileTooLarge, NotRegularFile, probe_dir, read_regular
from saestream.common.settings import MAX_COUNT

STATE_VERSION = 1


class StateError(ValueError):
    """A state file that cannot be used for this run; the message is one line."""


class StateWriteError(Exception):
    """The state file could not be written at exit (the CLI: one line, exit 1); the message
    says what the file still holds."""


@dataclass
class ProducerState:
    corpus: str
    """The `--corpus` value the progress refers to."""
    shard: str
    """`I/N`."""
    seq_len: int
    """Context length in tokens (as fed to the model)."""
    keep_first_token: bool
    epoch: int = 0
    """Epochs completed before the current one (0 during the first)."""
    tokens_done: int = 0
    """Tokens of the current epoch's shard stream that have been sent."""
    tokens_sent_total: int = 0
    """Tokens sent over the file's whole life, all runs and epochs (per hook)."""
    runs: list[str] = field(default_factory=list)
    """Run ids that have written this file, oldest first (the last 20)."""
    updated: float = 0.0
    version: int = STATE_VERSION
    split: str = "all"
    """`--split` the progress refers to (files written before splits existed: `all`)."""
    producer_id: str | None = None
    """The id this stream is known by (used when --producer-id is not given)."""
    origins: dict[str, list[int]] = field(default_factory=dict)
    """Consumer run id -> [epoch, tokens_done] where that run first took this stream."""
    budget: dict | None = None
    """The `--max-tokens` run in progress: {"rows", "start": [epoch, pos], "end": [epoch,
    pos] or None until known, "done"}."""

    def key(self) -> tuple[str, str, str, int, bool]:
        return (self.corpus, self.split, self.shard, self.seq_len, self.keep_first_token)


MAX_STATE_BYTES = 64 << 20
"""Largest state file read: a real one is a few kB (20 run ids, one origin per consumer run)."""


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file (never opened blocking: a FIFO, whose
    open waits for a writer, or a device is refused at once instead of hanging the start)."""
    try:
        return read_regular(path, MAX_STATE_BYTES)
    except NotRegularFile:
        raise StateError(f"state file {str(path)!r} is not a regular file") from None
    except FileTooLarge:
        raise StateError(f"state file {str(path)!r} is larger than {MAX_STATE_BYTES:,} bytes: "
                         "not a state file") from None


def read_state(path: Path) -> ProducerState | None:
    """The saved state, or None when the file does not exist."""
    try:
        data = bounded_json.loads(_read_regular(Path(path)).decode())
    except FileNotFoundError:
        return None
    except StateError:
        raise
    except RecursionError:
        raise StateError(f"state file {str(path)!r} is unreadable: nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"state file {str(path)!r} is unreadable: {exc}") from exc
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("version") != STATE_VERSION:
            raise StateError(f"state file {str(path)!r}: unsupported version {data.get('version')}")
        state = ProducerState(**data)
        _check_types(state)
        return state
    except (TypeError, ValueError) as exc:
        if isinstance(exc, StateError):
            raise
        raise StateError(f"state file {str(path)!r}: bad contents ({exc})") from exc


def _check_types(s: ProducerState) -> None:
    """A hand-edited or foreign file must fail here, in one line, not later in a traceback."""
    def count(x: object) -> bool:  # an int64 counter, with room (as --epochs, --max-tokens)
        return type(x) is int and 0 <= x <= MAX_COUNT

    def position(v: object) -> bool:
        return isinstance(v, list) and len(v) == 2 and all(count(x) for x in v)

    ok = (
        isinstance(s.corpus, str) and isinstance(s.shard, str) and isinstance(s.split, str)
        and type(s.seq_len) is int and type(s.keep_first_token) is bool
        and all(count(x) for x in (s.epoch, s.tokens_done, s.tokens_sent_total))
        and isinstance(s.runs, list) and all(isinstance(r, str) for r in s.runs)
        and (s.producer_id is None or (isinstance(s.producer_id, str) and s.producer_id))
        and isinstance(s.origins, dict) and all(isinstance(k, str) and position(v)
                                                for k, v in s.origins.items())
        and isinstance(s.updated, (int, float))
    )
    if ok and s.budget is not None:
        b = s.budget
        ok = (isinstance(b, dict) and type(b.get("rows")) is int and b["rows"] > 0
              and position(b.get("start")) and (b.get("end") is None or position(b["end"]))
              and type(b.get("done")) is bool
              and (b.get("end") is None or b["end"] >= b["start"]))  # ends before it starts
    if not ok:
        raise ValueError("a field has the wrong type, a negative value, one past 2^62, or a "
                         "budget that ends before it starts")


def check_state(state: ProducerState, expected: ProducerState, path: Path) -> None:
    """A state file written for another corpus/split/shard/context length cannot be resumed."""
    if state.key() != expected.key():
        names = ("corpus", "split", "shard", "seq_len", "keep_first_token")
        have = dict(zip(names, state.key(), strict=True))
        want = dict(zip(names, expected.key(), strict=True))
        diff = ", ".join(f"{k} {have[k]!r} != {want[k]!r}" for k in have if have[k] != want[k])
        raise StateError(
            f"state file {str(path)!r} belongs to another configuration ({diff}); "
            "remove it or pass another --state-file"
        )


class StateLock:
    """This process's use of a state file, for its lifetime: two producers sharing one would
    take the same id and overwrite each other's progress. flock(2) on `FILE.lock` beside it
    (the state file itself is replaced at every save, so it cannot hold a lock); the kernel
    drops the lock when the process dies, kill -9 included. StateError when it is held."""

    def __init__(self, path: Path) -> None:
        self.path = Path(f"{path}.lock")
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # read-only: flock needs no more, and a file open for writing would keep its
            # filesystem from being remounted read-only
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise StateError(f"state file {str(path)!r}: cannot open its lock file "
                             f"{self.path.name} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            raise StateError(f"state file {str(path)!r} is in use by another producer (its "
                             f"lock {self.path.name} is held)") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def check_writable(path: Path) -> None:
    """Refuse at start-up (StateError: one line, exit 2) a state file that could not be
    saved, rather than fail minutes in: a temporary file is written, synced and removed
    beside it, as every save does."""
    try:
        probe_dir(Path(path).parent)
    except OSError as exc:
        raise StateError(f"state file {str(path)!r} cannot be written: "
                         f"{exc.strerror or exc}") from exc


def write_state(path: Path, state: ProducerState) -> None:
    """Replace `path` atomically with `state` as JSON."""
    path = Path(path)
    state.updated = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(state), fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
