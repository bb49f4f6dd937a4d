"""The producer's main loop: contexts → truncated forward → chunks → send queue → PUSH.

`run_producer` reads top to bottom; `ProducerRun` holds the run and its named steps. The
loop emits the shard's stream from a position until its end (`--max-tokens`, `--epochs`)
or until the consumer says to continue elsewhere (a rewind or a skip, see
producer/control.py); at the end it waits until the consumer holds every row (committed in
a snapshot when it keeps them), then exits. On the stop flag (SIGTERM/SIGINT) it flushes the
partial chunk, lets the sender drain within `linger` seconds, writes the state file and
returns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np
import torch
import zmq
from prometheus_client import CollectorRegistry

from saestream.common.control import MAX_VOID, control_endpoint
from saestream.common.devices import set_threads
from saestream.common.errors import UserError
from saestream.common.logs import RateLimitedLog
from saestream.common.metrics import serve_metrics
from saestream.common.transport import push_socket
from saestream.common.wire import DTYPES, DecodeLimits, load_kernels
from saestream.producer.chunker import Chunker, Prefetch, batched
from saestream.producer.config import ProducerConfig, check_producer_id
from saestream.producer.control import ControlClient, where_request
from saestream.producer.corpus import DROP_REASONS, Corpus, CorpusError, Shard, open_corpus
from saestream.producer.hooks import HookedModel, HookError, validate_hooks
from saestream.producer.metrics import ProducerMetrics
from saestream.producer.models import Interrupted, LoadedModel, load_model
from saestream.producer.sender import Outgoing, Progress, Sender
from saestream.producer.staging import to_host
from saestream.producer.state import (
    ProducerState,
    StateError,
    StateLock,
    StateWriteError,
    check_state,
    read_state,
    write_state,
)

__all__ = ["ProducerConfig", "RunSummary", "StateWriteError", "run_producer"]

log = logging.getLogger("saestream.producer")

MAX_POS = 1 << 62
"""Void from the end of an epoch to here: the consumer's frontier moves to the next epoch."""
CONSUMER_DEFAULT_MAX_CHUNK_BYTES = 16 << 20
"""A consumer's default --max-chunk-bytes: larger chunks would be rejected."""
SAVE_RETRY_SECONDS = 5.0
"""After a failed save of the state file, the next one comes this soon (or --state-every)."""
BAD_IDS = "bad_token_ids"
"""`reason` of saestream_producer_dropped_inputs_total for contexts with ids off the vocabulary."""


class RunSummary(NamedTuple):
    run: str
    messages: int
    """Messages sent this run (the last seq + 1)."""
    tokens: int
    """Tokens sent this run, per hook."""
    progress: Progress
    complete: bool
    """False when a stop signal's linger ran out with chunks unsent (they will be redone)."""


def default_producer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def run_producer(
    cfg: ProducerConfig,
    stop: threading.Event | None = None,
    registry: CollectorRegistry | None = None,
    *,
    model: LoadedModel | None = None,
    corpus: Corpus | None = None,
) -> RunSummary:
    """Run until `stop`, `cfg.max_tokens` or `cfg.epochs`; raises ModelError, HookError,
    CorpusError, StateError or common.errors.UserError on bad configuration.

    `model` and `corpus`, when given (benchmarks, tests), replace loading `cfg.model` and
    opening `cfg.corpus`; `cfg.corpus` still names the corpus in headers and the state file.
    """
    run = ProducerRun(cfg, stop or threading.Event(), registry or CollectorRegistry(), model,
                      corpus)
    try:
        outcome = "stop" if run.stopped else "start"
        while outcome not in ("done", "stop"):
            start, end = run.plan()
            outcome = run.emit(start, end)
            if outcome == "end":
                outcome = run.settle()
    except BaseException:
        run.failed = True
        raise
    finally:
        run.close()
    if run.state_error is not None:
        raise StateWriteError(run.state_lost())
    return run.summary()


class ProducerRun:
    """One producer process: set-up in the constructor, then the loop's named steps."""

    def __init__(self, cfg: ProducerConfig, stop: threading.Event,
                 registry: CollectorRegistry, model: LoadedModel | None,
                 corpus: Corpus | None) -> None:
        self.cfg, self.stop, self.failed = cfg, stop, False
        self.stopped = False
        self.state_error: str | None = None
        """Why the newest save of the state file failed (None: it succeeded)."""
        self._state_log = RateLimitedLog(log)
        set_threads(cfg.threads)
        if cfg.wire_dtype not in DTYPES:
            raise UserError(f"bad wire dtype {cfg.wire_dtype!r} (use {', '.join(DTYPES)})")
        self.shard = Shard.parse(cfg.shard)
        self.state_lock = StateLock(cfg.state_file) if cfg.state_file is not None else None
        saved = read_state(cfg.state_file) if cfg.state_file is not None else None
        if saved is not None and saved.producer_id and cfg.producer_id \
                and cfg.producer_id != saved.producer_id:  # its origins are the other id's
            raise UserError(f"--state-file {cfg.state_file}: written by producer "
                            f"{saved.producer_id!r}, not --producer-id {cfg.producer_id!r} (a "
                            "new id re-sends the whole stream): give that id, or another file")
        try:
            self.lm = model or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype,
                                          cache_dir=cfg.cache_dir, seed=cfg.seed, stop=stop)
        except Interrupted:
            self.stopped = True
            return
        self._open_stream(corpus, saved)
        if cfg.codec == "lz4-shuffle":
            load_kernels()  # built now, not inside the first chunk's encode; logs the path
        self._serve(registry)

    # -- set-up -------------------------------------------------------------------------------

    def _open_stream(self, corpus: Corpus | None, saved: ProducerState | None) -> None:
        cfg, lm = self.cfg, self.lm
        try:
            self.hooks = validate_hooks(lm.model, list(cfg.hooks) or [lm.default_hook()])
        except HookError as exc:
            last = f"{lm.block_prefix}.{lm.n_layers - 1}"
            raise HookError(f"{exc} (its blocks are {lm.block_prefix}.0 .. {last})") from None
        if lm.max_positions is not None and cfg.seq_len > lm.max_positions:
            raise UserError(f"--seq-len {cfg.seq_len}: model {lm.name} takes at most "
                            f"{lm.max_positions} positions")
        self.corpus = corpus or open_corpus(
            cfg.corpus, seq_len=cfg.seq_len, vocab_size=lm.vocab_size,
            encode=lm.encode_text if lm.tokenizer is not None else None,
            separator=lm.separator_id, seed=cfg.seed, token_dtype=cfg.token_dtype,
            split=cfg.split,
        )
        if lm.max_positions is not None and self.corpus.seq_len > lm.max_positions:
            raise UserError(f"corpus {cfg.corpus}: contexts of {self.corpus.seq_len} tokens (the "
                            f"width of its 2-D array): model {lm.name} takes at most "
                            f"{lm.max_positions} positions")
        self.first = 0 if cfg.keep_first_token else 1
        self.per_ctx = self.corpus.seq_len - self.first
        chunk_bytes = cfg.chunk_tokens * lm.d_model * DTYPES[cfg.wire_dtype].itemsize
        if cfg.chunk_tokens > DecodeLimits.max_n or chunk_bytes > CONSUMER_DEFAULT_MAX_CHUNK_BYTES:
            raise UserError(
                f"--chunk-tokens {cfg.chunk_tokens}: chunks of {chunk_bytes:,} bytes would be "
                f"rejected by consumers' default limits ({DecodeLimits.max_n} rows, "
                f"{CONSUMER_DEFAULT_MAX_CHUNK_BYTES:,} bytes: --max-chunk-bytes)"
            )
        self.state = ProducerState(cfg.corpus, str(self.shard), self.corpus.seq_len,
                                   cfg.keep_first_token, split=cfg.split)
        if saved is not None:
            check_state(saved, self.state, cfg.state_file)  # type: ignore[arg-type]
            self.state = saved
            log.info("resuming from %s: epoch %d, %d tokens into the shard", cfg.state_file,
                     saved.epoch, saved.tokens_done)
        self.producer_id = cfg.producer_id or self.state.producer_id or default_producer_id()
        check_producer_id(self.producer_id)
        self.state.producer_id = self.producer_id
        self.run = uuid.uuid4().hex[:12]
        self.state.runs = [*self.state.runs, self.run][-20:]
        self.base_total = self.state.tokens_sent_total
        self.resume = Progress(self.state.epoch, self.state.tokens_done)
        self.started_at = self.resume
        """Where this process began emitting: every row it sends is at or after it."""
        self.voids: list[tuple[int, int, int]] = []
        self._scanning = False
        self.emitted = self.since = self.resume
        self.end: Progress | None = None
        self.left: int | None = None
        self._state_lock = threading.RLock()

    def _serve(self, registry: CollectorRegistry) -> None:
        cfg = self.cfg
        self.metrics = ProducerMetrics.create(registry)
        for reason in (*DROP_REASONS, BAD_IDS):  # every series exists from the start, at 0
            self.metrics.dropped_inputs.labels(reason=reason)
        self.corpus.on_drop = self._count_drop
        serve_metrics(registry, cfg.metrics_port, cfg.metrics_addr)
        self.zctx = zmq.Context()
        self.sock = push_socket(self.zctx, list(cfg.connect), hwm=cfg.hwm, curve=cfg.curve,
                                linger_ms=int(cfg.linger * 1000))
        self.sender = Sender(
            self.sock, producer=self.producer_id, run=self.run, model=self.lm.name,
            codec=cfg.codec, metrics=self.metrics, queue_size=cfg.queue_size,
            encode_threads=cfg.encode_threads,
            first_hook=self.hooks[0], progress=self.resume,
        ).start()
        endpoints = list(cfg.control_connect) or [control_endpoint(e) for e in cfg.connect]
        self.control: ControlClient | None = None
        if endpoints != ["off"]:
            self.control = ControlClient(self.zctx, endpoints, curve=cfg.curve,
                                         request=self._where)
            self.control.start()
        self.hooked = HookedModel(self.lm.model, self.hooks, residual=True)  # removed in `close`
        self.chunker = Chunker(self.hooks, cfg.chunk_tokens, {
            **cfg.extra_source, "corpus": cfg.corpus, "split": cfg.split,
            "shard": str(self.shard)})
        self.bad_ids = RateLimitedLog(log)
        self.next_save = time.monotonic() + cfg.state_every
        lm = self.lm
        log.info(
            "producer %s run %s: model %s (%d layers, d_model %d, %s on %s), hooks %s, corpus "
            "%s (%s) shard %s, seq_len %d, -> %s (control %s)", self.producer_id, self.run,
            lm.name, lm.n_layers, lm.d_model, str(lm.dtype).removeprefix("torch."), lm.device,
            ",".join(self.hooks), cfg.corpus, cfg.split, self.shard, self.corpus.seq_len,
            ",".join(cfg.connect), ",".join(endpoints),
        )

    # -- the loop's steps ---------------------------------------------------------------------

    def plan(self) -> tuple[Progress, Progress | None]:
        """Where to emit from (the resume point, or where the consumer said) and to."""
        start = self.resume
        cfg, state = self.cfg, self.state
        end = Progress(cfg.epochs, 0) if cfg.epochs else None
        self.left = None
        if cfg.max_tokens:
            b = state.budget
            if not b or b["done"] or b["rows"] != cfg.max_tokens:
                b = state.budget = {"rows": cfg.max_tokens, "start": list(start), "end": None,
                                    "done": False}
            if b["end"] is None and Progress(*b["start"]) == start:
                self.left = cfg.max_tokens  # counted on the way; its end is where it runs out
            elif b["end"] is None:
                b["end"] = list(self._scan_end(Progress(*b["start"]), b["rows"], end))
            if b["end"] is not None:
                end = min(end, Progress(*b["end"])) if end else Progress(*b["end"])
        self.since = self.emitted = start
        self.end = end
        return start, end

    def emit(self, start: Progress, end: Progress | None) -> str:
        """Emit the stream from `start` to `end`: "end", "rewind" (self.resume says where)
        or "stop"."""
        epoch, done = start
        while end is None or Progress(epoch, done) < end:
            outcome = self._emit_epoch(epoch, done, end)
            if outcome != "epoch":
                return outcome
            epoch, done = epoch + 1, 0
        return self._flush("end")

    def settle(self) -> str:
        """Wait until the consumer holds everything up to the end: "done", "rewind", "stop"."""
        if not self.sender.wait_sent(self.stop):
            return "stop"
        control, end = self.control, self.end
        if control is None:
            return self._done(None)
        if not control.expect_answers(self.stop, known=bool(self.state.origins)):
            return "stop" if self.stop.is_set() else self._done(None)
        outcome, where = control.settle(end, self.since, self.stop, self._check_refusal)
        if outcome == "done":
            return self._done(where)
        return self._rewind(where) if outcome == "rewind" else "stop"  # type: ignore[arg-type]

    def close(self) -> None:
        if self.stopped and not hasattr(self, "sender"):
            return
        drain_stop = self.stop
        if self.failed:  # failing: give what is queued `linger`, not forever
            drain_stop = threading.Event()
            drain_stop.set()
        self.hooked.remove()
        self.complete = self.sender.drain(drain_stop, self.cfg.linger)
        if self.control is not None:
            self.control.stop()
        self.sock.close(linger=int(self.cfg.linger * 1000))
        self.zctx.term()
        self._save_state()
        if self.state_lock is not None:
            self.state_lock.release()
        log.info("producer %s run %s: sent %d tokens per hook in %d messages%s",
                 self.producer_id, self.run, self.sender.tokens_sent, self.sender.seq,
                 "" if self.complete else " (stopped with chunks unsent)")

    def state_lost(self) -> str:
        """What a failed last save of the state file means for a restart, in one line."""
        path = self.cfg.state_file
        try:
            kept = read_state(path)  # type: ignore[arg-type]
        except StateError:
            kept = None
        held = ("it does not exist" if kept is None else
                f"it still holds position {kept.tokens_done} of epoch {kept.epoch}")
        return (f"could not write the state file {path} at exit ({self.state_error}); {held}: "
                f"a restart with it resumes from there (a consumer that answers says where "
                f"instead, and trims rows it already holds)")

    def summary(self) -> RunSummary:
        if not hasattr(self, "sender"):
            return RunSummary("", 0, 0, Progress(0, 0), True)
        return RunSummary(self.run, self.sender.seq, self.sender.tokens_sent,
                          self.sender.progress, self.complete)

    # -- emitting -------------------------------------------------------------------------------

    def _emit_epoch(self, epoch: int, done: int, end: Progress | None) -> str:
        """One pass over the shard from `done`: "epoch" when it ran out, else the outcome."""
        cfg, per_ctx = self.cfg, self.per_ctx
        stop_at = end.tokens_done if end is not None and end.epoch == epoch else None
        start_ctx = done // per_ctx
        pos, seen, usable = start_ctx * per_ctx, 0, 0
        batches = Prefetch(batched(self.corpus.shard_contexts(self.shard, start_ctx),
                                   cfg.batch_size), depth=4 if self.corpus.read_ahead else 0,
                           stop=self.stop)
        try:
            for ids in batches:
                if self.stop.is_set():
                    return self._flush("stop")
                self._check_refusal()
                target = self.control.target(self.emitted, self.since) if self.control else None
                if target is not None:
                    return self._rewind(target)
                starts = pos + per_ctx * np.arange(len(ids))
                pos += per_ctx * len(ids)
                seen += len(ids)
                usable += self._forward(ids, starts, epoch, done, stop_at)
                if self.left == 0:
                    self._budget_reached(epoch)
                    return self._flush("end")
                for item in self.chunker.take(epoch):
                    if not self._put(item):
                        return "stop"
                self._periodic_save()
                if stop_at is not None and pos >= stop_at:
                    return self._flush("end")
            if self.stop.is_set():  # the read-ahead gave up waiting: not the end of the epoch
                return self._flush("stop")
        finally:
            batches.close()
        if usable == 0 and start_ctx == 0:
            what = "usable contexts" if seen else "contexts"
            raise CorpusError(f"shard {self.shard} of corpus {cfg.corpus} has no {what}")
        self.voids.append((epoch, pos, MAX_POS))  # the rest of this epoch never carries rows
        if self._flush("epoch") != "epoch":
            return "stop"
        if not self.sender.put(Outgoing(None, None, {}, Progress(epoch + 1, 0)), self.stop,
                               cfg.linger):
            return "stop"
        log.info("epoch %d done", epoch + 1)
        return "epoch"

    def _forward(self, ids: np.ndarray, starts: np.ndarray, epoch: int, done: int,
                 stop_at: int | None) -> int:
        """The hooked forward of a batch's valid contexts into the chunker; returns their
        number. Contexts with ids outside the vocabulary are skipped and declared void."""
        lm, per_ctx = self.lm, self.per_ctx
        valid = ((ids >= 0) & (ids < lm.vocab_size)).all(axis=1)
        if not valid.all():
            self.metrics.dropped_inputs.labels(reason=BAD_IDS).inc(int((~valid).sum()))
            self.bad_ids.warning("ids", "skipping %d context(s) with token ids outside [0, %d)",
                                 int((~valid).sum()), lm.vocab_size)
            for s in starts[~valid].tolist():
                if s + per_ctx > done:
                    self.voids.append((epoch, max(s, done), s + per_ctx))
            del self.voids[: -2 * MAX_VOID]
            ids, starts = ids[valid], starts[valid]
        if len(ids):
            with self.metrics.forward_seconds.time():
                acts = self.hooked(torch.from_numpy(ids).to(lm.device))
                # On CUDA the rows stay on the device until a chunk is cut (`_put`).
                host = {h: a[:, self.first:].to(DTYPES[self.cfg.wire_dtype])
                        for h, a in acts.items()}
                if lm.device.type != "cuda":
                    host = {h: a.cpu() for h, a in host.items()}
            self.left = self.chunker.add_batch(host, starts.tolist(), done, self.left, stop_at)
            self.emitted = Progress(epoch, self.chunker.last_end)
        return len(ids)

    def _put(self, item: Outgoing) -> bool:
        """Queue a chunk for sending (its copy to the host started first, on CUDA)."""
        return self.sender.put(to_host(item, self.cfg.codec), self.stop, self.cfg.linger)

    def _flush(self, outcome: str) -> str:
        """Send the partial chunk in hand; `outcome`, or "stop" if the linger ran out."""
        for item in self.chunker.take(self.emitted.epoch, final=True):
            if not self._put(item):
                return "stop"
        return outcome

    def _done(self, held: Progress | None) -> str:
        """The stream is over: the budget is spent, the state says so."""
        if self.state.budget is not None:
            self.state.budget["done"] = True
        self._save_state(committed=held)
        return "done"

    def _rewind(self, target: Progress) -> str:
        direction = "back" if target < self.emitted else "forward"
        dropped = self.sender.rewind(target)
        self.chunker.clear()
        self.metrics.rewinds.labels(direction=direction).inc()
        log.info("the consumer holds position %d of epoch %d: continuing there (%s; %d queued "
                 "chunks dropped)", target.tokens_done, target.epoch, direction, dropped)
        self.resume = self.emitted = target
        return "rewind"

    def _budget_reached(self, epoch: int) -> None:
        b = self.state.budget
        if b is not None:
            b["end"] = [epoch, self.chunker.last_end]
            self.end = Progress(epoch, self.chunker.last_end)
            self._save_state()

    def _count_drop(self, reason: str, n: int) -> None:
        """Count input the corpus skipped (it logs why); not while `_scan_end` reads ahead."""
        if not self._scanning:
            self.metrics.dropped_inputs.labels(reason=reason).inc(n)

    def _scan_end(self, start: Progress, rows: int, end: Progress | None) -> Progress:
        """Where `rows` rows from `start` end (contexts with bad ids hold none)."""
        self._scanning = True  # what it skips is counted when it is streamed
        try:
            return self._scan_end_of(start, rows, end)
        finally:
            self._scanning = False

    def _scan_end_of(self, start: Progress, rows: int, end: Progress | None) -> Progress:
        per_ctx, vocab = self.per_ctx, self.lm.vocab_size
        epoch, done, left = start.epoch, start.tokens_done, rows
        while end is None or Progress(epoch, done) < end:
            first_ctx, any_ctx = done // per_ctx, False
            for i, ctx in enumerate(self.corpus.shard_contexts(self.shard, first_ctx)):
                any_ctx = True
                pos = (first_ctx + i) * per_ctx
                lo = max(0, done - pos)
                if ((ctx >= 0) & (ctx < vocab)).all():
                    take = min(per_ctx - lo, left)
                    left -= take
                    if left == 0:
                        return Progress(epoch, pos + lo + take)
            if not any_ctx and first_ctx == 0:
                break
            epoch, done = epoch + 1, 0
        return end or Progress(epoch, done)

    # -- waiting and bookkeeping ----------------------------------------------------------------

    def _check_refusal(self) -> None:
        if self.control is not None and self.control.error:
            raise UserError(f"the consumer refuses this producer: {self.control.error}")

    def _where(self) -> dict:
        """The control request, built fresh every time (on the control thread)."""
        reply = self.control.view() if self.control is not None else None
        if reply is not None and reply["origin"] is not None \
                and reply["consumer"] not in self.state.origins:
            self.state.origins[reply["consumer"]] = list(reply["origin"])
            self.state.origins = dict(list(self.state.origins.items())[-63:])
            self._save_state()  # durable before this consumer run depends on it
        # Until some consumer has answered, rows sent since the start may still be on their
        # way (a consumer with a full buffer reads them late): proposing what was sent so
        # far would put the consumer's origin past them, and lose them if it crashes.
        answered = self.control is not None and self.control.ever_answered.is_set()
        star = self._resume_point() if answered else self.started_at
        propose = {**self.state.origins, "*": list(star)}
        stream = {"corpus": self.cfg.corpus, "split": self.cfg.split, "shard": str(self.shard),
                  "seq_len": self.corpus.seq_len, "first": self.first}
        return where_request(producer=self.producer_id, run=self.run, hooks=self.hooks,
                             stream=stream, propose=propose, void=self.voids,
                             flush=bool(self.control and self.control.flush))

    def _resume_point(self, committed: Progress | None = None) -> Progress:
        """Where a restart should begin: what a keeping consumer committed, else what was
        sent (the state file's fallback when no consumer answers)."""
        if committed is not None:
            return committed
        held = self.control.held_durably() if self.control is not None else None
        return held if held is not None else self.sender.progress

    def _periodic_save(self) -> None:
        if time.monotonic() >= self.next_save:
            saved = self._save_state()
            log.info("sent %d tokens, %d messages", self.sender.tokens_sent, self.sender.seq)
            every = self.cfg.state_every
            self.next_save = time.monotonic() + (every if saved else min(every, SAVE_RETRY_SECONDS))

    def _save_state(self, committed: Progress | None = None) -> bool:
        """Write the state file; False when the disk refused (counted, logged, and tried again
        by the next save: a full or read-only disk never stops the stream)."""
        if self.cfg.state_file is None or not hasattr(self, "sender"):
            return True
        with self._state_lock:  # the control thread saves too (a new consumer run's origin)
            state = self.state
            state.epoch, state.tokens_done = self._resume_point(committed)
            state.tokens_sent_total = self.base_total + self.sender.tokens_sent
            try:
                write_state(self.cfg.state_file, state)
            except OSError as exc:
                self.state_error = exc.strerror or str(exc)
                self.metrics.state_write_failures.inc()
                self._state_log.warning(
                    "save", "could not write the state file %s (%s): still streaming, the "
                    "next save tries again", self.cfg.state_file, self.state_error)
                return False
            self.state_error = None
            return True
