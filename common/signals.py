"""Signals as flags the main loop polls at safe points (a step or chunk boundary).

Handlers only set flags: no I/O, no locks, so a signal can never interrupt a checkpoint
half-written or a message half-sent.
"""

from __future__ import annotations

import signal
import threading


class SignalFlags:
    """`stop` is set by SIGTERM/SIGINT, `snapshot` by SIGUSR1 (cleared by whoever handles it)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.snapshot = threading.Event()

    def install(self) -> SignalFlags:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: self.snapshot.set())
        return self
