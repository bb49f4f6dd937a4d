"""Fixtures shared by the whole suite. Area-specific helpers live in their own test modules."""

from __future__ import annotations

import functools
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import zmq

# Tests run many small processes on 2 cores: keep each one from grabbing every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _malloc_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run inside the test process (click's CliRunner) leave its malloc alone: the
    setting of consumer/heap.py is per process, and every later test would inherit it. Real
    processes started by tests apply it as the daemons do (tests/test_heap.py)."""
    from saestream.consumer import heap

    monkeypatch.setattr(heap, "_applied", [False])


_handed_out: set[int] = set()
_port_rng = random.Random(os.getpid() ^ time.monotonic_ns())


@functools.cache
def _port_range() -> range:
    """Where this test process picks ports: below the kernel's ephemeral range (which every
    outgoing connection on the machine draws from, so a port found free there can be taken
    by some connect() before the test's daemon binds it), one disjoint slice per xdist
    worker (so two workers never hand out the same port)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 12000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    width = (low - 10000) // max(workers, 1)
    return range(10000 + index * width, 10000 + (index + 1) * width)


def free_ports(n: int) -> int:
    """The first of `n` consecutive TCP ports on 127.0.0.1, each free a moment ago and none
    handed out before in this session (daemons bind neighbours of the ports they are given:
    a consumer's control socket on its data port + 1, a rank's on its data port + ranks + 1).
    Picked at random in `_port_range`; the kernel's own picks come from elsewhere. Should
    that slice run out (a machine whose ephemeral range starts low), the kernel's picks."""
    span = _port_range()
    for attempt in range(1_000_000):
        if attempt < 20_000:
            base = _port_rng.randrange(span.start, span.stop - n)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
            if base + n > 65536:
                continue
        ports = set(range(base, base + n))
        if ports & _handed_out:
            continue
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.update(ports)
        return base
    raise RuntimeError(f"no {n} consecutive free TCP ports on 127.0.0.1")


def leave_rank_process() -> None:
    """End a spawned gloo rank whose work is done with exit code 0, without the
    interpreter's teardown: after gloo collectives it aborts now and then under load
    (SIGABRT, "terminate called without an active exception"), failing a test that passed.
    The product's ranks end the same way (`saestream.tools.cli`). A rank that put results
    on a multiprocessing queue must join the queue's feeder thread first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, whose next port is free too (a
    consumer binds its control socket on its data port + 1): `free_ports(2)`."""
    return free_ports(2)


def send_unless_stopped(
    sock: zmq.Socket, frames: list, stop: threading.Event, *, copy: bool = True
) -> bool:
    """Send one multipart message on a PUSH socket, waiting while it is full, until `stop` is
    set (then False). Never blocks inside ZeroMQ: a blocking send after a poll said writable
    waits forever when the consumer exits in between (its IMMEDIATE connection, and the
    only pipe, gone), and a thread stuck there cannot be joined, nor its context ended."""
    while not stop.is_set():
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            sock.poll(100, zmq.POLLOUT)
    return False


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple:
    """The embedded model and tokenizer loaded from its GGUF, once per session: dequantising
    takes 15-25 s on 2 cores, and two modules need it."""
    import torch

    from saestream.producer.models import load_smollm2_gguf

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return load_smollm2_gguf()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: tuple) -> Path:
    """A cache directory holding the embedded model's float copy, built from `smollm2_gguf`.
    Shared: a test that damages a cache works on its own copy of this one."""
    from saestream.producer.models import build_smollm2_cache

    cache = tmp_path_factory.mktemp("models")
    build_smollm2_cache(cache, loaded=smollm2_gguf)
    return cache


@pytest.fixture(params=["C", "numpy"])
def regrouping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both lz4-shuffle byte regrouping paths: the C kernels (common/wire_kernels.c) and
    the numpy code that runs without them (no compiler, SAESTREAM_NATIVE=0)."""
    from saestream.common import wire

    if request.param == "numpy":
        monkeypatch.setenv("SAESTREAM_NATIVE", "0")
        assert wire._KERNELS.load() is None
    else:
        assert wire._KERNELS.load() is not None, "the wire kernels did not build (is cc installed?)"
    return request.param


@pytest.fixture
def free_port() -> int:
    return free_tcp_port()


def saestream_cmd(*args: str) -> list[str]:
    """argv that runs the `saestream` CLI with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "saestream", *args]


def run_cli(args: Sequence[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `saestream ARGS` to completion as a real process, capturing text output."""
    return subprocess.run(
        saestream_cmd(*args), capture_output=True, text=True, timeout=timeout, **kw
    )


class LoggedProcess:
    """A real process whose output goes to a log file, killed at `close` if still running."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
