"""Recorded streams (issue 13, item 3): `--record`, `saestream record`, `train --input DIR/<hook>`,
`saestream replay`, with real processes and sockets on 127.0.0.1.

Record → replay → a consumer receives the same activations (checksums, bytes) in the same
per-producer order; a recording killed with SIGKILL mid-shard leaves only readable shards;
bad recordings (wrong format, a missing tensor, wrong shapes, NaN, a corrupt byte) are one
line on stderr and exit 2.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from conftest import LoggedProcess, free_tcp_port, run_cli, saestream_cmd, send_unless_stopped
from prometheus_client import CollectorRegistry
from test_consumer import HOOK, Consumer, child_env

from saestream.common.errors import UserError
from saestream.common.recording import (
    LOCK_NAME,
    TMP_PREFIX,
    Entry,
    Recording,
    RecordingError,
    RecordingLock,
    ShardWriter,
    new_writer_id,
    write_shard,
)
from saestream.common.transport import push_socket
from saestream.common.wire import decode_chunk, encode_chunk
from saestream.producer.config import ProducerConfig
from saestream.producer.replay import ReplayConfig, run_replay
from saestream.tools.status import by_name, fetch_samples, value

TIMEOUT = 120.0
D = 64


# -- helpers -----------------------------------------------------------------------------------


class Sink(LoggedProcess):
    """`saestream record` as a subprocess with a free port and metrics port."""

    def __init__(self, tmp_path: Path, out: Path, *args: str, port: int | None = None) -> None:
        self.port, self.metrics_port = port or free_tcp_port(), free_tcp_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        super().__init__(saestream_cmd(
            "record", "--bind", self.endpoint, "--hook", HOOK, "--out", str(out),
            "--metrics-port", str(self.metrics_port), "--log-every", "1", *args,
        ), tmp_path / f"sink-{self.port}-{self.metrics_port}.log", child_env())

    def value(self, name: str, **labels: str) -> float:
        try:
            v = value(by_name(fetch_samples(f"127.0.0.1:{self.metrics_port}", timeout=5)),
                      name, **labels)
        except OSError:
            return 0.0
        return 0.0 if v is None else v

    def wait_for(self, what: str, pred, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            assert self.proc.poll() is None, f"sink exited waiting for {what}:\n{self.log()}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)


def producer(tmp_path: Path, endpoint: str, pid: str, shard: str, *extra: str) -> LoggedProcess:
    return LoggedProcess(saestream_cmd(
        "producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
        "--connect", endpoint, "--producer-id", pid, "--shard", shard, "--chunk-tokens", "256",
        "--batch-size", "2", "--seq-len", "64", "--threads", "1", "--seed", "0", *extra,
    ), tmp_path / f"{pid}.log", child_env())


@pytest.fixture
def procs() -> Iterator[list[LoggedProcess]]:
    started: list[LoggedProcess] = []
    yield started
    for p in started:
        p.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator:
    """test_guarantee_disk's `tmpfs` fixture, imported when used: that module imports this
    one, so importing it here at the top would be a cycle."""
    from test_guarantee_disk import tmpfs_at

    with ExitStack() as stack:
        count = itertools.count()

        def mount(size: str = "16m") -> Path:
            return stack.enter_context(tmpfs_at(tmp_path / f"mnt{next(count)}", size))

        yield mount


def chunks_of(rec: Recording) -> list[tuple[Entry, np.ndarray]]:
    return [(e, np.array(s.chunk(e))) for s, e in rec.chunks()]


def by_producer(items: list[tuple[str, int, int, bytes]]) -> dict[str, list]:
    out: dict[str, list] = {}
    for producer_id, *rest in items:
        out.setdefault(producer_id, []).append(tuple(rest))
    return out


def sink_socket(endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    return ctx, sock


def receive(sock: zmq.Socket, until: float, count: int | None = None) -> list:
    got: list = []
    while time.monotonic() < until and (count is None or len(got) < count):
        if sock.poll(200):
            got.append(decode_chunk(sock.recv_multipart()))
    return got


def make_recording(root: Path, chunks: int = 6, n: int = 100, d: int = D,
                   shard_tokens: int = 250, producers: tuple[str, ...] = ("pa", "pb"),
                   dtype: torch.dtype = torch.bfloat16) -> Path:
    """A recording written by the real ShardWriter from chunks as a receiver decodes them."""
    lock = RecordingLock(root, "--out")
    writer = ShardWriter(root / HOOK, HOOK, shard_tokens, *new_writer_id())
    gen = torch.Generator().manual_seed(0)
    for i in range(chunks):
        pid = producers[i % len(producers)]
        seq = i // len(producers)
        frames = encode_chunk(torch.randn(n, d, generator=gen).to(dtype), producer=pid,
                              run="r1", seq=seq, model="tiny", hook=HOOK,
                              source={"corpus": "synthetic", "epoch": 0, "start": seq * n,
                                      "end": seq * n + n})
        c = decode_chunk(frames)
        signed = c.acts.view(torch.int16 if c.acts.element_size() == 2 else torch.int32)
        words = signed.numpy().view(np.uint16 if c.acts.element_size() == 2 else np.uint32)
        writer.add(words, c.dtype, c.model,
                   Entry(pid, "r1", seq, c.source, 0, n, c.header["checksum"], c.ts))
    writer.flush()
    lock.release()
    return root / HOOK


# -- record → replay → consumer -----------------------------------------------------------------


@pytest.mark.slow
def test_record_then_replay_gives_a_consumer_the_same_chunks_in_each_producers_order(
        tmp_path: Path, procs: list) -> None:
    # 1. two real producers → `saestream record`
    sink = Sink(tmp_path, tmp_path / "r1", "--record-shard-tokens", "1000")
    procs.append(sink)
    for pid, shard in (("prod-a", "0/2"), ("prod-b", "1/2")):
        procs.append(producer(tmp_path, sink.endpoint, pid, shard, "--max-tokens", "3000"))
    for p in procs[1:]:
        assert p.proc.wait(TIMEOUT) == 0, p.log()
    sink.wait_for("6000 rows", lambda: sink.value("saestream_received_tokens_total") >= 6000)
    assert sink.stop() == 0, sink.log()
    recorded = Recording(tmp_path / "r1" / HOOK)
    assert recorded.shape == (6000, D) and recorded.model == "tiny"
    assert len(recorded.shards) >= 6  # shards of 1000 rows, the last one written on SIGTERM
    original = chunks_of(recorded)
    assert {e.producer for e, _ in original} == {"prod-a", "prod-b"}

    # 2. the recording replayed into a real consumer that records what it accepts
    c = Consumer(tmp_path, "--record", str(tmp_path / "r2"), "--record-shard-tokens", "700")
    procs.append(c)
    replay = run_cli(["replay", str(tmp_path / "r1" / HOOK), "--connect", c.endpoint,
                      "--producer-id", "rp"], timeout=TIMEOUT, env=child_env())
    assert replay.returncode == 0, replay.stderr + c.log()
    assert "replayed 6000 rows in" in replay.stdout
    assert c.value("saestream_received_tokens_total", producer="rp") == 6000
    # the same id again: the consumer's ledger holds its stream, nothing is taken twice
    again_run = run_cli(["replay", str(tmp_path / "r1" / HOOK), "--connect", c.endpoint,
                         "--producer-id", "rp"], timeout=TIMEOUT, env=child_env())
    assert again_run.returncode == 0, again_run.stderr
    assert c.value("saestream_received_tokens_total", producer="rp") == 6000
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0, c.log()
    again = chunks_of(Recording(tmp_path / "r2" / HOOK))

    # 3. same bytes, same checksums, same order per recorded producer
    def key(items, prefix=""):
        return by_producer([(e.source[prefix + "producer"] if prefix else e.producer,
                             e.source[prefix + "seq"] if prefix else e.seq, e.checksum,
                             words.tobytes()) for e, words in items])

    assert key(again, "recorded_") == key(original)
    assert [e.source["start"] for e, _ in again] == \
        list(np.cumsum([0] + [e.n for e, _ in original])[:-1])
    assert all(e.producer == "rp" and e.source["corpus"].startswith("recording:")
               for e, _ in again)

    # 4. the recording trains as one dataset
    out = run_cli(["train", "--input", str(tmp_path / "r1" / HOOK), "--latents", "128", "--k",
                   "8", "--batch-size", "512", "--device", "cpu", "--out",
                   str(tmp_path / "trained")], timeout=TIMEOUT, env=child_env())
    assert out.returncode == 0, out.stderr
    assert f"on 6000 tokens from {tmp_path / 'r1' / HOOK}" in out.stdout
    cfg = json.loads(next((tmp_path / "trained").glob(f"step-*/{HOOK}/cfg.json")).read_text())
    assert (cfg["hook"], cfg["model"], cfg["d_in"]) == (HOOK, "tiny", D)


@pytest.mark.slow
def test_a_recording_killed_mid_shard_leaves_only_readable_shards(tmp_path: Path,
                                                                  procs: list) -> None:
    out = tmp_path / "rec"
    sink = Sink(tmp_path, out, "--record-shard-tokens", "512")
    procs.append(sink)
    procs.append(producer(tmp_path, sink.endpoint, "endless", "0/1"))
    sink.wait_for("a few shards", lambda: sink.value("saestream_recorded_shards_total") >= 4)
    sink.proc.send_signal(signal.SIGUSR1)  # writes the rows held at once
    sink.wait_for("the signal's sync", lambda: "signal sync: every accepted row" in sink.log())
    sink.wait_for("rows held for the next shard",
                  lambda: sink.value("saestream_record_pending_tokens") > 0)
    os.kill(sink.proc.pid, signal.SIGKILL)
    sink.proc.wait(30)
    hook_dir = out / HOOK
    names = [p.name for p in hook_dir.iterdir()]
    assert all(n.startswith(("shard-", TMP_PREFIX)) for n in names), names
    rec = Recording(hook_dir)  # every header and index readable
    rec.check_finite()  # every chunk's checksum and values
    entries = [e for _, e in rec.chunks()]
    assert rec.shape[0] == sum(e.n for e in entries) >= 4 * 512
    assert [e.seq for e in entries] == list(range(len(entries)))  # none missing in between
    for e, after in itertools.pairwise(entries):  # whole chunks: 256 rows, but an epoch's last
        assert e.n == 256 or after.source["epoch"] == e.source["epoch"] + 1, (e, after)

    # the next writer of the directory clears what the killed one left half-written
    (hook_dir / f"{TMP_PREFIX}left-over.safetensors").write_bytes(b"half a shard")
    lock = RecordingLock(out, "--out")
    lock.release()
    assert not list(hook_dir.glob(f"{TMP_PREFIX}*"))


@pytest.mark.slow
def test_a_sink_killed_under_a_looping_replay_gets_back_every_row_it_had_not_written(
        tmp_path: Path, procs: list) -> None:
    """The rows a killed sink held in memory were sent, never written: the replayer must
    propose the restarted sink what the dead one had on disk, not what it had sent (it did,
    and the restarted sink took the rest of that pass as never sent). `--loop` and shards too
    large to fill keep every row in memory until the kill."""
    hook_dir = make_recording(tmp_path / "src", chunks=20, n=500)
    sink = Sink(tmp_path, tmp_path / "rec", "--record-shard-tokens", "10000000")
    procs.append(sink)
    replay = LoggedProcess(saestream_cmd(
        "replay", str(hook_dir), "--loop", "--connect", sink.endpoint, "--producer-id", "rp",
    ), tmp_path / "replay.log", child_env())
    procs.append(replay)
    sink.wait_for("three passes", lambda: sink.value(
        "saestream_received_tokens_total", producer="rp") >= 30_000)
    os.kill(sink.proc.pid, signal.SIGKILL)
    sink.proc.wait(30)
    rewinds = replay.log().count("continuing there")
    assert not list((tmp_path / "rec" / HOOK).glob("shard-*"))  # nothing was written
    again = Sink(tmp_path, tmp_path / "rec", "--record-shard-tokens", "10000000",
                 port=sink.port)
    procs.append(again)
    # Its rows come back at once, from the pass the replayer is in; its proposal, with the
    # control channel's next request, puts the sink's origin back to the start.
    again.wait_for("the replayer's rewind",
                   lambda: replay.log().count("continuing there") > rewinds, 30)
    resent = again.value("saestream_received_tokens_total", producer="rp")
    again.wait_for("three passes more", lambda: again.value(
        "saestream_received_tokens_total", producer="rp") >= resent + 30_000)
    replay.proc.send_signal(signal.SIGTERM)
    assert replay.proc.wait(TIMEOUT) == 0, replay.log()
    assert again.stop() == 0, again.log()
    spans: dict[int, list[tuple[int, int]]] = {}
    for _, e in Recording(tmp_path / "rec" / HOOK).chunks():
        spans.setdefault(e.source["epoch"], []).append((e.source["start"], e.source["end"]))
    for got in spans.values():
        got.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(got)), got  # none twice
    for epoch in range(3):  # the passes the dead sink held in memory
        got = spans.get(epoch, [])
        assert got and got[0][0] == 0 and got[-1][1] == 10_000, (epoch, sorted(spans))
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got)), (epoch, got)


@pytest.mark.slow
def test_the_sink_trims_rows_it_already_holds_and_records_them_once(tmp_path: Path,
                                                                    procs: list) -> None:
    sink = Sink(tmp_path, tmp_path / "rec", "--control-bind", "off")
    procs.append(sink)
    ctx = zmq.Context()
    sock = push_socket(ctx, [sink.endpoint], hwm=4)
    gen = torch.Generator().manual_seed(1)
    stream = torch.randn(640, D, generator=gen).to(torch.bfloat16)
    try:
        for seq, (lo, hi) in enumerate([(0, 256), (256, 512), (128, 384), (384, 640)]):
            sock.send_multipart(encode_chunk(
                stream[lo:hi], producer="p", run="r", seq=seq, model="m", hook=HOOK,
                source={"corpus": "c", "split": "train", "shard": "0/1", "epoch": 0,
                        "start": lo, "end": hi}))
        sink.wait_for("the four chunks", lambda: sink.value(
            "saestream_received_messages_total", producer="p") == 4)
    finally:
        sock.close(linger=1000)
        ctx.term()
    assert sink.value("saestream_duplicate_tokens_total", producer="p") == 256 + 128
    assert sink.stop() == 0, sink.log()
    rec = Recording(tmp_path / "rec" / HOOK)
    spans = [(e.seq, e.source["start"], e.source["end"]) for _, e in rec.chunks()]
    assert spans == [(0, 0, 256), (1, 256, 512), (3, 512, 640)]
    assert torch.equal(rec.rows(np.arange(640)), stream.float())
    rec.check_finite()  # the trimmed chunk's own checksum


@pytest.mark.slow
def test_a_sink_keeps_a_recording_to_the_width_and_model_its_shards_hold(tmp_path: Path,
                                                                         procs: list) -> None:
    """Rows of another width or model were written beside the shards, and every reader then
    refused the whole directory: they are rejected instead, and a --d-in that contradicts
    the shards is refused at start."""
    hook_dir = make_recording(tmp_path / "rec", chunks=2)
    before = Recording(hook_dir).shape
    res = run_cli(["record", "--bind", f"tcp://127.0.0.1:{free_tcp_port()}", "--hook", HOOK,
                   "--out", str(tmp_path / "rec"), "--d-in", "32", "--metrics-port", "0"],
                  timeout=TIMEOUT, env=child_env())
    _one_line_exit_2(res, "holds rows of d=64 from model tiny")
    sink = Sink(tmp_path, tmp_path / "rec", "--control-bind", "off")
    procs.append(sink)
    ctx = zmq.Context()
    sock = push_socket(ctx, [sink.endpoint], hwm=4)
    try:
        for seq, (d, model) in enumerate([(32, "tiny"), (D, "other-model"), (D, "tiny")]):
            sock.send_multipart(encode_chunk(
                torch.ones(50, d, dtype=torch.bfloat16), producer="p", run="r", seq=seq,
                model=model, hook=HOOK, source={"epoch": 0, "start": 50 * seq,
                                                "end": 50 * seq + 50}))
        sink.wait_for("the chunk of the recording's kind", lambda: sink.value(
            "saestream_received_tokens_total", producer="p") == 50)
    finally:
        sock.close(linger=1000)
        ctx.term()
    assert sink.value("saestream_rejected_messages_total", reason="dim") == 1
    assert sink.value("saestream_rejected_messages_total", reason="model") == 1
    assert sink.stop() == 0, sink.log()
    assert Recording(hook_dir).shape == (before[0] + 50, D)  # the directory still reads


# -- replay on its own --------------------------------------------------------------------------


def replay_into_socket(rec: Path, *, shard: str = "0/1", loop: bool = False,
                       seconds: float = 30.0, count: int | None = None,
                       registry: CollectorRegistry | None = None):
    port = free_tcp_port()
    ctx, sock = sink_socket(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()
    cfg = ReplayConfig(rec, loop, send=ProducerConfig(
        connect=[f"tcp://127.0.0.1:{port}"], control_connect=["off"], shard=shard,
        producer_id=f"replay-{shard}", linger=1.0))
    result: list = []
    t = threading.Thread(target=lambda: result.append(run_replay(cfg, stop, registry)))
    t.start()
    try:
        got = receive(sock, time.monotonic() + seconds, count)
        stop.set()
        t.join(30)
        got += receive(sock, time.monotonic() + 1.5)  # what was on its way
    finally:
        stop.set()
        t.join(30)
        sock.close(linger=0)
        ctx.term()
    return got, result[0] if result else None


def test_replay_shards_split_a_recording_and_loop_repeats_it(tmp_path: Path) -> None:
    hook_dir = make_recording(tmp_path / "rec", chunks=7)
    rec = Recording(hook_dir)
    all_sums = [e.checksum for _, e in rec.chunks()]
    parts = [replay_into_socket(hook_dir, shard=s, count=4 - int(s[0]))[0]
             for s in ("0/2", "1/2")]
    assert [c.header["checksum"] for c in parts[0]] == all_sums[0::2]
    assert [c.header["checksum"] for c in parts[1]] == all_sums[1::2]
    assert [c.source["start"] for c in parts[1]] == [0, 100, 200]  # its own positions

    registry = CollectorRegistry()
    got, summary = replay_into_socket(hook_dir, loop=True, count=3 * 7, registry=registry)
    assert summary is not None and summary.passes >= 2
    epochs = [c.source["epoch"] for c in got]
    assert epochs == sorted(epochs) and epochs[-1] >= 2
    for e in range(2):
        one_pass = [c for c in got if c.source["epoch"] == e]
        assert [c.header["checksum"] for c in one_pass] == all_sums
        assert [c.source["recorded_producer"] for c in one_pass] == \
            [e.producer for _, e in rec.chunks()]
        assert one_pass[0].source["start"] == 0 and one_pass[-1].source["end"] == 700
    assert [c.seq for c in got] == list(range(len(got)))
    assert registry.get_sample_value("saestream_producer_tokens_total", {"hook": HOOK}) \
        == summary.tokens == sum(c.n for c in got)


@pytest.mark.parametrize("source", ["64 lists of 256 ints", "64 strings of 900 chars"])
def test_chunks_with_rich_provenance_are_split_into_shards_every_reader_opens(
        tmp_path: Path, source: str) -> None:
    """`source` as large as the wire carries: 4,096 such chunks in one shard made a header
    of about 240 MB (strings) or an index of 67 million values, which readers refuse; the writer
    closes a shard before its index passes what they accept (recording.INDEX_BYTES, the
    1,048,576 values of bounded_json), whatever the chunk count."""
    if source.endswith("ints"):
        src, chunks = {f"k{j}": list(range(256)) for j in range(64)}, 200  # 16,500 values each
    else:
        src, chunks = {f"k{j}": "x" * 900 for j in range(64)}, 700  # 58 KB each
    frames = encode_chunk(torch.zeros(1, 4).to(torch.bfloat16), producer="p", run="r", seq=0,
                          model="m", hook=HOOK, source=src)
    assert decode_chunk(frames).source == src  # the wire carries it
    root = tmp_path / "rec"
    lock = RecordingLock(root, "--out")
    writer = ShardWriter(root / HOOK, HOOK, 1 << 30, *new_writer_id())  # never full by rows
    words = np.arange(4, dtype=np.uint16).reshape(1, 4)
    written = []
    for i in range(chunks):
        written += writer.add(words, "bfloat16", "m",
                              Entry("p", "r", i, src, 0, 1, _crc(words), 0.0))
    written += writer.flush()
    lock.release()
    assert all(type(w).__name__ == "Written" for w in written)
    assert len(written) >= 3  # split by the index's size, not by rows or chunk count
    rec = Recording(root / HOOK)  # every header and index read and checked
    assert rec.shape == (chunks, 4)
    assert [e.seq for shard in rec.shards for e in shard.entries] == list(range(chunks))
    assert all(e.source == src for shard in rec.shards for e in shard.entries)


def test_a_recording_reads_as_one_dataset_across_shards_and_dtypes(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    lock = RecordingLock(root, "--out")
    writer = ShardWriter(root / HOOK, HOOK, 150, *new_writer_id())
    rows = []
    for i, dtype in enumerate(["bfloat16", "float32", "float32", "float16"]):
        x = torch.randn(100, D).to(getattr(torch, dtype))
        rows.append(x.float())
        words = x.view(torch.int32 if x.element_size() == 4 else torch.int16).numpy()
        writer.add(words.view(np.uint32 if x.element_size() == 4 else np.uint16), dtype, "m",
                   Entry("p", "r", i, {}, 0, 100, _crc(words), 0.0))
    writer.flush()
    lock.release()
    rec = Recording(root / HOOK)
    assert [s.dtype for s in rec.shards] == ["bfloat16", "float32", "float16"]  # a dtype each
    assert rec.shape == (400, D)
    index = np.array([0, 99, 100, 150, 299, 300, 399])
    assert torch.equal(rec.rows(index), torch.cat(rows)[index])
    rec.check_finite()


def _crc(words: np.ndarray) -> int:
    import zlib

    return zlib.crc32(np.ascontiguousarray(words))


# -- bad input: one line, exit 2 --------------------------------------------------------------


def _shard(hook_dir: Path, name: str = "shard-20260101T000000Z-0000abcd-000001.safetensors",
           *, rows: int = 4, d: int = D, tensor: str = "acts", values: np.ndarray | None = None,
           index_rows: int | None = None, fmt: str = "saestream-recording-1",
           dtype: str = "float32") -> Path:
    hook_dir.mkdir(parents=True, exist_ok=True)
    x = np.zeros((rows, d), np.float32) + 0.5 if values is None else values
    words = x.view(np.uint32)
    entries = [{"producer": "p", "run": "r", "seq": 0, "source": {}, "row": 0,
                "n": rows if index_rows is None else index_rows, "checksum": _crc(words),
                "ts": 0.0}]
    path = hook_dir / name
    write_shard(path, [words], dtype, meta={
        "saestream.format": fmt, "saestream.hook": HOOK, "saestream.model": "m",
        "saestream.dtype": dtype, "saestream.chunks": json.dumps(entries)})
    if tensor != "acts":  # same length, so offsets stay right
        path.write_bytes(path.read_bytes().replace(b'"acts"', json.dumps(tensor).encode(), 1))
    return path


def _bad(kind: str, hook_dir: Path) -> None:
    if kind == "empty directory":
        hook_dir.mkdir(parents=True)
    elif kind == "not safetensors":
        hook_dir.mkdir(parents=True)
        (hook_dir / "shard-20260101T000000Z-0000abcd-000001.safetensors").write_bytes(
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif kind == "not a recording":
        _shard(hook_dir, fmt="something-else")
    elif kind == "missing tensor":
        _shard(hook_dir, tensor="xyzw")
    elif kind == "wrong shape":
        _shard(hook_dir, index_rows=3)
    elif kind == "widths differ":
        _shard(hook_dir)
        _shard(hook_dir, "shard-20260101T000000Z-0000abcd-000002.safetensors", d=D + 1)
    elif kind == "nan":
        x = np.zeros((4, D), np.float32)
        x[2, 5] = np.nan
        _shard(hook_dir, values=x)
    elif kind == "corrupt byte":
        path = _shard(hook_dir)
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x40
        path.write_bytes(bytes(raw))
    else:
        raise AssertionError(kind)


BAD = {
    "empty directory": "no recorded shards",
    "not safetensors": "not a saestream recording shard",
    "not a recording": "not a saestream recording shard",
    "missing tensor": "no tensor 'acts'",
    "wrong shape": "its chunk index covers 3 rows, the tensor holds 4",
    "widths differ": "one hook per directory",
    "nan": "NaN or infinite value",
    "corrupt byte": "checksum mismatch",
}


def _one_line_exit_2(result, expected: str) -> None:
    """Exit 2 and one error line, the last (a replayer that found a bad chunk while sending
    has logged its start before)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("saestream: error: ")]
    assert errors == lines[-1:], result.stderr
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_recording_is_one_line_and_exit_2_for_train(tmp_path: Path, kind: str) -> None:
    hook_dir = tmp_path / "rec" / HOOK
    _bad(kind, hook_dir)
    with pytest.raises(RecordingError, match=BAD[kind].replace("(", r"\(")):
        Recording(hook_dir).check_finite()
    result = run_cli(["train", "--input", str(hook_dir), "--out", str(tmp_path / "ck"),
                      "--device", "cpu"], timeout=TIMEOUT)
    _one_line_exit_2(result, BAD[kind])


@pytest.mark.parametrize("kind", ["not a recording", "missing tensor", "nan", "corrupt byte"])
def test_a_bad_recording_is_one_line_and_exit_2_for_replay(tmp_path: Path, kind: str) -> None:
    hook_dir = tmp_path / "rec" / HOOK
    _bad(kind, hook_dir)
    result = run_cli(["replay", str(hook_dir), "--connect", f"tcp://127.0.0.1:{free_tcp_port()}",
                      "--control-connect", "off", "--linger", "0", "--verify"], timeout=TIMEOUT)
    _one_line_exit_2(result, BAD[kind])


@pytest.mark.slow
def test_a_corrupt_chunk_is_refused_by_the_consumer_and_stops_the_replayer(
        tmp_path: Path, procs: list) -> None:
    """Without --verify the consumer is the check: it rejects the chunk, reports the hole,
    and the replayer, re-sending from there with every chunk checked, exits 2."""
    hook_dir = make_recording(tmp_path / "rec", chunks=6)
    path = Recording(hook_dir).shards[-1].path
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # one bit of the last chunk
    path.write_bytes(bytes(raw))
    c = Consumer(tmp_path, "--min-fill", "0.01")
    procs.append(c)
    result = run_cli(["replay", str(hook_dir), "--connect", c.endpoint, "--linger", "1",
                      "--producer-id", "rp"], timeout=TIMEOUT, env=child_env())
    _one_line_exit_2(result, "checksum mismatch")
    assert c.value("saestream_rejected_messages_total", reason="checksum") == 1
    assert c.value("saestream_received_tokens_total", producer="rp") == 500  # the good five


def test_recording_directories_are_checked_before_any_socket_is_bound(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    port = free_tcp_port()
    result = run_cli(["record", "--bind", f"tcp://127.0.0.1:{port}", "--hook", HOOK, "--out",
                      str(a_file), "--metrics-port", "0"], timeout=TIMEOUT)
    _one_line_exit_2(result, "is a file")
    held = RecordingLock(tmp_path / "busy", "--record")
    try:
        result = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{port}", "--hook", HOOK,
                          "--record", str(tmp_path / "busy"), "--checkpoint-dir",
                          str(tmp_path / "ck"), "--metrics-port", "0"], timeout=TIMEOUT)
        _one_line_exit_2(result, "another process is recording into it")
    finally:
        held.release()
    assert (tmp_path / "busy" / LOCK_NAME).exists()
    result = run_cli(["record", "--bind", f"tcp://127.0.0.1:{port}", "--hook", "a/b", "--out",
                      str(tmp_path / "x"), "--metrics-port", "0"], timeout=TIMEOUT)
    _one_line_exit_2(result, "not usable as a directory name")


# -- a failing disk -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_costs_the_recording_shards_never_the_training(tmpfs, tmp_path: Path,
                                                                   procs: list) -> None:
    mnt = tmpfs("1m")
    c = Consumer(tmp_path, "--record", str(mnt / "rec"), "--record-shard-tokens", "1024")
    procs.append(c)
    ctx = zmq.Context()
    sock = push_socket(ctx, [c.endpoint], hwm=4)
    gen = torch.Generator().manual_seed(0)
    stop = threading.Event()

    def feed() -> None:
        seq = 0
        while send_unless_stopped(sock, encode_chunk(
                torch.randn(256, D, generator=gen), producer="p", run="r", seq=seq,
                model="m", hook=HOOK, source={}, dtype="float32"), stop):
            seq += 1

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        c.wait_for("a shard lost to the full disk", lambda: c.value(
            "saestream_record_failures_total", reason="no_space") >= 1)
        steps = c.steps()
        c.wait_for("training going on", lambda: c.steps() >= steps + 10)
        assert c.value("saestream_record_dropped_tokens_total", hook=HOOK) >= 1024
    finally:
        stop.set()
        t.join(10)
        sock.close(linger=0)
        ctx.term()
    assert c.value("saestream_recorded_shards_total", hook=HOOK) >= 1  # those that fitted
    # Checked once the consumer has exited: while it runs, a shard may be in the middle of
    # its write (a temporary file for a moment), and its exit writes one more on a full disk.
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0, c.log()
    assert not list((mnt / "rec" / HOOK).glob(f"{TMP_PREFIX}*"))
    Recording(mnt / "rec" / HOOK).check_finite()


def test_shard_files_are_safetensors_that_other_tools_read(tmp_path: Path) -> None:
    from safetensors import safe_open

    hook_dir = make_recording(tmp_path / "rec", chunks=5)
    rec = Recording(hook_dir)
    for shard in rec.shards:
        with safe_open(str(shard.path), "pt") as f:
            assert list(f.keys()) == ["acts"]
            acts = f.get_tensor("acts")
            assert acts.dtype == torch.bfloat16 and acts.shape == (shard.rows, D)
            index = json.loads(f.metadata()["saestream.chunks"])
        assert [e["seq"] for e in index] == [e.seq for e in shard.entries]
        assert struct.unpack("<Q", shard.path.read_bytes()[:8])[0] % 8 == 0


def test_a_restarted_recorder_does_not_record_positions_its_shards_hold(tmp_path: Path) -> None:
    """After a crash the producers re-send what the last snapshot did not hold; rows already
    in a written shard are skipped (counted), the rest of such a chunk is recorded."""
    from saestream.consumer.metrics import ConsumerMetrics
    from saestream.consumer.recorder import Recorder

    stream = torch.randn(700, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def chunk(seq: int, lo: int, hi: int, producer: str = "p"):
        return decode_chunk(encode_chunk(
            stream[lo:hi], producer=producer, run=f"r{seq}", seq=seq, model="m", hook=HOOK,
            source={"corpus": "c", "split": "train", "shard": "0/1", "epoch": 0,
                    "start": lo, "end": hi}))

    def session(chunks: list) -> ConsumerMetrics:
        metrics = ConsumerMetrics()
        rec = Recorder(tmp_path / "rec", [HOOK], 200, metrics, flag="--record")
        rec.start()
        for c in chunks:
            rec.add(c, [(0, c.n)], lambda: False)
        rec.stop()
        return metrics

    session([chunk(0, 0, 300), chunk(1, 300, 400)])
    # the second session: a re-send overlapping both chunks, new rows, another producer
    m = session([chunk(0, 250, 500), chunk(1, 500, 700), chunk(0, 0, 100, producer="q")])
    skipped = m.record_skipped_tokens.labels(hook=HOOK)._value.get()
    assert skipped == 150
    rec = Recording(tmp_path / "rec" / HOOK)
    spans = sorted((e.producer, e.source["start"], e.source["end"]) for _, e in rec.chunks())
    assert spans == [("p", 0, 300), ("p", 300, 400), ("p", 400, 500), ("p", 500, 700),
                     ("q", 0, 100)]
    rec.check_finite()  # the trimmed chunk got its own checksum
    by_start = {e.source["start"]: s.chunk(e) for s, e in rec.chunks() if e.producer == "p"}
    got = np.concatenate([by_start[k] for k in sorted(by_start)])
    assert np.array_equal(got, stream.view(torch.int16).numpy().view(np.uint16))


# -- hostile recordings and directories: one line, exit 2, never a traceback or a hang -------


HOSTILE_TIMEOUT = 60.0
"""A hang (a FIFO opened for reading, a lock file opened for writing) fails the test here."""


def _refused(result, expected: str) -> None:
    """Exit 2, exactly one `saestream: error:` line (the last), no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("saestream: error: ")]
    assert errors == lines[-1:], result.stderr
    assert expected in errors[0], errors[0]


def _replay(hook_dir: Path, *args: str):
    return run_cli(["replay", str(hook_dir), "--connect", f"tcp://127.0.0.1:{free_tcp_port()}",
                    "--control-connect", "off", "--linger", "0", *args],
                   timeout=HOSTILE_TIMEOUT)


def _train(hook_dir: Path, tmp_path: Path):
    return run_cli(["train", "--input", str(hook_dir), "--out", str(tmp_path / "ck"),
                    "--device", "cpu"], timeout=HOSTILE_TIMEOUT)


def _record(out: Path):
    return run_cli(["record", "--bind", f"tcp://127.0.0.1:{free_tcp_port()}", "--hook", HOOK,
                    "--out", str(out), "--metrics-port", "0"], timeout=HOSTILE_TIMEOUT)


def _rewrite_header(path: Path, edit) -> None:
    """Give the shard at `path` the header `edit(header)` returns (a dict, or raw bytes),
    keeping its rows."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    new = edit(json.loads(raw[8:8 + n]))
    head = new if isinstance(new, bytes) else json.dumps(new).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


def _edit_index(edit):
    def header_edit(header: dict) -> dict:
        entries = json.loads(header["__metadata__"]["saestream.chunks"])
        edit(entries[0])
        header["__metadata__"]["saestream.chunks"] = json.dumps(entries)
        return header
    return header_edit


def _edit_meta(key: str, value):
    def header_edit(header: dict) -> dict:
        header["__metadata__"][key] = value
        return header
    return header_edit


def _edit_offsets(offsets):
    def header_edit(header: dict) -> dict:
        header["acts"]["data_offsets"] = offsets(header["acts"]["data_offsets"])
        return header
    return header_edit


MALFORMED = {  # D4: headers that pass the type checks of old and fail deeper
    "offsets strings": (_edit_offsets(lambda o: ["0", "x"]), "does not fit its bytes"),
    "offsets null": (_edit_offsets(lambda o: [None, None]), "does not fit its bytes"),
    "offsets floats": (_edit_offsets(lambda o: [float(v) for v in o]),
                       "does not fit its bytes"),
    "nested header": (lambda h: b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "nested index": (_edit_meta("saestream.chunks", "[" * 100_000 + "]" * 100_000),
                     "nested too deeply"),
    # 3 bytes each, 64 bytes each once parsed: a 64 MiB header of them took over 2 GB
    "an index of a million empty maps": (
        _edit_meta("saestream.chunks", "[" + "{}," * (1 << 20) + "{}]"),
        "its chunk index is refused: it holds more than 1,048,576 JSON values"),
    "a header of a million empty arrays": (
        lambda h: {**h, "junk": [[]] * ((1 << 20) + 1)},
        "it holds more than 1,048,576 JSON values"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_shard_header_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    edit, expected = MALFORMED[kind]
    hook_dir = tmp_path / "rec" / HOOK
    _rewrite_header(_shard(hook_dir), edit)
    with pytest.raises(RecordingError, match=expected):
        Recording(hook_dir)
    _refused(_train(hook_dir, tmp_path), expected)
    _refused(_replay(hook_dir), expected)


UNSENDABLE = {  # D5 and the log injection: what the wire cannot carry, refused at start
    "model too long": (_edit_meta("saestream.model", "m" * 1025), "model"),
    "hook too long": (_edit_meta("saestream.hook", "h" * 1025), "hook"),
    "hook not a name": (_edit_meta("saestream.hook", "../../etc\n\x1b[31mEVIL"),
                        r"hook ../../etc\n\x1b[31mEVIL"),
    "source int beyond 64 bits": (_edit_index(lambda e: e["source"].update(x=1 << 70)),
                                  "source[x] holds an int beyond 64 bits"),
    "seq beyond 63 bits": (_edit_index(lambda e: e.update(seq=1 << 64)), "seq is not an int"),
    "checksum beyond 32 bits": (_edit_index(lambda e: e.update(checksum=e["checksum"]
                                                                + (1 << 64))),
                                "checksum is not an int"),
    "ts not finite": (_edit_index(lambda e: e.update(ts=float("nan"))), "ts is not a finite"),
    "a 2 MB source string": (_edit_index(lambda e: e["source"].update(blob="x" * 2_000_000)),
                             "a str over 65536 chars"),
    "a header over 64 KiB": (_edit_index(lambda e: e["source"].update(
        {f"k{i}": "x" * 2000 for i in range(40)})), "receivers accept at most 65536"),
}


@pytest.mark.parametrize("kind", sorted(UNSENDABLE))
def test_a_recording_the_wire_cannot_carry_is_refused_before_anything_is_sent(
        tmp_path: Path, kind: str) -> None:
    """Without --verify: the replayer used to start, and its sending thread died on the
    first chunk it could not encode (a traceback, exit 1)."""
    edit, expected = UNSENDABLE[kind]
    hook_dir = tmp_path / "rec" / HOOK
    _rewrite_header(_shard(hook_dir), edit)
    result = _replay(hook_dir)
    _refused(result, expected)
    assert "\x1b" not in result.stderr and "replayer" not in result.stderr  # nothing started


def test_a_producer_id_the_wire_cannot_carry_is_refused(tmp_path: Path) -> None:
    hook_dir = tmp_path / "rec" / HOOK
    _shard(hook_dir)
    _refused(_replay(hook_dir, "--producer-id", "p" * 1025), "--producer-id: at most 1024")


def test_a_file_named_like_a_shard_that_is_not_a_regular_file_is_refused(
        tmp_path: Path) -> None:
    """D7: a FIFO named shard-*.safetensors blocked the reader in open() forever."""
    from saestream.consumer.metrics import ConsumerMetrics
    from saestream.consumer.recorder import Recorder

    hook_dir = tmp_path / "rec" / HOOK
    _shard(hook_dir)
    os.mkfifo(hook_dir / "shard-20260101T000000Z-0000abcd-000002.safetensors")
    _refused(_replay(hook_dir), "not a regular file")
    _refused(_train(hook_dir, tmp_path), "not a regular file")
    # the recorder's start-up scan passes it over (a warning), and starts
    made: list = []
    t = threading.Thread(target=lambda: made.append(Recorder(
        tmp_path / "rec", [HOOK], 100, ConsumerMetrics(), flag="--out")), daemon=True)
    t.start()
    t.join(HOSTILE_TIMEOUT)
    assert made, "the recorder's start-up scan blocked on the FIFO"
    made[0].lock.release()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_one_line_and_exit_2(
        tmp_path: Path, kind: str) -> None:
    """D3: `DIR/.lock` a directory was a traceback (IsADirectoryError); a FIFO, a hang."""
    out = tmp_path / "rec"
    out.mkdir()
    if kind == "directory":
        (out / LOCK_NAME).mkdir()
    else:
        os.mkfifo(out / LOCK_NAME)
    _refused(_record(out), f"its lock file {LOCK_NAME}")


def _read_only_hook_dir(hook_dir: Path, stack) -> None:
    """`hook_dir` holding a stale temporary, and not writable (a read-only tmpfs where this
    runs as root, whom permission bits do not stop; else mode 0555)."""
    from test_guarantee_disk import remount, tmpfs_at

    if os.geteuid() == 0:
        stack.enter_context(tmpfs_at(hook_dir, "1m"))
        (hook_dir / f"{TMP_PREFIX}left-over.safetensors").write_bytes(b"half a shard")
        remount(hook_dir, "ro")
    else:
        hook_dir.mkdir(parents=True)
        (hook_dir / f"{TMP_PREFIX}left-over.safetensors").write_bytes(b"half a shard")
        hook_dir.chmod(0o555)
        stack.callback(hook_dir.chmod, 0o755)


def test_a_stale_temporary_that_cannot_be_removed_is_one_line_and_exit_2(
        tmp_path: Path) -> None:
    """D2: a read-only DIR/<hook> holding a `.tmp-shard-*` was a traceback (OSError). The
    recorder checks its hook directories first, so it is refused as not writable; without
    that check, removing the temporary is refused in one line (the unit check below)."""
    out = tmp_path / "rec"
    with ExitStack() as stack:
        _read_only_hook_dir(out / HOOK, stack)
        _refused(_record(out), f"{HOOK}: not writable (Read-only file system)")
        with pytest.raises(UserError, match=f"cannot remove {TMP_PREFIX}left-over"):
            RecordingLock(out, "--out")


def test_hook_directories_must_be_writable_directories(tmp_path: Path) -> None:
    """`check_hook_dirs` (through RecordingLock's `hooks`): a hook's directory that exists
    must be a directory a shard can be written into; one missing is made later."""
    from saestream.common.errors import UserError
    from saestream.common.recording import check_hook_dirs

    out = tmp_path / "rec"
    out.mkdir()
    check_hook_dirs(out, [HOOK], "--out")  # missing: fine, and not made here
    assert not (out / HOOK).exists()
    (out / HOOK).write_text("not a directory")
    with pytest.raises(UserError, match=f"--out {out}: {HOOK} .* is not a directory"):
        RecordingLock(out, "--out", hooks=[HOOK])
    RecordingLock(out, "--out").release()  # the failed one released the lock
    (out / HOOK).unlink()
    with ExitStack() as stack:
        _read_only_hook_dir(out / HOOK, stack)
        with pytest.raises(UserError, match="not writable"):
            check_hook_dirs(out, [HOOK], "--out")
