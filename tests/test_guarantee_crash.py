"""Exactly-once training across kill -9 (issue 9, item 6): real processes on 127.0.0.1.

Three producers (`--model tiny --corpus synthetic`, shards 0/3..2/3, each with its own
`--max-tokens`) stream into one consumer (`--resume`, periodic snapshots, `--max-tokens` =
the sum of the budgets, so it stops by itself with a final snapshot once everything is
trained). During the run the consumer is killed with SIGKILL three times — once while a
snapshot is being written — and each producer once; each is restarted at once with the same
arguments (the consumer on the same ports and checkpoint directory, each producer with its
state file). The final snapshot's ledger must then account for every producer's stream
exactly once.

Position arithmetic (producer/daemon.py, producer/chunker.py): without --keep-first-token a
context of --seq-len L yields L-1 rows, context c of the shard at positions
c*(L-1) .. (c+1)*(L-1) of epoch 0; --max-tokens M sends the first M rows of that stream.
The synthetic corpus has no out-of-vocabulary ids (no skipped, void contexts) and every
shard holds far more than M rows, so the positions trained must be exactly [0, M) of epoch 0.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import free_tcp_port, saestream_cmd
from safetensors.torch import load_file

from saestream.tools.status import by_name, fetch_samples, value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

HOOK = "model.layers.1"
SEQ_LEN = 64
PER_CTX = SEQ_LEN - 1
SAE_NAME = "crash"
# A wide SAE makes the consumer the bottleneck (a few thousand tokens/s on one CPU thread),
# so the kills land while plenty is left to do, and its snapshots (~25 MB) take long
# enough to be caught half-written.
SAE = f"name={SAE_NAME},latents=16384,k=16,k_aux=64"
# Not multiples of --chunk-tokens or of a context: the last chunk and context are partial.
BUDGETS = {"crash-p0": 40_009, "crash-p1": 37_811, "crash-p2": 35_333}
TOTAL = sum(BUDGETS.values())
GATE_TIMEOUT = 150.0
CHECKPOINT_SECONDS = "1"


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Daemon:
    """One daemon's incarnations: each `start()` is a fresh process with its own log file."""

    def __init__(self, workdir: Path, name: str, argv: list[str]) -> None:
        self.workdir, self.name, self.argv = workdir, name, argv
        self.proc: subprocess.Popen | None = None
        self.incarnation = -1
        self.logs: list[Path] = []

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.incarnation += 1
        path = self.workdir / f"{self.name}-{self.incarnation}.log"
        self.logs.append(path)
        with open(path, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=child_env())

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, \
            f"{self.name} is not running:\n{self.log_text()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        assert self.proc.returncode == -signal.SIGKILL

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, last: int = 1) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in self.logs[-last:])

    def close(self) -> None:
        if self.running():
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(10)  # type: ignore[union-attr]


class Run:
    """The consumer and the producers of one test, and the gates between the kills."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ckpt = workdir / "ckpt"
        port = free_tcp_port()  # its next port, for the control socket, is free too
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.metrics_port = free_tcp_port()
        self.consumer = Daemon(workdir, "consumer", saestream_cmd(
            "consumer", "--bind", self.endpoint, "--metrics-port", str(self.metrics_port),
            "--checkpoint-dir", str(self.ckpt), "--resume", "--hook", HOOK, "--sae", SAE,
            "--buffer-tokens", "4096", "--batch-size", "256", "--min-fill", "0.5",
            "--checkpoint-every-seconds", CHECKPOINT_SECONDS, "--keep", "3",
            "--max-tokens", str(TOTAL), "--log-every", "2",
        ))
        self.producers = {
            pid: Daemon(workdir, pid, saestream_cmd(
                "producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
                "--shard", f"{i}/{len(BUDGETS)}", "--producer-id", pid,
                "--state-file", str(workdir / f"{pid}.state.json"),
                "--max-tokens", str(budget), "--chunk-tokens", "256", "--seq-len", str(SEQ_LEN),
                "--batch-size", "4", "--threads", "1", "--seed", "0",
                "--connect", self.endpoint,
            ))
            for i, (pid, budget) in enumerate(BUDGETS.items())
        }
        self.events: list[str] = []
        self.t0 = time.monotonic()
        self.baseline: int | None = None
        """Tokens trained when the running consumer incarnation resumed (None: not yet read)."""

    def all(self) -> list[Daemon]:
        return [self.consumer, *self.producers.values()]

    def trained(self) -> int:
        try:
            samples = by_name(fetch_samples(f"127.0.0.1:{self.metrics_port}", timeout=2))
        except (OSError, ValueError):
            return -1
        v = value(samples, "saestream_trained_tokens_total", hook=HOOK, sae=SAE_NAME)
        return -1 if v is None else int(v)

    def check_alive(self, what: str) -> None:
        """The consumer runs (it may not finish before the kills are over); a producer may
        only have finished (exit 0) once it was killed and restarted."""
        for d in self.all():
            if d.running():  # polls first: returncode is only known once the exit is reaped
                continue
            finished = d is not self.consumer and d.incarnation >= 1 and d.proc.returncode == 0
            if not finished:
                raise AssertionError(
                    f"{d.name} exited ({d.proc.returncode}) while waiting for {what}; "  # type: ignore[union-attr]
                    f"events {self.events}\n{d.log_text()}\n{self.consumer.log_text()}")

    def wait_for(self, what: str, pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + GATE_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive(what)
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; events {self.events}\n"
                             f"{self.consumer.log_text()}")

    def wait_trained(self, fraction: float, more: float = 0.0) -> None:
        """Until the consumer has trained `fraction` of all budgets, and `more` of them
        since its latest (re)start resumed."""
        if self.baseline is None:
            self.wait_for("the consumer's metrics", lambda: self.trained() >= 0)
            self.baseline = self.trained()
        base = self.baseline
        self.wait_for(f"{fraction:.0%} of {TOTAL} tokens trained ({more:.0%} since {base})",
                      lambda: self.trained() >= max(fraction * TOTAL, base + more * TOTAL))

    def note(self, event: str, trained: int) -> None:
        self.events.append(f"{time.monotonic() - self.t0:.0f}s: {event} at {trained} trained")

    def kill_consumer(self, why: str) -> None:
        at = self.trained()
        self.consumer.kill9()
        self.note(f"consumer kill -9 ({why})", at)
        self.consumer.start()
        self.baseline = None

    def kill_consumer_during_snapshot(self) -> tuple[bool, list[str]]:
        """SIGUSR1, then kill -9 the moment a snapshot's temporary directory shows up (polled
        every ~1 ms; periodic snapshots count too). Returns whether one was seen, and the
        temporary directories the dead consumer left."""
        proc = self.consumer.proc
        assert proc is not None
        at = self.trained()
        seen = False
        for _ in range(30):
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 2.0
            while not seen and time.monotonic() < deadline:
                with os.scandir(self.ckpt) as entries:
                    seen = any(e.name.startswith(".tmp-step-") for e in entries)
                if not seen:
                    time.sleep(0.001)
            if seen:
                break
            self.check_alive("a snapshot being written")
        self.consumer.kill9()
        left = sorted(p.name for p in self.ckpt.iterdir() if p.name.startswith(".tmp-"))
        self.note(f"consumer kill -9 during a snapshot (seen {seen}, left {left})", at)
        self.consumer.start()
        self.baseline = None
        return seen, left

    def kill_producer(self, pid: str) -> None:
        d = self.producers[pid]
        at = self.trained()
        d.kill9()
        self.note(f"{pid} kill -9", at)
        d.start()

    def close(self) -> None:
        for d in self.all():
            d.close()


def expected_ranges(budget: int) -> list[list[int]]:
    """The positions of the first `budget` rows of a shard's stream, merged into ranges:
    context c contributes PER_CTX rows at c*PER_CTX ..."""
    ranges: list[list[int]] = []
    left, ctx = budget, 0
    while left:
        rows = min(PER_CTX, left)
        lo = ctx * PER_CTX
        if ranges and ranges[-1][1] == lo:
            ranges[-1][1] = lo + rows
        else:
            ranges.append([lo, lo + rows])
        left -= rows
        ctx += 1
    return ranges


def assert_disjoint_sorted(ranges: list[list[int]], what: str) -> None:
    for a, b in ranges:
        assert a < b, f"{what}: empty or reversed range {[a, b]}"
    for (_, b0), (a1, _) in itertools.pairwise(ranges):
        assert b0 <= a1, f"{what}: ranges overlap or are unsorted: {ranges}"


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path)
    yield r
    r.close()


def test_every_token_trained_exactly_once_across_kill_9_of_consumer_and_producers(run) -> None:
    run.consumer.start()
    for d in run.producers.values():
        d.start()
    p0, p1, p2 = run.producers

    # kills spread over the run, each once the consumer (restarted or not) trains again
    run.wait_trained(0.06, more=0.02)
    run.kill_consumer("early")
    run.wait_trained(0.13, more=0.03)
    run.kill_producer(p0)
    run.wait_trained(0.20)
    run.kill_producer(p1)
    run.wait_trained(0.27)
    run.kill_producer(p2)
    run.wait_trained(0.34, more=0.04)
    seen, left = run.kill_consumer_during_snapshot()
    assert seen, f"no snapshot was caught being written; events {run.events}"
    # every restarted producer is up (its control thread asks) before the last kill, so
    # none can miss the end of the run
    run.wait_for("the restarted producers to be up", lambda: all(
        f"producer {pid} run " in d.logs[-1].read_text() for pid, d in run.producers.items()))
    run.wait_trained(0.5, more=0.06)
    run.kill_consumer("late")
    killed_at = time.monotonic() - run.t0

    # the consumer stops by itself (--max-tokens), producers once their rows are committed
    deadline = time.monotonic() + GATE_TIMEOUT
    for d in run.all():
        try:
            rc = d.proc.wait(max(1.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            state = {p: _state(run, p) for p in BUDGETS}
            raise AssertionError(
                f"{d.name} did not finish; events {run.events}; states {state}\n"
                f"{d.log_text()}\n{run.consumer.log_text()}") from None
        assert rc == 0, f"{d.name} exited {rc}; events {run.events}\n{d.log_text()}"
    elapsed = time.monotonic() - run.t0
    print(f"events: {run.events}; kills done at {killed_at:.0f}s, all finished at {elapsed:.0f}s")

    # the restarted consumer removed what the one killed mid-snapshot left
    if left:
        after = run.consumer.logs[2].read_text()  # the incarnation after that kill
        assert "left by an interrupted snapshot" in after, after
    assert not [p.name for p in run.ckpt.iterdir() if p.name.startswith(".tmp-")]
    for d in run.producers.values():  # each restart continued from its state file
        assert d.incarnation == 1
        assert "resuming from" in d.logs[1].read_text(), d.log_text()
    assert run.consumer.incarnation == 3

    # the final snapshot
    latest = (run.ckpt / "latest").read_text().strip()
    snap = run.ckpt / latest
    extra = json.loads((snap / "extra.json").read_text())
    assert extra["stop_reason"] == "max-tokens", extra
    if extra["reason"] != "final":  # a flush snapshot had saved this very state: it stands
        assert (f"final snapshot: step {extra['step']} already saved"
                in run.consumer.logs[-1].read_text()), extra["reason"]
    assert extra["tokens"] == TOTAL
    assert extra["saes"][SAE_NAME]["tokens"] == TOTAL
    for rel in (extra.get("buffers") or {}).values():
        assert load_file(str(snap / rel))["rows"].shape[0] == 0, "rows left untrained"

    ledger = extra["producers"]
    assert set(ledger) == set(BUDGETS), sorted(ledger)
    duplicates = {}
    for pid, budget in BUDGETS.items():
        p = ledger[pid]
        assert p["stream"]["shard"] == f"{list(BUDGETS).index(pid)}/{len(BUDGETS)}"
        assert p["trained_tokens"] == budget, (pid, p["trained_tokens"], budget)
        assert p["received_tokens"] == budget, (pid, p["received_tokens"], budget)
        hl = p["hooks"][HOOK]
        assert hl["trained_tokens"] == budget, (pid, hl)
        assert hl["received_tokens"] == budget, (pid, hl)
        assert hl["void"] == {}, (pid, hl["void"])
        assert set(hl["data"]) == {"0"}, (pid, hl["data"])
        ranges = hl["data"]["0"]
        assert_disjoint_sorted(ranges, pid)
        assert sum(b - a for a, b in ranges) == budget, (pid, ranges)
        assert ranges == expected_ranges(budget), (pid, ranges, expected_ranges(budget))
        duplicates[pid] = hl["duplicate_tokens"]
        state = _state(run, pid)
        assert state["budget"]["done"] is True, (pid, state)
        assert state["budget"]["end"] == [0, budget], (pid, state)
    assert sum(p["trained_tokens"] for p in ledger.values()) == extra["tokens"]
    print(f"duplicates trimmed per producer: {duplicates}")


def _state(run: Run, pid: str) -> dict:
    try:
        return json.loads((run.workdir / f"{pid}.state.json").read_text())
    except (OSError, ValueError):
        return {}

