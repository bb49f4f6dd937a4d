"""Signals as flags the main loop polls at safe points (a step or chunk boundary).

Handlers only set flags: no I/O, no locks, so a signal can never interrupt a checkpoint
half-written or a message half-sent.
"""

from __future__ import annotations

import atexit
import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
"""Each asks for a graceful stop (final snapshot, saved state). SIGHUP is here because its
default action kills the process with nothing saved: a closed terminal or an ssh session
that drops must not cost a daemon its training state."""


class SignalFlags:
    """`stop` is set by SIGTERM/SIGINT/SIGHUP, `snapshot` by SIGUSR1 (cleared by whoever
    handles it)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.snapshot = threading.Event()

    def install_snapshot(self) -> SignalFlags:
        """SIGUSR1 only, as early as a command can: its default action kills the process,
        and an operator asking for a snapshot while the daemon starts must not end it."""
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: self.snapshot.set())
        return self

    def install(self) -> SignalFlags:
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda *_: self.stop.set())
        atexit.register(_ignore_at_teardown)
        return self.install_snapshot()


def _ignore_at_teardown() -> None:
    """After the work is done, a repeated stop signal must not turn a clean exit into death
    by signal (exit 143). Python puts its own handlers back to the default once atexit has
    run, before it tears the modules down (torch's teardown alone can take a second); an
    ignored signal stays ignored."""
    for name in (*STOP_SIGNALS, "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
