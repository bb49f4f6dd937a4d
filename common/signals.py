"""Signals as flags the main loop polls at safe points (a step or chunk boundary).

Handlers only set flags: no I/O, no locks (not even an Event's: `SignalFlag`), so a signal
can never interrupt a checkpoint half-written or a message half-sent, nor hang the process.
"""

from __future__ import annotations

import atexit
import signal
import threading
import time

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
"""Each asks for a graceful stop (final snapshot, saved state). SIGHUP is here because its
default action kills the process with nothing saved: a closed terminal or an ssh session
that drops must not cost a daemon its training state."""


POLL_SECONDS = 0.05
"""How often `SignalFlag.wait` looks at its flag: the latency of a stop, at most."""


class SignalFlag(threading.Event):
    """A `threading.Event` that a signal handler can set: setting, clearing and reading it
    assign or read one bool, and `wait` polls it (every POLL_SECONDS), so no lock is ever
    taken. `Event.set` takes the event's lock, which is not reentrant; Python runs a
    handler on the main thread between two bytecodes, also while that thread holds the
    lock — inside `Event.wait`, or inside another handler's `set` when signals come fast —
    and the process hung for good (a burst of SIGUSR1 froze training and made SIGTERM do
    nothing; a longer one ended in RecursionError)."""

    def __init__(self) -> None:
        super().__init__()
        self._is = False

    def is_set(self) -> bool:
        return self._is

    def set(self) -> None:
        self._is = True

    def clear(self) -> None:
        self._is = False

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._is:
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_SECONDS, left))
        return True


_early_snapshot = SignalFlag()
"""SIGUSR1 caught by `catch_snapshot_early`, until a command's SignalFlags takes it over."""


def catch_snapshot_early() -> None:
    """Catch SIGUSR1 from the process's first moments: `saestream` calls this before it
    imports a daemon's module, which loads torch (a second or more), so a snapshot asked for
    meanwhile is served at the first step rather than killing the process (its default)."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: _early_snapshot.set())


class SignalFlags:
    """`stop` is set by SIGTERM/SIGINT/SIGHUP, `snapshot` by SIGUSR1 (cleared by whoever
    handles it)."""

    def __init__(self) -> None:
        self.stop = SignalFlag()
        self.snapshot = SignalFlag()

    def install_snapshot(self) -> SignalFlags:
        """SIGUSR1 only, as early as a command can: its default action kills the process,
        and an operator asking for a snapshot while the daemon starts must not end it. A
        request `catch_snapshot_early` held is taken over."""
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: self.snapshot.set())
        if _early_snapshot.is_set():
            _early_snapshot.clear()
            self.snapshot.set()
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
