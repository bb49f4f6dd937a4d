"""What the evaluator daemon is configured with: `EvaluatorConfig`, one field per flag of
`saestream evaluator` (defaults and help texts come from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saestream.common.settings import ranged

DEFAULT_METRICS_PORT = 9103
MAX_BATCH = 2**31 - 1
"""The most contexts one forward may take: beyond int32 no tensor op accepts the count."""


@dataclass
class EvaluatorConfig:
    checkpoint_dir: Path
    """Checkpoint directory to watch (a consumer's or `saestream train`'s --checkpoint-dir);
    its `latest` snapshot is evaluated whenever it changes."""
    model: str | None = None
    """Model to run [default: the `model` in the first snapshot's cfg.json]."""
    hook: str | None = None
    """Module whose output the SAEs read [default: each SAE's `hook` in cfg.json]."""
    corpus: str = "wiki-sample"
    """text:PATH_OR_GLOB, tokens:PATH, wiki-sample or synthetic[:N] (as the producer's)."""
    split: str = "eval"
    """Part of the corpus to score (eval: the held-out tenth)."""
    seq_len: int = 128
    """Tokens per context (2-D .npy corpora bring their own)."""
    contexts: int = 32
    """Contexts evaluated for every snapshot: the same ones each time, chosen at start-up."""
    batch_size: int = ranged(8, 1, MAX_BATCH)
    """Contexts per forward pass."""
    device: str = "auto"
    """auto (CUDA if present), cpu, cuda or cuda:N."""
    poll_seconds: float = 5.0
    """Seconds between looks at the checkpoint directory's `latest`."""
    history: Path | None = None
    """Append one JSON line per evaluated snapshot to this file."""
    features: Path | None = None
    """Rebuild the feature browser in this directory for every evaluated snapshot, from the
    same contexts (`saestream features`' layout: DIR/index.html always opens the newest)."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """Port of the Prometheus /metrics endpoint (0 = off)."""
    metrics_addr: str = "127.0.0.1"
    """Address /metrics listens on (0.0.0.0 for a scraper on another host)."""
