"""The consumer daemon as a real process: training, metrics, signals, checkpoints, bad input.

Activations come from an in-test sender (the wire module's encoder on a real PUSH socket);
tests with real producer processes are in test_consumer_e2e.py.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from conftest import LoggedProcess, free_tcp_port, run_cli, saestream_cmd, send_unless_stopped

from saestream.common.transport import push_socket
from saestream.common.wire import encode_chunk
from saestream.tools.status import by_name, fetch_samples, value

HOOK = "model.layers.1"
D = 64
CHUNK = 256
SAE = "latents=256,k=8,k_aux=64"
SMALL = ["--buffer-tokens", "4096", "--batch-size", "256", "--min-fill", "0.5"]
TIMEOUT = 90.0


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Consumer(LoggedProcess):
    """`saestream consumer` as a subprocess with a free port, metrics port and a log file."""

    def __init__(self, tmp_path: Path, *args: str, ckpt: Path | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_tcp_port()
        self.metrics_port = free_tcp_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.ckpt = ckpt or tmp_path / "ckpt"
        self.log_path = tmp_path / f"consumer-{self.port}.log"
        argv = saestream_cmd(
            "consumer", "--bind", self.endpoint, "--metrics-port", str(self.metrics_port),
            "--checkpoint-dir", str(self.ckpt), "--hook", HOOK, "--log-every", "1", *args,
        )
        if "--sae" not in args:
            argv += ["--sae", SAE]
        if "--buffer-tokens" not in args:
            argv += SMALL
        super().__init__(argv, self.log_path, child_env())

    def metrics(self) -> dict | None:
        try:
            return by_name(fetch_samples(f"127.0.0.1:{self.metrics_port}", timeout=5))
        except OSError:
            return None

    def value(self, name: str, **labels: str) -> float:
        m = self.metrics()
        v = value(m, name, **labels) if m else None
        return 0.0 if v is None else v

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            alive = self.proc.poll() is None
            assert alive, f"consumer exited while waiting for {what}:\n{self.log()}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def steps(self) -> float:
        return self.value("saestream_train_steps_total")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"consumer did not exit:\n{self.log()}") from None

@pytest.fixture
def start_consumer(tmp_path: Path):
    started: list[Consumer] = []

    def start(*args: str, ckpt: Path | None = None) -> Consumer:
        c = Consumer(tmp_path, *args, ckpt=ckpt)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


# -- the in-test sender ------------------------------------------------------------------------

ATOMS = torch.randn(512, D, generator=torch.Generator().manual_seed(0))


def sparse_acts(n: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens that are sparse sums of a fixed dictionary: what a TopK SAE can learn."""
    idx = torch.randint(ATOMS.shape[0], (n, 8), generator=gen)
    coef = torch.rand(n, 8, generator=gen) * 2
    return (ATOMS[idx] * coef[..., None]).sum(1)


def chunk_frames(seq: int, *, producer: str = "p1", run: str = "r1", hook: str = HOOK,
                 model: str = "synthetic", acts: torch.Tensor | None = None,
                 gen: torch.Generator | None = None) -> list[bytes]:
    if acts is None:
        acts = sparse_acts(CHUNK, gen or torch.Generator().manual_seed(seq))
    return encode_chunk(acts, producer=producer, run=run, seq=seq, model=model, hook=hook,
                        source={"corpus": "test", "offset": seq * CHUNK}, dtype="float32")


class Sender:
    """A real PUSH socket; `send` blocks under backpressure but gives up when `stop` is set."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = push_socket(self.ctx, [endpoint], hwm=4)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def send(self, frames: list[bytes]) -> bool:
        return send_unless_stopped(self.sock, frames, self.stop)

    def send_chunks(self, count: int, *, producer: str = "p1", run: str = "r1",
                    seq0: int = 0, seed: int = 0) -> int:
        gen = torch.Generator().manual_seed(seed)
        sent = 0
        for seq in range(seq0, seq0 + count):
            if not self.send(chunk_frames(seq, producer=producer, run=run, gen=gen)):
                break
            sent += CHUNK
        return sent

    def in_background(self, count: int, **kw) -> threading.Thread:
        t = threading.Thread(target=self.send_chunks, args=(count,), kwargs=kw, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def close(self) -> None:
        if self.sock.closed:
            return
        self.stop.set()
        for t in self.threads:
            t.join(10)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def sender_for():
    senders: list[Sender] = []

    def make(c: Consumer) -> Sender:
        s = Sender(c.endpoint)
        senders.append(s)
        return s

    yield make
    for s in senders:
        s.close()


def snapshot_dirs(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.glob("step-*"))


def latest(ckpt: Path) -> Path:
    return ckpt / (ckpt / "latest").read_text().strip()


# -- tests -------------------------------------------------------------------------------------


def test_normalized_mse_falls_and_metrics_are_served(start_consumer, sender_for) -> None:
    c = start_consumer()
    s = sender_for(c)
    s.in_background(400, producer="a", seed=1)
    sender_b = sender_for(c)
    sender_b.in_background(400, producer="b", seed=2)
    c.wait_for("a first nmse", lambda: c.steps() >= 3)
    first = c.value("saestream_normalized_mse", hook=HOOK, sae=HOOK)
    c.wait_for("60 steps", lambda: c.steps() >= 60)
    m = c.metrics()
    assert m is not None
    later = value(m, "saestream_normalized_mse", hook=HOOK, sae=HOOK)
    assert later < first
    for name in (
        "saestream_dead_latent_fraction", "saestream_l0", "saestream_auxk_loss",
        "saestream_trained_tokens_total", "saestream_train_step_seconds_count",
        "saestream_buffer_tokens", "saestream_buffer_capacity_tokens",
        "saestream_received_wire_bytes_total", "saestream_checkpoints_total",
        "saestream_last_checkpoint_timestamp_seconds",
    ):
        assert name in m, name
    assert value(m, "saestream_l0", hook=HOOK, sae=HOOK) == pytest.approx(8, abs=0.01)
    assert value(m, "saestream_buffer_capacity_tokens", hook=HOOK) == 4096
    # every failure reason at 0 from the start: the alert's increase() misses a series
    # that first appears at 1, and missed the first failed snapshot
    for reason in ("no_space", "read_only", "permission", "io", "other"):
        assert value(m, "saestream_checkpoint_failures_total", reason=reason) == 0, reason
    for producer in ("a", "b"):
        assert value(m, "saestream_received_messages_total", producer=producer) > 0
        assert value(m, "saestream_received_tokens_total", producer=producer) > 0
        assert value(m, "saestream_producer_last_seen_timestamp_seconds", producer=producer) > 0
        assert value(m, "saestream_sequence_gaps_total", producer=producer) == 0
    status = run_cli(["status", str(c.metrics_port)], timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"sae {HOOK}" in status.stdout and "producer a" in status.stdout


def test_sigusr1_snapshot_keeps_training(start_consumer, sender_for) -> None:
    c = start_consumer()
    sender_for(c).in_background(2000)
    c.wait_for("5 steps", lambda: c.steps() >= 5)
    c.signal(signal.SIGUSR1)
    c.wait_for("a snapshot", lambda: c.value("saestream_checkpoints_total") >= 1)
    steps_at_snapshot = c.steps()
    assert len(snapshot_dirs(c.ckpt)) == 1
    c.wait_for("training after the snapshot", lambda: c.steps() >= steps_at_snapshot + 10)
    assert c.proc.poll() is None
    extra = json.loads((latest(c.ckpt) / "extra.json").read_text())
    assert extra["reason"] == "signal"
    assert extra["hooks"][HOOK]["model"] == "synthetic"
    assert extra["producers"]["p1"]["received_tokens"] > 0
    assert (latest(c.ckpt) / HOOK / "sae.safetensors").is_file()


def test_sigterm_writes_a_final_snapshot_and_exits_0_while_waiting_for_data(
    start_consumer, sender_for
) -> None:
    c = start_consumer()
    sender = sender_for(c)
    sent = sender.send_chunks(24)  # 6144 tokens: trains until the buffer is below 2048
    c.wait_for("all received", lambda: c.value("saestream_received_tokens_total") == sent)
    sender.close()  # no producer left
    c.wait_for("idle below min-fill", lambda: c.value("saestream_buffer_tokens") < 2048
               and c.steps() > 0)
    steps = int(c.steps())
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0
    snap = latest(c.ckpt)
    assert snap.name == f"step-{steps:08d}"
    assert json.loads((snap / "extra.json").read_text())["reason"] == "final"
    state = json.loads((snap / HOOK / "trainer.json").read_text())
    assert state["step"] == steps and state["tokens_seen"] == steps * 256


def test_sigterm_before_any_data_exits_0(start_consumer) -> None:
    c = start_consumer()
    c.wait_for("metrics", lambda: c.metrics() is not None)
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0
    assert "nothing trained yet" in c.log()
    if platform.libc_ver()[0] == "glibc":  # consumer/heap.py: freed memory kept for reuse
        assert "malloc: freed memory kept for reuse" in c.log()


def test_tokens_in_equal_tokens_trained_plus_buffered(start_consumer, sender_for) -> None:
    c = start_consumer()
    sent = sender_for(c).send_chunks(30, producer="a", seed=3)
    sent += sender_for(c).send_chunks(17, producer="b", seed=4)

    def settled() -> bool:
        m1 = c.metrics()
        time.sleep(0.5)
        m2 = c.metrics()
        keys = ("saestream_received_tokens_total", "saestream_trained_tokens_total",
                "saestream_buffer_tokens")
        return bool(m1 and m2) and all(value(m1, k) == value(m2, k) for k in keys) and (
            value(m2, "saestream_received_tokens_total") == sent
            and value(m2, "saestream_buffer_tokens") < 2048
        )

    c.wait_for("received and trained all it can", settled)
    m = c.metrics()
    assert m is not None
    trained = value(m, "saestream_trained_tokens_total")
    buffered = value(m, "saestream_buffer_tokens")
    assert trained + buffered == sent
    assert trained == 256 * value(m, "saestream_train_steps_total")


def test_malformed_messages_are_counted_by_reason_while_training_goes_on(
    start_consumer, sender_for
) -> None:
    c = start_consumer()
    s = sender_for(c)
    s.send_chunks(16)  # learn d=64 and the model, start training
    c.wait_for("training", lambda: c.steps() >= 1)

    good = chunk_frames(100)
    header = msgpack.unpackb(good[0])

    def with_header(**changes) -> list[bytes]:
        return [msgpack.packb({**header, **changes}), good[1]]

    nan = torch.zeros(CHUNK, D)
    nan[3, 5] = float("nan")
    bad = {
        "frames": [b"only one frame"],
        "header": [b"\xc1 not msgpack", b""],
        "version": with_header(v=99),
        "field": with_header(n="many"),
        "checksum": with_header(checksum=(header["checksum"] + 1) % 2**32),
        "codec": [good[0], b"not lz4 at all"],
        "nonfinite": chunk_frames(101, acts=nan),
        "hook": chunk_frames(102, hook="model.layers.9"),
        "dim": chunk_frames(103, acts=torch.zeros(CHUNK, 32)),
        "model": chunk_frames(104, model="another-model"),
    }
    for frames in bad.values():
        assert s.send(frames)
    c.wait_for(
        "every reject counted",
        lambda: all(c.value("saestream_rejected_messages_total", reason=r) == 1 for r in bad),
    )
    steps = c.steps()
    s.send_chunks(16, seq0=16)
    c.wait_for("training after the rejects", lambda: c.steps() > steps)
    c.wait_for("32 accepted", lambda: c.value("saestream_received_messages_total") == 32)
    assert c.proc.poll() is None
    assert "dropped a message" in c.log()


def test_sequence_gaps_and_restarts_are_counted_not_fatal(start_consumer, sender_for) -> None:
    c = start_consumer()
    s = sender_for(c)
    for seq in (0, 1, 2, 5, 6):  # one gap
        assert s.send(chunk_frames(seq))
    for seq in (0, 1):  # the producer restarted with a new run id
        assert s.send(chunk_frames(seq, run="r2"))
    c.wait_for("7 messages", lambda: c.value("saestream_received_messages_total") == 7)
    assert c.value("saestream_sequence_gaps_total", producer="p1") == 1
    assert c.value("saestream_producer_restarts_total", producer="p1") == 1


def test_resume_continues_step_count_and_tokens(start_consumer, sender_for, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    first = start_consumer("--max-steps", "6", ckpt=ckpt)
    sender_for(first).in_background(200)
    assert first.wait_exit() == 0
    assert snapshot_dirs(ckpt) == ["step-00000006"]

    second = start_consumer("--max-steps", "10", "--resume", ckpt=ckpt)
    # The snapshot holds the shuffle buffer too, so the resumed consumer may reach its limit
    # on the restored tokens alone, before any scrape: read its log, not its /metrics.
    sender_for(second).in_background(200, run="r2")
    assert second.wait_exit() == 0
    assert "resumed from" in second.log()
    assert "step 6, 1536 tokens" in second.log()  # counters continue from the snapshot
    snap = latest(ckpt)
    assert snap.name == "step-00000010"
    state = json.loads((snap / HOOK / "trainer.json").read_text())
    assert state["step"] == 10 and state["tokens_seen"] == 10 * 256
    extra = json.loads((snap / "extra.json").read_text())
    assert extra["step"] == 10 and extra["tokens"] == 10 * 256
    assert extra["reason"] == "final" and extra["stop_reason"] == "max-steps"


def test_a_stop_in_a_state_already_saved_is_recorded_in_that_snapshot(
    start_consumer, sender_for
) -> None:
    # 4 chunks are 4 steps; the periodic snapshot at step 4 saves the state the run stops in
    c = start_consumer("--max-tokens", str(4 * CHUNK), "--checkpoint-every", "4")
    sender_for(c).in_background(4)
    assert c.wait_exit() == 0
    assert "final snapshot: step 4 already saved" in c.log()
    assert snapshot_dirs(c.ckpt) == ["step-00000004"]
    snap = latest(c.ckpt)
    extra = json.loads((snap / "extra.json").read_text())
    assert extra["reason"] == "periodic" and extra["stop_reason"] == "max-tokens"
    assert extra["tokens"] == 4 * CHUNK
    assert [p.name for p in [*snap.iterdir(), *c.ckpt.iterdir()] if p.name.startswith(".")] == []


def test_resume_skips_an_unreadable_snapshot(start_consumer, sender_for, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    first = start_consumer("--max-steps", "8", "--checkpoint-every", "4", ckpt=ckpt)
    sender_for(first).in_background(200)
    assert first.wait_exit() == 0
    assert snapshot_dirs(ckpt) == ["step-00000004", "step-00000008"]
    (ckpt / "step-00000008" / HOOK / "sae.safetensors").write_bytes(b"truncated")

    second = start_consumer("--max-steps", "6", "--resume", ckpt=ckpt)
    sender_for(second).in_background(200)  # it may finish on its restored buffer alone
    assert second.wait_exit() == 0
    assert "step 4, 1024 tokens" in second.log()
    state = json.loads((latest(ckpt) / HOOK / "trainer.json").read_text())
    assert state["step"] == 6


def test_max_tokens_stops_with_a_final_snapshot_and_keep_prunes(
    start_consumer, sender_for
) -> None:
    c = start_consumer("--max-tokens", "2560", "--checkpoint-every", "2", "--keep", "2")
    sender_for(c).in_background(200)
    assert c.wait_exit() == 0
    assert snapshot_dirs(c.ckpt) == ["step-00000008", "step-00000010"]
    assert json.loads((latest(c.ckpt) / "extra.json").read_text())["tokens"] == 2560


def test_several_saes_train_on_the_same_batches(start_consumer, sender_for) -> None:
    c = start_consumer(
        "--sae", "name=k4,latents=128,k=4,k_aux=32",
        "--sae", "name=k8,latents=256,k=8,k_aux=32,multi_topk=true",
        "--max-steps", "5",
    )
    sender_for(c).in_background(200)
    assert c.wait_exit() == 0
    snap = latest(c.ckpt)
    for name, k in (("k4", 4), ("k8", 8)):
        state = json.loads((snap / name / "trainer.json").read_text())
        assert state["step"] == 5 and state["tokens_seen"] == 5 * 256
        assert state["sae"]["k"] == k


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hook", "h", "--sae", "width=3"], "unknown key 'width'"),
        (["--hook", "h", "--sae", "k=64,latents=32"], "1 <= k <= latents"),
        (["--hook", "h", "--sae", "name=a", "--sae", "name=a"], "used twice"),
        (["--hook", "h", "--batch-size", "512", "--buffer-tokens", "256"], "larger than"),
        (["--sae", "k=8"], "--hook"),
        (["--hook", "a", "--hook", "b", "--sae", "hook=a"], "--hook b has no --sae"),
        (["--hook", "h", "--curve-secret-key", "/nonexistent"], "go together"),
    ],
)
def test_bad_options_fail_with_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli(["consumer", "--metrics-port", "0", *args], timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") <= 2


def test_d_in_flag_fixes_the_width_and_other_widths_are_rejected(
    start_consumer, sender_for
) -> None:
    c = start_consumer("--d-in", "32")
    s = sender_for(c)
    assert s.send(chunk_frames(0))  # d=64
    assert s.send(chunk_frames(1, acts=torch.ones(CHUNK, 32)))
    c.wait_for("one reject, one accept", lambda: c.value(
        "saestream_rejected_messages_total", reason="dim") == 1
        and c.value("saestream_received_messages_total") == 1)


def test_curve_admits_authorized_producers_only(start_consumer, tmp_path) -> None:
    from saestream.common.transport import CurveClientKeys

    keys, admitted = tmp_path / "keys", tmp_path / "admitted"
    for name in ("consumer", "good", "bad"):
        assert run_cli(["keygen", str(keys), "--name", name], timeout=60).returncode == 0
    admitted.mkdir()
    (admitted / "good.key").write_bytes((keys / "good.key").read_bytes())
    c = start_consumer("--curve-secret-key", str(keys / "consumer.key_secret"),
                       "--curve-authorized-dir", str(admitted))
    c.wait_for("metrics", lambda: c.metrics() is not None)
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket] = {}
    try:
        for name in ("good", "bad"):
            curve = CurveClientKeys(keys / f"{name}.key_secret", keys / "consumer.key")
            socks[name] = push_socket(ctx, [c.endpoint], curve=curve)
        socks["plain"] = push_socket(ctx, [c.endpoint])
        for seq in range(3):
            assert socks["good"].poll(30_000, zmq.POLLOUT)  # the CURVE handshake completes
            socks["good"].send_multipart(chunk_frames(seq, producer="good"))
            for name in ("bad", "plain"):  # never connected: not writable (IMMEDIATE)
                if socks[name].poll(100, zmq.POLLOUT):
                    socks[name].send_multipart(chunk_frames(seq, producer=name))
        c.wait_for("the admitted producer", lambda: c.value(
            "saestream_received_messages_total", producer="good") == 3)
        time.sleep(1)
        assert c.value("saestream_received_messages_total") == 3  # nobody else got in
    finally:
        for sock in socks.values():
            sock.close(linger=0)
        ctx.term()
