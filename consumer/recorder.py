"""The recorder thread: one job, appending accepted chunks to a recording's shards.

The receiver hands it every chunk the ledger admitted (the rows it keeps: a re-sent chunk's
rows that the ledger already accounts for are trimmed before they get here, so they are not
recorded twice) through a bounded queue; when the disk is slower than the stream, `add`
blocks and the receiver stops reading, so ZeroMQ's high-water marks push back on the
producers exactly as a full shuffle buffer does, and the recording stays complete.

Rows are also trimmed against the recording itself: at start the recorder reads the index of
every shard already in the directory, and rows whose stream positions a shard holds are not
written again (`saestream_record_skipped_tokens_total`). So a consumer or sink that crashed
after writing a shard, whose producers then re-send what its last snapshot did not hold,
records each position once (chunks without positions cannot be matched and are kept).

A shard that cannot be written (full disk, read-only file system, I/O error) is counted by
reason and logged, its rows are dropped from the recording, and the next shard is tried
afresh: recording never stops training. Rows held for a shard not yet full are written on a
clean stop (SIGTERM) and on `sync`; a SIGKILL loses them (at most --record-shard-tokens per
hook), never a written shard.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saestream.common.errors import UserError
from saestream.common.logs import RateLimitedLog, shown
from saestream.common.recording import (
    SHARD_RE,
    Entry,
    Lost,
    RecordingError,
    RecordingLock,
    ShardWriter,
    Written,
    hook_dir_name,
    new_writer_id,
    read_shard,
)
from saestream.common.wire import WORD_DTYPES, Chunk, crc32
from saestream.consumer.checkpoint import FAILURE_REASONS, failure_reason
from saestream.consumer.metrics import ConsumerMetrics

if TYPE_CHECKING:
    from saestream.consumer.receiver import HookInfo

log = logging.getLogger("saestream.consumer.recorder")

QUEUE_CHUNKS = 32
"""Chunks waiting for the recorder before the receiver blocks (at most 32 × --max-chunk-bytes
of memory; a few shards' worth of disk latency)."""
POLL_SECONDS = 0.1


class Recorder(threading.Thread):
    """Owns the recording directory `root` (its lock) from construction until `stop`.

    :param flag: the flag that named `root`, for errors (`--record`, `--out`).
    :param on_lost: called (on this thread) with a hook and the entries of each shard that
        could not be written, before `losses` counts it.
    Raises UserError when `root` is not writable or another process records into it.
    """

    def __init__(self, root: Path, hooks: Collection[str], shard_tokens: int,
                 metrics: ConsumerMetrics, *, flag: str,
                 on_lost: Callable[[str, list[Entry]], None] | None = None) -> None:
        super().__init__(name="recorder", daemon=True)
        self.on_lost = on_lost
        self.losses = 0
        """Shards that could not be written, so far."""
        self.dropped = dict.fromkeys(hooks, 0)
        """Rows of those shards, per hook."""
        for hook in hooks:
            hook_dir_name(hook)  # before any work: a hook that cannot be a directory
        self.flag = flag
        self.lock = RecordingLock(root, flag, hooks=hooks)
        for stale in self.lock.stale:
            log.info("removed %s, left by an interrupted recording", stale)
        self.root = Path(root)
        self.metrics = metrics
        writer, started = new_writer_id()
        self.writers = {h: ShardWriter(self.root / hook_dir_name(h), h, shard_tokens, writer,
                                       started) for h in hooks}
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(QUEUE_CHUNKS)
        self.error: BaseException | None = None
        self.written = dict.fromkeys(hooks, 0)
        """Rows in complete shards, per hook (for progress lines)."""
        self._rlog = RateLimitedLog(log, 10.0)
        self.recorded: dict[str, tuple[int, str]] = {}
        """Per hook whose directory holds shards already: their width and model, which every
        row written next must share (the readers refuse a directory that mixes them)."""
        self.held = {h: self._read_held(h) for h in hooks}
        for reason in FAILURE_REASONS:  # every series exported from the start, at 0
            metrics.record_failures.labels(reason=reason)
        """Per hook, the stream positions the recording's shards already hold."""
        for h in hooks:
            for m in (metrics.recorded_tokens, metrics.recorded_shards, metrics.recorded_bytes,
                      metrics.record_dropped_tokens, metrics.record_skipped_tokens):
                m.labels(hook=h)
            metrics.record_pending_tokens.labels(hook=h).set_function(
                lambda w=self.writers[h]: w.pending_rows)

    # -- the receiver's side --------------------------------------------------------------------

    def add(self, chunk: Chunk, parts: list[tuple[int, int]],
            should_stop: Callable[[], bool]) -> None:
        """Queue the kept rows of an admitted chunk (blocks while the queue is full)."""
        item = ("chunk", (chunk, parts))
        while True:
            if self.error is not None or not self.is_alive():
                self.metrics.record_dropped_tokens.labels(hook=chunk.hook).inc(
                    sum(m for _, m in parts))
                return
            try:
                self.queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                if should_stop():
                    return

    def sync(self, done: Callable[[], None], since: int | None = None) -> None:
        """Write every hook's held rows; then call `done` if no shard was lost since
        `losses` was `since` (default: now), so every row queued before is on disk: read
        `losses` before taking the cut of what `done` will declare held."""
        self.queue.put(("sync", (done, self.losses if since is None else since)))

    def stop(self, timeout: float = 60.0) -> None:
        """Write what is queued and held, then end the thread and release the directory."""
        if self.is_alive():
            self.queue.put(("stop", None))
            self.join(timeout)
        self.lock.release()

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                kind, payload = self.queue.get()
                if kind == "chunk":
                    self._record(*payload)
                    continue
                self._flush_all()
                if kind == "stop":
                    return
                done, since = payload
                if self.losses == since:
                    done()
                else:
                    log.warning("sync: %d shard(s) could not be written since it was asked "
                                "for; their rows are not declared held",
                                self.losses - since)
        except BaseException as exc:  # a bug, not the disk: the main loop reports it
            self.error = exc
            log.exception("recorder thread failed")

    def _read_held(self, hook: str) -> HeldPositions:
        held = HeldPositions()
        hook_dir = self.root / hook_dir_name(hook)
        if not hook_dir.is_dir():
            return held
        for path in sorted(p for p in hook_dir.iterdir() if SHARD_RE.match(p.name)):
            try:
                shard = read_shard(path)
            except (RecordingError, OSError) as exc:
                log.warning("%s: unreadable (%s); its rows are not matched against", path, exc)
                continue
            self.recorded.setdefault(hook, (shard.d, shard.model))
            for e in shard.entries:
                held.add(e.producer, e.source, 0, e.n)
        return held

    def fix_hooks(self, hook_info: dict[str, HookInfo]) -> None:
        """Hooks whose directory holds shards take those shards' width and model: a chunk of
        another is rejected (`dim`, `model`) rather than written where the readers would then
        refuse the whole directory. UserError when the width known already differs."""
        from saestream.consumer.receiver import HookInfo  # the receiver imports this module

        for hook, (d, model) in self.recorded.items():
            info = hook_info.get(hook)
            if info is None:
                hook_info[hook] = HookInfo(d, None, model)
                continue
            if info.d != d or (info.model is not None and info.model != model):
                have = f"d={info.d}" + (f", model {info.model}" if info.model else "")
                raise UserError(f"{self.flag} {self.root}: the recording of hook {hook} holds "
                                f"rows of d={d} from model {model}, and this run's are {have}: "
                                "record them into another directory")
            info.model = info.model or model

    def _record(self, chunk: Chunk, parts: list[tuple[int, int]]) -> None:
        writer = self.writers[chunk.hook]
        words = _words(chunk)
        held = self.held[chunk.hook]
        kept = [new for first, rows in parts
                for new in held.missing(chunk.producer, chunk.source, first, rows)]
        skipped = sum(m for _, m in parts) - sum(m for _, m in kept)
        if skipped:
            self.metrics.record_skipped_tokens.labels(hook=chunk.hook).inc(skipped)
            self._rlog.warning(f"skip:{chunk.producer}", "recording %s: %d rows of producer %s "
                               "are in the recording already, not written again", chunk.hook,
                               skipped, shown(chunk.producer))
        for first, rows in kept:
            held.add(chunk.producer, chunk.source, first, rows)
        whole = kept == [(0, chunk.n)]
        for first, rows in kept:
            part = words[first : first + rows]
            source = chunk.source if whole else _moved(chunk.source, first, rows)
            checksum = chunk.header["checksum"] if whole else crc32(part)
            entry = Entry(chunk.producer, chunk.run, chunk.seq, source, 0, rows, checksum,
                          chunk.ts)
            self._report(chunk.hook, writer.add(part, chunk.dtype, chunk.model, entry))

    def _flush_all(self) -> bool:
        """Write every hook's held rows; True when nothing was lost."""
        ok = True
        for hook, writer in self.writers.items():
            ok = self._report(hook, writer.flush()) and ok
        return ok

    def _report(self, hook: str, results: list[Written | Lost]) -> bool:
        """Count written and lost shards; a lost one is logged (rate-limited), training goes
        on. True when none was lost."""
        m = self.metrics
        ok = True
        for r in results:
            if isinstance(r, Written):
                self.written[hook] += r.rows
                m.recorded_tokens.labels(hook=hook).inc(r.rows)
                m.recorded_shards.labels(hook=hook).inc()
                m.recorded_bytes.labels(hook=hook).inc(r.nbytes)
                continue
            ok = False
            held = self.held[hook]
            for e in r.entries:  # a re-sent row is written, not skipped as held
                held.remove(e.producer, e.source, e.n)
            if self.on_lost is not None:
                self.on_lost(hook, r.entries)
            self.dropped[hook] += r.rows
            self.losses += 1  # after on_lost: a cut taken once it counts lacks these rows
            reason = failure_reason(r.error)
            m.record_failures.labels(reason=reason).inc()
            m.record_dropped_tokens.labels(hook=hook).inc(r.rows)
            self._rlog.warning(f"fail:{reason}", "recording %s: a shard of %d rows could not be "
                               "written (%s: %s); its rows are not recorded, training goes on",
                               hook, r.rows, reason, r.error)
        return ok


def _words(chunk: Chunk) -> np.ndarray:
    """The chunk's values as unsigned words [n, d] (no copy)."""
    import torch

    signed = chunk.acts.view(torch.int32 if chunk.acts.element_size() == 4 else torch.int16)
    return signed.numpy().view(WORD_DTYPES[chunk.dtype])


def _moved(source: dict[str, Any], first: int, rows: int) -> dict[str, Any]:
    """A chunk's `source` for rows [first, first + rows) of it: positions moved along."""
    if "start" not in source:
        return dict(source)
    start = source["start"] + first
    return {**source, "start": start, "end": start + rows}


class HeldPositions:
    """Which positions of each producer's stream (epoch, [start, end)) a recording holds, as
    sorted, merged ranges: small however long the recording (one range per gap)."""

    def __init__(self) -> None:
        self.ranges: dict[tuple[Any, ...], list[tuple[int, int]]] = {}

    @staticmethod
    def _key(producer: str, source: dict[str, Any]) -> tuple[Any, ...] | None:
        if "start" not in source:
            return None
        return (producer, source.get("corpus"), source.get("split"), source.get("shard"),
                source["epoch"])

    def add(self, producer: str, source: dict[str, Any], first: int, rows: int) -> None:
        """Rows [first, first + rows) of a chunk with this `source` are recorded."""
        key = self._key(producer, source)
        if key is None or rows <= 0:
            return
        lo = source["start"] + first
        spans = self.ranges.setdefault(key, [])
        merged = [(lo, lo + rows)]
        for a, b in spans:
            if b < merged[0][0] or a > merged[0][1]:
                merged.append((a, b))
            else:
                merged[0] = (min(a, merged[0][0]), max(b, merged[0][1]))
        spans[:] = sorted(merged)

    def remove(self, producer: str, source: dict[str, Any], rows: int) -> None:
        """The first `rows` rows of a chunk with this `source` are not recorded after all."""
        key = self._key(producer, source)
        if key is None or key not in self.ranges:
            return
        lo, hi = source["start"], source["start"] + rows
        self.ranges[key] = [(a2, b2) for a, b in self.ranges[key]
                            for a2, b2 in ((a, min(b, lo)), (max(a, hi), b)) if a2 < b2]

    def missing(self, producer: str, source: dict[str, Any], first: int,
                rows: int) -> list[tuple[int, int]]:
        """The parts (first, rows) of rows [first, first + rows) not recorded yet."""
        key = self._key(producer, source)
        if key is None or key not in self.ranges:
            return [(first, rows)] if rows > 0 else []
        start = source["start"]
        lo, hi = start + first, start + first + rows
        out = []
        for a, b in self.ranges[key]:
            if b <= lo or a >= hi:
                continue
            if a > lo:
                out.append((lo - start, a - lo))
            lo = max(lo, b)
        if lo < hi:
            out.append((lo - start, hi - lo))
        return out

