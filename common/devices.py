"""Device names: the one place `--device auto|cpu|cuda|cuda:N` is understood."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from saestream.common.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (CUDA if present), cpu, cuda or cuda:N."
THREADS_ENV = "SAESTREAM_THREADS"
MAX_THREADS = 1024
"""Most torch threads $SAESTREAM_THREADS may ask for: torch takes any number and then hangs
creating them (100000 did), so a larger one is a typo, not a setting."""


def resolve_device(spec: str) -> torch.device:
    """`auto` = the first CUDA device when there is one, else the CPU. UserError for a name
    that is not a device here (unknown, or CUDA on a machine without it)."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r}: not a device (use {DEVICE_HELP})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {spec!r}: not a device (use {DEVICE_HELP})")
    return device


def set_threads(threads: int = 0) -> None:
    """torch's CPU threads: `threads`, else $SAESTREAM_THREADS, else torch's default (all
    cores), so several processes on one machine can share its cores."""
    import torch

    n = threads or env_threads()
    if n > 0:
        torch.set_num_threads(n)


def env_threads() -> int:
    """$SAESTREAM_THREADS: 0 when unset or empty (torch's default); UserError unless it is a
    whole number from 0 to `MAX_THREADS`, rather than a traceback from int() or a silent
    negative (ignored) or huge (a hang) count."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_THREADS:
        raise UserError(f"{THREADS_ENV}={raw[:40]!r}: not a number of threads (use 1 to "
                        f"{MAX_THREADS}, or 0 or unset for torch's default)")
    return n


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def codec_threads(requested: int = 0) -> int:
    """Threads for a daemon's encode or decode pool: `requested`, or for 0 half the CPUs
    this process may use, between 1 and 4. Half, because on a CPU-only producer the model
    (and on a consumer the training step) needs the rest; 4 because lz4 + crc32 run at
    ~0.5 GB/s a thread, and four outpace what one GPU harvests (~1 GB/s) or a 10 GbE link
    carries."""
    return requested if requested > 0 else max(1, min(4, available_cpus() // 2))
