"""The producer's state file: how far into its shard it has sent, so a restart continues there.

Progress is counted in the shard's token stream: `tokens_done` = (shard contexts done) *
(tokens emitted per context) + (tokens emitted from the next context). Written atomically
(temp file, fsync, rename) on exit and every `--state-every` seconds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_VERSION = 1


class StateError(ValueError):
    """A state file that cannot be used for this run; the message is one line."""


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

    def key(self) -> tuple[str, str, str, int, bool]:
        return (self.corpus, self.split, self.shard, self.seq_len, self.keep_first_token)


def read_state(path: Path) -> ProducerState | None:
    """The saved state, or None when the file does not exist."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"state file {str(path)!r} is unreadable: {exc}") from exc
    try:
        if data.get("version") != STATE_VERSION:
            raise StateError(f"state file {str(path)!r}: unsupported version {data.get('version')}")
        return ProducerState(**data)
    except TypeError as exc:
        raise StateError(f"state file {str(path)!r}: bad contents ({exc})") from exc


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
