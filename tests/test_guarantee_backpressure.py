"""Soak and fault suite (issue 9, item 6): sustained backpressure and hostile input, with real
processes on 127.0.0.1.

- A slow consumer and three fast producers for more than three minutes of backpressure:
  nothing is lost or duplicated, and every producer's tokens sent = received = trained +
  buffered, read from the consumer's final snapshot.
- Hostile peers (a `source` holding bytes, thousands of made-up producer ids, oversized
  frames, a flood of the largest chunks from more connections than admitted): the consumer
  counts the rejects, keeps training, still snapshots, and its memory and /metrics stay
  bounded.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from conftest import LoggedProcess, free_tcp_port, saestream_cmd, send_unless_stopped
from test_consumer import HOOK, Consumer, D, Sender, child_env, chunk_frames

from saestream.common.control import MAX_CONTROL_BYTES
from saestream.common.transport import CONTROL_HWM, push_socket
from saestream.common.wire import DecodeLimits, encode_chunk, lz4_bound
from saestream.consumer import checkpoint as ckpt
from saestream.consumer.ledger import KEEP_EPOCHS
from saestream.tools.status import by_name, fetch_samples, value

pytestmark = pytest.mark.slow

MAX_POS = 1 << 62
"""The end of the void range with which a producer closes an epoch (consumer/ledger.py)."""


def scrape(port: int) -> dict | None:
    try:
        return by_name(fetch_samples(f"127.0.0.1:{port}", timeout=5))
    except OSError:
        return None


def metric(m: dict | None, name: str, **labels: str) -> float:
    v = value(m, name, **labels) if m else None
    return 0.0 if v is None else v


def latest_snapshot(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


# -- 1. sustained backpressure -----------------------------------------------------------------

BACKPRESSURE_SECONDS = 180.0
SAMPLE_SECONDS = 5.0
WINDOW_SECONDS = 30.0
PRODUCERS = 3
BATCH = 4096
BUFFER = 2 * BATCH
SENT_RE = re.compile(
    r"producer (\S+) run (\S+): sent (\d+) tokens per hook in (\d+) messages(.*)$", re.M
)


class FastProducer(LoggedProcess):
    """`saestream producer` on the tiny model and the synthetic corpus, serving /metrics."""

    def __init__(self, tmp_path: Path, endpoint: str, i: int, producer_id: str) -> None:
        self.id = producer_id
        self.metrics_port = free_tcp_port()
        super().__init__(
            saestream_cmd(
                "producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
                "--connect", endpoint, "--producer-id", self.id, "--shard", f"{i}/{PRODUCERS}",
                "--chunk-tokens", "256", "--batch-size", "2", "--seq-len", "64",
                "--threads", "1", "--seed", "0", "--metrics-port", str(self.metrics_port),
                "--linger", "150",
            ),
            tmp_path / f"{self.id}.log", child_env(),
        )

    def metrics(self) -> dict | None:
        return scrape(self.metrics_port)


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in started:
        p.close()


def test_slow_consumer_and_three_fast_producers_lose_nothing_under_sustained_backpressure(
    tmp_path: Path, procs: list
) -> None:
    """Three minutes of a full consumer buffer and blocked producers lose and duplicate
    nothing: 0 sequence gaps, no rejects or rewinds, and for every producer the tokens it
    sent = the tokens the consumer received = trained + still buffered in the final
    snapshot, positions without holes."""
    c = Consumer(tmp_path, "--sae", "name=big,latents=16384,k=32", "--device", "cpu",
                 "--batch-size", str(BATCH), "--buffer-tokens", str(BUFFER))
    procs.append(c)
    # Ids in reverse alphabetical order of arrival: the consumer's ledger numbers producers
    # as they arrive, its snapshots list them by name, and the two must not be confused.
    ids = [f"fast-{chr(ord('a') + PRODUCERS - 1 - i)}" for i in range(PRODUCERS)]
    producers = [FastProducer(tmp_path, c.endpoint, 0, ids[0])]
    procs.extend(producers)
    c.wait_for(f"{ids[0]} first", lambda: c.value(
        "saestream_received_tokens_total", producer=ids[0]) > 0, timeout=120)
    producers += [FastProducer(tmp_path, c.endpoint, i, ids[i]) for i in range(1, PRODUCERS)]
    procs.extend(producers[1:])

    def alive() -> None:
        for p in producers:
            assert p.proc.poll() is None, f"{p.id} exited:\n{p.log()}"

    def blocked(p: FastProducer) -> float:
        return metric(p.metrics(), "saestream_producer_send_blocked_seconds_total")

    def under_backpressure() -> bool:
        alive()
        return c.value("saestream_buffer_tokens") == BUFFER and all(
            blocked(p) > 0 for p in producers)

    c.wait_for("a full buffer and three blocked producers", under_backpressure, timeout=180)

    # -- the soak: sample consumer and producers until BACKPRESSURE_SECONDS have passed --
    samples: list[dict] = []
    t0 = time.monotonic()
    while True:
        now = time.monotonic() - t0
        alive()
        assert c.proc.poll() is None, f"consumer exited:\n{c.log()}"
        cm = c.metrics()
        pms = [p.metrics() for p in producers]
        samples.append({
            "t": now, "steps": metric(cm, "saestream_train_steps_total"),
            "full": metric(cm, "saestream_buffer_tokens") == BUFFER,
            "gaps": metric(cm, "saestream_sequence_gaps_total"),
            "rejects": metric(cm, "saestream_rejected_messages_total"),
            "received": [metric(cm, "saestream_received_tokens_total", producer=p.id)
                         for p in producers],
            "blocked": [metric(pm, "saestream_producer_send_blocked_seconds_total")
                        for pm in pms],
            "rewinds": [metric(pm, "saestream_producer_rewinds_total") for pm in pms],
        })
        assert samples[-1]["gaps"] == 0, f"sequence gaps:\n{c.log()}"
        assert samples[-1]["rejects"] == 0, f"rejects:\n{c.log()}"
        if now >= BACKPRESSURE_SECONDS:
            break
        time.sleep(min(SAMPLE_SECONDS, BACKPRESSURE_SECONDS - now + 0.1))
    soak_seconds = samples[-1]["t"]
    assert soak_seconds >= BACKPRESSURE_SECONDS

    # It was backpressure all along: in every window of WINDOW_SECONDS the consumer trained
    # and its buffer was seen full, and every producer was blocked on it for a good part of
    # the window and still got tokens through (no connection stalled or dropped).
    per_window = round(WINDOW_SECONDS / SAMPLE_SECONDS)
    bounds = list(range(0, len(samples), per_window))
    if len(samples) - 1 - bounds[-1] < per_window // 2:
        bounds[-1] = len(samples) - 1  # a short tail joins the window before it
    else:
        bounds.append(len(samples) - 1)
    for lo, hi in itertools.pairwise(bounds):
        a, b = samples[lo], samples[hi]
        span = b["t"] - a["t"]
        where = f"window {a['t']:.0f}-{b['t']:.0f} s"
        assert b["steps"] > a["steps"], f"{where}: no training"
        assert any(s["full"] for s in samples[lo : hi + 1]), f"{where}: buffer never full"
        for i, p in enumerate(producers):
            assert b["blocked"][i] - a["blocked"][i] >= 0.25 * span, (
                f"{where}: {p.id} blocked only {b['blocked'][i] - a['blocked'][i]:.1f} s")
            assert b["received"][i] > a["received"][i], f"{where}: nothing from {p.id}"
    assert samples[-1]["rewinds"] == [0.0] * PRODUCERS  # nothing had to be re-sent

    # -- stop the producers gracefully: each sends what it holds, then exits --
    for p in producers:
        p.proc.send_signal(signal.SIGTERM)
    sent: dict[str, tuple[str, int, int]] = {}
    for p in producers:
        assert p.proc.wait(200) == 0, p.log()
        found = SENT_RE.findall(p.log())
        assert len(found) == 1, p.log()
        pid, run, tokens, messages, tail = found[0]
        assert pid == p.id and tail.strip() == "", f"chunks left unsent:\n{p.log()}"
        sent[p.id] = (run, int(tokens), int(messages))

    def received_all() -> bool:
        m = c.metrics()
        return m is not None and all(
            metric(m, "saestream_received_tokens_total", producer=p) == tokens
            for p, (_, tokens, _) in sent.items())

    try:
        c.wait_for("every sent token received", received_all, timeout=180)
    except AssertionError:
        m = c.metrics()
        got = {p: metric(m, "saestream_received_tokens_total", producer=p) for p in sent}
        raise AssertionError(f"sent {sent}, received {got}") from None
    m = c.metrics()
    for name in ("saestream_sequence_gaps_total", "saestream_rejected_messages_total",
                 "saestream_producer_restarts_total", "saestream_duplicate_tokens_total"):
        assert metric(m, name) == 0, name
    c.signal(signal.SIGTERM)
    assert c.wait_exit(120) == 0, c.log()

    # -- the final snapshot: per producer, received = sent = trained + buffered --
    snap = latest_snapshot(c.ckpt)
    extra = json.loads((snap / "extra.json").read_text())
    assert extra["reason"] == "final"
    ledger = extra["producers"]
    assert sorted(ledger) == sorted(sent)
    sources = ckpt.load_buffers(snap, extra)[HOOK].sources
    assert int((sources < 0).sum()) == 0
    buffered = torch.bincount(sources.long(), minlength=len(ledger)).tolist()
    for ordinal, (pid, entry) in enumerate(ledger.items()):
        run, tokens, messages = sent[pid]
        hl = entry["hooks"][HOOK]
        assert entry["received_tokens"] == hl["received_tokens"] == tokens, pid
        assert entry["trained_tokens"] + buffered[ordinal] == tokens, pid
        assert entry["trained_tokens"] == hl["trained_tokens"], pid
        assert hl["duplicate_tokens"] == 0, pid
        assert (entry["run"], entry["received_messages"], entry["last_seq"]) == (
            run, messages, messages - 1), pid
        # The positions received: every epoch from its start without a hole, each closed
        # epoch ending where its void begins; together exactly the tokens received. Epochs
        # more than KEEP_EPOCHS behind the producer's frontier are forgotten (wholly
        # accounted for); a fast producer passes that many, and each of its epochs reads the
        # same shard, so each forgotten epoch held as many tokens as every closed one kept.
        first = max(0, hl["low"][0] - KEEP_EPOCHS) if hl["low"] is not None else 0
        epochs = sorted(int(e) for e in hl["data"])
        assert epochs == list(range(first, first + len(epochs))), (pid, hl["low"], epochs)
        for e in epochs:
            ranges = hl["data"][str(e)]
            assert len(ranges) == 1 and ranges[0][0] == 0, (pid, e, ranges)
            if e < epochs[-1]:
                assert hl["void"][str(e)] == [[ranges[0][1], MAX_POS]], (pid, e)
        assert all(int(e) >= first for e in hl["void"]), pid
        closed = {hl["data"][str(e)][0][1] for e in epochs[:-1]}
        assert first == 0 or len(closed) == 1, (pid, closed)
        forgotten = first * next(iter(closed)) if first else 0
        assert forgotten + sum(r[0][1] for r in hl["data"].values()) == tokens, pid
    assert sum(e["trained_tokens"] for e in ledger.values()) == extra["tokens"]
    assert extra["tokens"] == extra["step"] * BATCH
    assert sum(buffered) == sources.numel()


# -- 2. hostile input ------------------------------------------------------------------------

MAX_PRODUCERS = 64
MAX_CHUNK_BYTES = 256 << 10
HWM = 4
MAX_CONNECTIONS = 8
STRANGERS = 3000
FLOOD_SOCKETS = MAX_CONNECTIONS + 4
FLOOD_SECONDS = 8.0
BIG_ROWS = MAX_CHUNK_BYTES // (D * 4)  # float32 rows of the largest chunk accepted
SLOW_SAE = "latents=16384,k=32"
"""Slow enough on a CPU that the receiver waits on a full buffer while the flood goes on, so
ZeroMQ's queues fill up to their limits: the worst case of the receive memory."""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    return [msgpack.packb({**header, **changes}, use_bin_type=True), frames[1]]


def send_all(sock: zmq.Socket, messages: list[list[bytes]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for frames in messages:
        while not sock.poll(100, zmq.POLLOUT):
            assert time.monotonic() < deadline, "the consumer stopped taking messages"
        sock.send_multipart(frames, copy=False)


def flood(ctx: zmq.Context, endpoint: str, frames: list[bytes], stop: threading.Event,
          sent: list[int]) -> None:
    """Push `frames` on a connection of its own as fast as the consumer takes them."""
    sock = push_socket(ctx, [endpoint], hwm=HWM, monitor=False)
    header = msgpack.unpackb(frames[0])
    seq = 0
    try:
        while send_unless_stopped(sock, [msgpack.packb({**header, "seq": seq}), frames[1]],
                                  stop, copy=False):
            seq += 1
    finally:
        sock.close(linger=0)
        sent.append(seq)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc for the RSS")
def test_hostile_input_never_stops_training(tmp_path: Path, procs: list) -> None:
    """A `source` holding bytes (or nesting, or a huge map), 3,000 made-up producer ids, frames
    beyond the size caps and a flood of the largest chunks from more connections than
    admitted: each bad message is counted as a reject by reason, the consumer keeps training,
    SIGUSR1 and the final SIGTERM snapshots succeed (exit 0), /metrics keeps at most
    --max-producers producer series, and the consumer's memory grows by no more than the
    receive budget it states."""
    c = Consumer(tmp_path, "--sae", SLOW_SAE, "--max-producers", str(MAX_PRODUCERS),
                 "--max-chunk-bytes", str(MAX_CHUNK_BYTES), "--hwm", str(HWM),
                 "--max-connections", str(MAX_CONNECTIONS), "--device", "cpu")
    procs.append(c)
    senders: list[Sender] = []
    ctx = zmq.Context()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def feed() -> Sender:
        """The well-behaved producer "good", sending in the background."""
        s = Sender(c.endpoint)
        senders.append(s)
        s.in_background(1_000_000, producer="good", seed=len(senders))
        return s

    def keeps_training(what: str) -> None:
        steps = c.steps()
        c.wait_for(f"training after {what}", lambda: c.steps() >= steps + 10)

    def rejects(reason: str) -> float:
        return c.value("saestream_rejected_messages_total", reason=reason)

    def snapshot(n: int) -> None:
        c.signal(signal.SIGUSR1)
        c.wait_for(f"snapshot {n}", lambda: c.value("saestream_checkpoints_total") == n)

    hostile = push_socket(ctx, [c.endpoint], hwm=HWM, monitor=False)
    try:
        good = feed()
        c.wait_for("training", lambda: c.steps() >= 10)
        snapshot(1)

        # The budget it states, from its limits: metric and start-up line.
        max_message = lz4_bound(MAX_CHUNK_BYTES) + DecodeLimits.max_header_nbytes
        budget = MAX_CONNECTIONS * ((HWM + 1) * max_message
                                   + (CONTROL_HWM + 1) * MAX_CONTROL_BYTES)
        assert c.value("saestream_receive_memory_budget_bytes") == budget
        assert f"receive memory bound {budget / 2**20:.0f} MiB" in c.log()

        # (a) A `source` that cannot be written as JSON: bytes, nesting, too many keys.
        ok = chunk_frames(0, producer="bytes-peer")
        send_all(hostile, [
            with_header(ok, source={"corpus": b"\x00\xff bytes"}),
            with_header(ok, source={"corpus": "x", "tags": [b"bytes in a list"]}),
            with_header(ok, source={"a": {"b": {"c": {"d": 1}}}}),
            with_header(ok, source={f"k{i}": i for i in range(1000)}),
        ])
        c.wait_for("four field rejects", lambda: rejects("field") == 4)
        snapshot(2)
        keeps_training("the bad sources")

        # (c) Frames beyond the caps. A chunk decoding to more than --max-chunk-bytes (small
        # on the wire) is a `size` reject; frames beyond ZeroMQ's message cap close their
        # connection before anything is buffered (they never reach the decoder: no reject).
        too_big = encode_chunk(torch.zeros(2 * BIG_ROWS, D), producer="big-peer", run="r",
                               seq=0, model="synthetic", hook=HOOK, source={}, codec="lz4",
                               dtype="float32")
        send_all(hostile, [too_big])
        c.wait_for("a size reject", lambda: rejects("size") == 1)
        huge = [msgpack.packb({"v": 1}), b"\x00" * (4 * max_message)]
        for _ in range(4):  # each reconnects and re-sends until closed
            sock = push_socket(ctx, [c.endpoint], hwm=1, monitor=False)
            assert sock.poll(10_000, zmq.POLLOUT)
            sock.send_multipart(huge, copy=False)

        # Then the largest chunks accepted, from more connections than admitted, while the
        # receiver waits on the full buffer: its queues fill, its memory must stay in budget.
        largest = encode_chunk(torch.randn(BIG_ROWS, D), producer="flood", run="r", seq=0,
                               model="synthetic", hook=HOOK, source={}, codec="raw",
                               dtype="float32")
        assert len(largest[1]) == MAX_CHUNK_BYTES
        before = 0
        for _ in range(20):
            before = max(before, rss_bytes(c.proc.pid))
            time.sleep(0.05)
        sent: list[int] = []
        threads += [threading.Thread(target=flood, args=(ctx, c.endpoint, largest, stop, sent),
                                     daemon=True) for _ in range(FLOOD_SOCKETS)]
        for t in threads:
            t.start()
        peak, deadline = before, time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(c.proc.pid))
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(30)
        assert sum(sent) > 0 and sent.count(0) >= FLOOD_SOCKETS - MAX_CONNECTIONS, sent
        assert c.value("saestream_refused_connections_total", socket="data") > 0
        c.wait_for("flood chunks received", lambda: c.value(
            "saestream_received_messages_total", producer="flood") > 0)
        keeps_training("the oversized frames and the flood")
        peak = max(peak, rss_bytes(c.proc.pid))
        assert peak - before <= budget, (
            f"RSS grew {(peak - before) / 2**20:.1f} MiB in the flood, beyond the stated "
            f"budget of {budget / 2**20:.1f} MiB")
        assert rejects("field") == 4  # the oversized frames were never decoded

        # (b) 3,000 made-up producer ids: --max-producers are tracked, the rest rejected
        # (sent while "good" pauses, so they are not interleaved with slow training steps).
        good.close()
        small = torch.randn(16, D)
        send_all(hostile, [
            encode_chunk(small, producer=f"stranger-{i:04d}", run="r", seq=0,
                         model="synthetic", hook=HOOK, source={"corpus": "made-up"},
                         dtype="float32")
            for i in range(STRANGERS)
        ], timeout=120)
        admitted = MAX_PRODUCERS - 2  # "good" and "flood" hold two slots
        c.wait_for("every stranger accepted or rejected", lambda: rejects("producers")
                   == STRANGERS - admitted, timeout=120)
        feed()
        keeps_training("3,000 producer ids")
        c.wait_for("the tracked-producers gauge", lambda: c.value(
            "saestream_producers_tracked") == MAX_PRODUCERS)

        with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics",
                                    timeout=10) as resp:
            body = resp.read()
        assert len(body) < 256 << 10, f"/metrics is {len(body)} bytes"
        m = c.metrics()
        assert m is not None
        names = {s.labels["producer"] for ss in m.values() for s in ss if "producer" in s.labels}
        assert len(names) == MAX_PRODUCERS and {"good", "flood"} <= names
        assert sum(n.startswith("stranger-") for n in names) == admitted
        for reason in ("error", "header", "frames", "version", "codec", "checksum"):
            assert rejects(reason) == 0, (reason, c.log())
        assert rejects("field") == 4 and rejects("size") == 1

        # Snapshots still succeed and training goes on; memory stayed within the budget.
        snapshot(3)
        assert c.value("saestream_checkpoint_failures_total") == 0
        keeps_training("the last snapshot")
        assert rss_bytes(c.proc.pid) - before <= budget
        saved = json.loads((latest_snapshot(c.ckpt) / "extra.json").read_text())
        assert saved["reason"] == "signal" and len(saved["producers"]) == MAX_PRODUCERS
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for s in senders:
            s.close()
        ctx.destroy(linger=0)
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0, c.log()
    assert "final snapshot" in c.log()
    final = json.loads((latest_snapshot(c.ckpt) / "extra.json").read_text())
    assert final["reason"] == "final"
