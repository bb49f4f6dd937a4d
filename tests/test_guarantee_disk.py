"""Disk faults never lose training state (issue 9, item 3), on real tmpfs mounts.

A checkpoint directory that is read-only or full is refused at start-up (one line, exit 2,
before any socket is bound). A snapshot that fails mid-run (SIGUSR1 on a full or read-only
disk) is counted by reason, leaves no temporary directory, keeps the previous snapshot, and
training goes on; once the disk is repaired the next snapshot succeeds. A final snapshot
(SIGTERM) on a failing disk is retried `--final-snapshot-attempts` times, then the consumer
exits 1 naming the last good snapshot.

Root ignores file permissions, so the faults are real mounts: `mount -t tmpfs` (skipped
where mounting is not permitted), filled with a file or remounted read-only.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import LoggedProcess, free_tcp_port, run_cli, saestream_cmd
from test_consumer import HOOK, Consumer, Sender, child_env, latest, snapshot_dirs
from test_recording import Sink
from test_recording import producer as recording_producer

from saestream.common.recording import Recording
from saestream.consumer.checkpoint import TEMP_PREFIXES, check_complete
from saestream.tools.status import by_name, fetch_samples, value

REASON = {"full": "no_space", "read_only": "read_only"}
STRERROR = {"full": "No space left on device", "read_only": "Read-only file system"}


# -- mounts ------------------------------------------------------------------------------------


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def tmpfs_at(path: Path, size: str = "16m") -> Iterator[Path]:
    """A fresh tmpfs mounted on `path` (created) for the block; skips the test where
    mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        why = res.stderr.strip() if res.returncode != 0 else None
    except OSError as exc:  # no mount(8)
        why = str(exc)
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {why}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(size)` mounts a fresh tmpfs under tmp_path; every one is unmounted at the end.
    Request it before the fixture that starts processes, so they are stopped first."""
    with ExitStack() as stack:
        count = itertools.count()

        def mount(size: str = "16m") -> Path:
            return stack.enter_context(tmpfs_at(tmp_path / f"mnt{next(count)}", size))

        yield mount


def fill(mnt: Path) -> None:
    """Write one file until the filesystem has no block left."""
    block = b"\0" * (1 << 20)
    fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            try:
                if os.write(fd, block) == 0:
                    break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == 0


def remount(mnt: Path, mode: str) -> None:
    """`ro` or `rw`; a remount to ro is refused (EBUSY) while a file is open for writing, so
    retry for a while."""
    deadline = time.monotonic() + 30
    while True:
        res = _mount("-o", f"remount,{mode}", str(mnt))
        if res.returncode == 0:
            return
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.2)


def break_disk(mnt: Path, fault: str) -> None:
    fill(mnt) if fault == "full" else remount(mnt, "ro")


def repair_disk(mnt: Path, fault: str) -> None:
    if fault == "full":
        (mnt / "fill").unlink()
    else:
        remount(mnt, "rw")


def leftovers(ckpt: Path) -> list[str]:
    """What interrupted or failed writes would leave (`.tmp-*`, `.old-*`, `.latest.tmp`)."""
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith(TEMP_PREFIXES))


# -- processes ---------------------------------------------------------------------------------


class Procs:
    """Consumers and the senders feeding them; all stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.consumers: list[Consumer] = []
        self.senders: list[Sender] = []

    def consumer(self, *args: str, ckpt: Path) -> Consumer:
        c = Consumer(self.tmp_path, *args, ckpt=ckpt)
        self.consumers.append(c)
        return c

    def feed(self, c: Consumer, chunks: int, **kw) -> None:
        s = Sender(c.endpoint)
        self.senders.append(s)
        s.in_background(chunks, **kw)

    def close(self) -> None:
        for s in self.senders:
            s.close()
        for c in self.consumers:
            c.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def last_line(c: Consumer) -> str:
    return c.log().strip().splitlines()[-1]


# -- start-up ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["read_only", "read_only_not_yet_created", "full"])
def test_start_up_refuses_a_read_only_or_full_checkpoint_dir(tmpfs, case: str) -> None:
    mnt = tmpfs("1m")
    ckpt = mnt / "ckpt"
    if case != "read_only_not_yet_created":
        ckpt.mkdir()
    fault = "full" if case == "full" else "read_only"
    break_disk(mnt, fault)
    port, metrics_port = free_tcp_port(), free_tcp_port()
    with socket.create_server(("127.0.0.1", metrics_port)):  # taken: had the consumer got as
        # far as serving /metrics, it would have failed on this port instead
        res = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port",
                       str(metrics_port), "--hook", "h", "--checkpoint-dir", str(ckpt)],
                      timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"saestream: error: --checkpoint-dir {ckpt}: not writable ({STRERROR[fault]})"
    ]


# -- mid-run -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_snapshots_failing_mid_run_are_counted_and_training_goes_on(
    tmpfs, procs: Procs, fault: str
) -> None:
    mnt = tmpfs()
    c = procs.consumer("--final-snapshot-attempts", "2", ckpt=mnt / "ckpt")
    procs.feed(c, 1_000_000)
    c.wait_for("5 steps", lambda: c.steps() >= 5)
    c.signal(signal.SIGUSR1)
    c.wait_for("a first snapshot", lambda: c.value("saestream_checkpoints_total") == 1)
    good = latest(c.ckpt)

    # The disk fails: SIGUSR1's snapshot is counted, nothing is left of it, training goes on.
    break_disk(mnt, fault)
    for tries in (1, 2):
        c.signal(signal.SIGUSR1)
        c.wait_for(f"failure {tries} counted", lambda n=tries: c.value(
            "saestream_checkpoint_failures_total", reason=REASON[fault]) == n)
    steps = c.steps()
    c.wait_for("training after the failures", lambda: c.steps() >= steps + 10)
    assert c.value("saestream_checkpoints_total") == 1
    assert latest(c.ckpt) == good and snapshot_dirs(c.ckpt) == [good.name]
    check_complete(good)
    assert leftovers(c.ckpt) == []
    assert "the previous snapshot stays, training goes on" in c.log()

    # Repaired: the next snapshot succeeds.
    repair_disk(mnt, fault)
    c.signal(signal.SIGUSR1)
    c.wait_for("a snapshot after the repair",
               lambda: c.value("saestream_checkpoints_total") == 2)
    repaired = latest(c.ckpt)
    assert repaired != good and repaired.name > good.name
    check_complete(repaired)
    assert leftovers(c.ckpt) == []

    # SIGTERM on a failing disk: the final snapshot is tried twice, then exit 1 naming the
    # last good snapshot.
    saved_step = int(repaired.name.removeprefix("step-"))
    c.wait_for("training after that snapshot", lambda: c.steps() > saved_step)
    break_disk(mnt, fault)
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 1
    failed_finals = [x for x in c.log().splitlines() if "final snapshot at step" in x
                     and f"failed ({REASON[fault]}" in x]
    assert len(failed_finals) == 2, c.log()
    assert last_line(c) == ("saestream: error: the final snapshot failed 2 times; the last "
                            f"good snapshot is {repaired}")
    assert latest(c.ckpt) == repaired
    assert leftovers(c.ckpt) == []


@pytest.mark.slow
def test_final_snapshot_failing_after_resume_names_the_snapshot_resumed_from(
    tmpfs, procs: Procs
) -> None:
    mnt = tmpfs()
    ckpt = mnt / "ckpt"
    first = procs.consumer("--max-steps", "4", ckpt=ckpt)
    procs.feed(first, 200)
    assert first.wait_exit() == 0
    assert snapshot_dirs(ckpt) == ["step-00000004"]

    second = procs.consumer("--resume", "--final-snapshot-attempts", "3", ckpt=ckpt)
    second.wait_for("start-up", lambda: second.metrics() is not None)
    fill(mnt)
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 1
    assert second.log().count("final snapshot at step") == 3
    assert last_line(second) == ("saestream: error: the final snapshot failed 3 times; the "
                                 f"last good snapshot is {ckpt / 'step-00000004'}")
    assert snapshot_dirs(ckpt) == ["step-00000004"] and leftovers(ckpt) == []


# -- the producer's state file ---------------------------------------------------------------


def producer_argv(state: Path, port: int, metrics_port: int) -> list[str]:
    """The tiny model over a short synthetic shard (2,520 positions an epoch: many epoch
    ends, each declared void on the control channel), saving its state every second."""
    return saestream_cmd(
        "producer", "--model", "tiny", "--corpus", "synthetic:40", "--hook", HOOK,
        "--connect", f"tcp://127.0.0.1:{port}", "--producer-id", "p", "--chunk-tokens", "256",
        "--batch-size", "4", "--seq-len", "64", "--threads", "1", "--state-file", str(state),
        "--state-every", "1", "--metrics-port", str(metrics_port), "--linger", "5",
    )


def producer_value(metrics_port: int, name: str) -> float:
    try:
        v = value(by_name(fetch_samples(f"127.0.0.1:{metrics_port}", timeout=5)), name)
    except OSError:
        return -1.0
    return 0.0 if v is None else v


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_producer_start_up_refuses_a_state_file_it_could_not_save(tmpfs, fault: str) -> None:
    mnt = tmpfs("1m")
    state = mnt / "p.json"
    break_disk(mnt, fault)
    res = run_cli(["producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
                   "--connect", f"tcp://127.0.0.1:{free_tcp_port()}", "--state-file",
                   str(state)], timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"saestream: error: state file {str(state)!r} cannot be written: {STRERROR[fault]}"]
    assert sorted(p.name for p in mnt.iterdir()) == (["fill"] if fault == "full" else [])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_producer_whose_state_file_fails_mid_run_keeps_streaming_and_saves_when_it_can(
    tmpfs, procs: Procs, tmp_path: Path, fault: str
) -> None:
    """The disk fails before a consumer first answers, so the save of that consumer's origin
    (on the control thread) fails too: the control thread lives on and keeps declaring the
    epochs' ends; the periodic saves are counted and retried; the save at exit fails with one
    line and exit 1 that says what the file still holds."""
    mnt = tmpfs()
    state = mnt / "p.json"
    port, metrics_port = free_tcp_port(), free_tcp_port()
    prod = LoggedProcess(producer_argv(state, port, metrics_port), tmp_path / "producer.log",
                         child_env())
    try:
        deadline = time.monotonic() + 120
        while producer_value(metrics_port, "saestream_producer_tokens_total") < 0:
            assert prod.proc.poll() is None and time.monotonic() < deadline, prod.log()
            time.sleep(0.2)
        break_disk(mnt, fault)
        c = Consumer(tmp_path, ckpt=tmp_path / "ckpt", port=port)
        procs.consumers.append(c)
        c.wait_for("eight epochs and failed saves", lambda: c.value(
            "saestream_received_tokens_total", producer="p") >= 8 * 2520 and producer_value(
            metrics_port, "saestream_producer_state_write_failures_total") >= 2)
        assert prod.proc.poll() is None, prod.log()
        assert "could not write the state file" in prod.log()
        assert "Traceback" not in prod.log() and "Exception in thread" not in prod.log()

        # Repaired: the next save writes the position and the consumer's origin, which the
        # control thread could not save when that consumer first answered.
        repair_disk(mnt, fault)
        deadline = time.monotonic() + 60
        while not (state.exists() and len(json.loads(state.read_text())["origins"]) == 1):
            assert prod.proc.poll() is None and time.monotonic() < deadline, prod.log()
            time.sleep(0.2)

        # The disk fails again; SIGTERM: the save at exit fails, one line, exit 1.
        break_disk(mnt, fault)
        kept = json.loads(state.read_text())
        prod.proc.send_signal(signal.SIGTERM)
        assert prod.proc.wait(60) == 1, prod.log()
        assert prod.log().strip().splitlines()[-1] == (
            f"saestream: error: could not write the state file {state} at exit "
            f"({STRERROR[fault]}); it still holds position {kept['tokens_done']} of epoch "
            f"{kept['epoch']}: a restart with it resumes from there (a consumer that answers "
            f"says where instead, and trims rows it already holds)")
        assert "Traceback" not in prod.log()
        assert json.loads(state.read_text()) == kept
        assert [p.name for p in mnt.iterdir() if p.name.startswith(".")] == []
    finally:
        prod.close()

    # The consumer heard the epochs' ends: its frontier passed them.
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0, c.log()
    ledger = json.loads((latest(c.ckpt) / "extra.json").read_text())["producers"]["p"]
    hl = ledger["hooks"][HOOK]
    assert hl["low"][0] >= 8 and len(hl["void"]) >= 2, hl


# -- a recording's lost shards ---------------------------------------------------------------


@pytest.mark.slow
def test_rows_of_a_shard_the_disk_refused_are_never_declared_held(tmpfs, tmp_path: Path) -> None:
    """`record` tells a producer its rows are held once they are in complete shards; the
    rows of a shard that could not be written must not count (a producer with --max-tokens
    once exited 0 with nothing on disk). They are forgotten: the producer waits, sends them
    again once the disk is back, and exits 0 with every row recorded once."""
    mnt = tmpfs()
    out = mnt / "rec"
    sink = Sink(tmp_path, out, "--record-shard-tokens", "1024")
    prod = None
    try:
        sink.wait_for("start-up", lambda: "recording run" in sink.log())
        fill(mnt)
        prod = recording_producer(tmp_path, sink.endpoint, "p", "0/1", "--max-tokens", "3000")
        sink.wait_for("two lost shards", lambda: sink.value(
            "saestream_record_failures_total", reason="no_space") >= 2)
        time.sleep(8.0)  # time enough to settle, had the rows been declared held
        assert prod.proc.poll() is None, prod.log()
        repair_disk(mnt, "full")
        assert prod.proc.wait(120) == 0, prod.log()
        assert sink.stop() == 0, sink.log()
    finally:
        if prod is not None:
            prod.close()
        sink.close()
    assert "Traceback" not in sink.log()
    rec = Recording(out / HOOK)
    spans = sorted((e.source["epoch"], e.source["start"], e.source["end"])
                   for _, e in rec.chunks())
    assert rec.shape[0] == sum(end - start for _, start, end in spans) == 3000
    assert all(a[2] == b[1] for a, b in itertools.pairwise(spans)), spans  # none twice
