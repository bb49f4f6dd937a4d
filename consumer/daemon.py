"""The consumer daemon: receive → shuffle buffer → train every SAE on each batch → checkpoint.

`run_consumer` is the main loop, readable top to bottom; `ConsumerRun` holds the run and
its named steps. Three threads: the receiver (socket → buffer, `consumer/receiver.py`), the
control channel (producers ask where to continue, `consumer/control.py`) and this loop
(buffer → trainers). Signals only set flags, handled at step boundaries: SIGUSR1 writes a
snapshot and training continues; SIGTERM/SIGINT write a final snapshot and return.

Delivery: each snapshot holds the trainers, the shuffle buffer and the ledger of which
positions of every producer's stream they account for, taken as one consistent cut; a
producer resumes from what the snapshot accounts for, so a token is trained exactly once
whichever process dies. A snapshot that fails (full disk, I/O error) is counted and logged,
and training goes on.

Data parallel (under torchrun, `world.size > 1`): every rank is such a process with its own
sockets, buffer and ledger, and the ranks train one SAE together (`Trainer(dp=...)`). At each
step boundary one small collective (`Agreement`) decides for all of them whether to stop,
whether to snapshot and which hook every rank has a batch of, so a starved rank makes the
others wait and all ranks snapshot and stop at the same step. Rank 0 writes the snapshots:
the trainers and counters only (no buffers, no ledger: each rank is its own consumer run to
the producers, and nothing is promised beyond training state; see ARCHITECTURE.md).
With `--latent-shards R`, R consecutive ranks split each SAE's latents: each takes its part
of the global batch from its own buffer as before, the R parts are gathered so the R ranks
train on the same rows, and rank 0 gathers the shards to write a snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from saestream.common.control import MAX_CONTROL_BYTES, control_endpoint
from saestream.common.devices import resolve_device
from saestream.common.errors import UserError
from saestream.common.files import dir_locked
from saestream.common.logs import RateLimitedLog
from saestream.common.metrics import serve_metrics
from saestream.common.signals import SignalFlags
from saestream.common.transport import CONTROL_HWM, pull_socket, router_socket
from saestream.common.wire import DTYPES, REJECT_REASONS, DecodeLimits, load_kernels, lz4_bound
from saestream.consumer import checkpoint as ckpt
from saestream.consumer import init_from
from saestream.consumer.buffer import Batch, BufferSet
from saestream.consumer.config import SAE_KEYS, ConsumerConfig, SAESpec, check_fits
from saestream.consumer.control import ControlServer
from saestream.consumer.distributed import (
    SINGLE,
    SINGLE_MESH,
    Agreement,
    DataParallel,
    Mesh,
    local_rank,
    local_world_size,
    peers_watched,
    rank_endpoints,
    rank_slice,
)
from saestream.consumer.heap import keep_freed_memory, release_freed_memory
from saestream.consumer.ledger import Ledger
from saestream.consumer.metrics import ConsumerMetrics
from saestream.consumer.receiver import CONSUMER_REJECT_REASONS, HookInfo, Receiver
from saestream.consumer.recorder import Recorder
from saestream.consumer.shard_files import choose_layout, stage_per_rank
from saestream.consumer.sharding import LatentShard
from saestream.consumer.trainer import MSEWindow, StepMetrics, Trainer

log = logging.getLogger("saestream.consumer")

FLUSH_SNAPSHOT_SECONDS = 2.0
"""Snapshots asked for by producers that finished are written at most this often."""
RETRY_AFTER_FAILURE_SECONDS = 10.0
WAIT_SECONDS = 0.2
"""Longest wait for a batch before the loop goes round (signals, snapshots, the ranks'
agreement)."""
SNAPSHOT_REASONS = ("", "flush", "periodic", "signal")
"""Data parallel: the agreed snapshot is the highest-ranked reason any rank has."""


@dataclass
class RunStats:
    """What a finished run did (returned to the CLI and tests)."""

    run_id: str = ""
    steps: int = 0
    tokens: int = 0
    snapshots: list[Path] = field(default_factory=list)
    saved_step: int = -1
    stop_reason: str = ""
    failed_snapshots: int = 0


class FinalSnapshotError(Exception):
    """The final snapshot could not be written; the message names the last good one."""


def run_consumer(
    cfg: ConsumerConfig, flags: SignalFlags, *, metrics: ConsumerMetrics | None = None,
    mesh: Mesh = SINGLE_MESH,
) -> RunStats:
    """Receive and train until stopped (signal, --max-tokens, --max-steps); final snapshot.

    Raises UserError for a configuration this machine or directory cannot serve (before
    any socket is bound), FinalSnapshotError when the final snapshot cannot be written,
    PeerLost (data parallel) when another rank died or went silent for --dist-timeout.
    """
    with peers_watched(mesh.world, cfg.dist_timeout), ExitStack() as held:
        run = ConsumerRun(cfg, flags, metrics or ConsumerMetrics(), mesh, held)
        try:
            if mesh.world.size == 1:
                while not run.stop_reason():
                    got = run.next_batch()
                    if got is not None:
                        run.train(*got)
                    run.housekeeping()
            else:
                while True:
                    hook = run.agree()  # the ranks' one collective per step boundary
                    if run.stop_reason():
                        break
                    if hook is not None:
                        run.train(hook, run.take(hook), tokens=run.rank_batch()[0])
                    run.log_if_due()
            run.finish()
        finally:
            run.close()
    return run.stats


class ConsumerRun:
    """One consumer process: set-up in the constructor, then the loop's named steps."""

    def __init__(self, cfg: ConsumerConfig, flags: SignalFlags, metrics: ConsumerMetrics,
                 mesh: Mesh, held: ExitStack) -> None:
        """:param held: what the run holds until it ends (the checkpoint directory's lock),
        released by the caller however the run ends, in this constructor too."""
        self.cfg, self.flags, self.metrics, self.mesh = cfg, flags, metrics, mesh
        self.held = held
        self._started = False
        """Set up in full: the sockets bound, the threads running."""
        self.world = mesh.world
        """Every rank: the step-boundary agreement, the split of a global batch's rows."""
        self.shard_peers = DataParallel(mesh.shard_group) if mesh.shard_size > 1 else SINGLE
        """The ranks that share this rank's batch and split the latents."""
        self.agreement = Agreement(mesh.world)
        self._stop_agreed = False
        self._said_per_rank = False
        if self.world.size > 1 and cfg.record is not None:
            raise UserError("--record is not supported under torchrun yet: record with one "
                            "process (or `saestream record`)")
        self.device = resolve_device(cfg.device)
        if self.world.size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank())
            torch.cuda.set_device(self.device)
        check_fits(cfg, str(self.device))
        if cfg.control_bind is None and self.world.size == 1:
            control_endpoint(cfg.bind)  # EndpointError now, not once the directory holds a run
        self.stats = RunStats()
        self.trainers: dict[str, Trainer] = {}
        self.windows = {s.name: MSEWindow(cfg.metrics_window) for s in cfg.saes}
        self._rlog = RateLimitedLog(log, cfg.reject_log_interval)
        self.hook_info = {h: HookInfo(cfg.d_in, None, None) for h in cfg.hooks} if cfg.d_in \
            else {}
        self.init_sources = init_from.load_sources(
            cfg.init_from, [s.name for s in cfg.saes], self.device) if cfg.init_from else {}
        for hook, d in init_from.hook_widths(self.init_sources, {s.name: s.hook for s in cfg.saes},
                                             cfg.d_in).items():
            self.hook_info.setdefault(hook, HookInfo(d, None, None))
        self.ledger = Ledger(cfg.max_producers, cfg.producer_expiry_seconds)
        self.buffers = BufferSet(cfg.buffer_tokens, pin_memory=self.device.type == "cuda",
                                 seed=cfg.seed)
        self._saved_version = -1  # the ledger version the newest snapshot holds (`_adopt`)
        self._resumed_from: Path | None = None
        restored = self._open_checkpoint_dir()
        self.recorder = Recorder(cfg.record, cfg.hooks, cfg.record_shard_tokens, metrics,
                                 flag="--record") if cfg.record is not None else None
        if self.recorder is not None:
            self.recorder.fix_hooks(self.hook_info)
            log.info("recording accepted chunks to %s/<hook>/ in shards of %d rows", cfg.record,
                     cfg.record_shard_tokens)
        metrics.declare_rejects((*REJECT_REASONS, *CONSUMER_REJECT_REASONS))
        for reason in ckpt.FAILURE_REASONS:  # at 0 from the start: increase() misses a series
            metrics.checkpoint_failures.labels(reason=reason)  # that first appears at 1
        for spec in cfg.saes:
            metrics.declare_sae(spec.hook, spec.name)
        load_kernels()  # built now, not inside the first lz4-shuffle chunk's decode
        self.stats.run_id = self.stats.run_id or uuid.uuid4().hex[:12]
        self._serve(restored)
        if self.device.type == "cpu":  # set up and checked: the step's large tensors reused
            keep_freed_memory()
        self._last_save = self._last_flush_save = self._last_log = time.monotonic()
        self._periodic_step = self.stats.steps
        self._failed_at = -float("inf")
        self._at_log = (self.stats.steps, self.stats.tokens)
        self._started = True

    # -- set-up -------------------------------------------------------------------------------

    def _open_checkpoint_dir(self) -> Ledger | None:
        """Check the directory, then resume (returns the committed ledger) or start anew.
        Data parallel: rank 0 does that alone (it writes), then every rank learns the run id
        and the snapshot it resumed (or its error) and loads the same trainers."""
        if self.world.size == 1:
            return self._open_here()
        outcome: tuple[str, str, str | None]
        if self.world.rank == 0:
            try:
                self._open_here()
                outcome = ("ok", self.stats.run_id or uuid.uuid4().hex[:12],
                           str(self._resumed_from) if self._resumed_from else None)
            except UserError as exc:
                self.agreement.broadcast(("error", str(exc), None))
                raise
        outcome = self.agreement.broadcast(outcome if self.world.rank == 0 else None)  # type: ignore[assignment]
        if outcome[0] == "error":
            raise UserError(outcome[1])
        self.stats.run_id = outcome[1]
        if self.world.rank != 0 and outcome[2] is not None:
            path = Path(outcome[2])
            try:
                trainers, extra = ckpt.load_snapshot(path, self.device, self._shard_of)
                hooks = _saved_hooks(path, extra, trainers, {})
            except ckpt.CheckpointError as exc:  # rank 0 read its part; this one cannot
                raise UserError(f"rank {self.world.rank} cannot read its part of the snapshot "
                                f"rank 0 resumed: {exc}") from None
            self._adopt(path, trainers, extra, {}, hooks, None)
        return None  # ranks' ledgers are not in the snapshots: nothing is `committed`

    def _open_here(self) -> Ledger | None:
        cfg, root = self.cfg, self.cfg.checkpoint_dir
        if root is None:
            return None
        self.held.enter_context(dir_locked(
            root, "--checkpoint-dir", "another process is using it (is this run's consumer "
            "still running?)"))
        for stale in ckpt.remove_stale_temporaries(root):
            log.info("removed %s, left by an interrupted snapshot", stale)
        if ckpt.holds_a_run(root) and cfg.overwrite:
            log.warning("--overwrite: deleting the run in %s", root)
            ckpt.remove_run(root)
        elif ckpt.holds_a_run(root) and not cfg.resume:
            raise UserError(
                f"--checkpoint-dir {root} already holds a run: pass --resume to continue it, "
                "--overwrite to discard it, or choose a new directory"
            )
        elif ckpt.holds_a_run(root):
            return self._restore(root)
        elif cfg.resume:
            log.info("--resume: no run in %s, starting a new one", root)
        self.stats.run_id = uuid.uuid4().hex[:12]
        ckpt.write_run_id(root, self.stats.run_id)  # before any data is accepted
        self.held.callback(self._forget_unstarted_run, root)
        return None

    def _forget_unstarted_run(self, root: Path) -> None:
        """A new run whose set-up failed after its run file was written (a port taken, say)
        takes the file back: the same command again must not meet "already holds a run"."""
        if not self._started and not ckpt.list_snapshots(root):
            (root / ckpt.RUN_FILE).unlink(missing_ok=True)

    def _restore(self, root: Path) -> Ledger:
        """Trainers, buffers, ledger, counters from the snapshot `latest` names (or nothing
        yet, for a run that was killed before its first snapshot)."""
        run_id = ckpt.read_run_id(root)
        if run_id is not None and not ckpt.list_snapshots(root) and not ckpt.latest_name(root):
            log.info("--resume: run %s in %s has no snapshot yet: continuing it from the start",
                     run_id, root)
            self.stats.run_id = run_id
            return self.ledger.copy()
        for path, _ in ckpt.resumable(root, run_id):  # never another run's
            try:
                trainers, extra = ckpt.load_snapshot(path, self.device, self._shard_of)
                _check_finite(trainers, path)
                buffered = ckpt.load_buffers(path, extra)
                hooks = _saved_hooks(path, extra, trainers, buffered)
                ledger = _saved_ledger(path, extra, self.cfg)
            except ckpt.CheckpointError as exc:
                log.warning("skipping unreadable snapshot %s: %s", path, exc)
                continue
            self._adopt(path, trainers, extra, buffered, hooks, ledger)
            named = ckpt.latest_name(root)
            if named is not None and named != path.name:
                log.warning("resumed from %s, not from %s, which `latest` names: the rows "
                            "committed in between are no longer held; producers still "
                            "streaming send them again, but a producer that has already "
                            "exited (--max-tokens) does not", path.name, named)
            return self.ledger.copy()
        raise UserError(
            f"--resume: no readable snapshot of the run in {root} (see the warnings above); "
            "--overwrite starts over"
        )

    def _adopt(self, path: Path, trainers: dict[str, Trainer], extra: dict[str, Any],
               buffered: dict[str, Batch], hooks: dict[str, HookInfo],
               ledger: Ledger | None) -> None:
        """Take on a snapshot read and checked (`_saved_hooks`, `_saved_ledger`): UserError
        only where it disagrees with this run's settings."""
        cfg = self.cfg
        specs = {s.name: s for s in cfg.saes}
        # An SAE is made at its hook's first step, all of the hook's at once: one missing
        # from the snapshot is on a hook that had not trained yet (or that the run did not
        # have), and starts fresh then. One missing beside its hook's trained SAEs is not.
        trained_hooks = {tr.hook for tr in trainers.values()}
        unmade = {n for n, s in specs.items() if n not in trainers and s.hook not in trained_hooks}
        if trainers and set(trainers) | unmade != set(specs):
            raise UserError(f"snapshot {path} holds SAEs {sorted(trainers)}, but --sae "
                            f"configures {sorted(specs)}")
        for name, tr in trainers.items():
            if tr.hook != specs[name].hook:
                raise UserError(f"SAE {name} in {path} reads hook {tr.hook}, --sae says "
                                f"{specs[name].hook}")
        for name, tr in trainers.items():
            _say_overridden(specs[name], tr, path)
        lost = sorted(h for h in buffered if h not in cfg.hooks)
        if lost:
            raise UserError(f"snapshot {path} buffers rows of hook(s) {', '.join(lost)}, which "
                            "--hook does not name")
        for hook, saved in hooks.items():
            if hook in cfg.hooks:
                if cfg.d_in is not None and cfg.d_in != saved.d:
                    log.warning("--d-in %d ignored for %s: the snapshot %s was trained on "
                                "width %d, which stands", cfg.d_in, hook, path, saved.d)
                self.hook_info[hook] = saved
        if ledger is not None:  # a one-process snapshot's ledger and buffers: rank 0's
            self.ledger = ledger
        self._resumed_from = path
        for hook, batch in buffered.items():
            info = self.hook_info[hook]
            if batch.x.shape[0] > cfg.buffer_tokens:
                raise UserError(f"snapshot {path} buffers {batch.x.shape[0]} tokens of {hook}: "
                                f"--buffer-tokens must be at least that")
            self.buffers.get_or_create(hook, info.d, batch.x.dtype).restore(batch)
        for tr in trainers.values():
            tr.dp = self.mesh.dp
        self.trainers = trainers
        self.stats.steps, self.stats.tokens = extra.get("step", 0), extra["tokens"]
        self.stats.saved_step = self.stats.steps  # that state is saved: in `path` (`_newest`)
        self._saved_version = self.ledger.version if self.world.size == 1 else 0
        self.stats.run_id = ckpt.run_of(extra) or ""
        for name, tr in trainers.items():
            self.metrics.train_steps.labels(hook=tr.hook, sae=name).inc(tr.step)
            self.metrics.trained_tokens.labels(hook=tr.hook, sae=name).inc(tr.tokens_seen)
        log.info("resumed from %s (run %s): step %d, %d tokens, %d buffered", path,
                 self.stats.run_id, self.stats.steps, self.stats.tokens,
                 sum(b.x.shape[0] for b in buffered.values()))

    def _serve(self, committed: Ledger | None) -> None:
        """/metrics, then the sockets and the threads that serve them."""
        cfg, m, dp = self.cfg, self.metrics, self.world
        here, ranks = (local_rank(), local_world_size()) if dp.size > 1 else (0, 1)
        bind, control = rank_endpoints(cfg.bind, cfg.control_bind, here, ranks)
        control = control or control_endpoint(bind)
        metrics_port = cfg.metrics_port + here if cfg.metrics_port else 0
        serve_metrics(m.served(dp.rank if dp.size > 1 else None), metrics_port, cfg.metrics_addr)
        limits = DecodeLimits(max_raw_nbytes=cfg.max_chunk_bytes)
        max_message = lz4_bound(cfg.max_chunk_bytes) + limits.max_header_nbytes
        budget = cfg.max_connections * ((cfg.hwm + 1) * max_message
                                        + (CONTROL_HWM + 1) * MAX_CONTROL_BYTES)
        m.receive_budget_bytes.set(budget)
        self.ctx = zmq.Context()
        sock = pull_socket(self.ctx, bind, hwm=cfg.hwm, curve=cfg.curve,
                           max_message_bytes=max_message, max_connections=cfg.max_connections)
        m.refused_connections.watch("data", sock.refused)
        self.receiver = Receiver(sock, self.buffers, m, self.ledger, hooks=cfg.hooks,
                                 hook_info=self.hook_info, limits=limits,
                                 log_interval=cfg.reject_log_interval, recorder=self.recorder,
                                 decode_threads=cfg.decode_threads, dealt=dp.size > 1)
        self.control: ControlServer | None = None
        if control != "off":
            # Data parallel: each rank is a consumer run of its own to the producers (its own
            # ledger), and its positions are never in a snapshot (not durable).
            try:
                router = router_socket(self.ctx, control, curve=cfg.curve,
                                       max_connections=cfg.max_connections)
            except UserError as exc:
                if cfg.control_bind is not None:
                    raise
                raise UserError(f"{exc} (the control endpoint, which is --bind's port + 1 unless "
                                "--control-bind says otherwise)") from None
            m.refused_connections.watch("control", router.refused)
            self.control = ControlServer(
                router, self.ledger, m,
                run_id=self.stats.run_id if dp.size == 1 else f"{self.stats.run_id}-r{dp.rank}",
                durable=cfg.checkpoint_dir is not None and dp.size == 1, hooks=cfg.hooks)
            self.control.committed = committed
        for h in cfg.hooks:
            m.declare_hook(h, cfg.buffer_tokens, lambda h=h: self.buffers.fill(h))
        if self.recorder is not None:
            self.recorder.start()
        self.receiver.start()
        if self.control is not None:
            self.control.start()
        log.info(
            "consumer run %s on %s (control %s), hooks %s, SAEs %s, device %s, metrics on "
            "%s:%s; receive memory bound %.0f MiB (%d connections x ((%d queued + 1) x %.1f MiB "
            "of data + (%d + 1) x %.2f MiB of control))",
            self.stats.run_id, bind, control, ",".join(cfg.hooks),
            ",".join(s.name for s in cfg.saes), self.device, cfg.metrics_addr,
            metrics_port or "off", budget / 2**20, cfg.max_connections, cfg.hwm,
            max_message / 2**20, CONTROL_HWM, MAX_CONTROL_BYTES / 2**20,
        )
        if dp.size > 1:
            log.info(
                "data parallel: rank %d of %d (local %d of %d) binds data %s, control %s, "
                "metrics port %s; a global batch of %d tokens per step, this rank's part from "
                "its own buffer; producers --connect every rank's data endpoint (local rank r: "
                "--bind port + r) and may --control-connect every control endpoint (--bind "
                "port + local ranks + 1 + r)", dp.rank, dp.size, here,
                ranks, bind, control, metrics_port or "off", cfg.batch_size)
        if self.mesh.shard_size > 1:
            log.info("%d data-parallel ranks × %d latent shards: ranks %d-%d share their parts of "
                     "each batch (gathered) and each holds 1/%d of every SAE's latents",
                     self.mesh.dp.size, self.mesh.shard_size,
                     dp.rank - self.mesh.shard_rank,
                     dp.rank - self.mesh.shard_rank + self.mesh.shard_size - 1,
                     self.mesh.shard_size)

    # -- the loop's steps ---------------------------------------------------------------------

    def stop_reason(self) -> str:
        for thread in (self.receiver, self.control, self.recorder):
            if thread is not None and thread.error is not None:
                raise RuntimeError(f"the {thread.name} thread failed") from thread.error
        cfg, s = self.cfg, self.stats
        if not s.stop_reason:
            if self._stop_agreed if self.world.size > 1 else self.flags.stop.is_set():
                s.stop_reason = "signal"
            elif cfg.max_steps is not None and s.steps >= cfg.max_steps:
                s.stop_reason = "max-steps"
            elif cfg.max_tokens is not None and cfg.max_tokens - s.tokens < self.world.size:
                s.stop_reason = "max-tokens"  # data parallel: < 1 token per rank is left out
        return s.stop_reason

    def next_batch(self) -> tuple[str, Batch] | None:
        """A batch from whichever hook's buffer is above its low-water mark (waits ≤ 0.2 s).
        The last batch before --max-tokens is cut so the run trains exactly that many."""
        size, low = self.cfg.batch_size, self.cfg.low_water()
        if self.cfg.max_tokens is not None:
            left = self.cfg.max_tokens - self.stats.tokens
            size, low = min(size, left), min(low, left)
        return self.buffers.take_any(size, low, timeout=0.2)

    # -- data parallel: the step boundary as one decision of all ranks ----------------------

    def rank_batch(self) -> tuple[int, int, int]:
        """(global batch, this rank's part, this rank's low-water mark): --batch-size tokens
        a step over all ranks (cut before --max-tokens), split by `rank_slice`."""
        cfg, rank, share = self.cfg, self.world.rank, self.world.size
        size, low = cfg.batch_size, math.ceil(cfg.min_fill * cfg.buffer_tokens)
        if cfg.max_tokens is not None:
            left = cfg.max_tokens - self.stats.tokens
            size, low = min(size, left), min(low, _part(left, rank, share))
        part = _part(size, rank, share)
        return size, part, max(part, low)

    def agree(self) -> str | None:
        """Wait up to WAIT_SECONDS for a batch here, then one all-reduce MAX of [stop,
        snapshot reason, lacks a batch of each hook] over the ranks: stop if any rank was
        signalled, snapshot (written by rank 0) if any asked, and return the hook every rank
        has a batch of (in turn, when several), or None: every rank waits for the slowest."""
        for thread in (self.receiver, self.control):
            if thread is not None and thread.error is not None:
                raise RuntimeError(f"the {thread.name} thread failed") from thread.error
        _, part, low = self.rank_batch()
        hooks = self.cfg.hooks
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            ready = {h for h, b in self.buffers.items() if b.ready(part, low)}
            if ready or time.monotonic() >= deadline or self.flags.stop.is_set():
                break
            time.sleep(0.01)
        now, control = time.monotonic(), self.control
        want = 0
        if self.flags.snapshot.is_set():
            want = 3
        elif self.world.rank == 0 and now - self._failed_at >= RETRY_AFTER_FAILURE_SECONDS \
                and self._periodic_due(now):
            want = 2  # rank 0's clock decides (it writes, and knows its disk's failures)
        elif control is not None and control.flush_requested.is_set() and (
                now - self._last_flush_save >= FLUSH_SNAPSHOT_SECONDS):
            want = 1
        got = self.agreement.max([int(self.flags.stop.is_set()), want,
                                  *(int(h not in ready) for h in hooks)])
        if got[0]:
            self._stop_agreed = True
            return None
        reason = SNAPSHOT_REASONS[got[1]]
        if reason == "signal":
            self.flags.snapshot.clear()
        elif reason == "periodic":
            self._periodic_step, self._last_save = self.stats.steps, now
        elif reason == "flush" and control is not None:
            control.flush_requested.clear()
            self._last_flush_save = now
        if reason:
            self.snapshot(reason)
        common = [h for h, lacking in zip(hooks, got[2:], strict=True) if not lacking]
        if not common and ready:
            time.sleep(0.05)  # ready here, not everywhere: do not spin on the collective
        turn = self.stats.steps % len(hooks)
        return min(common, key=lambda h: (hooks.index(h) - turn) % len(hooks), default=None)

    def take(self, hook: str) -> Batch:
        """This rank's part of the agreed step (there: only this thread takes)."""
        _, part, low = self.rank_batch()
        batch = dict(self.buffers.items())[hook].take(part, low, timeout=0)
        if batch is None:
            raise RuntimeError(f"the buffer of {hook} lost its batch after the agreement")
        return batch

    def log_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.cfg.log_every:
            self._log_progress(now)

    # -- training -----------------------------------------------------------------------------

    def train(self, hook: str, batch: Batch, tokens: int | None = None) -> None:
        """Every SAE of the hook trains on the same batch (data parallel: `batch` is this
        rank's part of a global batch of `tokens`)."""
        x = self.shard_peers.gather_rows(batch.x.to(self.device, non_blocking=True))
        for spec in (s for s in self.cfg.saes if s.hook == hook):
            trainer = self.trainers.get(spec.name) or self._new_trainer(spec)
            labels = {"hook": hook, "sae": spec.name}
            with self.metrics.train_step_seconds.labels(**labels).time():
                m = trainer.train_step(x)
            self._record(labels, m)
        self.stats.steps += 1
        self.stats.tokens += batch.x.shape[0] if tokens is None else tokens
        tags = batch.sources.long()
        counts = torch.bincount(tags[tags >= 0])  # -1: a producer the ledger forgot
        self.ledger.credit_trained(hook, {i: int(c) for i, c in enumerate(counts.tolist()) if c})

    def housekeeping(self) -> None:
        """At the step boundary: snapshots asked for (signal, periodic, producers), logs."""
        cfg, now = self.cfg, time.monotonic()
        control = self.control
        if self.flags.snapshot.is_set():
            self.flags.snapshot.clear()
            self.snapshot("signal")
        elif now - self._failed_at < RETRY_AFTER_FAILURE_SECONDS:
            pass  # a disk just failed: periodic and producer-asked snapshots wait a little
        elif self._periodic_due(now):
            self._periodic_step, self._last_save = self.stats.steps, now  # tried, saved or not
            self.snapshot("periodic")
        elif control is not None and control.flush_requested.is_set() and (
                now - self._last_flush_save >= FLUSH_SNAPSHOT_SECONDS):
            control.flush_requested.clear()
            self._last_flush_save = now
            self.snapshot("flush")
        if now - self._last_log >= cfg.log_every:
            self._log_progress(now)

    def _periodic_due(self, now: float) -> bool:
        """--checkpoint-every steps or --checkpoint-every-seconds have passed since the last
        periodic try (a skipped one counts: an idle consumer does not retry every loop)."""
        cfg, steps = self.cfg, self.stats.steps
        by_steps = bool(cfg.checkpoint_every) and steps % cfg.checkpoint_every == 0 \
            and steps not in (self._periodic_step, self.stats.saved_step)
        by_time = bool(cfg.checkpoint_every_seconds) and \
            now - self._last_save >= cfg.checkpoint_every_seconds
        return by_steps or by_time

    def finish(self) -> None:
        """The final snapshot, tried `final_snapshot_attempts` times (data parallel: by rank
        0, and every rank learns whether it succeeded, then the ranks leave together)."""
        failed = 1
        if self.mesh.shard_size > 1:  # gathered once, written up to the attempts
            failed = int(self._snapshot_shards("final", self.cfg.final_snapshot_attempts)
                         is False)
        else:
            for attempt in range(1, self.cfg.final_snapshot_attempts + 1):
                if self.snapshot("final") is not False:
                    failed = 0
                    break
                if attempt < self.cfg.final_snapshot_attempts:
                    time.sleep(1.0)
        if self.world.size > 1:
            failed = self.agreement.max([failed])[0]
            if failed and self.world.rank != 0:
                raise FinalSnapshotError("rank 0 could not write the final snapshot")
        if failed:
            root = self.cfg.checkpoint_dir
            named = ckpt.latest_name(root) if root is not None else None
            last = self.stats.snapshots[-1] if self.stats.snapshots else (
                root / named if root is not None and named else None)  # a path, not a name
            raise FinalSnapshotError(
                f"the final snapshot failed {self.cfg.final_snapshot_attempts} times; the last "
                f"good snapshot is {last or 'none'}"
            )
        log.info("stopped (%s) after %d steps, %d tokens; %d snapshots written",
                 self.stats.stop_reason, self.stats.steps, self.stats.tokens,
                 len(self.stats.snapshots))
        if self.world.size > 1:
            self.world.finish()  # every rank here: leave the process group together

    def close(self) -> None:
        if hasattr(self, "receiver"):
            self.receiver.stop()
            if self.control is not None:
                self.control.stop()
            self.ctx.destroy(linger=0)
        if getattr(self, "recorder", None) is not None:
            self.recorder.stop()  # after the receiver: what it accepted is written

    # -- helpers --------------------------------------------------------------------------------

    def _new_trainer(self, spec: SAESpec) -> Trainer:
        info = self.receiver.known_hooks()[spec.hook]
        check_fits(self.cfg, str(self.device), info.d)
        log.info("SAE %s on %s: d_in=%d latents=%d k=%d", spec.name, spec.hook, info.d,
                 spec.latents, spec.k)
        trainer = Trainer(spec.sae_config(info.d), spec.trainer, name=spec.name,
                          hook=spec.hook, model=info.model, device=self.device, dp=self.mesh.dp,
                          shard=self._shard_of(spec.latents))
        if spec.name in self.init_sources:
            init_from.start(trainer, self.init_sources[spec.name])
            log.info("SAE %s starts from %s", spec.name, trainer.origin["path"])
        self.trainers[spec.name] = trainer
        return trainer

    def _shard_of(self, n_latents: int) -> LatentShard | None:
        """This rank's latents of an SAE of `n_latents` (None when not sharded): what a
        resumed snapshot is sliced to, whatever shard count wrote it."""
        if n_latents % self.mesh.shard_size:
            raise UserError(f"an SAE of the snapshot has {n_latents} latents: "
                            f"--latent-shards {self.mesh.shard_size} must divide them")
        return self.mesh.shard(n_latents)

    def _record(self, labels: dict[str, str], m: StepMetrics) -> None:
        """Export one step's StepMetrics; normalized MSE over the window of recent steps."""
        mt = self.metrics
        if m.skipped:  # the SAE is as it was: the gauges keep the last real step's figures
            mt.skipped_steps.labels(**labels).inc()
            mt.skipped_tokens.labels(**labels).inc(m.tokens)
            self._rlog.warning(f"skip:{labels['sae']}", "SAE %s: skipped a step of %d tokens, "
                               "its loss not finite (values in the batch whose squares pass "
                               "float32's range); the weights are unchanged", labels["sae"],
                               m.tokens)
            return
        window = self.windows[labels["sae"]]
        window.add(m)
        mt.normalized_mse.labels(**labels).set(window.value())
        mt.dead_latent_fraction.labels(**labels).set(m.dead_fraction)
        mt.l0.labels(**labels).set(m.l0)
        mt.auxk_loss.labels(**labels).set(m.auxk_loss)
        mt.loss.labels(**labels).set(m.loss)
        mt.trained_tokens.labels(**labels).inc(m.tokens)
        mt.train_steps.labels(**labels).inc()

    def snapshot(self, reason: str) -> Path | bool | None:
        """Write a snapshot: its path; None when skipped; False when writing it failed (the
        failure is counted and logged, the previous snapshot stays, training goes on)."""
        result = self._snapshot(reason)
        if result is not None:  # what writing it freed is no step's to reuse
            release_freed_memory()
        return result

    def _snapshot(self, reason: str) -> Path | bool | None:
        cfg, s = self.cfg, self.stats
        if cfg.checkpoint_dir is None:
            log.info("%s snapshot skipped: no --checkpoint-dir", reason)
            return None
        if self.mesh.shard_size > 1:
            return self._snapshot_shards(reason)
        committed: Ledger | None = None
        buffers: dict[str, Batch] | None = None
        if self.world.size == 1:
            (ledger_json, committed), buffers = self.buffers.freeze(self._ledger_cut)
            version = committed.version
        elif self.world.rank == 0:  # the trainers are the same on every rank; no buffers, ledger
            ledger_json, version = {}, 0
        else:
            return None
        if self._newest() and (s.saved_step, self._saved_version) == (s.steps, version):
            log.info("%s snapshot: step %d already saved in %s", reason, s.steps,
                     self._newest())
            self._stood_final(reason)
            return None
        if not self.trainers and not any(b.x.shape[0] for b in (buffers or {}).values()):
            log.info("%s snapshot skipped: nothing trained yet", reason)
            return None
        return self._write(reason, self.trainers, ledger_json, version, committed, buffers)

    def _snapshot_shards(self, reason: str, attempts: int = 1) -> Path | bool | None:
        """Latent shards (a collective: every rank calls it at the same step). Rank 0 decides
        whether to write and how (`_shard_plan`) and every rank learns it. `gather`: the
        ranks of shard group 0 gather each SAE whole on rank 0, which writes it (tries
        `attempts` times, 1 s apart, gathering once). `per-rank`: each try, every rank of
        shard group 0 writes its rows into rank 0's temporary snapshot, and rank 0 finishes
        it or, when any rank failed, removes it."""
        if self.cfg.checkpoint_dir is None:  # the same on every rank
            log.info("%s snapshot skipped: no --checkpoint-dir", reason)
            return None
        plan = self.agreement.broadcast(self._shard_plan(reason) if self.world.rank == 0
                                        else None)
        if plan is None:
            return None
        written: Path | bool | None = None
        if plan == "gather":
            if self.mesh.dp.rank != 0:  # the other shard groups hold the same SAE
                return None
            whole = {name: tr.unsharded() for name, tr in self.trainers.items()}
            for attempt in range(attempts if self.world.rank == 0 else 0):
                if attempt:
                    time.sleep(1.0)
                written = self._write(reason, whole, {}, 0, None, None)  # type: ignore[arg-type]
                if written is not False:
                    break
            return written
        for attempt in range(attempts):
            if attempt:
                time.sleep(1.0)
            written = self._write_per_rank(reason)
            if self.agreement.broadcast(written is not False):
                break
        return written

    def _shard_plan(self, reason: str) -> str | None:
        """Rank 0: None (nothing to write), `gather` or `per-rank` (--snapshot-shards;
        `auto`: per-rank when gathering would not fit half of this device's free memory)."""
        s = self.stats
        if (self._newest() and s.saved_step == s.steps) or not self.trainers:
            log.info("%s snapshot skipped: %s", reason, f"step {s.steps} already saved"
                     if self.trainers else "nothing trained yet")
            if self.trainers:
                self._stood_final(reason)
            return None
        layout, why = choose_layout(self.cfg.snapshot_shards, self.trainers.values(),
                                    self.device)
        if why is not None and not self._said_per_rank:
            self._said_per_rank = True
            log.warning("%s: snapshots are per-rank shard files (saestream --resume reads them "
                        "on any shard count; sparsify cannot)", why)
        return layout

    def _write_per_rank(self, reason: str) -> Path | bool | None:
        """One try of a per-rank snapshot (collective); rank 0 returns the outcome."""
        assert self.cfg.checkpoint_dir is not None
        staged, error, why = stage_per_rank(self.agreement, self.mesh, self.cfg.checkpoint_dir,
                                            self.stats.steps, self.trainers)
        if error is not None and self.world.rank != 0:  # rank 0 logs it with the failure
            log.error("writing this rank's shard of the %s snapshot failed: %s", reason, error)
        if self.world.rank != 0:
            return None
        if why is not None:
            self._failed(reason, error or OSError("another rank could not write its shard file"),
                         why)
            return False
        return self._write(reason, self.trainers, {}, 0, None, None, staged=staged)

    def _write(self, reason: str, trainers: dict[str, Trainer], ledger_json: dict[str, Any],
               version: int, committed: Ledger | None, buffers: dict[str, Batch] | None,
               staged: Path | None = None) -> Path | bool:
        cfg, s = self.cfg, self.stats
        t0 = time.perf_counter()
        if buffers is not None and committed is not None:
            buffers = _renumber_sources(buffers, committed.ordinals())
        try:
            path = ckpt.save_snapshot(cfg.checkpoint_dir, s.steps, trainers,
                                      self._extra(reason, ledger_json), buffers=buffers,
                                      staged=staged)
        except Exception as exc:  # a full or failing disk must not end the training
            self._failed(reason, exc)
            return False
        s.saved_step, self._last_save = s.steps, time.monotonic()
        self._saved_version = version
        s.snapshots.append(path)
        if self.control is not None and committed is not None:
            self.control.committed = committed
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint.set_to_current_time()
        if cfg.keep:
            ckpt.prune_snapshots(cfg.checkpoint_dir, cfg.keep, s.run_id)
        log.info("%s snapshot %s (%.2fs)", reason, path, time.perf_counter() - t0)
        return path

    def _stood_final(self, reason: str) -> None:
        """The final snapshot was not written because the newest one holds this very state:
        that one records why the run stopped. Not writing it down loses nothing but that
        note, so a failure is logged and the run still ends well."""
        if reason != "final" or not self.stats.stop_reason:
            return
        try:
            ckpt.record_stop_reason(self._newest(), self.stats.stop_reason)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            log.warning("could not record the stop reason in %s: %s", self._newest(), exc)

    def _newest(self) -> Path | None:
        """The snapshot holding the state saved last: written by this process, else the one
        it resumed from (until a step or new data changes the state, rewriting it would only
        open a window in which a kill could cost the run its newest snapshot)."""
        return self.stats.snapshots[-1] if self.stats.snapshots else self._resumed_from

    def _failed(self, reason: str, exc: BaseException, why: str | None = None) -> None:
        """A snapshot that could not be written: counted (by `why`, else the reason `exc`
        gives) and logged; training goes on."""
        why = why or ckpt.failure_reason(exc)
        self._failed_at = time.monotonic()
        self.metrics.checkpoint_failures.labels(reason=why).inc()
        self.stats.failed_snapshots += 1
        log.error("%s snapshot at step %d failed (%s: %s); the previous snapshot stays%s",
                  reason, self.stats.steps, why, exc,
                  "" if reason == "final" else ", training goes on")

    def _ledger_cut(self) -> tuple[dict[str, Any], Ledger]:
        """Under the buffers' lock: the ledger as JSON and a copy for the control channel's
        `committed` answers."""
        snap = self.ledger.copy()
        return snap.to_json(), snap

    def _extra(self, reason: str, producers: dict[str, Any]) -> dict[str, Any]:
        s = self.stats
        hooks = self.receiver.known_hooks()
        return {
            "run_id": s.run_id, "reason": reason, "stop_reason": s.stop_reason or None,
            "time": time.time(), "step": s.steps, "tokens": s.tokens,
            "hooks": {h: {"model": i.model, "d_in": i.d, "dtype": i.dtype}
                      for h, i in hooks.items() if h in self.cfg.hooks},
            "saes": {n: {"hook": t.hook, "model": t.model, "step": t.step,
                         "tokens": t.tokens_seen} for n, t in self.trainers.items()},
            "producers": producers,
            **({"data_parallel": {"world_size": self.world.size}} if self.world.size > 1 else {}),
        }

    def _log_progress(self, now: float) -> None:
        steps0, tokens0 = self._at_log
        elapsed = now - self._last_log
        s = self.stats
        fill = " ".join(f"{h}={b.fill()}/{b.capacity}" for h, b in self.buffers.items()) \
            or "empty"
        if s.steps == steps0:
            log.info("waiting for data: buffer %s, training starts at %d tokens", fill,
                     self.cfg.low_water())
        else:
            nmse = " ".join(f"{n}={w.value():.4f}" for n, w in self.windows.items() if len(w))
            log.info("step %d, %d tokens, %.0f tokens/s, %.2f steps/s; nmse %s; buffer %s",
                     s.steps, s.tokens, (s.tokens - tokens0) / elapsed,
                     (s.steps - steps0) / elapsed, nmse, fill)
        self._last_log, self._at_log = now, (s.steps, s.tokens)


def _part(n: int, rank: int, size: int) -> int:
    """Rows of `n` that rank `rank` of `size` takes (`rank_slice`)."""
    part = rank_slice(n, rank, size)
    return part.stop - part.start


def _renumber_sources(buffers: dict[str, Batch], ordinals: dict[int, int]) -> dict[str, Batch]:
    """Buffer tags as the saved ledger will number them (-1 for a forgotten producer)."""
    if not buffers:
        return buffers
    top = max([*ordinals, *(int(b.sources.max()) for b in buffers.values() if b.sources.numel()),
               0]) + 2
    lut = torch.full((top,), -1, dtype=torch.int32)  # last slot: rows already tagged -1
    for index, ordinal in ordinals.items():
        lut[index] = ordinal
    return {h: Batch(b.x, lut[b.sources.long().where(b.sources >= 0, top - 1)])
            for h, b in buffers.items()}


def _say_overridden(spec: SAESpec, tr: Trainer, path: Path) -> None:
    """A resumed SAE keeps the snapshot's hyper-parameters (README: --resume); a `--sae`
    key given with another value is said, not dropped without a word."""
    saved = {**dataclasses.asdict(tr.sae_cfg), **dataclasses.asdict(tr.cfg)}
    asked = {**dataclasses.asdict(spec.sae), **dataclasses.asdict(spec.trainer)}
    for key, (_, field_name) in SAE_KEYS.items():
        if field_name in spec.given and saved.get(field_name) != asked.get(field_name):
            log.warning("--sae %s: %s=%s ignored, the snapshot %s has %s=%s, which stands",
                        spec.name, key, asked.get(field_name), path, key, saved.get(field_name))


def _saved_hooks(path: Path, extra: dict[str, Any], trainers: dict[str, Trainer],
                 buffered: dict[str, Batch]) -> dict[str, HookInfo]:
    """The hooks' widths, dtypes and models a snapshot's extra.json records, checked against
    its SAEs and buffers, with its step and token counts: CheckpointError (a damaged
    snapshot, skipped for an older one) for any that is no count, or a width its SAEs or
    buffers do not have (a shuffle buffer is allocated at that width)."""
    for key in ("step", "tokens"):
        value = extra.get(key, 0 if key == "step" else None)
        if type(value) is not int or value < 0:
            raise ckpt.CheckpointError(f"{path}: extra.json's {key} {value!r:.60} is not a "
                                       "whole number >= 0")
    saved = extra.get("hooks", {})
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{path}: extra.json's hooks is not a map of hook to width")
    widths = {tr.hook: tr.sae_cfg.d_in for tr in trainers.values()}
    widths.update({h: b.x.shape[1] for h, b in buffered.items()})
    top = DecodeLimits().max_d
    out = {}
    for hook, info in saved.items():
        d = info.get("d_in") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        model = info.get("model") if isinstance(info, dict) else None
        if type(d) is not int or not 1 <= d <= top:
            raise ckpt.CheckpointError(f"{path}: extra.json's hooks[{hook!r:.60}] has no width "
                                       f"(d_in of 1..{top})")
        if hook in widths and widths[hook] != d:
            raise ckpt.CheckpointError(f"{path}: extra.json's hooks[{hook!r:.60}] says d_in "
                                       f"{d}, its SAEs and buffer have {widths[hook]}")
        if (dtype is not None and dtype not in DTYPES) or \
                (model is not None and not isinstance(model, str)):
            raise ckpt.CheckpointError(f"{path}: extra.json's hooks[{hook!r:.60}] has a dtype "
                                       "or model that is no name")
        out[hook] = HookInfo(d, dtype, model)
    unknown = sorted(h for h in buffered if h not in out)
    if unknown:
        raise ckpt.CheckpointError(f"{path}: extra.json's hooks gives no width for the "
                                   f"buffered hook(s) {', '.join(unknown)}")
    return out


def _saved_ledger(path: Path, extra: dict[str, Any], cfg: ConsumerConfig) -> Ledger:
    """The ledger a snapshot's extra.json records; CheckpointError (a damaged snapshot) for
    one no ledger wrote."""
    try:
        return Ledger.from_json(extra.get("producers", {}), cfg.max_producers,
                                cfg.producer_expiry_seconds)
    except ValueError as exc:
        raise ckpt.CheckpointError(f"{path}: extra.json's producers: {exc}") from None


def _check_finite(trainers: dict[str, Trainer], path: Path) -> None:
    """A snapshot whose weights, their EMA or Adam's moments hold an inf or NaN (a damaged
    file that still parses) would have every step skipped, or its first step poison the
    weights: it is no snapshot to resume."""
    for name, tr in trainers.items():
        state = [(f"Adam's {k} of {key}", v)
                 for key, p in tr.sae.named_parameters()
                 for k, v in tr.optimizer.state.get(p, {}).items() if torch.is_tensor(v)]
        ema = [(f"EMA of parameter {i}", t) for i, t in enumerate(tr.ema or [])]
        for what, t in [*tr.sae.named_parameters(), *ema, *state]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ckpt.CheckpointError(f"{path}: SAE {name}'s {what} holds inf or NaN")
