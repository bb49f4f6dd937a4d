"""The producer's main loop: contexts → truncated forward → chunks → send queue → PUSH.

`run_producer` reads top to bottom: load the model and the corpus, pick up the state file,
then for each batch of the shard's contexts run the forward up to the deepest hook, cut the
activations into chunks of `chunk_tokens` and hand them to the sending thread. On the stop
flag (SIGTERM/SIGINT), `--max-tokens` or the last epoch it flushes the partial chunk, lets the
sender drain within `linger` seconds (unbounded while no stop was asked for), and writes the
state file with the position of the last chunk actually sent.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import zmq
from prometheus_client import CollectorRegistry

from saestream.common.errors import UserError
from saestream.common.logs import RateLimitedLog
from saestream.common.metrics import serve_metrics
from saestream.common.transport import DEFAULT_HWM, CurveClientKeys, push_socket
from saestream.common.wire import DEFAULT_CODEC, DTYPES, DecodeLimits
from saestream.producer.corpus import Corpus, CorpusError, Shard, open_corpus
from saestream.producer.hooks import HookedModel, HookError, validate_hooks
from saestream.producer.metrics import ProducerMetrics
from saestream.producer.models import EMBEDDED_MODEL, LoadedModel, load_model
from saestream.producer.sender import Outgoing, Progress, Sender
from saestream.producer.state import ProducerState, check_state, read_state, write_state

log = logging.getLogger("saestream.producer")


@dataclass
class ProducerConfig:
    """One field per `saestream producer` flag (see README, section producer)."""

    model: str = EMBEDDED_MODEL
    """`smollm2-135m`, `tiny`, `random:CONFIG.json`, a model directory or a cached hub id."""
    hooks: Sequence[str] = ()
    """Module paths whose output is streamed; empty = the model's default hook."""
    corpus: str = "wiki-sample"
    split: str = "train"
    """Which part of the corpus to stream: `train` (default), `eval` (held out) or `all`."""
    connect: Sequence[str] = ("tcp://127.0.0.1:5557",)
    """Consumer endpoints; chunks are dealt round-robin among the connected ones."""
    chunk_tokens: int = 2048
    """Token rows per message (the last chunk of a run or epoch may have fewer)."""
    wire_dtype: str = "bfloat16"
    codec: str = DEFAULT_CODEC
    batch_size: int = 8
    """Contexts per forward pass."""
    seq_len: int = 128
    """Tokens per context fed to the model (2-D `.npy` corpora bring their own)."""
    shard: str = "0/1"
    producer_id: str | None = None
    """Sent in every header; None = `<hostname>-<pid>`."""
    epochs: int = 0
    """Passes over the shard; 0 = endless."""
    max_tokens: int = 0
    """Send exactly this many tokens (per hook), then exit; 0 = no limit."""
    state_file: Path | None = None
    state_every: float = 30.0
    """Seconds between state-file writes while running (it is always written on exit)."""
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    device: str = "auto"
    model_dtype: str = "auto"
    keep_first_token: bool = False
    seed: int = 0
    """Seeds random models (`tiny`, `random:`) and the synthetic corpus."""
    curve: CurveClientKeys | None = None
    cache_dir: Path | None = None
    token_dtype: str = "uint16"
    """Element type of `.bin` token files."""
    threads: int = 0
    """torch intra-op threads; 0 = `$SAESTREAM_THREADS`, else torch's default."""
    queue_size: int = 8
    """Chunks the send queue holds before the model loop blocks."""
    hwm: int = DEFAULT_HWM
    linger: float = 5.0
    """Seconds allowed, after a stop signal, to send what is queued."""
    extra_source: dict = field(default_factory=dict)


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


def set_threads(threads: int) -> None:
    n = threads or int(os.environ.get("SAESTREAM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def batched(contexts: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Stacks of up to `size` contexts: [batch, seq_len] token ids."""
    it = iter(contexts)
    while batch := list(itertools.islice(it, size)):
        yield np.stack(batch)


class Prefetch:
    """Runs an iterator on a thread of its own, up to `depth` items ahead, so reading and
    tokenising the corpus overlaps the forward pass. Exceptions surface in the consumer.

    `depth` 0 iterates inline instead: for corpora that are cheap to read (arrays, synthetic
    ids) a second Python thread costs the model loop more in GIL hand-overs than it saves.
    """

    _END = object()

    def __init__(self, items: Iterable, depth: int = 4) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._closed = threading.Event()
        if depth > 0:
            self._thread = threading.Thread(target=self._run, args=(items,), name="corpus",
                                            daemon=True)
            self._thread.start()
        self._inline = depth <= 0

    def _put(self, entry: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exc:
            self._put((self._END, exc))

    def __iter__(self) -> Iterator:
        if self._inline:
            yield from self._items
            return
        while True:
            item, exc = self._queue.get()
            if exc is not None:
                raise exc
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop reading ahead (the thread ends at its next item)."""
        self._closed.set()


class Chunker:
    """Collects per-context activations and cuts them into chunks of `chunk_tokens` rows."""

    def __init__(self, hooks: Sequence[str], chunk_tokens: int, source: dict) -> None:
        self.hooks, self.chunk_tokens, self.source = list(hooks), chunk_tokens, source
        self.segments: deque[tuple[int, dict[str, torch.Tensor]]] = deque()
        self.rows = 0

    def add(self, start: int, acts: dict[str, torch.Tensor]) -> None:
        """Rows of one context, starting at position `start` of the shard's token stream."""
        n = int(next(iter(acts.values())).shape[0])
        if n:
            self.segments.append((start, acts))
            self.rows += n

    def add_batch(
        self, acts: dict[str, torch.Tensor], starts: list[int], done: int, left: int | None
    ) -> int | None:
        """Add a batch's rows, except positions before `done` (sent before a restart) and
        beyond the budget `left` (None = no limit); returns the budget still left.

        :param acts: hook -> [batch, per_ctx, d], context j starting at position starts[j].
        """
        per_ctx = int(next(iter(acts.values())).shape[1])
        spans = []  # (row in batch, first position, lo, hi) of what is added
        for j, start in enumerate(starts):
            lo = max(0, done - start)
            hi = per_ctx if left is None else min(per_ctx, lo + left)
            if hi > lo:
                spans.append((j, start, lo, hi))
                if left is not None:
                    left -= hi - lo
        contiguous = starts[-1] - starts[0] == per_ctx * (len(starts) - 1)
        if contiguous and len(spans) == len(starts) and all(
            lo == 0 and hi == per_ctx for _, _, lo, hi in spans
        ):  # the common case: the whole batch is one run of the token stream, no copy
            self.add(starts[0], {h: a.reshape(-1, a.shape[-1]) for h, a in acts.items()})
        else:
            for j, start, lo, hi in spans:
                self.add(start + lo, {h: a[j, lo:hi] for h, a in acts.items()})
        return left

    def take(self, epoch: int, final: bool = False) -> Iterator[Outgoing]:
        """Full chunks (and with `final`, the partial rest), one message per hook each."""
        while self.rows >= self.chunk_tokens or (final and self.rows > 0):
            need = min(self.chunk_tokens, self.rows)
            pieces: list[dict[str, torch.Tensor]] = []
            first = self.segments[0][0]
            end = first
            while need:
                start, acts = self.segments.popleft()
                n = int(acts[self.hooks[0]].shape[0])
                if n > need:
                    self.segments.appendleft((start + need, {h: a[need:] for h, a in acts.items()}))
                    acts, n = {h: a[:need] for h, a in acts.items()}, need
                pieces.append(acts)
                need -= n
                self.rows -= n
                end = start + n
            source = {**self.source, "epoch": epoch, "start": first, "end": end}
            for i, hook in enumerate(self.hooks):
                parts = [p[hook] for p in pieces]
                acts_h = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
                last = i == len(self.hooks) - 1
                yield Outgoing(hook, acts_h, source, Progress(epoch, end) if last else None)


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
    stop = stop or threading.Event()
    registry = registry or CollectorRegistry()
    set_threads(cfg.threads)
    if cfg.wire_dtype not in DTYPES:
        raise UserError(f"bad wire dtype {cfg.wire_dtype!r} (use {', '.join(DTYPES)})")
    shard = Shard.parse(cfg.shard)

    lm = model or load_model(
        cfg.model, device=cfg.device, dtype=cfg.model_dtype, cache_dir=cfg.cache_dir,
        seed=cfg.seed,
    )
    try:
        hooks = validate_hooks(lm.model, list(cfg.hooks) or [lm.default_hook()])
    except HookError as exc:
        last = f"{lm.block_prefix}.{lm.n_layers - 1}"
        raise HookError(f"{exc} (its blocks are {lm.block_prefix}.0 .. {last})") from None
    corpus = corpus or open_corpus(
        cfg.corpus, seq_len=cfg.seq_len, vocab_size=lm.vocab_size,
        encode=lm.encode_text if lm.tokenizer is not None else None,
        separator=lm.separator_id, seed=cfg.seed, token_dtype=cfg.token_dtype, split=cfg.split,
    )
    first = 0 if cfg.keep_first_token else 1
    per_ctx = corpus.seq_len - first
    wire_dtype = DTYPES[cfg.wire_dtype]
    limits = DecodeLimits()
    chunk_bytes = cfg.chunk_tokens * lm.d_model * wire_dtype.itemsize
    if cfg.chunk_tokens > limits.max_n or chunk_bytes > limits.max_raw_nbytes:
        raise UserError(
            f"--chunk-tokens {cfg.chunk_tokens}: chunks of {chunk_bytes:,} bytes would be "
            f"rejected by receivers' default limits ({limits.max_n} rows, "
            f"{limits.max_raw_nbytes:,} bytes)"
        )

    run = uuid.uuid4().hex[:12]
    producer_id = cfg.producer_id or default_producer_id()
    state = ProducerState(cfg.corpus, str(shard), corpus.seq_len, cfg.keep_first_token,
                          split=cfg.split)
    if cfg.state_file is not None:
        saved = read_state(cfg.state_file)
        if saved is not None:
            check_state(saved, state, cfg.state_file)
            state = saved
            log.info("resuming from %s: epoch %d, %d tokens into the shard",
                     cfg.state_file, state.epoch, state.tokens_done)
    state.runs = [*state.runs, run][-20:]
    progress = Progress(state.epoch, state.tokens_done)
    if cfg.epochs and state.epoch >= cfg.epochs:
        log.info("all %d epoch(s) already done according to %s", cfg.epochs, cfg.state_file)
        return RunSummary(run, 0, 0, progress, True)

    metrics = ProducerMetrics.create(registry)
    try:
        serve_metrics(registry, cfg.metrics_port, cfg.metrics_addr)
    except OSError as exc:
        raise UserError(
            f"cannot serve metrics on {cfg.metrics_addr}:{cfg.metrics_port}: {exc}"
        ) from exc
    zctx = zmq.Context()
    sock = push_socket(zctx, list(cfg.connect), hwm=cfg.hwm, curve=cfg.curve,
                       linger_ms=int(cfg.linger * 1000))
    sender = Sender(
        sock, producer=producer_id, run=run, model=lm.name, codec=cfg.codec, metrics=metrics,
        queue_size=cfg.queue_size, first_hook=hooks[0], progress=progress,
    ).start()
    hooked = HookedModel(lm.model, hooks)  # removed again in the `finally` below
    chunker = Chunker(hooks, cfg.chunk_tokens,
                      {**cfg.extra_source, "corpus": cfg.corpus, "split": cfg.split,
                       "shard": str(shard)})
    bad_ids = RateLimitedLog(log)
    log.info(
        "producer %s run %s: model %s (%d layers, d_model %d, %s on %s), hooks %s, corpus %s "
        "shard %s, seq_len %d, -> %s", producer_id, run, lm.name, lm.n_layers, lm.d_model,
        str(lm.dtype).removeprefix("torch."), lm.device, ",".join(hooks), cfg.corpus, shard,
        corpus.seq_len, ",".join(cfg.connect),
    )

    base_total = state.tokens_sent_total

    def save_state() -> None:
        if cfg.state_file is not None:
            state.epoch, state.tokens_done = sender.progress
            state.tokens_sent_total = base_total + sender.tokens_sent
            write_state(cfg.state_file, state)

    left = cfg.max_tokens or None  # tokens still to emit this run (None = unlimited)
    epoch, done = progress
    next_save = time.monotonic() + cfg.state_every
    queued_all = True
    drain_stop = stop
    batches: Prefetch | None = None
    try:
        while queued_all and not stop.is_set() and left != 0 and (
            cfg.epochs == 0 or epoch < cfg.epochs
        ):
            start_ctx = done // per_ctx
            pos, seen, usable = start_ctx * per_ctx, 0, 0
            batches = Prefetch(batched(corpus.shard_contexts(shard, start_ctx), cfg.batch_size),
                               depth=4 if corpus.read_ahead else 0)
            for ids in batches:
                seen += len(ids)
                valid = ((ids >= 0) & (ids < lm.vocab_size)).all(axis=1)
                starts = pos + per_ctx * np.arange(len(ids))
                pos += per_ctx * len(ids)
                if not valid.all():
                    bad_ids.warning("ids", "skipping %d context(s) with token ids outside "
                                    "[0, %d)", int((~valid).sum()), lm.vocab_size)
                    ids, starts = ids[valid], starts[valid]
                usable += len(ids)
                if len(ids):
                    t0 = time.perf_counter()
                    acts = hooked(torch.from_numpy(ids).to(lm.device))
                    host = {h: a[:, first:].to(wire_dtype).cpu() for h, a in acts.items()}
                    metrics.forward_seconds.observe(time.perf_counter() - t0)
                    left = chunker.add_batch(host, starts.tolist(), done, left)
                for item in chunker.take(epoch):
                    if not sender.put(item, stop, cfg.linger):
                        queued_all = False
                        break
                if time.monotonic() >= next_save:
                    save_state()
                    log.info("sent %d tokens, %d messages", sender.tokens_sent, sender.seq)
                    next_save = time.monotonic() + cfg.state_every
                if not queued_all or stop.is_set() or left == 0:
                    batches.close()
                    break
            else:
                if usable == 0 and start_ctx == 0:
                    what = "usable contexts" if seen else "contexts"
                    raise CorpusError(f"shard {shard} of corpus {cfg.corpus} has no {what}")
                for item in chunker.take(epoch, final=True):
                    queued_all = queued_all and sender.put(item, stop, cfg.linger)
                epoch, done = epoch + 1, 0
                queued_all = queued_all and sender.put(
                    Outgoing(None, None, {}, Progress(epoch, 0)), stop, cfg.linger
                )
                log.info("epoch %d done", epoch)
                continue
            break
        for item in chunker.take(epoch, final=True):  # the chunk in hand
            if not queued_all or not sender.put(item, stop, cfg.linger):
                queued_all = False
                break
    except BaseException:
        if batches is not None:
            batches.close()
        drain_stop = threading.Event()  # failing: give what is queued `linger`, not forever
        drain_stop.set()
        raise
    finally:
        hooked.remove()
        complete = sender.drain(drain_stop, cfg.linger) and queued_all
        sock.close(linger=int(cfg.linger * 1000))
        zctx.term()
        save_state()
    log.info("producer %s run %s: sent %d tokens per hook in %d messages%s", producer_id, run,
             sender.tokens_sent, sender.seq, "" if complete else " (stopped with chunks unsent)")
    return RunSummary(run, sender.seq, sender.tokens_sent, sender.progress, complete)
