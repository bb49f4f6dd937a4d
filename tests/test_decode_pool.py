"""The receiver's decode pool (`--decode-threads`): the same chunks, in the same per-producer
order, with the same rejects, as inline decoding; and a full buffer still stops the reads."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
import zmq
from click.testing import CliRunner

from saestream.common.wire import decode_chunk, encode_chunk
from saestream.consumer.ledger import Ledger
from saestream.consumer.metrics import ConsumerMetrics
from saestream.consumer.receiver import Receiver

HOOK = "model.layers.1"
D = 16
N = 8


class CountingPull(zmq.Socket):
    """A PULL socket that counts the messages read from it."""

    reads: int = 0

    def recv_multipart(self, *args: Any, **kwargs: Any) -> list[Any]:
        frames = super().recv_multipart(*args, **kwargs)
        self.reads += 1
        return frames


class Sink:
    """Stands in for the shuffle buffer: keeps every put (producer index, rows), in order.
    While `gate` is clear a put blocks, as on a full buffer."""

    def __init__(self) -> None:
        self.puts: list[tuple[int, torch.Tensor]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()

    def get_or_create(self, hook: str, d: int, dtype: torch.dtype) -> Sink:
        return self

    def dtype_of(self, hook: str, first: torch.dtype) -> None:
        return None  # rows kept in their own dtype: nothing converted

    def put(self, acts: torch.Tensor, *, source: int, should_stop: Callable[[], bool],
            on_commit: Callable[[int, int], None]) -> int:
        while not self.gate.wait(0.01):
            self.blocked.set()
            if should_stop():
                return 0
        self.puts.append((source, acts.clone()))
        on_commit(0, int(acts.shape[0]))
        return int(acts.shape[0])

    def wake(self) -> None:
        pass


def chunk(producer: str, seq: int, *, acts: torch.Tensor | None = None, hook: str = HOOK,
          model: str = "m") -> list[bytes]:
    if acts is None:
        seed = zlib.crc32(f"{producer}/{seq}".encode())
        acts = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
    return encode_chunk(acts, producer=producer, run="r", seq=seq, model=model, hook=hook,
                        source={"corpus": "t", "epoch": 0, "start": seq * N,
                                "end": seq * N + acts.shape[0]}, dtype="bfloat16")


def malformed(i: int) -> tuple[list[bytes], str]:
    """A bad message and the reason it is counted under."""
    good = chunk("bad", i)
    header = msgpack.unpackb(good[0])
    nan = torch.randn(N, D)
    nan[i % N, i % D] = float("nan")
    cases = [
        ([b"one frame"], "frames"),
        ([b"\xc1", good[1]], "header"),
        ([msgpack.packb({**header, "checksum": header["checksum"] ^ 1}), good[1]], "checksum"),
        (chunk("bad", i, acts=nan), "nonfinite"),
        (chunk("bad", i, hook="other.hook"), "hook"),
        (chunk("bad", i, acts=torch.randn(N, D + 1)), "dim"),
        (chunk("bad", i, model="another"), "model"),
    ]
    return cases[i % len(cases)]


def messages(producers: int = 3, per_producer: int = 12) -> tuple[list[list[bytes]], dict]:
    """Interleaved producers with a malformed message after every fourth chunk; the first
    message fixes the hook's width and model. Returns the messages and the rejects by reason."""
    out: list[list[bytes]] = []
    rejects: dict[str, int] = {}
    for seq in range(per_producer):
        for p in range(producers):
            out.append(chunk(f"p{p}", seq))
            if len(out) % 4 == 0:
                frames, reason = malformed(len(out) // 4)
                out.append(frames)
                rejects[reason] = rejects.get(reason, 0) + 1
    return out, rejects


def run_receiver(batches: list[list[list[bytes]]], threads: int, sink: Sink | None = None,
                 until: Callable[[Receiver, Sink], bool] | None = None
                 ) -> tuple[Receiver, Sink, CountingPull]:
    """Send each batch of messages from its own PUSH connection, then receive them all."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL, socket_class=CountingPull)
    pull.bind("inproc://decode-pool")
    pushes = [ctx.socket(zmq.PUSH) for _ in batches]
    for push, batch in zip(pushes, batches, strict=True):
        push.connect("inproc://decode-pool")
        for frames in batch:
            push.send_multipart(frames)
    sink = sink or Sink()
    metrics = ConsumerMetrics()
    receiver = Receiver(pull, sink, metrics, Ledger(), hooks=[HOOK],  # type: ignore[arg-type]
                        poll_ms=10, decode_threads=threads)
    total = sum(len(b) for b in batches)
    receiver.start()
    try:
        deadline = time.monotonic() + 30
        done = until or (lambda r, _s: pull.reads == total and settled(r) == total)
        while not done(receiver, sink) and time.monotonic() < deadline:
            time.sleep(0.005)
            assert receiver.error is None
    finally:
        if until is None:
            receiver.stop()
            for push in pushes:
                push.close(linger=0)
            ctx.term()
    return receiver, sink, pull


def rejected(receiver: Receiver) -> dict[str, int]:
    out = {}
    for metric in receiver.metrics.rejected_messages.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.value:
                out[s.labels["reason"]] = int(s.value)
    return out


def accepted(receiver: Receiver) -> int:
    return int(sum(s.value for m in receiver.metrics.received_messages.collect()
                   for s in m.samples if s.name.endswith("_total")))


def settled(receiver: Receiver) -> int:
    return accepted(receiver) + sum(rejected(receiver).values())


def test_pool_decodes_what_inline_decodes_in_the_same_order(monkeypatch) -> None:
    msgs, rejects = messages()
    inline, inline_sink, _ = run_receiver([msgs], threads=1)
    decoded_on: set[str] = set()

    def decode(*args: Any, **kwargs: Any) -> Any:
        decoded_on.add(threading.current_thread().name.rstrip("0123456789"))
        return decode_chunk(*args, **kwargs)

    monkeypatch.setattr("saestream.consumer.receiver.decode_chunk", decode)
    pool, pool_sink, _ = run_receiver([msgs], threads=4)
    assert decoded_on == {"decode_"}
    assert pool.decode_threads == 4 and pool.max_in_flight == 8
    assert rejected(inline) == rejected(pool) == rejects
    assert len(pool_sink.puts) == len(inline_sink.puts) == 3 * 12
    for (src_a, acts_a), (src_b, acts_b) in zip(inline_sink.puts, pool_sink.puts, strict=True):
        assert src_a == src_b and torch.equal(acts_a.view(torch.int16), acts_b.view(torch.int16))
    assert pool.ledger.to_json() == inline.ledger.to_json()


def test_pool_keeps_each_producers_order_over_separate_connections() -> None:
    sent = {f"p{p}": [chunk(f"p{p}", seq) for seq in range(10)] for p in range(3)}
    receiver, sink, _ = run_receiver(list(sent.values()), threads=3)
    assert rejected(receiver) == {}
    names = {p.index: name for name, p in receiver.ledger.producers.items()}
    got: dict[str, list[torch.Tensor]] = {}
    for src, acts in sink.puts:
        got.setdefault(names[src], []).append(acts)
    for name, frames in sent.items():
        want = [decode_chunk(f).acts for f in frames]
        assert len(got[name]) == len(want)
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                   for a, b in zip(got[name], want, strict=True))
        assert receiver.ledger.producers[name].last_seq == 9
    gaps = [s.value for m in receiver.metrics.sequence_gaps.collect() for s in m.samples
            if s.name.endswith("_total")]
    assert gaps and not any(gaps)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_full_buffer_stops_the_reads(threads: int) -> None:
    msgs = [chunk("p0", seq) for seq in range(12)]
    sink = Sink()
    sink.gate.clear()  # the buffer is full
    receiver, sink, pull = run_receiver([msgs], threads, sink,
                                        until=lambda _r, s: s.blocked.is_set())
    try:
        assert sink.blocked.is_set()
        reads = pull.reads
        time.sleep(0.3)  # a receiver that kept reading would read on meanwhile
        assert pull.reads == reads <= receiver.max_in_flight == 2 * threads
        assert sink.puts == []
        sink.gate.set()  # room again: everything arrives, in order
        deadline = time.monotonic() + 30
        while len(sink.puts) < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [p.index for p in receiver.ledger.producers.values()] == [0]
        assert receiver.ledger.producers["p0"].last_seq == 11
        assert pull.reads == len(msgs) and len(sink.puts) == len(msgs)
    finally:
        receiver.stop()
        pull.context.destroy(linger=0)
    assert not receiver.is_alive() and receiver.error is None


def test_stop_while_blocked_on_a_full_buffer_ends_the_pool() -> None:
    sink = Sink()
    sink.gate.clear()
    receiver, sink, pull = run_receiver([[chunk("p0", s) for s in range(6)]], 3, sink,
                                        until=lambda _r, s: s.blocked.is_set())
    receiver.stop()
    pull.context.destroy(linger=0)
    assert not receiver.is_alive() and receiver.error is None
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]


def test_decode_threads_flag_is_validated_and_0_picks_a_default() -> None:
    from saestream.common.devices import codec_threads
    from saestream.consumer.cli import consumer
    from saestream.consumer.record_cli import record

    for command in (consumer, record):
        for bad in ("-1", "65", "two"):
            result = CliRunner().invoke(command, ["--hook", HOOK, "--decode-threads", bad])
            assert result.exit_code == 2 and "--decode-threads" in result.output
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PULL)
        receiver = Receiver(sock, Sink(), ConsumerMetrics(), Ledger(),  # type: ignore[arg-type]
                            hooks=[HOOK], decode_threads=0)
        assert receiver.decode_threads == codec_threads(0) >= 1
        with pytest.raises(ValueError):
            Receiver(sock, Sink(), ConsumerMetrics(), Ledger(),  # type: ignore[arg-type]
                     hooks=[HOOK], decode_threads=-1)
        sock.close(linger=0)
    finally:
        ctx.term()
