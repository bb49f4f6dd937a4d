"""The receiver thread: one job, moving valid chunks from the PULL socket into the shuffle buffer.

Everything a peer sends is untrusted. A message is decoded and validated by the wire module;
anything wrong is dropped, counted by reason and logged at most once per interval per
reason. When the hook's buffer is full the thread blocks in `put` and stops reading the
socket, so ZeroMQ's high-water marks push back on the producers and nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq

from saestream.common.logs import RateLimitedLog
from saestream.common.wire import DTYPES, Chunk, DecodeLimits, WireError, decode_chunk
from saestream.consumer.buffer import BufferSet
from saestream.consumer.metrics import ConsumerMetrics

log = logging.getLogger("saestream.consumer.receiver")

CONSUMER_REJECT_REASONS = ("model", "error")
"""Reasons the consumer adds to the wire module's: a hook's model changed; anything else."""


@dataclass
class HookInfo:
    """What the consumer learned about a hook from its first valid message (or a checkpoint)."""

    d: int
    dtype: str | None
    """Wire dtype of the hook's first message: the buffer's dtype (None until seen)."""
    model: str | None
    """Model of the hook's first message; later messages of another model are rejected."""


@dataclass
class ProducerProgress:
    """Per-producer provenance: what was received and trained from it."""

    index: int
    """Small integer id used to tag this producer's rows in the buffer."""
    run: str | None = None
    """Run id of the latest message."""
    last_seq: int | None = None
    """Sequence number of the latest message of `run`."""
    received_messages: int = 0
    received_tokens: int = 0
    trained_tokens: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    """`source` of the latest message (corpus id, token offsets)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "last_seq": self.last_seq,
            "received_messages": self.received_messages,
            "received_tokens": self.received_tokens, "trained_tokens": self.trained_tokens,
            "source": self.source,
        }


class Receiver(threading.Thread):
    """Reads `sock` until `stop` is set; owns the socket (closes it on exit).

    :param hooks: hooks to accept; others are rejected (`hook`).
    :param hook_info: hooks whose width (and model) are already known, e.g. from `--d-in` or a
        checkpoint; the rest are learned from their first valid message.
    :param progress: per-producer progress to continue (from a checkpoint).
    """

    def __init__(
        self,
        sock: zmq.Socket,
        buffers: BufferSet,
        metrics: ConsumerMetrics,
        *,
        hooks: Collection[str],
        hook_info: Mapping[str, HookInfo] | None = None,
        progress: Mapping[str, ProducerProgress] | None = None,
        limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen)
        log_interval: float = 10.0,
        poll_ms: int = 100,
    ) -> None:
        super().__init__(name="receiver", daemon=True)
        self.sock = sock
        self.buffers = buffers
        self.metrics = metrics
        self.hooks = frozenset(hooks)
        self.hook_info: dict[str, HookInfo] = dict(hook_info or {})
        self.producers: dict[str, ProducerProgress] = dict(progress or {})
        self.producer_names: list[str] = [""] * len(self.producers)
        for name, p in self.producers.items():
            self.producer_names[p.index] = name
        self.limits = limits
        self.poll_ms = poll_ms
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        """Guards `producers` and `hook_info` against the training loop's reads."""
        self._rlog = RateLimitedLog(log, log_interval)

    # -- thread -----------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                if not poller.poll(self.poll_ms):
                    continue
                frames = self.sock.recv_multipart(copy=False)
                self.handle(frames)
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
        """Validate one message and buffer its tokens; True if accepted."""
        try:
            chunk = self._decode(frames)
        except WireError as exc:
            return self._reject(exc.reason, str(exc))
        except Exception as exc:  # never let a peer's bytes stop the daemon
            return self._reject("error", f"{type(exc).__name__}: {exc}")
        info = self.hook_info.get(chunk.hook)
        if info is None:
            with self.lock:
                info = self.hook_info[chunk.hook] = HookInfo(chunk.d, chunk.dtype, chunk.model)
            log.info(
                "hook %s: d_in=%d dtype=%s model=%s (from producer %s)",
                chunk.hook, chunk.d, chunk.dtype, chunk.model, chunk.producer,
            )
        elif chunk.d != info.d:
            return self._reject("dim", f"dim: d={chunk.d} for hook {chunk.hook}, expected {info.d}")
        elif info.model is not None and chunk.model != info.model:
            got = f"{chunk.model!r:.100}"
            return self._reject("model", f"model: {got} on hook {chunk.hook}, not {info.model!r}")
        else:
            with self.lock:
                info.model = info.model or chunk.model
                info.dtype = info.dtype or chunk.dtype
        progress = self._track(chunk)
        self._count(chunk)
        buf = self.buffers.get_or_create(chunk.hook, info.d, DTYPES[info.dtype or chunk.dtype])
        buf.put(chunk.acts, source=progress.index, should_stop=self.stop_event.is_set)
        return True

    def _decode(self, frames: list[Any]) -> Chunk:
        # With every hook's width known, decode_chunk checks it before decompressing.
        known = {h: i.d for h, i in self.hook_info.items()}
        expect_d = known if set(known) >= self.hooks else None
        return decode_chunk(frames, limits=self.limits, expect_hook=self.hooks, expect_d=expect_d)

    def _reject(self, reason: str, msg: str) -> bool:
        self.metrics.rejected_messages.labels(reason=reason).inc()
        self._rlog.warning(reason, "dropped a message: %s", msg)
        return False

    def _track(self, chunk: Chunk) -> ProducerProgress:
        """Per-producer sequence tracking: gaps and restarts are counted, never fatal."""
        name, run, seq = chunk.producer, chunk.run, chunk.seq
        with self.lock:
            p = self.producers.get(name)
            if p is None:
                p = self.producers[name] = ProducerProgress(index=len(self.producer_names))
                self.producer_names.append(name)
                log.info("new producer %s (run %s)", name, run)
            elif p.run != run:
                self.metrics.producer_restarts.labels(producer=name).inc()
                log.info("producer %s restarted: run %s -> %s", name, p.run, run)
            elif p.last_seq is not None and seq != p.last_seq + 1:
                self.metrics.sequence_gaps.labels(producer=name).inc()
                self._rlog.warning(
                    f"gap:{name}", "producer %s run %s: seq %d after %d", name, run, seq, p.last_seq
                )
            p.run, p.last_seq = run, seq
            p.received_messages += 1
            p.received_tokens += chunk.n
            p.source = chunk.source
        return p

    def _count(self, chunk: Chunk) -> None:
        m, name = self.metrics, chunk.producer
        m.received_messages.labels(producer=name).inc()
        m.received_tokens.labels(producer=name).inc(chunk.n)
        m.received_wire_bytes.labels(producer=name).inc(chunk.wire_nbytes)
        m.producer_last_seen.labels(producer=name).set(time.time())
        m.sequence_gaps.labels(producer=name)  # export the series at 0

    # -- for the training loop --------------------------------------------------------------

    def add_trained(self, counts: Mapping[int, int]) -> None:
        """Credit trained tokens to producers by buffer source index."""
        with self.lock:
            for index, n in counts.items():
                if 0 <= index < len(self.producer_names):
                    self.producers[self.producer_names[index]].trained_tokens += n

    def snapshot_progress(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {name: p.to_json() for name, p in self.producers.items()}

    def known_hooks(self) -> dict[str, HookInfo]:
        with self.lock:
            return dict(self.hook_info)
