"""`saestream record`'s loop: a consumer that only records (a harvest without training).

The same receiver, ledger and control channel as the consumer daemon (so producers get the
same validation, duplicate trimming, backpressure and exactly-once rewinds), with the
shuffle buffer replaced by the recorder: admitted rows go to shards, nothing is trained.

It answers the control channel as a durable consumer whose "snapshot" is a sync of the
recording: on a producer's flush request (at most every `FLUSH_SECONDS`), on SIGUSR1 and on
stop, every hook's held rows are written, and only then does `committed` move to the ledger
as it stood before the sync. So a producer with `--max-tokens` exits once its rows are in
complete shards on disk, and one that restarts continues from what is on disk.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import torch
import zmq

from saestream.common.control import MAX_CONTROL_BYTES, control_endpoint
from saestream.common.errors import UserError
from saestream.common.metrics import serve_metrics
from saestream.common.recording import Entry
from saestream.common.signals import SignalFlags
from saestream.common.transport import CONTROL_HWM, pull_socket, router_socket
from saestream.common.wire import REJECT_REASONS, DecodeLimits, lz4_bound
from saestream.consumer.config import ConsumerConfig
from saestream.consumer.control import ControlServer
from saestream.consumer.ledger import Ledger
from saestream.consumer.metrics import ConsumerMetrics
from saestream.consumer.receiver import CONSUMER_REJECT_REASONS, HookInfo, Receiver
from saestream.consumer.recorder import Recorder

log = logging.getLogger("saestream.record")

FLUSH_SECONDS = 2.0
"""Syncs asked for by producers that finished are done at most this often."""


class Discard:
    """Stands in for the shuffle buffer: rows are accounted in the ledger and let go (the
    recorder already holds them)."""

    def get_or_create(self, hook: str, d: int, dtype: torch.dtype) -> Discard:
        return self

    def dtype_of(self, hook: str, first: torch.dtype) -> None:
        return None  # each chunk is recorded in its own dtype: nothing is converted

    def put(self, acts: torch.Tensor, *, source: int, should_stop: Any,
            on_commit: Any) -> int:
        on_commit(0, int(acts.shape[0]))
        return int(acts.shape[0])

    def wake(self) -> None:
        pass


def run_record(cfg: ConsumerConfig, flags: SignalFlags,
               metrics: ConsumerMetrics | None = None) -> dict[str, int]:
    """Record until SIGTERM/SIGINT; returns rows written per hook. `cfg.record` is the
    recording directory; the training fields of `cfg` are unused."""
    sink = RecordSink(cfg, flags, metrics or ConsumerMetrics())
    try:
        while not flags.stop.wait(0.2):
            sink.housekeeping()
    finally:
        sink.close()
    return dict(sink.recorder.written)


class RecordSink:
    """One `saestream record` process: set-up in the constructor, then `housekeeping`."""

    def __init__(self, cfg: ConsumerConfig, flags: SignalFlags,
                 metrics: ConsumerMetrics) -> None:
        if cfg.record is None:
            raise UserError("--out is required")
        self.cfg, self.flags, self.metrics = cfg, flags, metrics
        self.ledger = Ledger(cfg.max_producers, cfg.producer_expiry_seconds)
        self.recorder = Recorder(cfg.record, cfg.hooks, cfg.record_shard_tokens, metrics,
                                 flag="--out", on_lost=self._lost)
        self.run_id = uuid.uuid4().hex[:12]
        metrics.declare_rejects((*REJECT_REASONS, *CONSUMER_REJECT_REASONS))
        serve_metrics(metrics.registry, cfg.metrics_port, cfg.metrics_addr)
        limits = DecodeLimits(max_raw_nbytes=cfg.max_chunk_bytes)
        max_message = lz4_bound(cfg.max_chunk_bytes) + limits.max_header_nbytes
        metrics.receive_budget_bytes.set(cfg.max_connections * (
            (cfg.hwm + 1) * max_message + (CONTROL_HWM + 1) * MAX_CONTROL_BYTES))
        self.ctx = zmq.Context()
        sock = pull_socket(self.ctx, cfg.bind, hwm=cfg.hwm, curve=cfg.curve,
                           max_message_bytes=max_message, max_connections=cfg.max_connections)
        metrics.refused_connections.watch("data", sock.refused)
        hook_info = {h: HookInfo(cfg.d_in, None, None) for h in cfg.hooks} if cfg.d_in else {}
        self.recorder.fix_hooks(hook_info)
        self.receiver = Receiver(sock, Discard(), metrics, self.ledger,  # type: ignore[arg-type]
                                 hooks=cfg.hooks, hook_info=hook_info, limits=limits,
                                 log_interval=cfg.reject_log_interval, recorder=self.recorder,
                                 decode_threads=cfg.decode_threads)
        self.control: ControlServer | None = None
        control = cfg.control_bind or control_endpoint(cfg.bind)
        if control != "off":
            router = router_socket(self.ctx, control, curve=cfg.curve,
                                   max_connections=cfg.max_connections)
            metrics.refused_connections.watch("control", router.refused)
            self.control = ControlServer(
                router, self.ledger, metrics,
                run_id=self.run_id, durable=True, hooks=cfg.hooks)
        self.recorder.start()
        self.receiver.start()
        if self.control is not None:
            self.control.start()
        self._last_sync = self._last_log = time.monotonic()
        log.info("recording run %s: %s (control %s), hooks %s -> %s/<hook>/ in shards of %d "
                 "rows; metrics on %s:%s", self.run_id, cfg.bind, control, ",".join(cfg.hooks),
                 cfg.record, cfg.record_shard_tokens, cfg.metrics_addr,
                 cfg.metrics_port or "off")

    def housekeeping(self) -> None:
        """Thread failures, syncs asked for (SIGUSR1, producers' flush), progress lines."""
        for thread in (self.receiver, self.control, self.recorder):
            if thread is not None and thread.error is not None:
                raise RuntimeError(f"the {thread.name} thread failed") from thread.error
        now, control = time.monotonic(), self.control
        if self.flags.snapshot.is_set():
            self.flags.snapshot.clear()
            self.sync("signal")
        elif control is not None and control.flush_requested.is_set() \
                and now - self._last_sync >= FLUSH_SECONDS:
            control.flush_requested.clear()
            self.sync("flush")
        if now - self._last_log >= self.cfg.log_every:
            self._last_log = now
            log.info("recorded %s rows in complete shards; %s rows held for the next",
                     self._per_hook(self.recorder.written),
                     self._per_hook({h: w.pending_rows for h, w in
                                     self.recorder.writers.items()}))

    def sync(self, reason: str) -> None:
        """Write every hook's held rows; once on disk, the control channel's `committed`
        is the ledger as it stood before (a cut that the shards hold in full). Should a
        shard be lost meanwhile, `committed` stays where it was."""
        self._last_sync = time.monotonic()
        losses = self.recorder.losses  # before the cut: a loss counted later may be in it
        cut = self.ledger.copy()
        control = self.control

        def done() -> None:
            if control is not None:
                control.committed = cut
            log.info("%s sync: every accepted row is in a complete shard", reason)

        self.recorder.sync(done, since=losses)

    def _lost(self, hook: str, entries: list[Entry]) -> None:
        """Rows of a shard that could not be written are not held: the ledger forgets
        them, so producers see the hole and send them again (the recorder thread)."""
        for e in entries:
            if all(k in e.source for k in ("epoch", "start")):
                start = int(e.source["start"])
                self.ledger.forget(e.producer, hook, int(e.source["epoch"]), start, start + e.n)

    def close(self) -> None:
        """Stop receiving, write what is held (SIGTERM loses nothing accepted), then give
        producers the last word with what is now on disk."""
        self.receiver.stop()
        self.sync("final")
        self.recorder.stop()
        if self.control is not None:
            self.control.stop()
        self.ctx.destroy(linger=0)
        log.info("stopped; recorded %s rows", self._per_hook(self.recorder.written))
        if self.recorder.losses:
            log.warning("%d shard(s) could not be written: %s rows are not in the recording "
                        "(nor declared held to their producers)", self.recorder.losses,
                        self._per_hook(self.recorder.dropped))

    @staticmethod
    def _per_hook(counts: dict[str, int]) -> str:
        return " ".join(f"{h}={n}" for h, n in counts.items())
