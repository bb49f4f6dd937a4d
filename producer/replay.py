"""`saestream replay DIR/<hook>`: a recording streamed to consumers as a producer would.

The replayer is a producer whose corpus is a recording: the same sending thread (bounded
queue, blocking PUSH: backpressure), the same wire format, the same metrics, the same
control channel. What it cannot be is the producers that made the recording: a consumer
that has their ids in its ledger would trim the replayed rows as duplicates, `--loop` would
re-send positions already held, and several replayers would claim one id. So a replayer is
a producer of its own (`--producer-id`, default `replay-HOST-PID`) reading its own stream:

- stream: corpus `recording:<parent>/<hook>`, split `all`, shard `I/N` (`--shard`: chunk j of
  the recording, in recording order, is this replayer's when j mod N == I);
- positions: the rows of this replayer's chunks numbered from 0 in that order, epoch = pass
  (`--loop` starts pass e + 1 where pass e ended, so every pass is new to the consumer);
- provenance: each chunk's `source` keeps the recording's — `recorded_producer`,
  `recorded_run`, `recorded_seq` and the recorded `source` keys prefixed `recorded_`.

So a consumer trains every replayed row exactly once per pass, across crashes of either side
(restart a replayer with the same `--producer-id` and it continues where the consumer is),
and the recorded producers' order survives: chunks go out in recording order.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch
import zmq
from prometheus_client import CollectorRegistry

from saestream.common.control import MAX_VOID, control_endpoint
from saestream.common.errors import UserError
from saestream.common.logs import shown
from saestream.common.metrics import serve_metrics
from saestream.common.recording import Entry, Recording, RecordingError, Shard
from saestream.common.transport import push_socket
from saestream.common.wire import (
    DTYPES,
    HEADER_FIELDS,
    ITEMSIZE,
    KIND,
    MAX_SOURCE_KEY_LEN,
    MAX_SOURCE_KEYS,
    MAX_STR_LEN,
    WIRE_VERSION,
    DecodeLimits,
    WireError,
    check_source,
)
from saestream.producer.config import ProducerConfig, check_producer_id
from saestream.producer.control import ControlClient, where_request
from saestream.producer.corpus import CorpusError
from saestream.producer.corpus import Shard as Part
from saestream.producer.metrics import ProducerMetrics
from saestream.producer.sender import Outgoing, Progress, Sender

log = logging.getLogger("saestream.replay")

MAX_POS = 1 << 62
"""Void from the end of a pass to here: the consumer's frontier moves to the next pass."""
RECORDED = "recorded_"
"""Prefix of the recording's provenance in a replayed chunk's `source`."""
SKIP_MARGIN = 64
"""Bytes a chunk resumed mid-way may add to its header (`recorded_skipped_rows`, an int, and
a larger map header); what the check of a recording's headers keeps in hand."""


@dataclass
class ReplayConfig:
    """What `saestream replay` is configured with."""

    recording: Path
    """A recorded hook directory, DIR/<hook>."""
    loop: bool = False
    """Replay the recording again and again, each pass a new epoch of this replayer's stream,
    until stopped; default: one pass, then wait until the consumer holds it and exit 0."""
    verify: bool = False
    """Check every chunk against its recorded checksum before sending it (one crc32 pass,
    about what the consumer's decode costs). Default: only chunks re-sent after the consumer
    reported a hole, and chunks resumed mid-way; the consumer checks every message anyway."""
    send: ProducerConfig = field(default_factory=ProducerConfig)
    """How to send, as a producer would: --connect, --control-connect, --shard (here: which
    chunks), --producer-id, --codec, --queue-size, --hwm, --linger, metrics, CURVE."""


class ReplaySummary(NamedTuple):
    run: str
    messages: int
    tokens: int
    passes: int
    """Passes finished (sent in full)."""
    complete: bool


def default_replay_id() -> str:
    return f"replay-{socket.gethostname()}-{os.getpid()}"


def run_replay(cfg: ReplayConfig, stop: threading.Event | None = None,
               registry: CollectorRegistry | None = None) -> ReplaySummary:
    """Replay until the pass is held by the consumer (or, with `loop`, until `stop`).
    Raises common.errors.UserError (RecordingError among them) on bad input."""
    run = ReplayRun(cfg, stop or threading.Event(), registry or CollectorRegistry())
    try:
        outcome = "start"
        while outcome not in ("done", "stop"):
            outcome = run.emit(run.resume)
            if outcome == "end":
                outcome = run.next_pass() if cfg.loop else run.settle()
    except BaseException:
        run.failed = True
        raise
    finally:
        run.close()
    return run.summary()


class ReplayRun:
    """One replayer: the recording and its positions, then the loop's named steps."""

    def __init__(self, cfg: ReplayConfig, stop: threading.Event,
                 registry: CollectorRegistry) -> None:
        self.cfg, self.send, self.stop, self.failed = cfg, cfg.send, stop, False
        rec = Recording(cfg.recording)
        try:
            self.part = Part.parse(self.send.shard)
        except CorpusError as exc:
            raise UserError(f"--shard: {exc}") from None
        self.items: list[tuple[Shard, Entry]] = [
            item for j, item in enumerate(rec.chunks()) if j % self.part.count == self.part.index
        ]
        if not self.items:
            raise UserError(f"{cfg.recording}: --shard {self.part} holds no chunks (the "
                            f"recording has {rec.n_chunks})")
        self.rec = rec
        self.starts = np.cumsum([0] + [e.n for _, e in self.items])
        self.total = int(self.starts[-1])
        self.producer_id = self.send.producer_id or default_replay_id()
        check_producer_id(self.producer_id)
        self.run = uuid.uuid4().hex[:12]
        name = f"{Path(cfg.recording).resolve().parent.name}/{rec.hook}"
        self.stream = {"corpus": f"recording:{name}"[:1024], "split": "all",
                       "shard": str(self.part), "seq_len": 0, "first": 0}
        for shard, entry in self.items:  # before anything is sent: every chunk will encode
            problem = header_problem(self.producer_id, self.run, rec.model, rec.hook, shard,
                                     entry, self.stream, self.send.codec)
            if problem:
                raise RecordingError(f"{shard.what(entry)}: cannot be replayed: {problem}")
        self.resume = self.emitted = self.since = Progress(0, 0)
        self.passes = 0
        self.verify = cfg.verify
        self.voids: list[tuple[int, int, int]] = []
        self.complete = False
        self._serve(registry)

    def _serve(self, registry: CollectorRegistry) -> None:
        send = self.send
        self.metrics = ProducerMetrics.create(registry)
        serve_metrics(registry, send.metrics_port, send.metrics_addr)
        self.zctx = zmq.Context()
        self.sock = push_socket(self.zctx, list(send.connect), hwm=send.hwm, curve=send.curve,
                                linger_ms=int(send.linger * 1000))
        self.sender = Sender(
            self.sock, producer=self.producer_id, run=self.run, model=self.rec.model,
            codec=send.codec, metrics=self.metrics, queue_size=send.queue_size,
            encode_threads=send.encode_threads,
            first_hook=self.rec.hook, progress=self.resume,
        ).start()
        endpoints = list(send.control_connect) or [control_endpoint(e) for e in send.connect]
        self.control: ControlClient | None = None
        if endpoints != ["off"]:
            self.control = ControlClient(self.zctx, endpoints, curve=send.curve,
                                         request=self._where)
            self.control.start()
        log.info("replayer %s run %s: %s (hook %s, model %s, d %d), shard %s: %d of its %d "
                 "chunks, %d rows per pass%s -> %s (control %s)", shown(self.producer_id),
                 self.run, shown(self.cfg.recording), shown(self.rec.hook),
                 shown(self.rec.model), self.rec.d, self.part,
                 len(self.items), self.rec.n_chunks, self.total,
                 ", looping" if self.cfg.loop else "", ",".join(send.connect),
                 ",".join(endpoints))

    # -- the loop's steps ---------------------------------------------------------------------

    def emit(self, start: Progress) -> str:
        """Send the pass `start.epoch` from `start`: "end", "rewind" or "stop"."""
        epoch, pos = start
        self.since = self.emitted = start
        if not self.cfg.loop and epoch > 0:
            return "end"  # the one pass is wholly held already
        first = max(int(np.searchsorted(self.starts, pos, side="right")) - 1, 0)
        for k in range(first, len(self.items)):
            if self.stop.is_set():
                return "stop"
            self._check_refusal()
            target = self.control.target(self.emitted, self.since) if self.control else None
            if target is not None:
                return self._rewind(target)
            lo, hi = max(pos, int(self.starts[k])), int(self.starts[k + 1])
            if lo >= hi:
                continue
            item = self._outgoing(k, epoch, lo, hi)
            if not self.sender.put(item, self.stop, self.send.linger):
                return "stop"
            self.emitted = Progress(epoch, hi)
        return "end"

    def next_pass(self) -> str:
        """`--loop`: the pass is sent; the next one is a new epoch of the stream."""
        epoch = self.emitted.epoch
        self.passes += 1
        self.voids.append((epoch, self.total, MAX_POS))
        del self.voids[:-MAX_VOID]
        if not self.sender.put(Outgoing(None, None, {}, Progress(epoch + 1, 0)), self.stop,
                               self.send.linger):
            return "stop"
        log.info("pass %d sent (%d rows)", epoch + 1, self.total)
        self.resume = Progress(epoch + 1, 0)
        return "again"

    def settle(self) -> str:
        """Wait until the consumer holds the pass: "done", "rewind" or "stop"."""
        if not self.sender.wait_sent(self.stop):
            return "stop"
        control, end = self.control, Progress(0, self.total)
        if control is None or not control.expect_answers(self.stop):
            return "stop" if self.stop.is_set() else self._done()
        outcome, where = control.settle(end, self.since, self.stop, self._check_refusal)
        if outcome == "done":
            return self._done()
        return self._rewind(where) if outcome == "rewind" else "stop"  # type: ignore[arg-type]

    def close(self) -> None:
        if not hasattr(self, "sender"):
            return
        drain_stop = self.stop
        if self.failed:  # failing: give what is queued `linger`, not forever
            drain_stop = threading.Event()
            drain_stop.set()
        sent_all = self.sender.drain(drain_stop, self.send.linger)
        self.complete = self.complete and sent_all
        if self.control is not None:
            self.control.stop()
        self.sock.close(linger=int(self.send.linger * 1000))
        self.zctx.term()
        log.info("replayer %s run %s: sent %d rows in %d messages, %d full pass(es)%s",
                 shown(self.producer_id), self.run, self.sender.tokens_sent, self.sender.seq,
                 self.passes, "" if sent_all else " (stopped with chunks unsent)")

    def summary(self) -> ReplaySummary:
        return ReplaySummary(self.run, self.sender.seq, self.sender.tokens_sent, self.passes,
                             self.complete)

    # -- helpers --------------------------------------------------------------------------------

    def _outgoing(self, k: int, epoch: int, lo: int, hi: int) -> Outgoing:
        """Chunk k's rows [lo, hi) of the stream, checked, with their provenance."""
        shard, entry = self.items[k]
        skip = lo - int(self.starts[k])
        if self.verify or skip:  # a part gets a checksum of its own: vouch for its bytes
            shard.check(entry)
        else:
            shard.check_values(entry)
        words = shard.chunk(entry)[skip:]
        signed = torch.from_numpy(words.view(np.int32 if words.itemsize == 4 else np.int16))
        acts = signed.view(DTYPES[shard.dtype])
        source = replay_source(self.stream, entry, epoch, lo, hi, skip)
        return Outgoing(self.rec.hook, acts, source, Progress(epoch, hi),
                        checksum=None if skip else entry.checksum)

    def _done(self) -> str:
        self.passes += 1
        self.complete = True
        return "done"

    def _rewind(self, target: Progress) -> str:
        direction = "back" if target < self.emitted else "forward"
        if direction == "back" and not self.verify:
            # A hole: a chunk was lost, or rejected. If its bytes are corrupt, re-sending it
            # forever would not help: from now on every chunk is checked before it is sent.
            self.verify = True
            log.info("checking every chunk against its checksum from now on")
        dropped = self.sender.rewind(target)
        self.metrics.rewinds.labels(direction=direction).inc()
        log.info("the consumer holds position %d of pass %d: continuing there (%s; %d queued "
                 "chunks dropped)", target.tokens_done, target.epoch + 1, direction, dropped)
        self.resume = self.emitted = target
        return "rewind"

    def _check_refusal(self) -> None:
        if self.control is not None and self.control.error:
            raise UserError(f"the consumer refuses this replayer: {self.control.error}")

    def _where(self) -> dict[str, Any]:
        """The control request, built fresh every time (on the control thread). Until some
        consumer has answered, rows sent may still be on their way: propose the start; after,
        what a keeping consumer made durable (`ControlClient.held_durably`), else what was
        sent, as the producer does."""
        control = self.control
        star = Progress(0, 0)
        if control is not None and control.ever_answered.is_set():
            held = control.held_durably()
            star = held if held is not None else self.sender.progress
        return where_request(producer=self.producer_id, run=self.run, hooks=[self.rec.hook],
                             stream=self.stream, propose={"*": list(star)}, void=self.voids,
                             flush=bool(control and control.flush))


def replay_source(stream: dict[str, Any], entry: Entry, epoch: int, lo: int, hi: int,
                  skip: int) -> dict[str, Any]:
    """A replayed chunk's `source`: the replayer's stream and positions, then the recorded
    provenance (`recorded_…`, as many recorded keys as the wire's 64 allow)."""
    out: dict[str, Any] = {
        "corpus": stream["corpus"], "split": stream["split"], "shard": stream["shard"],
        "epoch": epoch, "start": lo, "end": hi, f"{RECORDED}producer": entry.producer,
        f"{RECORDED}run": entry.run, f"{RECORDED}seq": entry.seq,
    }
    if skip:
        out[f"{RECORDED}skipped_rows"] = skip
    for key, value in entry.source.items():
        if len(out) >= MAX_SOURCE_KEYS:
            break
        if len(RECORDED + key) <= MAX_SOURCE_KEY_LEN:
            out[RECORDED + key] = value
    return out



def header_problem(producer: str, run: str, model: str, hook: str, shard: Shard,
                   entry: Entry, stream: dict[str, Any], codec: str) -> str | None:
    """Why the sender could not encode `entry` as a replayed chunk (or a receiver would
    refuse its header), or None: the header `wire.encode_chunk` would build for it, with
    the largest positions, seq and checksum it may ever carry, packed as the wire packs it
    and measured against the receivers' limit. Run for every chunk before anything is sent,
    so a recording the wire cannot carry is one line at start, not a failed sending thread."""
    for name, value in (("producer", producer), ("run", run), ("model", model),
                        ("hook", hook)):
        if type(value) is not str or not value or len(value) > MAX_STR_LEN:
            return f"its {name} is not a non-empty str of at most {MAX_STR_LEN} chars"
    n, top = entry.n, MAX_POS - 1
    source = replay_source(stream, entry, top, top - n, top, 0)
    try:
        check_source(source, n)
    except WireError as exc:
        return str(exc)
    header = {"v": WIRE_VERSION, "kind": KIND, "producer": producer, "run": run,
              "seq": (1 << 63) - 1, "model": model, "hook": hook, "d": shard.d, "n": n,
              "dtype": shard.dtype, "codec": codec,
              "raw_nbytes": n * shard.d * ITEMSIZE[shard.dtype], "checksum": (1 << 32) - 1,
              "source": source, "ts": time.time()}
    assert tuple(header) == HEADER_FIELDS, "the wire's header changed: change this too"
    try:
        size = len(msgpack.packb(header, use_bin_type=True)) + SKIP_MARGIN
    except (OverflowError, TypeError, ValueError) as exc:
        return f"its header cannot be encoded ({shown(exc, 100)})"
    limit = DecodeLimits.max_header_nbytes
    if size > limit:
        return (f"its header would take up to {size} bytes, receivers accept at most {limit} "
                "(its `source` is too large)")
    return None
