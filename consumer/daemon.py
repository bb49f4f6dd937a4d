"""The consumer daemon: receive → shuffle buffer → train every SAE on each batch → checkpoint.

`run_consumer` is the main loop, readable top to bottom. Two threads: the receiver (socket →
buffer, `consumer/receiver.py`) and this loop (buffer → trainers). Signals only set flags,
handled here at step boundaries: SIGUSR1 writes a snapshot and training continues;
SIGTERM/SIGINT write a final snapshot and return.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from saestream.common.errors import UserError
from saestream.common.metrics import serve_metrics
from saestream.common.signals import SignalFlags
from saestream.common.transport import CurveServerKeys, pull_socket
from saestream.common.wire import REJECT_REASONS
from saestream.consumer.buffer import Batch, BufferSet
from saestream.consumer.metrics import ConsumerMetrics
from saestream.consumer.receiver import (
    CONSUMER_REJECT_REASONS,
    HookInfo,
    ProducerProgress,
    Receiver,
)

log = logging.getLogger("saestream.consumer")

DEFAULT_BIND = "tcp://127.0.0.1:5557"
DEFAULT_METRICS_PORT = 9101


@dataclass
class SAESpec:
    """One SAE the consumer trains; `--sae key=value,...` maps onto these fields."""

    name: str
    """Snapshot folder and `sae` label; defaults to the hook (suffixed when a spec serves
    several hooks)."""
    hook: str
    """Hook whose activations this SAE reads."""
    latents: int = 16384
    """Number of latents (dictionary size)."""
    k: int = 32
    """Latents kept per token by TopK."""
    multi_topk: bool = False
    """Add the Multi-TopK term L(4k)/8."""
    input_normalization: str = "layer_norm"
    """none | layer_norm | scalar (recorded in the checkpoint, never inferred)."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(latents / 2**14)."""
    k_aux: int = 512
    """Dead latents used by the AuxK loss."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired in this many trained tokens."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (None = off)."""
    seed: int = 0
    """Seed of the SAE's initialisation."""

    def sae_config(self, d_in: int) -> Any:
        from saestream.consumer.sae import SAEConfig

        return SAEConfig(
            d_in=d_in, n_latents=self.latents, k=self.k, multi_topk=self.multi_topk,
            input_normalization=self.input_normalization,
        )

    def trainer_config(self) -> Any:
        from saestream.consumer.trainer import TrainerConfig

        return TrainerConfig(
            lr=self.lr, k_aux=self.k_aux, auxk_coef=self.auxk_coef, dead_tokens=self.dead_tokens,
            grad_clip=self.grad_clip, seed=self.seed,
        )


@dataclass
class ConsumerConfig:
    """Everything `saestream consumer` is configured with; one field per CLI flag."""

    hooks: list[str]
    """Hooks to accept (`--hook`)."""
    saes: list[SAESpec]
    """SAEs to train (`--sae`), each on one of `hooks`."""
    bind: str = DEFAULT_BIND
    """ZeroMQ endpoint the PULL socket binds (producers connect to it)."""
    d_in: int | None = None
    """Width of every hook; None = learned from the hook's first valid message."""
    buffer_tokens: int = 1 << 18
    """Shuffle buffer capacity per hook (tokens)."""
    batch_size: int = 4096
    """Tokens per training batch."""
    min_fill: float = 0.5
    """Training waits while a buffer holds fewer than min_fill × buffer_tokens tokens."""
    checkpoint_dir: Path | None = None
    """Where snapshots go; None = no snapshots."""
    checkpoint_every: int | None = None
    """Periodic snapshot every this many steps (None = off)."""
    checkpoint_every_seconds: float | None = None
    """Periodic snapshot every this many seconds of training (None = off)."""
    keep: int = 3
    """Snapshots to keep (newest); 0 = all."""
    resume: bool = False
    """Continue from the newest readable snapshot in checkpoint_dir, if any."""
    max_tokens: int | None = None
    """Stop (with a final snapshot) after training on this many tokens."""
    max_steps: int | None = None
    """Stop (with a final snapshot) after this many steps."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """Port of /metrics (0 = off)."""
    metrics_addr: str = "127.0.0.1"
    """Address /metrics listens on."""
    metrics_window: int = 100
    """Steps over which saestream_normalized_mse is computed."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    hwm: int = 16
    """Receive high-water mark (messages queued per producer before it blocks)."""
    curve: CurveServerKeys | None = None
    """CURVE server keys; None = plaintext."""
    log_every: float = 30.0
    """Seconds between progress log lines."""
    reject_log_interval: float = 10.0
    """Seconds between log lines for one reject reason."""
    seed: int = 0
    """Seed of the buffer's batch sampling."""


@dataclass
class RunStats:
    """What a finished run did (returned to the CLI and tests)."""

    steps: int = 0
    tokens: int = 0
    snapshots: list[Path] = field(default_factory=list)
    saved_step: int = -1
    stop_reason: str = ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_consumer(
    cfg: ConsumerConfig, flags: SignalFlags, *, metrics: ConsumerMetrics | None = None
) -> RunStats:
    """Receive and train until stopped (signal, --max-tokens, --max-steps); final snapshot."""
    device = resolve_device(cfg.device)
    metrics = metrics or ConsumerMetrics()
    metrics.declare_rejects((*REJECT_REASONS, *CONSUMER_REJECT_REASONS))
    low_water = max(cfg.batch_size, math.ceil(cfg.min_fill * cfg.buffer_tokens))
    stats = RunStats()

    # Training state: fresh, or exactly where the newest readable snapshot left off.
    trainers: dict[str, Any] = {}
    hook_info: dict[str, HookInfo] = {}
    progress: dict[str, ProducerProgress] = {}
    if cfg.d_in is not None:
        hook_info = {h: HookInfo(cfg.d_in, None, None) for h in cfg.hooks}
    if cfg.resume and cfg.checkpoint_dir is not None:
        trainers, hook_info, progress, stats.steps, stats.tokens = _restore(cfg, hook_info, device)
        for name, tr in trainers.items():
            metrics.train_steps.labels(hook=tr.hook, sae=name).inc(tr.step)
            metrics.trained_tokens.labels(hook=tr.hook, sae=name).inc(tr.tokens_seen)
    windows = {spec.name: deque(maxlen=cfg.metrics_window) for spec in cfg.saes}
    for h in cfg.hooks:
        metrics.declare_hook(h, cfg.buffer_tokens)

    # /metrics, then receiving: a PULL socket and its thread.
    try:
        serve_metrics(metrics.registry, cfg.metrics_port, cfg.metrics_addr)
    except OSError as exc:
        raise UserError(
            f"cannot serve /metrics on {cfg.metrics_addr}:{cfg.metrics_port}: {exc}"
        ) from exc
    ctx = zmq.Context()
    sock = pull_socket(ctx, cfg.bind, hwm=cfg.hwm, curve=cfg.curve)
    buffers = BufferSet(cfg.buffer_tokens, pin_memory=device.type == "cuda", seed=cfg.seed)
    receiver = Receiver(
        sock, buffers, metrics, hooks=cfg.hooks, hook_info=hook_info, progress=progress,
        log_interval=cfg.reject_log_interval,
    )
    receiver.start()
    log.info(
        "consumer on %s, hooks %s, SAEs %s, device %s, metrics on %s:%s",
        cfg.bind, ",".join(cfg.hooks), ",".join(s.name for s in cfg.saes), device,
        cfg.metrics_addr, cfg.metrics_port or "off",
    )

    def snapshot(reason: str) -> None:
        path = _save(cfg, stats, trainers, receiver, reason)
        if path is not None:
            stats.snapshots.append(path)
            metrics.checkpoints.inc()
            metrics.last_checkpoint.set(time.time())

    last_save, last_log = time.monotonic(), time.monotonic()
    steps_at_log, tokens_at_log = stats.steps, stats.tokens
    try:
        while not flags.stop.is_set():
            stats.stop_reason = _limit_reached(cfg, stats)  # e.g. resumed at --max-steps
            if stats.stop_reason:
                break
            # 1. A batch from whichever hook's buffer is above its low-water mark.
            got = buffers.take_any(cfg.batch_size, low_water, timeout=0.2)
            for h, buf in buffers.items():
                metrics.buffer_tokens.labels(hook=h).set(buf.fill())
            if receiver.error is not None:
                raise RuntimeError("receiver thread failed") from receiver.error
            if got is None:
                if flags.snapshot.is_set():  # idle: no step in progress, snapshot now
                    flags.snapshot.clear()
                    snapshot("signal")
                if time.monotonic() - last_log >= cfg.log_every:
                    fill = " ".join(f"{h}={b.fill()}" for h, b in buffers.items()) or "empty"
                    log.info("waiting for data: buffer %s, training starts at %d tokens",
                             fill, low_water)
                    last_log, steps_at_log, tokens_at_log = (
                        time.monotonic(), stats.steps, stats.tokens)
                continue
            hook, batch = got

            # 2. Every SAE of that hook trains on the same batch.
            x = batch.x.to(device, non_blocking=True)
            for spec in (s for s in cfg.saes if s.hook == hook):
                trainer = trainers.get(spec.name)
                if trainer is None:
                    trainer = trainers[spec.name] = _new_trainer(spec, receiver, device)
                t0 = time.perf_counter()
                m = trainer.train_step(x)
                dt = time.perf_counter() - t0
                _record(metrics, windows[spec.name], hook, spec.name, m, dt)
            stats.steps += 1
            stats.tokens += batch.x.shape[0]
            receiver.add_trained(_count_sources(batch))

            # 3. Stop conditions, signals and periodic snapshots, at the step boundary.
            stats.stop_reason = _limit_reached(cfg, stats)
            if stats.stop_reason:
                break
            if flags.snapshot.is_set():
                flags.snapshot.clear()
                snapshot("signal")
                last_save = time.monotonic()
            elif _periodic_due(cfg, stats.steps, last_save):
                snapshot("periodic")
                last_save = time.monotonic()
            if time.monotonic() - last_log >= cfg.log_every:
                elapsed = time.monotonic() - last_log
                _log_progress(stats, steps_at_log, tokens_at_log, elapsed, windows, buffers)
                last_log, steps_at_log, tokens_at_log = time.monotonic(), stats.steps, stats.tokens
        else:
            stats.stop_reason = "signal"
        snapshot("final")
    finally:
        receiver.stop()
        ctx.destroy(linger=0)
    log.info(
        "stopped (%s) after %d steps, %d tokens; %d snapshots written",
        stats.stop_reason, stats.steps, stats.tokens, len(stats.snapshots),
    )
    return stats


# -- helpers of the main loop, in the order it uses them -------------------------------------


def _restore(
    cfg: ConsumerConfig, hook_info: dict[str, HookInfo], device: torch.device
) -> tuple[dict[str, Any], dict[str, HookInfo], dict[str, ProducerProgress], int, int]:
    """Trainers, hook widths, producer progress, steps and tokens from the newest snapshot."""
    from saestream.consumer.checkpoint import load_latest

    assert cfg.checkpoint_dir is not None
    found = load_latest(cfg.checkpoint_dir, device)
    if found is None:
        log.info("--resume: no readable snapshot in %s, starting fresh", cfg.checkpoint_dir)
        return {}, hook_info, {}, 0, 0
    path, trainers, extra = found
    want = {s.name for s in cfg.saes}
    if set(trainers) != want:
        raise UserError(
            f"snapshot {path} holds SAEs {sorted(trainers)}, but --sae configures {sorted(want)}"
        )
    hook_info = dict(hook_info)
    for name, tr in trainers.items():
        spec = next(s for s in cfg.saes if s.name == name)
        if tr.hook != spec.hook:
            raise UserError(f"SAE {name} in {path} reads hook {tr.hook}, --sae says {spec.hook}")
        saved = extra.get("hooks", {}).get(tr.hook, {})
        hook_info[tr.hook] = HookInfo(
            tr.sae_cfg.d_in, saved.get("dtype"), saved.get("model", tr.model)
        )
    progress = {}
    for i, (name, p) in enumerate(extra.get("producers", {}).items()):
        progress[name] = ProducerProgress(
            index=i, run=p.get("run"), last_seq=p.get("last_seq"),
            received_messages=p.get("received_messages", 0),
            received_tokens=p.get("received_tokens", 0),
            trained_tokens=p.get("trained_tokens", 0), source=p.get("source", {}),
        )
    steps, tokens = int(extra.get("step", 0)), int(extra.get("tokens", 0))
    log.info("resumed from %s: step %d, %d tokens", path, steps, tokens)
    return trainers, hook_info, progress, steps, tokens


def _new_trainer(spec: SAESpec, receiver: Receiver, device: torch.device) -> Any:
    from saestream.consumer.trainer import Trainer

    info = receiver.known_hooks()[spec.hook]
    cfg = spec.sae_config(info.d)
    log.info("SAE %s on %s: d_in=%d latents=%d k=%d", spec.name, spec.hook, info.d, spec.latents,
             spec.k)
    return Trainer(cfg, spec.trainer_config(), name=spec.name, hook=spec.hook, model=info.model,
                   device=device)


def _record(
    metrics: ConsumerMetrics, window: deque, hook: str, sae: str, m: Any, seconds: float
) -> None:
    """Export one step's StepMetrics; normalized MSE over the window of recent steps."""
    window.append((m.sse, m.sst))
    sst = sum(s for _, s in window)
    labels = {"hook": hook, "sae": sae}
    metrics.normalized_mse.labels(**labels).set(
        sum(e for e, _ in window) / sst if sst > 0 else float("nan")
    )
    metrics.dead_latent_fraction.labels(**labels).set(m.dead_fraction)
    metrics.l0.labels(**labels).set(m.l0)
    metrics.auxk_loss.labels(**labels).set(m.auxk_loss)
    metrics.loss.labels(**labels).set(m.loss)
    metrics.trained_tokens.labels(**labels).inc(m.tokens)
    metrics.train_steps.labels(**labels).inc()
    metrics.train_step_seconds.labels(**labels).observe(seconds)


def _limit_reached(cfg: ConsumerConfig, stats: RunStats) -> str:
    if cfg.max_steps is not None and stats.steps >= cfg.max_steps:
        return "max-steps"
    if cfg.max_tokens is not None and stats.tokens >= cfg.max_tokens:
        return "max-tokens"
    return ""


def _count_sources(batch: Batch) -> dict[int, int]:
    counts = torch.bincount(batch.sources.long())
    return {i: int(c) for i, c in enumerate(counts.tolist()) if c}


def _periodic_due(cfg: ConsumerConfig, steps: int, last_save: float) -> bool:
    if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0:
        return True
    return bool(
        cfg.checkpoint_every_seconds
        and time.monotonic() - last_save >= cfg.checkpoint_every_seconds
    )


def _save(
    cfg: ConsumerConfig, stats: RunStats, trainers: dict[str, Any], receiver: Receiver,
    reason: str,
) -> Path | None:
    """A snapshot of every trainer with provenance; pruned to the newest `keep`."""
    if cfg.checkpoint_dir is None:
        log.info("%s snapshot skipped: no --checkpoint-dir", reason)
        return None
    if not trainers:
        log.info("%s snapshot skipped: nothing trained yet", reason)
        return None
    if stats.snapshots and stats.saved_step == stats.steps:
        log.info("%s snapshot: step %d already saved in %s", reason, stats.steps,
                 stats.snapshots[-1])
        return None
    from saestream.consumer.checkpoint import prune_snapshots, save_snapshot

    hooks = receiver.known_hooks()
    extra = {
        "reason": reason,
        "stop_reason": stats.stop_reason or None,
        "time": time.time(),
        "step": stats.steps,
        "tokens": stats.tokens,
        "hooks": {
            h: {"model": i.model, "d_in": i.d, "dtype": i.dtype}
            for h, i in hooks.items() if h in cfg.hooks
        },
        "saes": {n: {"hook": t.hook, "model": t.model, "step": t.step,
                     "tokens": t.tokens_seen} for n, t in trainers.items()},
        "producers": receiver.snapshot_progress(),
    }
    t0 = time.perf_counter()
    path = save_snapshot(cfg.checkpoint_dir, stats.steps, trainers, extra)
    stats.saved_step = stats.steps
    if cfg.keep:
        prune_snapshots(cfg.checkpoint_dir, cfg.keep)
    log.info("%s snapshot %s (%.2fs)", reason, path, time.perf_counter() - t0)
    return path


def _log_progress(
    stats: RunStats, steps0: int, tokens0: int, elapsed: float,
    windows: dict[str, deque], buffers: BufferSet,
) -> None:
    nmse = " ".join(
        f"{name}={sum(e for e, _ in w) / max(sum(s for _, s in w), 1e-30):.4f}"
        for name, w in windows.items() if w
    )
    fill = " ".join(f"{h}={b.fill()}/{b.capacity}" for h, b in buffers.items())
    log.info(
        "step %d, %d tokens, %.0f tokens/s, %.2f steps/s; nmse %s; buffer %s",
        stats.steps, stats.tokens, (stats.tokens - tokens0) / elapsed,
        (stats.steps - steps0) / elapsed, nmse, fill,
    )
