"""The evaluator daemon: follow a checkpoint directory's `latest`, evaluate each new snapshot
on one fixed set of held-out contexts, and export the figures as Prometheus gauges.

The contexts are chosen once (when the model is loaded), so successive snapshots are scored
on the same tokens and their figures differ only by the SAE. When evaluating falls behind
the snapshots, the ones in between are skipped: the newest is always the one evaluated.
A snapshot that cannot be read (removed by the consumer's --keep while read, incomplete,
for another model) is a counted failure and is not retried; the daemon carries on.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saestream.common.files import NotRegularFile
from saestream.consumer.checkpoint import (
    SNAPSHOT_RE,
    CheckpointError,
    IncompleteSnapshot,
    LoadedSAE,
    check_complete,
    latest_name,
    load_sae,
    sae_dirs,
)
from saestream.evaluator.config import EvaluatorConfig
from saestream.evaluator.data import eval_ids, load_eval_model
from saestream.evaluator.engine import EvalError, evaluate
from saestream.evaluator.metrics import EvaluatorMetrics
from saestream.evaluator.report import finite
from saestream.producer.corpus import CorpusError
from saestream.producer.hooks import HookError, validate_hooks
from saestream.producer.models import LoadedModel, ModelError

log = logging.getLogger("saestream.evaluator")

GROUPS = ("downstream", "reconstruction")
"""What the daemon computes for every snapshot (the cheap groups that matter live)."""


class Stopped(Exception):
    """A stop signal arrived during an evaluation: abandon it."""


class SnapshotFailure(Exception):
    """One snapshot could not be evaluated; `reason` labels saestream_eval_failures_total."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Session:
    """The model and the contexts every snapshot is evaluated on, fixed for the daemon's life."""

    model_name: str
    lm: LoadedModel
    ids: torch.Tensor
    texts: list[str] | None = None
    """Every token id's text, for the feature browser (read once, at its first build)."""


def open_session(cfg: EvaluatorConfig, model_name: str, hooks: Sequence[str],
                 device: torch.device) -> Session:
    """Load the model and pick the contexts. Raises ModelError, HookError or CorpusError."""
    lm = load_eval_model(model_name, str(device), list(hooks), seq_len=cfg.seq_len,
                         hook_given=cfg.hook is not None)
    ids = eval_ids(lm, cfg.corpus, split=cfg.split, seq_len=cfg.seq_len,
                   contexts=cfg.contexts, tokens=None)
    log.info("model %s loaded; evaluating %d contexts of %d tokens (%s split of %s)",
             model_name, ids.shape[0], ids.shape[1], cfg.split, cfg.corpus)
    return Session(model_name, lm, ids)


def run_evaluator(cfg: EvaluatorConfig, stop: threading.Event,
                  metrics: EvaluatorMetrics | None = None,
                  session: Session | None = None) -> None:
    """Watch `cfg.checkpoint_dir` until `stop` is set, publishing on `metrics` (served by the
    caller). :param session: the model and contexts when already opened (the CLI opens them
    at start-up when --model is given)."""
    metrics = metrics if metrics is not None else EvaluatorMetrics()
    device = session.lm.device if session is not None else _device(cfg)
    watcher = Publisher(metrics)
    seen: str | None = None
    log.info("watching %s/latest every %.1fs", cfg.checkpoint_dir, cfg.poll_seconds)
    said: str | None = None
    while not stop.is_set():
        try:
            name = latest_name(cfg.checkpoint_dir)
        except CheckpointError as exc:  # `latest` a FIFO or directory: say so once, keep watching
            if str(exc) != said:
                said = str(exc)
                log.warning("%s; waiting for a readable one", exc)
            name = None
        if name is not None and name != seen:
            seen = name
            t0 = time.perf_counter()
            try:
                session, record, loaded = evaluate_snapshot(cfg, cfg.checkpoint_dir / name,
                                                            session, device, stop)
            except Stopped:
                break
            except SnapshotFailure as exc:
                metrics.failures.labels(exc.reason).inc()
                log.warning("snapshot %s not evaluated (%s): %s", name, exc.reason, exc)
            else:
                record["seconds"] = round(time.perf_counter() - t0, 3)
                metrics.seconds.observe(record["seconds"])
                watcher.publish(record)
                _log_record(record)
                if cfg.features is not None:
                    try:
                        if not refresh_features(cfg, session, loaded, record, stop):
                            metrics.failures.labels("features").inc()
                    except Stopped:
                        break
                if cfg.history is not None and not append_history(cfg.history, record):
                    metrics.failures.labels("history").inc()
        stop.wait(cfg.poll_seconds)
    log.info("stopped")


def _device(cfg: EvaluatorConfig) -> torch.device:
    from saestream.common.devices import resolve_device

    return resolve_device(cfg.device)


def evaluate_snapshot(
    cfg: EvaluatorConfig, path: Path, session: Session | None, device: torch.device,
    stop: threading.Event,
) -> tuple[Session, dict[str, Any], list[tuple[LoadedSAE, str]]]:
    """Evaluate every SAE of snapshot `path`. Returns the session (opened on first use), the
    history record and the SAEs read, with their hooks. Raises SnapshotFailure, or Stopped
    when `stop` is set meanwhile."""
    extra, loaded = read_snapshot(path, device)
    hooks = [cfg.hook or str(s.cfg.get("hook")) for s in loaded]
    names = {str(s.cfg.get("model") or "") for s in loaded}
    model_name = cfg.model or (names.pop() if len(names) == 1 else "")
    if not model_name:
        raise SnapshotFailure("mismatch", "its SAEs name no single model (pass --model)")
    other = sorted(n for n in names if n and n != model_name)
    if cfg.model is not None and other:
        raise SnapshotFailure("mismatch", f"its SAEs read model {other[0]}, not --model "
                              f"{cfg.model}")
    try:
        if session is None:
            session = open_session(cfg, model_name, hooks, device)
        elif model_name != session.model_name:
            raise SnapshotFailure("mismatch", f"its SAEs read model {model_name}, not "
                                  f"{session.model_name}")
        validate_hooks(session.lm.model, hooks)
    except (ModelError, HookError, CorpusError) as exc:
        raise SnapshotFailure("mismatch", str(exc)) from None

    def check_stop(done: int, total: int) -> None:
        if stop.is_set():
            raise Stopped

    try:
        results = evaluate(session.lm.model, session.ids, list(zip(loaded, hooks, strict=True)),
                           GROUPS, batch_size=cfg.batch_size, progress=check_stop)
    except (EvalError, HookError) as exc:
        raise SnapshotFailure("mismatch", str(exc)) from None
    except (Stopped, KeyboardInterrupt):
        raise
    except Exception as exc:  # a daemon outlives one bad evaluation
        log.exception("evaluating %s failed", path)
        raise SnapshotFailure("error", f"{type(exc).__name__}: {exc}") from None
    for name, got in results.items():  # NaN gauges would replace the last good figures
        bad = [f"{group}.{key}" for group, key in (("reconstruction", "normalized_mse"),
                                                   ("downstream", "delta_ce"))
               if isinstance(v := got.get(group, {}).get(key), float) and not math.isfinite(v)]
        if bad:
            raise SnapshotFailure("unreadable", f"SAE {name} gives non-finite {', '.join(bad)} "
                                  "(weights or input_scale at the edge of float32?)")
    match = SNAPSHOT_RE.match(path.name)
    stamp = extra.get("time")
    record = {
        "time": time.time(),
        "snapshot": str(path),
        "step": int(match.group(1)) if match else None,
        "snapshot_time": _stamp(stamp) if _stamp(stamp) is not None else _mtime(path),
        "model": session.model_name,
        "corpus": cfg.corpus,
        "split": cfg.split,
        "contexts": int(session.ids.shape[0]),
        "tokens": int(session.ids.shape[0] * (session.ids.shape[1] - 1)),
        "saes": {s.name: {"hook": h, **results[s.name]}
                 for s, h in zip(loaded, hooks, strict=True)},
    }
    return session, record, list(zip(loaded, hooks, strict=True))


def refresh_features(cfg: EvaluatorConfig, session: Session, saes: list[tuple[LoadedSAE, str]],
                     record: dict[str, Any], stop: threading.Event) -> bool:
    """Add a build of the feature browser for the snapshot just evaluated, from the same
    contexts, its figures in the header. Sets `features` in the record (the entry page), or
    returns False, logged, when it could not be written. Raises Stopped when `stop` is set
    meanwhile."""
    from saestream.evaluator.browser import build_browser
    from saestream.evaluator.features import FeatureError
    from saestream.evaluator.features_cli import token_texts_of

    def check_stop(done: int, total: int) -> None:
        if stop.is_set():
            raise Stopped

    if session.texts is None:
        session.texts = token_texts_of(session.lm)
    path = Path(record["snapshot"])
    about = {"model": session.model_name, "corpus": cfg.corpus, "split": cfg.split,
             "snapshot": str(path), "step": record["step"]}
    evaluated = {name: {**r, "tokens": record["tokens"]} for name, r in record["saes"].items()}
    try:
        built = build_browser(cfg.features, session.lm, session.ids, saes, label=path.name,
                              texts=session.texts, about=about, evaluated=evaluated,
                              batch_size=cfg.batch_size, progress=check_stop)
    except (Stopped, KeyboardInterrupt):
        raise
    except (FeatureError, OSError) as exc:
        log.warning("feature browser of %s not written: %s", path.name, exc)
        return False
    except Exception:  # a daemon outlives one bad build
        log.exception("feature browser of %s not written", path.name)
        return False
    record["features"] = str(built.entry)
    log.info("feature browser of %s: %s (%d files, %.1f MB)", path.name, built.entry,
             built.files, built.bytes / 1e6)
    return True


def read_snapshot(path: Path, device: torch.device) -> tuple[dict[str, Any], list[LoadedSAE]]:
    """The snapshot's extra.json and its SAEs' weights, read into memory (so a removal after
    this point no longer matters). Raises SnapshotFailure: `missing` when the snapshot is
    gone or no longer `latest` (pruned by --keep while read), `incomplete`, `unreadable`."""
    try:
        extra = check_complete(path)
        loaded = [load_sae(d, device) for d in sae_dirs(path)]
    except (CheckpointError, OSError) as exc:
        if not path.is_dir() or latest_name(path.parent) != path.name:
            raise SnapshotFailure("missing", "removed while it was read") from None
        reason = "incomplete" if isinstance(exc, IncompleteSnapshot) else "unreadable"
        raise SnapshotFailure(reason, str(exc)) from None
    return extra, loaded


def _stamp(value: Any) -> float | None:
    """extra.json's `time` as a finite float (a hostile one may be an int too large for a
    float, NaN or a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        stamp = float(value)
    except OverflowError:
        return None
    return stamp if math.isfinite(stamp) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


GAUGES = {
    "delta_ce": ("downstream", "delta_ce"),
    "loss_recovered": ("downstream", "loss_recovered"),
    "kl": ("downstream", "kl"),
    "ce_clean": ("downstream", "ce_clean"),
    "normalized_mse": ("reconstruction", "normalized_mse"),
    "explained_variance": ("reconstruction", "explained_variance"),
    "l0": ("reconstruction", "l0"),
    "dead_fraction": ("reconstruction", "dead_fraction"),
}
"""EvaluatorMetrics attribute -> (group, field) of `saestream eval`'s results."""


class Publisher:
    """Sets the per-SAE gauges from a record, and removes the series of SAEs the newest
    snapshot no longer holds (so the dashboard never mixes two snapshots' SAEs)."""

    def __init__(self, metrics: EvaluatorMetrics) -> None:
        self.metrics = metrics
        self.labels: set[tuple[str, str]] = set()

    def publish(self, record: dict[str, Any]) -> None:
        m = self.metrics
        now: set[tuple[str, str]] = set()
        for sae, result in record["saes"].items():
            labels = (result["hook"], sae)
            now.add(labels)
            for attr, (group, key) in GAUGES.items():
                value = result.get(group, {}).get(key)
                getattr(m, attr).labels(*labels).set(float("nan") if value is None else value)
            m.snapshot_step.labels(*labels).set(record["step"] or 0)
            m.snapshot_timestamp.labels(*labels).set(record["snapshot_time"] or 0)
        for labels in self.labels - now:
            for gauge in m.per_sae():
                gauge.remove(*labels)
        self.labels = now


def append_history(path: Path, record: dict[str, Any]) -> bool:
    """Append `record` as one JSON line (one write, so lines never interleave); False, logged,
    when the file cannot be written (the daemon carries on). Opened without blocking and
    only as a regular file (a FIFO put there would hold the daemon, SIGTERM unheard); a
    short write (a full disk) is cut off again, so the file holds whole lines only."""
    line = (json.dumps(finite(record), separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFile(path, st.st_mode)
            size = st.st_size
            written = os.write(fd, line)
            if written < len(line):
                os.ftruncate(fd, size)
                raise OSError(errno.ENOSPC, f"wrote {written} of the line's {len(line)} "
                              "bytes (disk full?); cut back to whole lines")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("--history %s: cannot append (%s)", path, exc.strerror or exc)
        return False
    return True


def _log_record(record: dict[str, Any]) -> None:
    for sae, r in record["saes"].items():
        d, rec = r.get("downstream", {}), r.get("reconstruction", {})
        log.info("step %s %s: delta_ce %.4f, loss recovered %.4f, kl %.4f, normalized MSE "
                 "%.4f, L0 %.1f (%.1fs)", record["step"], sae, d.get("delta_ce", float("nan")),
                 d.get("loss_recovered", float("nan")), d.get("kl", float("nan")),
                 rec.get("normalized_mse", float("nan")), rec.get("l0", float("nan")),
                 record.get("seconds", 0.0))
