"""The receiver thread: one job, moving valid chunks from the PULL socket into the shuffle buffer.

Everything a peer sends is untrusted. A message is decoded and validated by the wire module;
anything wrong is dropped, counted by reason and logged at most once per interval per
reason. The ledger decides which rows are new (a re-sent chunk's rows already accounted for
are trimmed) and bounds how many producers are tracked. When the hook's buffer is full the
thread blocks in `put` and stops reading the socket, so ZeroMQ's high-water marks push back
on the producers and nothing is dropped.

Decoding and validation (lz4, crc32, numpy: they release the GIL) can run on a pool of
`decode_threads` threads. The receiver thread still reads the socket and settles every message
itself, in the order it was received: ZeroMQ's PULL keeps each peer's messages in order, so
per producer the ledger, the sequence tracking and the buffer see exactly what inline decoding
gives them. At most `2 × decode_threads` messages are in flight, so a full buffer still stops
the socket reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from saestream.common.devices import codec_threads
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
IN_FLIGHT_PER_THREAD = 2
"""Messages decoding or decoded but not yet settled, per decode thread: enough to keep every
thread busy while the receiver settles the oldest; bounded, so backpressure still holds."""
IN_FLIGHT_POLL_MS = 1
"""While messages are in flight, how long the receiver waits for another before it looks
whether the oldest is decoded (a bound on the latency decoding on the pool adds)."""


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
    :param decode_threads: threads that decode and validate (1 = inline, on this thread;
        0 = `codec_threads()`'s default for this machine).
    :param dealt: producers deal their chunks among this receiver and others (the ranks of a
        data-parallel consumer): a gap in a producer's `seq` is the other ranks' share, not
        a loss, so it is neither counted nor logged.
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
        dealt: bool = False,
        decode_threads: int = 1,
    ) -> None:
        super().__init__(name="receiver", daemon=True)
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {decode_threads}")
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
        self.dealt = dealt
        self.decode_threads = codec_threads(decode_threads)
        self.max_in_flight = IN_FLIGHT_PER_THREAD * self.decode_threads
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
        pool: ThreadPoolExecutor | None = None
        if self.decode_threads > 1:
            pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
            log.info("decoding on %d threads", self.decode_threads)
        pending: deque[Future[Chunk]] = deque()
        try:
            while not self.stop_event.is_set():
                if pool is not None:
                    self._pump(poller, pool, pending)
                elif poller.poll(self.poll_ms):
                    self.handle(self.sock.recv_multipart(copy=False))
                self._expire()
        except BaseException as exc:  # a bug, not a peer: the training loop reports it
            self.error = exc
            log.exception("receiver thread failed")
        finally:
            # Messages in flight at a stop are dropped unsettled, like those still queued in
            # ZeroMQ: the ledger never counted them, so producers re-send them.
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self.sock.close(linger=0)

    def _pump(self, poller: zmq.Poller, pool: ThreadPoolExecutor,
              pending: deque[Future[Chunk]]) -> None:
        """Read one message onto the pool while fewer than `max_in_flight` are in flight,
        then settle the decoded ones at the head of `pending`, oldest first."""
        if len(pending) < self.max_in_flight:
            if poller.poll(IN_FLIGHT_POLL_MS if pending else self.poll_ms):
                frames = self.sock.recv_multipart(copy=False)
                pending.append(pool.submit(self._decode, frames, self._expect_d()))
        elif not pending[0].done():  # full: only settling the oldest makes room
            wait_futures([pending[0]], timeout=self.poll_ms / 1000)
        while pending and pending[0].done():
            self._settle(pending.popleft().result)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.buffers.wake()
        self.join(timeout)

    # -- one message ------------------------------------------------------------------------

    def handle(self, frames: list[Any]) -> bool:
        """Validate one message and buffer its new rows; True if accepted."""
        return self._settle(lambda: self._decode(frames, self._expect_d()))

    def _settle(self, decoded: Callable[[], Chunk]) -> bool:
        """Admit the chunk `decoded` returns and buffer its new rows, or count the reject it
        raises; on the receiver thread, in arrival order. True if accepted."""
        try:
            chunk = decoded()
        except WireError as exc:
            return self._reject(exc.reason, str(exc))
        except Exception as exc:  # never let a peer's bytes stop the daemon
            return self._reject("error", f"{type(exc).__name__}: {exc}")
        info = self._hook_info(chunk)
        if isinstance(info, str):
            return self._reject(info.partition(":")[0], info)
        dtype = self.buffers.dtype_of(chunk.hook, DTYPES[info.dtype or chunk.dtype])
        acts = chunk.acts if dtype is None else chunk.acts.to(dtype)
        if acts.dtype != chunk.acts.dtype and acts.dtype != torch.float32 and not bool(
            torch.isfinite(acts).all()
        ):  # narrowed past the range of the buffer's dtype: inf after the wire's check
            return self._reject("nonfinite", f"nonfinite: {chunk.dtype} values beyond the "
                                f"range of {str(acts.dtype).removeprefix('torch.')}, the dtype of "
                                f"hook {chunk.hook}'s buffer (its first chunk's)")
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
        self._learn(chunk, info)
        self._track(chunk, adm)
        if self.recorder is not None and adm.parts:
            self.recorder.add(chunk, adm.parts, self.stop_event.is_set)
        buf = self.buffers.get_or_create(chunk.hook, info.d, acts.dtype)
        for first, rows in adm.parts:
            def commit(written: int, m: int, first: int = first) -> None:
                self.ledger.commit(adm, chunk.hook, first + written, m)

            buf.put(acts[first : first + rows], source=adm.producer.index,
                    should_stop=self.stop_event.is_set, on_commit=commit)
        return True

    def _expect_d(self) -> dict[str, int] | None:
        """Every hook's width once all are known (then decode_chunk checks it before
        decompressing); taken on the receiver thread, which alone changes `hook_info`."""
        known = {h: i.d for h, i in self.hook_info.items()}
        return known if set(known) >= self.hooks else None

    def _decode(self, frames: list[Any], expect_d: dict[str, int] | None) -> Chunk:
        """Decode and validate; safe on any thread (reads only immutable settings)."""
        return decode_chunk(frames, limits=self.limits, expect_hook=self.hooks, expect_d=expect_d)

    def _hook_info(self, chunk: Chunk) -> HookInfo | str:
        """The hook's width, dtype and model (what its first accepted message set; for a
        hook new to this one, the chunk's own), or a reject. Changes nothing: a message the
        ledger refuses next must not set a hook (`_learn` records them once admitted)."""
        info = self.hook_info.get(chunk.hook)
        if info is None:
            return HookInfo(chunk.d, chunk.dtype, chunk.model)
        if chunk.d != info.d:
            return f"dim: d={chunk.d} for hook {chunk.hook}, expected {info.d}"
        if info.model is not None and chunk.model != info.model:
            return f"model: {chunk.model!r:.100} on hook {chunk.hook}, not {info.model!r}"
        return info

    def _learn(self, chunk: Chunk, info: HookInfo) -> None:
        """Record what an admitted chunk says about its hook: all of it for a new hook, the
        model and dtype where a checkpoint or `--d-in` left them open."""
        with self.lock:
            if chunk.hook not in self.hook_info:
                self.hook_info[chunk.hook] = info
                new = True
            else:
                new = False
                info.model = info.model or chunk.model
                info.dtype = info.dtype or chunk.dtype
        if new:
            log.info("hook %s: d_in=%d dtype=%s model=%s (from producer %s)", shown(chunk.hook),
                     chunk.d, chunk.dtype, shown(chunk.model), shown(chunk.producer))

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
            self._rlog.info(f"restart:{name}", "producer %s restarted: run %s", shown(name),
                            shown(chunk.run))
        elif status == "gap" and not self.dealt:
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
