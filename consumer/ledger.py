"""The consumer's ledger: per producer, what was received and trained, and — for exactly-once
delivery — which positions of its stream are accounted for.

A producer's stream is its corpus shard, position by position (`source` epoch/start/end of
each chunk). A position is *accounted for* once its row is in the shuffle buffer or trained,
or once the producer declared it void (a skipped context, or the end of an epoch). Each
snapshot stores the ledger with the buffer, so what a snapshot accounts for is exactly what
it holds: a producer that asks where to continue (`frontier`) re-sends everything after it,
and rows that arrive twice are trimmed here (`admit`). Several threads use one ledger: the
receiver admits and commits, the training loop credits trained rows, the control socket
reads frontiers; every method takes the ledger's lock.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_POS = 1 << 62
"""End of a void range that closes an epoch: every later position of it is void."""
KEEP_EPOCHS = 16
"""Epochs kept in full behind a producer's frontier (older ones are wholly accounted for)."""
STREAM_KEYS = ("corpus", "split", "shard")
"""What a producer's `stream` must hold: the keys `admit` compares chunks with."""
MAX_RANGES = 1024
"""Most disjoint ranges kept per (producer, hook, epoch); a chunk that would open more is
refused (the producer rewinds to the first hole and fills it)."""

Range = list[int]  # [start, end), end > start


class LedgerError(ValueError):
    """A saved ledger (a snapshot's `producers`) that no ledger of ours wrote: restoring it
    would fail later, in the receiver or the control channel, so it is refused at once."""


def _count(value: Any, what: str, top: int = MAX_POS) -> int:
    """`value` as an int in 0..top (JSON's, never a bool); LedgerError otherwise."""
    if type(value) is not int or not 0 <= value <= top:
        raise LedgerError(f"{what} {value!r:.60} is not a whole number in 0..{top}")
    return value


def _map(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise LedgerError(f"{what} is not a map")
    return value


def _position(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise LedgerError(f"{what} {value!r:.60} is not [epoch, position]")
    return _count(value[0], what), _count(value[1], what)


def _table(value: Any, what: str) -> dict[int, list[Range]]:
    """epoch -> sorted, disjoint [start, end) ranges (what `_add` keeps and relies on)."""
    out: dict[int, list[Range]] = {}
    for key, ranges in _map(value, what).items():
        if not (isinstance(key, str) and key.isdigit()):
            raise LedgerError(f"{what}: epoch {key!r:.60} is not a whole number")
        epoch = _count(int(key), f"{what} epoch")
        if not isinstance(ranges, list):
            raise LedgerError(f"{what}[{epoch}] is not a list of ranges")
        kept: list[Range] = []
        for r in ranges:
            a, b = _position(r, f"{what}[{epoch}] range")
            if a >= b or (kept and kept[-1][1] > a):
                raise LedgerError(f"{what}[{epoch}]: ranges are not sorted, disjoint and "
                                  "non-empty")
            kept.append([a, b])
        out[epoch] = kept
    return out


def _subtract(ranges: list[Range], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) not covered by sorted disjoint `ranges`."""
    out, pos = [], lo
    for a, b in ranges:
        if b <= pos:
            continue
        if a >= hi:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
        if pos >= hi:
            break
    if pos < hi:
        out.append((pos, hi))
    return out


def _add(ranges: list[Range], lo: int, hi: int) -> None:
    """Insert [lo, hi) into sorted disjoint `ranges`, merging what touches it."""
    i = 0
    while i < len(ranges) and ranges[i][1] < lo:
        i += 1
    j = i
    while j < len(ranges) and ranges[j][0] <= hi:
        lo, hi = min(lo, ranges[j][0]), max(hi, ranges[j][1])
        j += 1
    ranges[i:j] = [[lo, hi]]


def _remove(ranges: list[Range], lo: int, hi: int) -> None:
    """Take [lo, hi) out of sorted disjoint `ranges` (splitting the range it falls inside)."""
    out: list[Range] = []
    for a, b in ranges:
        if b <= lo or a >= hi:
            out.append([a, b])
            continue
        if a < lo:
            out.append([a, lo])
        if b > hi:
            out.append([hi, b])
    ranges[:] = out


def _touches(ranges: list[Range], lo: int, hi: int) -> bool:
    """Whether [lo, hi) would merge with one of `ranges` (overlap or shared end)."""
    return any(a <= hi and b >= lo for a, b in ranges)


def _covering(ranges: list[Range], pos: int) -> int | None:
    """End of the range holding `pos`, or None."""
    for a, b in ranges:
        if a <= pos < b:
            return b
        if a > pos:
            return None
    return None


@dataclass
class HookLedger:
    """One hook of one producer: accounted positions per epoch, and token counts."""

    data: dict[int, list[Range]] = field(default_factory=dict)
    """epoch -> ranges whose rows were received (buffered or trained)."""
    void: dict[int, list[Range]] = field(default_factory=dict)
    """epoch -> ranges the producer declared void (skipped contexts, epoch ends)."""
    received_tokens: int = 0
    trained_tokens: int = 0
    duplicate_tokens: int = 0
    """Rows dropped because their positions were already accounted for."""
    low: tuple[int, int] | None = None
    """Every position from the producer's origin up to here is accounted for: frontier walks
    start here, and epochs long behind it are dropped, so an endless stream neither slows
    the walk nor grows the ledger."""

    def covered(self, epoch: int, pos: int) -> int | None:
        for table in (self.data, self.void):
            end = _covering(table.get(epoch, []), pos)
            if end is not None:
                return end
        return None

    def frontier(self, origin: tuple[int, int]) -> tuple[int, int]:
        """The first position at or after `origin` not accounted for."""
        epoch, pos = max(origin, self.low) if self.low is not None else origin
        for _ in range(4 * MAX_RANGES + 64):  # bounded walk over data and void ranges
            end = self.covered(epoch, pos)
            if end is None:
                return epoch, pos
            epoch, pos = (epoch + 1, 0) if end >= MAX_POS else (epoch, end)
        return epoch, pos

    def advance(self, origin: tuple[int, int]) -> None:
        """Move `low` up to the frontier and forget epochs more than KEEP_EPOCHS behind it."""
        self.low = self.frontier(origin)
        old = self.low[0] - KEEP_EPOCHS
        for table in (self.data, self.void):
            for e in [e for e in table if e < old]:
                del table[e]

    def merged(self, epoch: int) -> list[Range]:
        """Received and void ranges of an epoch as one sorted, disjoint list."""
        out: list[Range] = []
        for a, b in sorted(self.data.get(epoch, []) + self.void.get(epoch, [])):
            _add(out, a, b)
        return out

    def beyond(self, frontier: tuple[int, int]) -> bool:
        """Whether rows past `frontier` were received (a hole: something was lost)."""
        e0, p0 = frontier
        return any(
            b > p0 if e == e0 else e > e0 for e, rs in self.data.items() for _, b in rs
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "data": {str(e): rs for e, rs in sorted(self.data.items())},
            "void": {str(e): rs for e, rs in sorted(self.void.items())},
            "received_tokens": self.received_tokens,
            "trained_tokens": self.trained_tokens,
            "duplicate_tokens": self.duplicate_tokens,
            "low": None if self.low is None else list(self.low),
        }

    @classmethod
    def from_json(cls, d: Any, what: str = "hook") -> HookLedger:
        """Inverse of `to_json`; LedgerError for anything it would not write."""
        d = _map(d, what)
        return cls(
            _table(d.get("data", {}), f"{what} data"), _table(d.get("void", {}), f"{what} void"),
            _count(d.get("received_tokens", 0), f"{what} received_tokens"),
            _count(d.get("trained_tokens", 0), f"{what} trained_tokens"),
            _count(d.get("duplicate_tokens", 0), f"{what} duplicate_tokens"),
            None if d.get("low") is None else _position(d["low"], f"{what} low"),
        )


@dataclass
class ProducerLedger:
    """Everything the consumer knows of one producer id."""

    index: int
    """Small integer that tags this producer's rows in the shuffle buffer."""
    run: str | None = None
    """Run id of the latest message."""
    last_seq: int | None = None
    """Sequence number of the latest message of `run`."""
    received_messages: int = 0
    received_tokens: int = 0
    trained_tokens: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    """`source` of the latest message (corpus id, token offsets)."""
    stream: dict[str, Any] | None = None
    """What the producer reads (corpus, split, shard, seq_len, first), from its control
    requests; a later request for another stream under the same id is refused."""
    origin: tuple[int, int] | None = None
    """Where this run of the consumer started accounting the producer's stream."""
    hooks: dict[str, HookLedger] = field(default_factory=dict)
    last_seen: float = 0.0
    """Unix time of the latest message or control request (not saved)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "last_seq": self.last_seq,
            "received_messages": self.received_messages,
            "received_tokens": self.received_tokens, "trained_tokens": self.trained_tokens,
            "source": self.source, "stream": self.stream,
            "origin": None if self.origin is None else list(self.origin),
            "hooks": {h: hl.to_json() for h, hl in self.hooks.items()},
        }

    @classmethod
    def from_json(cls, index: int, d: Any, what: str = "producer") -> ProducerLedger:
        """Inverse of `to_json`; LedgerError for anything it would not write (a stream
        without the keys `admit` compares, a hook's `low` that is no position, ...)."""
        d = _map(d, what)
        run, last_seq, stream = d.get("run"), d.get("last_seq"), d.get("stream")
        if run is not None and not isinstance(run, str):
            raise LedgerError(f"{what} run {run!r:.60} is not a string")
        if last_seq is not None and type(last_seq) is not int:
            raise LedgerError(f"{what} last_seq {last_seq!r:.60} is not a whole number")
        if stream is not None and not (isinstance(stream, dict)
                                       and all(k in stream for k in STREAM_KEYS)):
            raise LedgerError(f"{what} stream is not a map of {', '.join(STREAM_KEYS)}")
        origin = d.get("origin")
        return cls(
            index=index, run=run, last_seq=last_seq,
            received_messages=_count(d.get("received_messages", 0),
                                     f"{what} received_messages"),
            received_tokens=_count(d.get("received_tokens", 0), f"{what} received_tokens"),
            trained_tokens=_count(d.get("trained_tokens", 0), f"{what} trained_tokens"),
            source=dict(_map(d.get("source", {}), f"{what} source")), stream=stream,
            origin=None if origin is None else _position(origin, f"{what} origin"),
            hooks={h: HookLedger.from_json(v, f"{what} hook {h!r:.60}")
                   for h, v in _map(d.get("hooks", {}), f"{what} hooks").items()},
        )


@dataclass
class Admission:
    """What `admit` decided for one chunk."""

    producer: ProducerLedger
    parts: list[tuple[int, int]]
    """(first row, rows) of the chunk to keep: all of it, or the rows not yet accounted."""
    epoch: int | None
    start: int | None
    """The chunk's first position (None: the chunk carries no positions)."""
    duplicates: int


class StreamMismatch(ValueError):
    """A chunk from another corpus, split or shard than its producer id declared."""


class LedgerFull(Exception):
    """A new producer id while `max_producers` live ones are tracked."""


class Ledger:
    """Per-producer provenance and positions. `max_producers` bounds the live entries;
    entries idle for `expiry` seconds stop counting against it (their positions stay, up to
    `4 × max_producers` entries in all, oldest idle ones forgotten first)."""

    def __init__(self, max_producers: int = 256, expiry: float = 600.0) -> None:
        self.max_producers = max_producers
        self.expiry = expiry
        self.producers: dict[str, ProducerLedger] = {}
        self._by_index: dict[int, str] = {}
        self._next_index = 0
        self.version = 0
        """Bumped by every change a snapshot would record."""
        self.lock = threading.Lock()

    # -- receiving ------------------------------------------------------------------------

    def _entry(self, name: str, now: float) -> ProducerLedger:
        p = self.producers.get(name)
        if p is None:
            if self._live(now) >= self.max_producers:
                raise LedgerFull(name)
            self._forget_idle(now)
            p = self.producers[name] = ProducerLedger(index=self._next_index)
            self._by_index[p.index] = name
            self._next_index += 1
        p.last_seen = now
        return p

    def admit(self, producer: str, hook: str, n: int, source: Mapping[str, Any],
              now: float | None = None) -> Admission:
        """Which rows of an n-row chunk to keep. Raises LedgerFull for a producer beyond
        the limit, ValueError for a chunk that would leave too many holes."""
        now = time.time() if now is None else now
        with self.lock:
            p = self._entry(producer, now)
            if not all(k in source for k in ("epoch", "start", "end")):
                return Admission(p, [(0, n)], None, None, 0)
            if p.stream is not None and any(
                    k in source and source[k] != p.stream[k] for k in ("corpus", "split", "shard")):
                raise StreamMismatch(
                    f"this id reads {_describe(p.stream)}, the chunk comes from "
                    f"{_describe(source)}: two producers share an id")
            epoch, start = int(source["epoch"]), int(source["start"])
            hl = p.hooks.setdefault(hook, HookLedger())
            if p.origin is None:
                p.origin = (epoch, start)
            taken = hl.merged(epoch)
            fresh = _subtract(taken, start, start + n)
            if hl.low is not None and p.origin[0] <= epoch < hl.low[0] - KEEP_EPOCHS:
                fresh = []  # a forgotten epoch: wholly accounted for
            if len(taken) >= MAX_RANGES and any(not _touches(taken, a, b) for a, b in fresh):
                raise ValueError(f"more than {MAX_RANGES} holes in its positions")
            parts = [(a - start, b - a) for a, b in fresh]
            dup = n - sum(m for _, m in parts)
            hl.duplicate_tokens += dup
            return Admission(p, parts, epoch, start, dup)

    def commit(self, adm: Admission, hook: str, first_row: int, rows: int) -> None:
        """`rows` rows of a chunk, from its row `first_row`, are now in the buffer. Called
        with the buffer's lock held, so a snapshot sees buffer and ledger agree."""
        with self.lock:
            p = adm.producer
            p.received_tokens += rows
            self.version += 1
            if adm.epoch is None:
                return
            hl = p.hooks.setdefault(hook, HookLedger())
            hl.received_tokens += rows
            lo = adm.start + first_row
            _add(hl.data.setdefault(adm.epoch, []), lo, lo + rows)
            if p.origin is not None:
                hl.advance(p.origin)

    def record_message(self, adm: Admission, run: str, seq: int,
                       source: Mapping[str, Any]) -> tuple[str, int | None]:
        """Per-run sequence tracking: ('new'|'restart'|'gap'|'ok', previous seq)."""
        with self.lock:
            p = adm.producer
            prev_run, prev_seq = p.run, p.last_seq
            p.run, p.last_seq = run, seq
            p.received_messages += 1
            p.source = dict(source)
        if prev_run is None:
            return "new", None
        if prev_run != run:
            return "restart", prev_seq
        if prev_seq is not None and seq != prev_seq + 1:
            return "gap", prev_seq
        return "ok", prev_seq

    # -- training ---------------------------------------------------------------------------

    def credit_trained(self, hook: str, counts: Mapping[int, int]) -> None:
        """Trained rows by buffer tag (producer index)."""
        with self.lock:
            for index, n in counts.items():
                name = self._by_index.get(index)
                if name is None:
                    continue
                p = self.producers[name]
                p.trained_tokens += n
                if hook in p.hooks:
                    p.hooks[hook].trained_tokens += n

    # -- the control channel ----------------------------------------------------------------

    def declare(self, producer: str, stream: Mapping[str, Any], hooks: Iterable[str],
                propose: tuple[int, int], now: float | None = None) -> ProducerLedger:
        """A producer says what it reads and where it would start; returns its entry (a copy).
        Raises ValueError when the id is known with another stream, LedgerFull when full."""
        now = time.time() if now is None else now
        with self.lock:
            p = self._entry(producer, now)
            if p.stream is not None and p.stream != dict(stream):
                raise ValueError(
                    f"producer {producer!r} is in this consumer's ledger reading "
                    f"{_describe(p.stream)}, not {_describe(stream)}: give it another "
                    "--producer-id, or point it at its old stream"
                )
            if p.stream is None or p.origin is None:
                self.version += 1
            if p.stream is None and p.origin is not None and propose < p.origin:
                # Its rows arrived before its first request: those sent before them may have
                # reached only a consumer process that died. Account from where it proposes.
                p.origin = propose
                for hl in p.hooks.values():
                    hl.low = None
            p.stream = dict(stream)
            if p.origin is None:
                p.origin = propose
            for h in hooks:
                p.hooks.setdefault(h, HookLedger())
            return copy.deepcopy(p)

    def forget(self, producer: str, hook: str, epoch: int, start: int, end: int) -> None:
        """Positions [start, end) of `epoch` are no longer held (a recording could not write
        them): no longer accounted for, so the frontier falls back to them, the producer
        re-sends them (a hole that stays open) and no cut taken from now on holds them."""
        with self.lock:
            p = self.producers.get(producer)
            hl = p.hooks.get(hook) if p is not None else None
            if hl is None or start >= end:
                return
            if epoch in hl.data:
                _remove(hl.data[epoch], start, end)
            if hl.low is not None and (epoch, start) < hl.low:
                hl.low = (epoch, start)  # epochs forgotten since are taken as unaccounted
            self.version += 1

    def add_void(self, producer: str, ranges: Iterable[tuple[int, int, int]]) -> int:
        """Positions the producer will never send rows for: (epoch, start, end) each. Returns
        how many ranges were refused, as data is: an epoch more than KEEP_EPOCHS past the
        frontier's, or one more disjoint range in an epoch holding MAX_RANGES. A peer sending
        thousands of one-position voids in new epochs grew the ledger, its every copy and
        every snapshot without bound, and slowed every producer's answers; a producer offers
        its recent voids again in every request, so one refused while far ahead is taken
        once the frontier comes near."""
        refused = 0
        with self.lock:
            p = self.producers.get(producer)
            if p is None:
                return 0
            for hl in p.hooks.values():
                changed = False
                base = (hl.low or p.origin or (0, 0))[0]
                merged: dict[int, list[Range]] = {}
                for epoch, a, b in ranges:
                    if not (0 <= a < b) or (hl.low is not None and
                                            epoch < hl.low[0] - KEEP_EPOCHS) \
                            or not _subtract(hl.void.get(epoch, []), a, b):  # void already
                        continue
                    if epoch not in merged:
                        merged[epoch] = hl.merged(epoch)
                    taken = merged[epoch]
                    if epoch > base + KEEP_EPOCHS or (len(taken) >= MAX_RANGES
                                                      and not _touches(taken, a, b)):
                        refused += 1
                        continue
                    _add(hl.void.setdefault(epoch, []), a, b)
                    _add(taken, a, b)
                    changed = True
                if changed:
                    self.version += 1
                    if p.origin is not None:
                        hl.advance(p.origin)
        return refused

    # -- persistence and inspection ---------------------------------------------------------

    def _live(self, now: float) -> int:
        return sum(1 for p in self.producers.values() if now - p.last_seen < self.expiry)

    def live_count(self, now: float) -> int:
        """Producers heard from within the expiry."""
        with self.lock:
            return self._live(now)

    def expired(self, now: float) -> list[str]:
        """Producers idle past the expiry (for the metrics to drop their series)."""
        with self.lock:
            return [n for n, p in self.producers.items() if now - p.last_seen >= self.expiry]

    def _forget_idle(self, now: float) -> None:
        idle = sorted(
            (p.last_seen, n) for n, p in self.producers.items()
            if now - p.last_seen >= self.expiry
        )
        while len(self.producers) >= 4 * self.max_producers and idle:
            _, name = idle.pop(0)
            p = self.producers.pop(name)
            self._by_index.pop(p.index, None)

    def copy(self) -> Ledger:
        with self.lock:
            other = Ledger(self.max_producers, self.expiry)
            other.producers = copy.deepcopy(self.producers)
            other._by_index = dict(self._by_index)
            other._next_index = self._next_index
            other.version = self.version
            return other

    def ordinals(self) -> dict[int, int]:
        """Buffer tag -> position in `to_json`'s order (the tags `from_json` gives back)."""
        with self.lock:
            return {self.producers[n].index: i for i, n in enumerate(sorted(self.producers))}

    def to_json(self) -> dict[str, dict[str, Any]]:
        """Producers by name, sorted: the order snapshots keep (their JSON is written with
        sorted keys), so a producer's position in it is its buffer tag in the snapshot."""
        with self.lock:
            return {name: self.producers[name].to_json() for name in sorted(self.producers)}

    @classmethod
    def from_json(cls, data: Any, max_producers: int = 256,
                  expiry: float = 600.0) -> Ledger:
        """Inverse of `to_json`; LedgerError (a ValueError) for a map it would not write."""
        ledger = cls(max_producers, expiry)
        now = time.time()
        for i, (name, d) in enumerate(sorted(_map(data, "producers").items())):
            p = ProducerLedger.from_json(i, d, f"producer {name!r:.60}")
            p.last_seen = now
            ledger.producers[name] = p
            ledger._by_index[i] = name
        ledger._next_index = len(ledger.producers)
        return ledger

    def get(self, producer: str) -> ProducerLedger | None:
        with self.lock:
            p = self.producers.get(producer)
            return None if p is None else copy.deepcopy(p)


def _describe(stream: Mapping[str, Any]) -> str:
    """The stream's keys, `first` (the first position kept) only where a stream names it."""
    keys = ("corpus", "split", "shard", "seq_len", *(("first",) if "first" in stream else ()))
    return ", ".join(f"{k} {stream.get(k)!r}" for k in keys)
