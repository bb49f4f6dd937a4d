"""The receiver thread: one job, moving valid chunks from the PULL socket into the shuffle buffer.

Everything a peer sends is untrusted. A message is decoded and validated by the wire module;
anything wrong is dropped, counted by reason and logged at most once per interval per
reason. The ledger decides which rows are new (a re-sent chunk's rows already accounted for
are trimmed) and bounds how many producers are tracked. When the hook's buffer is full the
thread blocks in `put` and stops reading the socket, so ZeroMQ's high-water marks push back
on the producers and nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from saestream.common.logs import RateLimitedLog, shown
from saestream.common.wire import DTYPES, Chunk, DecodeLimits, WireError, decode_chunk
from saestream.consumer.buffer import BufferSet
from saestream.consumer.ledger import Ledger, LedgerFull, StreamMismatch
from saestream.consumer.metrics import ConsumerMetrics
from saestream.consumer.recorder import Recorder

log = logging.getLogger("saestream.consumer.receiver")

CONSUMER_REJECT_REASONS = ("model", "producers", "positions", "stream", "error")
"""Reasons the consumer adds to the wire module's: a hook's model changed; a new producer id
beyond --max-producers; a chunk that would leave too many holes in its producer's positions;
a chunk from another corpus/split/shard than its producer id declared; anything else."""
EXPIRY_CHECK_SECONDS = 5.0


@dataclass
class HookInfo:
    """What the consumer learned about a hook from its first valid message (or a checkpoint)."""

    d: int
    dtype: str | None
    """Wire dtype of the hook's first message: the buffer's dtype (None until seen)."""
    model: str | None
    """Model of the hook's first message; later messages of another model are rejected."""


class Receiver(threading.Thread):
    """Reads `sock` until `stop` is set; owns the socket (closes it on exit).

    :param hooks: hooks to accept; others are rejected (`hook`).
    :param hook_info: hooks whose width (and model) are already known, e.g. from `--d-in` or a
        checkpoint; the rest are learned from their first valid message.
    """

    def __init__(
        self,
        sock: zmq.Socket,
        buffers: BufferSet,
        metrics: ConsumerMetrics,
        ledger: Ledger,
        *,
        hooks: Collection[str],
        hook_info: Mapping[str, HookInfo] | None = None,
        limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen)
        log_interval: float = 10.0,
        poll_ms: int = 100,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__(name="receiver", daemon=True)
        self.sock = sock
        self.buffers = buffers
        self.metrics = metrics
        self.ledger = ledger
        self.hooks = frozenset(hooks)
        self.hook_info: dict[str, HookInfo] = dict(hook_info or {})
        self.limits = limits
        self.poll_ms = poll_ms
        self.recorder = recorder
        """Also gets the kept rows of every admitted chunk (`--record`), before the buffer."""
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        """Guards `hook_info` against the training loop's reads."""
        self._rlog = RateLimitedLog(log, log_interval)
        self._next_expiry = 0.0

    # -- thread -----------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                if poller.poll(self.poll_ms):
                    self.handle(self.sock.recv_multipart(copy=False))
                self._expire()
        except BaseException as exc:  # a bug, not a peer: the training loop reports it
            self.error = exc
            log.exception("receiver thread failed")
        finally:
            self.sock.close(linger=0)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.buffers.wake()
        self.join(timeout)

    # -- one message ------------------------------------------------------------------------

    def handle(self, frames: list[Any]) -> bool:
        """Validate one message and buffer its new rows; True if accepted."""
        try:
            chunk = self._decode(frames)
        except WireError as exc:
            return self._reject(exc.reason, str(exc))
        except Exception as exc:  # never let a peer's bytes stop the daemon
            return self._reject("error", f"{type(exc).__name__}: {exc}")
        info = self._hook_info(chunk)
        if isinstance(info, str):
            return self._reject(info.partition(":")[0], info)
        try:
            adm = self.ledger.admit(chunk.producer, chunk.hook, chunk.n, chunk.source)
        except LedgerFull:
            return self._reject("producers", f"producers: {chunk.producer!r:.100} is one more "
                                f"than --max-producers {self.ledger.max_producers}")
        except StreamMismatch as exc:
            return self._reject("stream", f"stream: producer {chunk.producer!r:.100}: {exc}")
        except ValueError as exc:
            return self._reject("positions", f"positions: producer {chunk.producer!r:.100}: "
                                f"{exc}")
        self._track(chunk, adm)
        if self.recorder is not None and adm.parts:
            self.recorder.add(chunk, adm.parts, self.stop_event.is_set)
        buf = self.buffers.get_or_create(chunk.hook, info.d, DTYPES[info.dtype or chunk.dtype])
        for first, rows in adm.parts:
            def commit(written: int, m: int, first: int = first) -> None:
                self.ledger.commit(adm, chunk.hook, first + written, m)

            buf.put(chunk.acts[first : first + rows], source=adm.producer.index,
                    should_stop=self.stop_event.is_set, on_commit=commit)
        return True

    def _decode(self, frames: list[Any]) -> Chunk:
        # With every hook's width known, decode_chunk checks it before decompressing.
        known = {h: i.d for h, i in self.hook_info.items()}
        expect_d = known if set(known) >= self.hooks else None
        return decode_chunk(frames, limits=self.limits, expect_hook=self.hooks, expect_d=expect_d)

    def _hook_info(self, chunk: Chunk) -> HookInfo | str:
        """The hook's width, dtype and model (learned from its first message), or a reject."""
        info = self.hook_info.get(chunk.hook)
        if info is None:
            with self.lock:
                info = self.hook_info[chunk.hook] = HookInfo(chunk.d, chunk.dtype, chunk.model)
            log.info("hook %s: d_in=%d dtype=%s model=%s (from producer %s)", shown(chunk.hook),
                     chunk.d, chunk.dtype, shown(chunk.model), shown(chunk.producer))
        elif chunk.d != info.d:
            return f"dim: d={chunk.d} for hook {chunk.hook}, expected {info.d}"
        elif info.model is not None and chunk.model != info.model:
            return f"model: {chunk.model!r:.100} on hook {chunk.hook}, not {info.model!r}"
        else:
            with self.lock:
                info.model = info.model or chunk.model
                info.dtype = info.dtype or chunk.dtype
        return info

    def _reject(self, reason: str, msg: str) -> bool:
        self.metrics.rejected_messages.labels(reason=reason).inc()
        self._rlog.warning(reason, "dropped a message: %s", msg)
        return False

    def _track(self, chunk: Chunk, adm: Any) -> None:
        """Sequence tracking (gaps and restarts are counted, never fatal) and metrics."""
        name, m = chunk.producer, self.metrics
        status, prev = self.ledger.record_message(adm, chunk.run, chunk.seq, chunk.source)
        if status == "new":
            log.info("new producer %s (run %s)", shown(name), shown(chunk.run))
        elif status == "restart":
            m.producer_restarts.labels(producer=name).inc()
            log.info("producer %s restarted: run %s", shown(name), shown(chunk.run))
        elif status == "gap":
            m.sequence_gaps.labels(producer=name).inc()
            self._rlog.warning(f"gap:{name}", "producer %s run %s: seq %d after %d",
                               shown(name), shown(chunk.run), chunk.seq, prev)
        kept = chunk.n - adm.duplicates
        m.received_messages.labels(producer=name).inc()
        m.received_tokens.labels(producer=name).inc(kept)
        m.received_wire_bytes.labels(producer=name).inc(chunk.wire_nbytes)
        m.producer_last_seen.labels(producer=name).set(time.time())
        m.sequence_gaps.labels(producer=name)  # export the series at 0
        m.duplicate_tokens.labels(producer=name).inc(adm.duplicates)
        if adm.duplicates:
            self._rlog.warning(f"dup:{name}", "producer %s: %d re-sent rows already accounted "
                               "for, dropped", shown(name), adm.duplicates)

    def _expire(self) -> None:
        now = time.time()
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_CHECK_SECONDS
        for name in self.ledger.expired(now):
            self.metrics.forget_producer(name)
        self.metrics.producers_tracked.set(self.ledger.live_count(now))

    # -- for the training loop --------------------------------------------------------------

    def known_hooks(self) -> dict[str, HookInfo]:
        with self.lock:
            return dict(self.hook_info)
