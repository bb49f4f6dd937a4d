"""Stop and snapshot signals on real daemons: SIGHUP stops as gracefully as SIGTERM, SIGUSR1
during start-up does not kill, and a stop signal during interpreter teardown does not turn a
clean exit into death by signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LoggedProcess, saestream_cmd
from test_consumer import HOOK, Consumer, child_env

TEARDOWN_SCRIPT = """
import os, signal, time
from saestream.common.signals import SignalFlags

class SignalAtTeardown:
    # Module globals are cleared after Python has put its own handlers back to the default.
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.3)

flags = SignalFlags().install()
keep = SignalAtTeardown()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_during_teardown_leaves_the_exit_status_alone(sig: str) -> None:
    """torch's teardown takes up to a second after a daemon has saved everything; a second
    SIGTERM then (systemd, an impatient operator) made the exit status 143 (-15 here)."""
    done = subprocess.run([sys.executable, "-c", TEARDOWN_SCRIPT.format(sig=sig)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _caught(pid: int) -> int:
    """The process's caught-signal mask (/proc/PID/status SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def _producer(tmp_path: Path, c: Consumer, *extra: str) -> LoggedProcess:
    return LoggedProcess(saestream_cmd(
        "producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
        "--connect", c.endpoint, "--producer-id", "p", "--chunk-tokens", "256",
        "--batch-size", "2", "--seq-len", "64", "--threads", "1", "--seed", "0", *extra,
    ), tmp_path / "producer.log", child_env())


def test_sighup_stops_a_consumer_with_a_final_snapshot_and_a_producer_with_its_state(
        tmp_path: Path) -> None:
    """SIGHUP's default action killed both daemons with nothing saved (a dropped ssh
    session: a consumer lost ~2,700 steps in a probe)."""
    c = Consumer(tmp_path)
    state = tmp_path / "p.state.json"
    p = _producer(tmp_path, c, "--state-file", str(state))
    try:
        c.wait_for("a few steps", lambda: c.steps() >= 5)
        p.proc.send_signal(signal.SIGHUP)
        assert p.proc.wait(60) == 0, p.log()
        assert json.loads(state.read_text())  # the producer saved where it got to
        c.signal(signal.SIGHUP)
        assert c.wait_exit() == 0, c.log()
        assert "final snapshot" in c.log()
        assert (c.ckpt / "latest").is_file()
    finally:
        p.close()
        c.close()


def test_sigusr1_while_the_consumer_starts_does_not_kill_it(tmp_path: Path) -> None:
    """SIGUSR1's default action ends a process: before the consumer caught it, a snapshot
    request during start-up (torch importing, ranks joining) killed the daemon; `saestream`
    now catches it before it imports the command's module."""
    c = Consumer(tmp_path)
    p = None
    try:
        pid = c.proc.pid
        deadline = time.monotonic() + 60
        while c.proc.poll() is None and time.monotonic() < deadline:
            mask = _caught(pid)
            if mask & _bit(signal.SIGUSR1) and not mask & _bit(signal.SIGTERM):
                break  # SIGUSR1 is caught; the stop signals are not installed yet
            time.sleep(0.002)
        else:
            raise AssertionError(f"SIGUSR1 was never caught before the stop signals:\n{c.log()}")
        # caught before torch loads (a second or more of start-up it killed the daemon in)
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
        c.signal(signal.SIGUSR1)
        p = _producer(tmp_path, c)
        c.wait_for("training after the early SIGUSR1", lambda: c.steps() >= 3)
        c.signal(signal.SIGTERM)
        assert c.wait_exit() == 0, c.log()
    finally:
        if p is not None:
            p.close()
        c.close()


STORM_SCRIPT = """
import os, signal, subprocess, sys
from saestream.common.signals import SignalFlags

flags = SignalFlags().install()
# Another process sends them, as an operator's would: not held back by this one's GIL.
storm = subprocess.Popen([sys.executable, "-c", "import os, signal, sys\\n"
                          "pid = int(sys.argv[1])\\n"
                          "for _ in range(100000):\\n"
                          "    if os.getppid() != pid: sys.exit(1)  # never a reused pid\\n"
                          "    os.kill(pid, signal.SIGUSR1)\\n"
                          "os.kill(pid, signal.SIGTERM)", str(os.getpid())])
handled = 0
while not flags.stop.is_set():  # the main thread waits on, reads and clears the flags
    if flags.snapshot.wait(0.001):
        flags.snapshot.clear()
        handled += 1
assert storm.wait(60) == 0 and handled > 0
print("handled", handled)
"""


def test_a_storm_of_signals_neither_hangs_nor_overflows_the_stack() -> None:
    """Signal handlers run on the main thread between bytecodes, also inside a lock the
    main thread holds (Event.wait's, another handler's Event.set's): with an Event set by
    the handler, a burst of SIGUSR1 hung the process for good or ended in RecursionError."""
    done = subprocess.run([sys.executable, "-c", STORM_SCRIPT], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "handled" in done.stdout


def test_a_consumer_trains_through_a_sigusr1_storm_and_stops_cleanly(tmp_path: Path) -> None:
    import os
    import threading

    from test_consumer import Sender

    c = Consumer(tmp_path, "--keep", "2")
    s = Sender(c.endpoint)
    try:
        s.in_background(2000)
        c.wait_for("training", lambda: c.steps() >= 1)
        stop = threading.Event()

        def storm() -> None:
            while not stop.is_set():
                os.kill(c.proc.pid, signal.SIGUSR1)
                time.sleep(0.002)

        t = threading.Thread(target=storm, daemon=True)
        t.start()
        time.sleep(4)
        stop.set()
        t.join()
        steps = c.steps()
        c.wait_for("training after the storm", lambda: c.steps() > steps + 2)
        c.signal(signal.SIGTERM)
        assert c.wait_exit(60) == 0
        log = c.log()
        assert "RecursionError" not in log and "recursion" not in log
        assert "signal snapshot" in log
        assert len(list(c.ckpt.glob("step-*"))) <= 2
    finally:
        s.close()
        c.close()
