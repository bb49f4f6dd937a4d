"""The sending thread: takes chunks from a bounded queue, encodes them and PUSHes them.

The model loop only waits when the queue is full (backpressure from the consumers reaching
back through ZeroMQ's high-water mark); nothing is ever dropped, and `seq` counts the
messages actually handed to ZeroMQ, from 0, without gaps.

With `encode_threads` > 1 the sending thread hands each chunk to a pool as it takes it from
the queue (numbering it there) and sends the encoded chunks strictly in that order, so a
consumer sees the same sequence as from one thread; at most two chunks per encoding thread
are in flight, so the queue still fills, and backpressure still reaches the model loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
import zmq

from saestream.common.devices import codec_threads
from saestream.common.wire import encode_chunk
from saestream.producer.metrics import ProducerMetrics

log = logging.getLogger("saestream.producer")

POLL_MS = 100

COPY_BELOW = 1 << 20
"""Frames smaller than this are copied into ZeroMQ's message (pyzmq's `copy_threshold`,
64 KiB by default); larger ones are lent without a copy. A lent frame is given back through
pyzmq's garbage-collector thread, a Python thread that wakes for each one and takes the GIL
from the model's thread; a copy of a chunk under 1 MiB costs less than that."""

Encoded = list[bytes] | Future[list[bytes]] | None
"""A chunk's frames (encoded inline), their future (encoded by the pool) or None (nothing to
send)."""


class Progress(NamedTuple):
    """A point in the shard's token stream: epoch, tokens of that epoch sent."""

    epoch: int
    tokens_done: int


class Outgoing(NamedTuple):
    """One queue item: a chunk to send (hook + acts), and/or progress reached once it is sent."""

    hook: str | None
    """None for a progress-only marker (e.g. the end of an epoch)."""
    acts: torch.Tensor | None
    """[n, d] on the CPU, already in the wire dtype."""
    source: dict
    progress: Progress | None
    """Set on the last message of a token range: everything up to here has been sent."""
    checksum: int | None = None
    """crc32 of `acts`' raw bytes when already known (a replayer verified it against its
    recording): encoding skips its own pass over the data."""
    regrouped: torch.Tensor | None = None
    """`lz4-shuffle`'s regrouped bytes of `acts`, made on the device (`producer/staging.py`):
    encoding only compresses them."""
    ready: Any = None
    """A CUDA event that `acts` and `regrouped` (pinned host buffers filled by asynchronous
    copies) are complete once it has passed; None for ordinary tensors."""


class Sender:
    """Owns the PUSH socket from `start()` until `drain()` returns."""

    def __init__(
        self,
        sock: zmq.Socket,
        *,
        producer: str,
        run: str,
        model: str,
        codec: str,
        metrics: ProducerMetrics,
        queue_size: int,
        first_hook: str,
        progress: Progress,
        encode_threads: int = 1,
    ) -> None:
        self.sock = sock
        sock.copy_threshold = COPY_BELOW
        self.encode_threads = codec_threads(encode_threads)
        self.producer, self.run, self.model, self.codec = producer, run, model, codec
        self.metrics = metrics
        self.queue: queue.Queue[Outgoing | None] = queue.Queue(maxsize=max(1, queue_size))
        self.seq = 0
        """Messages sent so far this run (= the next message's seq)."""
        self._next_seq = 0
        """The seq the next chunk taken from the queue gets (ahead of `seq` by the chunks
        being encoded)."""
        self.tokens_sent = 0
        """Rows sent for `first_hook` this run (every hook gets the same rows)."""
        self.progress = progress
        """The last point in the token stream up to which every chunk has been sent."""
        self.error: BaseException | None = None
        self._first_hook = first_hook
        self._pending = 0
        """Queue entries put and not yet fully handled (sent or dropped)."""
        self._generation = 0
        """Bumped by `rewind`: progress of chunks queued before it no longer counts."""
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        """Notified whenever `_pending` drops to 0."""
        self._abort = threading.Event()
        self._deadline: float | None = None
        self._children: dict[str, tuple[Any, Any, Any, Any, Any]] = {}
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        metrics.queue_depth.set_function(self.queue.qsize)

    def start(self) -> Sender:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _past_linger(self, stop: threading.Event, linger: float) -> bool:
        """True once `linger` seconds have passed since `stop` was first seen set."""
        if not stop.is_set():
            return False
        if self._deadline is None:
            self._deadline = time.monotonic() + linger
        return time.monotonic() >= self._deadline

    def put(self, item: Outgoing, stop: threading.Event, linger: float) -> bool:
        """Queue `item`, blocking while the queue is full; True once queued.

        After `stop` is set, waits at most `linger` seconds more, then gives up (False).
        Time spent waiting counts as send-blocked time.
        """
        item = (self._generation, item)  # type: ignore[assignment]
        with self._lock:
            self._pending += 1
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            pass
        counted = time.perf_counter()
        try:
            while True:
                if self.error is not None or not self.alive:
                    raise RuntimeError(f"the sending thread stopped: {self.error!r}")
                if self._past_linger(stop, linger):
                    with self._lock:
                        self._release()
                    return False
                try:
                    self.queue.put(item, timeout=POLL_MS / 1000)
                    return True
                except queue.Full:  # counted as it goes: a scrape sees a wait in progress
                    now = time.perf_counter()
                    self.metrics.send_blocked_seconds.inc(now - counted)
                    counted = now
        finally:
            self.metrics.send_blocked_seconds.inc(time.perf_counter() - counted)

    def drain(self, stop: threading.Event, linger: float) -> bool:
        """Send what is queued, then stop the thread; True when everything was sent.

        Waits as long as it takes while `stop` is clear; once it is set, at most `linger`
        seconds more before abandoning what is left (it stays unsent and unrecorded).
        """
        if self.alive and not self.put(None, stop, linger):  # type: ignore[arg-type]
            self._abort.set()
        while self._thread.is_alive():
            if self._past_linger(stop, linger):
                self._abort.set()
            self._thread.join(POLL_MS / 1000)
        return self.queue.empty() and not self._abort.is_set() and self.error is None

    def rewind(self, position: Progress) -> int:
        """Drop every queued chunk (they will be produced again from `position`); returns how
        many were dropped. From now on, progress counts from `position`."""
        dropped = 0
        with self._lock:
            self._generation += 1
            self.progress = position
            while True:
                try:
                    entry = self.queue.get_nowait()
                except queue.Empty:
                    break
                if entry is None or entry[1] is None:  # a drain marker stays
                    self.queue.put_nowait(entry)
                    break
                dropped += 1
                self._release()
        return dropped

    def _release(self) -> None:
        """One queue entry fully handled (the caller holds `_lock`)."""
        self._pending -= 1
        if self._pending == 0:
            self._settled.notify_all()

    def wait_sent(self, stop: threading.Event) -> bool:
        """Until everything put so far is handed to ZeroMQ (or dropped by a rewind), woken
        the moment it is (False on `stop`; raises if the sending thread failed)."""
        while True:
            with self._settled:
                if self._settled.wait_for(lambda: self._pending == 0, POLL_MS / 1000):
                    return True
            if stop.is_set():
                return False
            if self.error is not None:
                raise RuntimeError("the sending thread failed") from self.error

    def _run(self) -> None:
        pool = None
        if self.encode_threads > 1:
            pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="encode")
        window = 2 * self.encode_threads if pool is not None else 1  # 1: as one thread did
        # Taken from the queue, in order: (generation, item, its `Encoded`).
        inflight: deque[tuple[int, Outgoing, Encoded]] = deque()
        try:
            while not self._abort.is_set():
                if len(inflight) < window:
                    try:  # block only when nothing is in flight
                        entry = (self.queue.get(timeout=POLL_MS / 1000) if not inflight
                                 else self.queue.get_nowait())
                    except queue.Empty:
                        entry = None
                    if entry is not None:
                        generation, item = entry
                        if item is None:  # drain: send what is in flight, then stop
                            while inflight and not self._abort.is_set():
                                self._finish(*inflight.popleft())
                            return
                        inflight.append((generation, item, self._submit(pool, generation, item)))
                        continue
                if inflight:
                    self._finish(*inflight.popleft())
        except BaseException as exc:
            self.error = exc
            log.exception("sending thread failed")
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, pool: ThreadPoolExecutor | None, generation: int,
                item: Outgoing) -> Encoded:
        """Number `item` and start encoding it; None if there is nothing to send (a progress
        marker, or a chunk queued before a rewind). Without a pool the frames themselves:
        a Future per chunk would only add lock and condition traffic on this thread, which
        holds the GIL against the model loop."""
        if item.hook is None or generation != self._generation:
            return None
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        if pool is not None:
            return pool.submit(self._encode, item, seq)
        return self._encode(item, seq)

    def _finish(self, generation: int, item: Outgoing, encoded: Encoded) -> None:
        """Send one chunk taken from the queue (in queue order) and account for it."""
        if isinstance(encoded, Future):
            encoded = encoded.result()
        if encoded is not None and not self._send(item, encoded):
            self._abort.set()
            return
        with self._lock:
            self._release()
            if item.progress is not None and generation == self._generation:
                self.progress = item.progress

    def _encode(self, item: Outgoing, seq: int) -> list[bytes]:
        assert item.hook is not None and item.acts is not None
        if item.ready is not None:
            item.ready.synchronize()  # the device-to-host copies have landed
        return encode_chunk(
            item.acts,
            producer=self.producer,
            run=self.run,
            seq=seq,
            model=self.model,
            hook=item.hook,
            source=item.source,
            codec=self.codec,
            checksum=item.checksum,
            regrouped=item.regrouped,
        )

    def _send(self, item: Outgoing, frames: list[bytes]) -> bool:
        """Hand `item`'s frames to ZeroMQ and count them; False if aborted first."""
        assert item.hook is not None and item.acts is not None
        if not self._push(frames):
            return False
        self.seq += 1
        n = int(item.acts.shape[0])
        raw = n * int(item.acts.shape[1]) * item.acts.element_size()
        wire = sum(len(f) for f in frames)
        tokens, messages, raw_bytes, wire_bytes, ratio = self._hook_metrics(item.hook)
        tokens.inc(n)
        messages.inc()
        raw_bytes.inc(raw)
        wire_bytes.inc(wire)
        ratio.set(raw / wire if wire else 0.0)
        if item.hook == self._first_hook:
            self.tokens_sent += n
        return True

    def _push(self, frames: list[bytes]) -> bool:
        """Queue `frames` on the socket, waiting while it is full; False if aborted first."""
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                # Every peer's queue is full, or no peer is connected: wait, never drop.
                if self._abort.is_set():
                    return False
                self.sock.poll(POLL_MS, zmq.POLLOUT)

    def _hook_metrics(self, hook: str) -> tuple[Any, Any, Any, Any, Any]:
        """The per-hook metric children, looked up once: `labels()` takes a lock and builds
        a key every call (~3x the cost of the increments themselves)."""
        children = self._children.get(hook)
        if children is None:
            m = self.metrics
            children = self._children[hook] = (
                m.tokens.labels(hook=hook), m.messages.labels(hook=hook),
                m.raw_bytes.labels(hook=hook), m.wire_bytes.labels(hook=hook),
                m.compression_ratio.labels(hook=hook))
        return children
