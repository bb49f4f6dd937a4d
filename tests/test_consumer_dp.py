"""`saestream consumer` as 2 data-parallel ranks (gloo on CPU, real processes): two real
producers deal their chunks among the ranks; a signal to either rank snapshots or stops both
at the same step; the snapshot resumes in one process; a killed rank ends the other with one
line and exit 1 within --dist-timeout.

The ranks are started with torchrun's environment variables set by hand (RANK, LOCAL_RANK,
WORLD_SIZE, ...), not by torchrun: its agent would restart or stop the survivors itself, and
the tests signal each rank's own process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LoggedProcess, free_ports, free_tcp_port, saestream_cmd
from test_consumer import HOOK, SAE, SMALL, Consumer, child_env

from saestream.tools.status import by_name, fetch_samples, value

pytestmark = pytest.mark.slow

TIMEOUT = 90.0
DIST_TIMEOUT = "20"


class Rank(LoggedProcess):
    """One rank of a 2-rank `saestream consumer`."""

    def __init__(self, tmp_path: Path, rank: int, base: int, metrics: int, master: int,
                 ckpt: Path, *extra: str, log: str = "") -> None:
        self.rank = rank
        self.metrics_port = metrics + rank
        env = {**child_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
        super().__init__(saestream_cmd(
            "consumer", "--bind", f"tcp://127.0.0.1:{base}", "--metrics-port", str(metrics),
            "--checkpoint-dir", str(ckpt), "--hook", HOOK, "--sae", SAE, *SMALL,
            "--log-every", "1", "--metrics-window", "10", "--device", "cpu",
            "--dist-timeout", DIST_TIMEOUT, *extra,
        ), tmp_path / f"rank{rank}{log}.log", env)

    def value(self, name: str, **labels: str) -> float:
        try:
            samples = by_name(fetch_samples(f"127.0.0.1:{self.metrics_port}", timeout=5))
        except OSError:
            return 0.0
        return value(samples, name, **labels) or 0.0

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank {self.rank} did not exit:\n{self.log()}") from None


def wait_for(what: str, pred, procs: list[LoggedProcess], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        exited = [p for p in procs if p.proc.poll() is not None]
        assert not exited, f"exited during {what}:\n" + "\n".join(
            f"{p.log_path.name}:\n{p.log()}" for p in exited)
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(p.log() for p in procs))


def snapshot_extra(ckpt: Path) -> dict:
    latest = (ckpt / "latest").read_text().strip()
    return json.loads((ckpt / latest / "extra.json").read_text())


def dealing_producer(tmp_path: Path, base: int) -> LoggedProcess:
    """A tiny-model producer whose chunks ZeroMQ deals between two ranks' data endpoints
    (no control channel: several ranks never confirm one stream)."""
    return LoggedProcess(
        saestream_cmd("producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
                      "--connect", f"tcp://127.0.0.1:{base}",
                      "--connect", f"tcp://127.0.0.1:{base + 1}", "--producer-id", "prod",
                      "--control-connect", "off", "--chunk-tokens", "256", "--batch-size",
                      "2", "--seq-len", "64", "--threads", "1", "--seed", "0"),
        tmp_path / "prod.log", child_env())


@pytest.fixture
def started():
    procs: list[LoggedProcess] = []
    yield procs
    for p in procs:
        p.close()


def test_two_ranks_fed_by_two_producers_snapshot_stop_together_and_resume_in_one_process(
        tmp_path: Path, started: list) -> None:
    base, metrics, master = free_ports(5), free_ports(2), free_tcp_port()
    ckpt = tmp_path / "ckpt"
    ranks = [Rank(tmp_path, r, base, metrics, master, ckpt) for r in (0, 1)]
    started.extend(ranks)
    # The producers connect to both ranks' data endpoints (the --bind port + local rank) and
    # to both control endpoints (the --bind port + 2 + 1 + local rank).
    producers = [LoggedProcess(
        saestream_cmd("producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
                      "--connect", f"tcp://127.0.0.1:{base}",
                      "--connect", f"tcp://127.0.0.1:{base + 1}", "--producer-id", pid,
                      "--control-connect", f"tcp://127.0.0.1:{base + 3}",
                      "--control-connect", f"tcp://127.0.0.1:{base + 4}",
                      "--chunk-tokens", "256", "--batch-size", "2", "--seq-len", "64",
                      "--threads", "1", "--seed", "0", "--shard", shard),
        tmp_path / f"{pid}.log", child_env()) for pid, shard in (("prod-a", "0/2"),
                                                                ("prod-b", "1/2"))]
    started.extend(producers)
    everyone = [*ranks, *producers]

    # Chunks are dealt among the ranks: both receive, and both train the same steps.
    wait_for("both ranks to receive and train", lambda: all(
        r.value("saestream_received_tokens_total", rank=str(r.rank)) > 0
        and r.value("saestream_train_steps_total") >= 3 for r in ranks), everyone)
    assert "rank 1 of 2 (local 1 of 2) binds data " \
        f"tcp://127.0.0.1:{base + 1}, control tcp://127.0.0.1:{base + 4}" in ranks[1].log()

    for r in ranks:  # each sees a share of every producer's seq numbers: no gap is a loss
        samples = by_name(fetch_samples(f"127.0.0.1:{r.metrics_port}", timeout=5))
        gaps = [x.value for x in samples.get("saestream_sequence_gaps_total", [])]
        assert len(gaps) == 2 and not any(gaps), gaps
        assert not re.search(r"run \S+: seq \d+ after \d+", r.log())  # no gap warnings
    ranks[1].proc.send_signal(signal.SIGUSR1)  # a snapshot, written by rank 0
    wait_for("the signalled snapshot", lambda: (ckpt / "latest").exists(), everyone)
    extra = snapshot_extra(ckpt)
    assert extra["reason"] == "signal" and extra["data_parallel"] == {"world_size": 2}
    assert extra["producers"] == {} and "buffers" not in extra

    ranks[0].proc.send_signal(signal.SIGTERM)  # stops both, at the same step
    assert [r.wait_exit() for r in ranks] == [0, 0], ranks[1].log()
    final = snapshot_extra(ckpt)
    assert final["reason"] == "final" and final["step"] >= extra["step"]
    stopped = [re.findall(r"stopped \(signal\) after (\d+) steps, (\d+) tokens", r.log())
               for r in ranks]
    assert stopped[0] == stopped[1] == [(str(final["step"]), str(final["tokens"]))]

    # One process resumes the snapshot on rank 0's endpoint; the producers reconnect to it.
    one = Consumer(tmp_path, "--resume", "--bind", f"tcp://127.0.0.1:{base}", ckpt=ckpt)
    started.append(one)
    one.wait_for("training after the resume", lambda: one.steps() >= final["step"] + 3)
    assert f"step {final['step']}" in one.log()
    one.signal(signal.SIGTERM)
    assert one.wait_exit() == 0


def test_latent_shards_split_the_sae_over_two_ranks_and_resume_on_another_shard_count(
        tmp_path: Path, started: list) -> None:
    """--latent-shards 2: each rank holds half the latents, and the two ranks' parts of a
    batch are gathered so both train on the same rows. The first run writes per-rank shard
    files (--snapshot-shards per-rank), which a sharded run resumes (each rank reading its
    rows) and snapshots gathered whole on rank 0 (the default here), which one process
    resumes."""
    from safetensors.torch import load_file

    from saestream.consumer.checkpoint import load_trainer

    base, metrics, master = free_ports(5), free_ports(2), free_tcp_port()
    ckpt = tmp_path / "ckpt"
    ranks = [Rank(tmp_path, r, base, metrics, master, ckpt, "--latent-shards", "2",
                  "--snapshot-shards", "per-rank") for r in (0, 1)]
    started.extend(ranks)
    producer = dealing_producer(tmp_path, base)
    started.append(producer)
    everyone = [*ranks, producer]
    wait_for("both ranks to train", lambda: all(
        r.value("saestream_train_steps_total") >= 5 for r in ranks), everyone)
    for r in ranks:
        nmse = r.value("saestream_normalized_mse", hook=HOOK, sae=HOOK)
        assert 0 < nmse < 2, (r.rank, nmse)
    assert "1 data-parallel ranks × 2 latent shards: ranks 0-1" in ranks[1].log()
    ranks[1].proc.send_signal(signal.SIGTERM)
    assert [r.wait_exit() for r in ranks] == [0, 0], ranks[0].log() + ranks[1].log()
    final = snapshot_extra(ckpt)
    assert final["reason"] == "final"
    stopped = [re.findall(r"stopped \(signal\) after (\d+) steps", r.log()) for r in ranks]
    assert stopped[0] == stopped[1] == [str(final["step"])]
    snap = ckpt / (ckpt / "latest").read_text().strip() / HOOK
    assert sorted(p.name for p in snap.glob("shard-*")) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert load_trainer(snap).sae.W_dec.shape[0] == 256  # the rows of both, read whole

    # The same two ranks resume it sharded (each takes its slice), and train on.
    master2 = free_tcp_port()
    again = [Rank(tmp_path, r, base, metrics, master2, ckpt, "--latent-shards", "2",
                  "--resume", "--max-steps", str(final["step"] + 3), log="-again")
             for r in (0, 1)]
    started.extend(again)
    assert [r.wait_exit() for r in again] == [0, 0], again[0].log() + again[1].log()
    assert f"step {final['step']}" in again[0].log()
    after = snapshot_extra(ckpt)
    assert after["step"] == final["step"] + 3 and after["stop_reason"] == "max-steps"
    weights = load_file(str(ckpt / f"step-{after['step']:08d}" / HOOK / "sae.safetensors"))
    assert weights["W_dec"].shape[0] == weights["encoder.weight"].shape[0] == 256  # gathered

    # ... and one process resumes that (no shards).
    one = Consumer(tmp_path, "--resume", "--bind", f"tcp://127.0.0.1:{base}", ckpt=ckpt)
    started.append(one)
    one.wait_for("training after the resume", lambda: one.steps() >= after["step"] + 2)
    one.signal(signal.SIGTERM)
    assert one.wait_exit() == 0


def test_a_killed_rank_ends_the_other_with_one_line_and_exit_1(tmp_path: Path,
                                                               started: list) -> None:
    base, metrics, master = free_ports(5), free_ports(2), free_tcp_port()
    ranks = [Rank(tmp_path, r, base, metrics, master, tmp_path / "ckpt") for r in (0, 1)]
    started.extend(ranks)
    # Without data the ranks still agree at every boundary (5 a second), waiting together.
    wait_for("both ranks up", lambda: all(
        "data parallel: rank" in r.log() for r in ranks), ranks)
    time.sleep(0.5)
    os.kill(ranks[1].proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert ranks[0].wait_exit(float(DIST_TIMEOUT) + 10) == 1
    assert time.monotonic() - t0 < float(DIST_TIMEOUT)
    log = ranks[0].log()
    errors = [line for line in log.splitlines() if line.startswith("saestream: error:")]
    assert len(errors) == 1 and "Traceback" not in log, log
    assert "rank 0 of 2: another rank is gone" in errors[0]
    assert f"--dist-timeout {DIST_TIMEOUT} s" in errors[0]


def test_rank_endpoints_follow_the_bind_port_plus_the_local_rank() -> None:
    from saestream.common.errors import UserError
    from saestream.consumer.distributed import rank_endpoints

    assert rank_endpoints("tcp://*:5557", None, 0, 1) == ("tcp://*:5557", None)
    got = [rank_endpoints("tcp://*:5557", None, r, 4) for r in range(4)]
    assert [d for d, _ in got] == [f"tcp://*:{5557 + r}" for r in range(4)]
    # control after every data port and past 5561, the last data port + 1 (what a producer
    # derives for it): no default control endpoint reaches another rank's control socket
    assert [c for _, c in got] == [f"tcp://*:{5562 + r}" for r in range(4)]
    assert rank_endpoints("tcp://*:5557", "off", 2, 4) == ("tcp://*:5559", "off")
    assert rank_endpoints("tcp://a:1,tcp://b:2", "tcp://a:9,tcp://b:8", 1, 2) == (
        "tcp://b:2", "tcp://b:8")
    assert rank_endpoints("ipc:///tmp/s", None, 1, 2) == ("ipc:///tmp/s-r1", None)
    with pytest.raises(UserError, match="one per local rank"):
        rank_endpoints("tcp://a:1,tcp://b:2,tcp://c:3", None, 0, 2)



def test_per_rank_snapshots_on_a_full_disk_are_counted_and_both_ranks_train_on(
        tmp_path: Path, started: list) -> None:
    """A per-rank snapshot is a collective: when the shard files cannot be written (a real
    full tmpfs), rank 0 counts the failure and leaves nothing behind, both ranks train on,
    the next snapshot after the repair is complete, and a final snapshot that keeps failing
    ends both ranks with exit 1 after --final-snapshot-attempts tries (never a hang)."""
    from test_guarantee_disk import fill, leftovers, tmpfs_at

    from saestream.consumer.checkpoint import check_complete

    with tmpfs_at(tmp_path / "mnt") as mnt:
        ckpt = mnt / "ckpt"
        base, metrics, master = free_ports(5), free_ports(2), free_tcp_port()
        ranks = [Rank(tmp_path, r, base, metrics, master, ckpt, "--latent-shards", "2",
                      "--snapshot-shards", "per-rank", "--final-snapshot-attempts", "2")
                 for r in (0, 1)]
        started.extend(ranks)
        producer = dealing_producer(tmp_path, base)
        started.append(producer)
        everyone = [*ranks, producer]
        r0 = ranks[0]
        wait_for("training", lambda: r0.value("saestream_train_steps_total") >= 3, everyone)
        ranks[1].proc.send_signal(signal.SIGUSR1)
        wait_for("a first snapshot", lambda: r0.value("saestream_checkpoints_total") == 1,
                 everyone)

        fill(mnt)
        ranks[1].proc.send_signal(signal.SIGUSR1)
        wait_for("the failure counted", lambda: r0.value(
            "saestream_checkpoint_failures_total", reason="no_space") == 1, everyone)
        steps = r0.value("saestream_train_steps_total")
        wait_for("training after the failure", lambda: all(
            r.value("saestream_train_steps_total") >= steps + 3 for r in ranks), everyone)
        assert leftovers(ckpt) == []
        assert "the previous snapshot stays, training goes on" in r0.log()

        (mnt / "fill").unlink()
        ranks[0].proc.send_signal(signal.SIGUSR1)
        wait_for("a snapshot after the repair",
                 lambda: r0.value("saestream_checkpoints_total") == 2, everyone)
        check_complete(ckpt / (ckpt / "latest").read_text().strip())
        assert leftovers(ckpt) == []

        fill(mnt)
        ranks[1].proc.send_signal(signal.SIGTERM)
        assert [r.wait_exit() for r in ranks] == [1, 1], r0.log() + ranks[1].log()
        assert r0.log().count("final snapshot at step") == 2, r0.log()
        assert "rank 0 could not write the final snapshot" in ranks[1].log()
        assert leftovers(ckpt) == []
        producer.close()


def _ranks_of(parent: int) -> dict[int, int]:
    """{RANK: pid} of a torchrun agent's worker processes (its children)."""
    found = {}
    for child in Path(f"/proc/{parent}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


def test_torchrun_max_restarts_brings_a_killed_rank_back_from_the_last_snapshot(
        tmp_path: Path, started: list) -> None:
    """The job as an operator runs it: `torchrun --max-restarts 1 ... consumer --resume`.
    SIGKILL of one rank makes torchrun restart both, and they resume from the last periodic
    snapshot and train on; SIGTERM to the ranks then ends the job with exit 0."""
    import sys

    base, metrics = free_ports(5), free_ports(2)
    ckpt = tmp_path / "ckpt"
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "--max-restarts", "1", "--monitor-interval", "0.5", "-m", "saestream",
             "consumer", "--bind", f"tcp://127.0.0.1:{base}", "--metrics-port", str(metrics),
             "--checkpoint-dir", str(ckpt), "--resume", "--checkpoint-every-seconds", "1",
             "--hook", HOOK, "--sae", SAE, *SMALL, "--log-every", "1", "--device", "cpu",
             "--dist-timeout", DIST_TIMEOUT],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    try:
        started.append(dealing_producer(tmp_path, base))
        text = log_path.read_text

        def until(what: str, pred, timeout: float = TIMEOUT) -> None:
            deadline = time.monotonic() + timeout
            while not pred():
                assert job.poll() is None, f"torchrun exited during {what}:\n{text()}"
                assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{text()}"
                time.sleep(0.2)

        until("a periodic snapshot", lambda: (ckpt / "latest").exists())
        first = _ranks_of(job.pid)
        assert sorted(first) == [0, 1], first
        os.kill(first[1], signal.SIGKILL)
        until("the restarted ranks to resume", lambda: "resumed from" in text())
        resumed = int(re.search(r"resumed from \S+ \(run \S+\): step (\d+)", text()).group(1))
        until("a snapshot after the restart", lambda: snapshot_extra(ckpt)["step"] > resumed)
        again = _ranks_of(job.pid)
        assert sorted(again) == [0, 1] and not set(again.values()) & set(first.values())
        for pid in again.values():
            os.kill(pid, signal.SIGTERM)
        assert job.wait(TIMEOUT) == 0, text()
        assert snapshot_extra(ckpt)["reason"] == "final"
        assert text().count("stopped (signal) after") == 2
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(10)
