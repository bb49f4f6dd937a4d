"""PUSH/PULL helpers over real sockets on 127.0.0.1, with and without CURVE."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from saestream.common.errors import UserError
from saestream.common.keygen import write_keypair
from saestream.common.transport import (
    ConnectionMonitor,
    CurveClientKeys,
    CurveServerKeys,
    _shutdown_fd,
    _socket_cookie,
    is_loopback_endpoint,
    pull_socket,
    push_socket,
)
from saestream.common.wire import decode_chunk, encode_chunk

REJECT_WAIT_MS = 1500  # how long an unauthorised producer's message must fail to arrive


def chunk_frames(producer: str, seq: int = 0) -> list[bytes]:
    return encode_chunk(torch.randn(8, 16), producer=producer, run="r", seq=seq, model="tiny",
                        hook="model.layers.0", source={"corpus": "test"})


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    write_keypair(tmp_path / "server", "consumer")
    write_keypair(tmp_path / "authorized", "good")
    write_keypair(tmp_path / "other", "intruder")
    return {
        "server_secret": tmp_path / "server" / "consumer.key_secret",
        "server_public": tmp_path / "server" / "consumer.key",
        "authorized": tmp_path / "authorized",
        "good_secret": tmp_path / "authorized" / "good.key_secret",
        "intruder_secret": tmp_path / "other" / "intruder.key_secret",
    }


def test_plain_push_to_pull_delivers_chunks(ctx, free_port) -> None:
    pull = pull_socket(ctx, f"tcp://127.0.0.1:{free_port}")
    push = push_socket(ctx, [f"tcp://127.0.0.1:{free_port}"])
    push.send_multipart(chunk_frames("p0"))
    assert pull.poll(5000)
    chunk = decode_chunk(pull.recv_multipart(copy=False))
    assert chunk.producer == "p0"
    push.close()
    pull.close()


def test_push_deals_chunks_to_several_consumers(ctx) -> None:
    pulls = [pull_socket(ctx, "tcp://127.0.0.1:*") for _ in range(2)]
    push = push_socket(ctx, [p.getsockopt_string(zmq.LAST_ENDPOINT) for p in pulls])
    poller = zmq.Poller()
    for pull in pulls:
        poller.register(pull, zmq.POLLIN)
    got: list[list[int]] = [[], []]
    sent = 0
    # Round-robin over the peers whose connection is up: keep sending until both have some.
    while sent < 200 and not (got[0] and got[1]):
        push.send_multipart(chunk_frames("p0", sent))
        sent += 1
        ready = dict(poller.poll(20))
        for i, pull in enumerate(pulls):
            while pull in ready and pull.poll(0):
                got[i].append(decode_chunk(pull.recv_multipart(copy=False)).seq)
    while len(got[0]) + len(got[1]) < sent:
        ready = dict(poller.poll(5000))
        assert ready, "chunks went missing"
        for i, pull in enumerate(pulls):
            if pull in ready:
                got[i].append(decode_chunk(pull.recv_multipart(copy=False)).seq)
    assert got[0] and got[1]
    assert sorted(got[0] + got[1]) == list(range(sent))
    for s in (*pulls, push):
        s.close()


def test_curve_authorised_producer_gets_in(ctx, keys, free_port) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port}"
    pull = pull_socket(ctx, endpoint,
                       curve=CurveServerKeys(keys["server_secret"], keys["authorized"]))
    push = push_socket(ctx, [endpoint],
                       curve=CurveClientKeys(keys["good_secret"], keys["server_public"]))
    push.send_multipart(chunk_frames("good"))
    assert pull.poll(5000)
    assert decode_chunk(pull.recv_multipart(copy=False)).producer == "good"
    push.close()
    pull.close()


def _send_in_background(sock: zmq.Socket, frames: list[bytes]) -> threading.Thread:
    sock.setsockopt(zmq.SNDTIMEO, REJECT_WAIT_MS + 1000)

    def send() -> None:
        try:
            sock.send_multipart(frames)
        except zmq.ZMQError:
            pass  # blocked: never admitted

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_curve_unauthorised_producer_never_gets_in(ctx, keys, free_port) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port}"
    pull = pull_socket(ctx, endpoint,
                       curve=CurveServerKeys(keys["server_secret"], keys["authorized"]))
    intruder = push_socket(ctx, [endpoint],
                           curve=CurveClientKeys(keys["intruder_secret"], keys["server_public"]))
    # A hand-made socket without IMMEDIATE queues its message at once and keeps retrying.
    raw = ctx.socket(zmq.PUSH)
    public, secret = zmq.auth.load_certificate(keys["intruder_secret"])
    raw.curve_publickey, raw.curve_secretkey = public, secret
    raw.curve_serverkey = zmq.auth.load_certificate(keys["server_public"])[0]
    raw.connect(endpoint)
    # And one speaking plain TCP to the CURVE socket.
    plain = ctx.socket(zmq.PUSH)
    plain.connect(endpoint)
    threads = [_send_in_background(s, chunk_frames(f"bad{i}"))
               for i, s in enumerate((intruder, raw, plain))]
    assert pull.poll(REJECT_WAIT_MS) == 0
    for t in threads:
        t.join()
    # The socket still works for an authorised producer afterwards.
    good = push_socket(ctx, [endpoint],
                       curve=CurveClientKeys(keys["good_secret"], keys["server_public"]))
    good.send_multipart(chunk_frames("good"))
    assert pull.poll(5000)
    assert decode_chunk(pull.recv_multipart(copy=False)).producer == "good"
    assert pull.poll(200) == 0
    for s in (intruder, raw, plain, good, pull):
        s.close(linger=0)


def test_binding_beyond_loopback_without_curve_warns(ctx, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="saestream.transport"):
        sock = pull_socket(ctx, "tcp://0.0.0.0:*")
    sock.close()
    assert "without CURVE" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saestream.transport"):
        sock = pull_socket(ctx, "tcp://127.0.0.1:*")
    sock.close()
    assert "without CURVE" not in caplog.text


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [("tcp://127.0.0.1:5557", True), ("tcp://localhost:1", True), ("tcp://[::1]:5", True),
     ("ipc:///tmp/x", True), ("tcp://*:5557", False), ("tcp://0.0.0.0:5557", False),
     ("tcp://10.0.0.3:5557", False), ("tcp://eth0:5557", False)],
)
def test_is_loopback_endpoint(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


def test_missing_key_files_are_user_errors(ctx, tmp_path: Path, keys) -> None:
    with pytest.raises(UserError):
        pull_socket(ctx, "tcp://127.0.0.1:*",
                    curve=CurveServerKeys(tmp_path / "nope.key_secret", keys["authorized"]))
    with pytest.raises(UserError):
        pull_socket(ctx, "tcp://127.0.0.1:*",
                    curve=CurveServerKeys(keys["server_secret"], tmp_path / "no-such-dir"))
    (keys["authorized"] / "broken.key").write_text("not a certificate\n")
    with pytest.raises(UserError, match=r"broken\.key"):
        pull_socket(ctx, "tcp://127.0.0.1:*",
                    curve=CurveServerKeys(keys["server_secret"], keys["authorized"]))
    with pytest.raises(UserError):  # a public key where the secret pair is needed
        push_socket(ctx, ["tcp://127.0.0.1:1"],
                    curve=CurveClientKeys(keys["server_public"], keys["server_public"]))
    with pytest.raises(UserError):
        push_socket(ctx, ["not-an-endpoint"])


def test_hwm_blocks_a_producer_then_delivers_everything(ctx) -> None:
    pull = pull_socket(ctx, "tcp://127.0.0.1:*", hwm=2)
    push = push_socket(ctx, [pull.getsockopt_string(zmq.LAST_ENDPOINT)], hwm=2)
    frames = encode_chunk(torch.randn(256, 256), producer="p", run="r", seq=0, model="m",
                          hook="h", source={}, codec="raw")  # 256 KiB
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # fill both queues and the kernel buffers
        try:
            push.send_multipart(frames, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            if sent:
                break
            time.sleep(0.01)  # not connected yet
    assert 0 < sent < 400  # the producer was stopped, not allowed to queue without bound
    received = 0
    while received < sent and pull.poll(5000):
        pull.recv_multipart(copy=False)
        received += 1
    assert received == sent  # nothing dropped
    push.close()
    pull.close()


def test_oversized_messages_are_cut_off_before_buffering(ctx) -> None:
    pull = pull_socket(ctx, "tcp://127.0.0.1:*", max_message_bytes=64 << 10)
    push = push_socket(ctx, [pull.getsockopt_string(zmq.LAST_ENDPOINT)])
    push.send_multipart([b"h", bytes(1 << 20)])
    assert pull.poll(REJECT_WAIT_MS) == 0
    push.close(linger=0)
    pull.close()


def test_two_curve_sockets_in_one_context_keep_their_own_keys(ctx, tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_keypair(tmp_path / f"server-{name}", "consumer")
        write_keypair(tmp_path / f"auth-{name}", f"producer-{name}")
    pulls = {
        name: pull_socket(ctx, "tcp://127.0.0.1:*", curve=CurveServerKeys(
            tmp_path / f"server-{name}" / "consumer.key_secret", tmp_path / f"auth-{name}"))
        for name in ("a", "b")
    }

    def producer(key: str, server: str) -> zmq.Socket:
        return push_socket(ctx, [pulls[server].getsockopt_string(zmq.LAST_ENDPOINT)],
                           curve=CurveClientKeys(
                               tmp_path / f"auth-{key}" / f"producer-{key}.key_secret",
                               tmp_path / f"server-{server}" / "consumer.key"))

    crossed = producer("a", "b")  # a's key is only authorised on a
    threads = [_send_in_background(crossed, chunk_frames("crossed"))]
    straight = producer("a", "a")
    straight.send_multipart(chunk_frames("straight"))
    assert pulls["a"].poll(5000)
    assert decode_chunk(pulls["a"].recv_multipart(copy=False)).producer == "straight"
    assert pulls["b"].poll(REJECT_WAIT_MS) == 0
    for t in threads:
        t.join()
    pulls["a"].close()  # the authenticator keeps serving b
    b_ok = producer("b", "b")
    b_ok.send_multipart(chunk_frames("b"))
    assert pulls["b"].poll(5000)
    assert decode_chunk(pulls["b"].recv_multipart(copy=False)).producer == "b"
    for s in (crossed, straight, b_ok, pulls["b"]):
        s.close(linger=0)


def test_refused_handshakes_are_logged_on_both_sides(ctx, keys, free_port, caplog) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port}"
    with caplog.at_level(logging.WARNING, logger="saestream.transport"):
        pull = pull_socket(ctx, endpoint,
                           curve=CurveServerKeys(keys["server_secret"], keys["authorized"]))
        intruder = push_socket(ctx, [endpoint], curve=CurveClientKeys(keys["intruder_secret"],
                                                                      keys["server_public"]))
        monitors = (pull.connection_monitor, intruder.connection_monitor)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            m.counts["handshake_failed_auth"] for m in monitors
        ):
            time.sleep(0.05)
    assert all(m.counts["handshake_failed_auth"] >= 1 for m in monitors)
    assert "consumer socket: handshake_failed_auth" in caplog.text
    assert "producer socket: handshake_failed_auth" in caplog.text
    intruder.close(linger=0)
    pull.close()
    assert not any(m.is_alive() for m in monitors)


def test_closing_a_curve_socket_lets_the_context_terminate(keys) -> None:
    context = zmq.Context()
    pull = pull_socket(context, "tcp://127.0.0.1:*",
                       curve=CurveServerKeys(keys["server_secret"], keys["authorized"]))
    pull.close()
    assert isinstance(pull.connection_monitor, ConnectionMonitor)
    done = threading.Thread(target=context.term, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive()


@pytest.mark.slow
def test_backlogged_consumer_keeps_every_chunk_of_a_producer_that_closed(ctx, free_port):
    """A producer sends everything and closes while the consumer is still far behind.

    The consumer reads slowly for longer than the heartbeat interval; a PULL-side ping to the
    closed producer would draw a TCP reset and throw away the chunks still unread.
    """
    endpoint = f"tcp://127.0.0.1:{free_port}"
    pull = pull_socket(ctx, endpoint, hwm=4)
    n_messages, payload = 48, b"x" * 200_000
    push = push_socket(ctx, [endpoint], hwm=4, linger_ms=60_000)

    def send_all_then_close() -> None:
        for i in range(n_messages):
            push.send_multipart([b"%d" % i, payload])
        push.close()

    sender = threading.Thread(target=send_all_then_close)
    sender.start()
    received = []
    while pull.poll(5000):
        received.append(int(pull.recv_multipart()[0]))
        time.sleep(0.25)  # 48 × 0.25 s = 12 s > HEARTBEAT_IVL (10 s)
    sender.join()
    pull.close()
    assert received == list(range(n_messages))


def _admitted(pull: zmq.Socket, pushes: list[zmq.Socket], sent: set[int], got: set[int],
              seconds: float) -> None:
    """For `seconds`: each PUSH socket whose connection got in sends its index once (with
    IMMEDIATE a refused one never can); record the indices `pull` receives."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for i, s in enumerate(pushes):
            if i not in sent and not s.closed:
                try:
                    s.send(str(i).encode(), zmq.NOBLOCK)
                    sent.add(i)
                except zmq.Again:
                    pass
        while pull.poll(20):
            got.add(int(pull.recv()))


def test_connection_cap_holds_against_a_burst_while_the_monitor_lags(ctx, free_port,
                                                                     caplog) -> None:
    """Eight producers connect at once to a PULL admitting three, while its monitor thread
    takes 50 ms per event (a loaded machine): exactly three get in, in the burst and again
    after those close. A cap read from a lagging count let the whole burst in; one counting
    connections still in their handshake refused the whole burst."""
    endpoint = f"tcp://127.0.0.1:{free_port}"
    pull = pull_socket(ctx, endpoint, max_connections=3)
    mon = pull.connection_monitor
    assert mon is not None
    record = mon._record

    def slow_record(*args, **kwargs):
        time.sleep(0.05)
        record(*args, **kwargs)

    mon._record = slow_record  # type: ignore[method-assign]
    pushes = [push_socket(ctx, [endpoint], monitor=False) for _ in range(8)]
    sent: set[int] = set()
    got: set[int] = set()
    deadline = time.monotonic() + 60  # no time limit on a loaded machine, only a count
    while len(got) < 3 and time.monotonic() < deadline:
        _admitted(pull, pushes, sent, got, 0.5)
    _admitted(pull, pushes, sent, got, 2.0)  # and no fourth
    assert len(sent) == 3 and got == sent, (sent, got)
    assert mon.counts["refused"] >= 5 and pull.refused() == mon.counts["refused"]
    assert "refused a connection on" in caplog.text and "3 are open" in caplog.text
    first = set(sent)
    for i in first:
        pushes[i].close(linger=0)
    deadline = time.monotonic() + 60  # the refused reconnect, backing off to 5 s
    while len(got) < 6 and time.monotonic() < deadline:
        _admitted(pull, pushes, sent, got, 0.5)
        assert mon.open_connections() <= 3
    _admitted(pull, pushes, sent, got, 2.0)
    assert len(got) == 6 and got == sent and not first & (got - first), (sent, got)
    for s in pushes:
        s.close(linger=0)
    pull.close()
    assert not mon.is_alive() and not mon.sync()


def test_a_handshake_waits_for_a_stalled_monitor_then_gets_in(ctx, free_port, caplog) -> None:
    """The monitor thread stalls for 5 s on the first connection's first event: the handshake
    waits (logged once it has waited 2 s) and completes once the thread has judged it.
    Refusing it by ZAP instead would have made the producer give up for good."""
    endpoint = f"tcp://127.0.0.1:{free_port}"
    with caplog.at_level(logging.WARNING, logger="saestream.transport"):
        pull = pull_socket(ctx, endpoint, max_connections=1)
        mon = pull.connection_monitor
        assert mon is not None
        record, stalled = mon._record, []

        def stall_once(*args, **kwargs):
            if not stalled:
                stalled.append(True)
                time.sleep(5.0)
            record(*args, **kwargs)

        mon._record = stall_once  # type: ignore[method-assign]
        push = push_socket(ctx, [endpoint], monitor=False)
        sent: set[int] = set()
        got: set[int] = set()
        start = time.monotonic()
        while not got and time.monotonic() < start + 30:
            _admitted(pull, [push], sent, got, 0.5)
        assert got == {0} and time.monotonic() - start > 4.5
    assert "a handshake has waited 2 s for the connection monitor" in caplog.text
    assert mon.open_connections() == 1 and mon.counts["refused"] == 0
    assert mon.counts["handshake_failed_auth"] == 0
    push.close(linger=0)
    pull.close()


def test_refusing_a_descriptor_touches_only_the_socket_judged() -> None:
    """Between judging a connection and shutting it down, ZeroMQ may close its descriptor and
    the process reuse the number: the cookie taken when judged tells the sockets apart."""
    import socket

    judged, peer = socket.socketpair()
    cookie = _socket_cookie(judged.fileno())
    assert cookie  # Linux has socket cookies
    reused, other = socket.socketpair()
    _shutdown_fd(reused.fileno(), "tcp://127.0.0.1:5555", cookie)  # another socket: kept
    other.send(b"x")
    assert reused.recv(1) == b"x"
    _shutdown_fd(judged.fileno(), "tcp://127.0.0.1:5555", cookie)
    assert peer.recv(1) == b""  # shut down: the peer sees the end of the stream
    _shutdown_fd(reused.fileno(), "tcp://127.0.0.1:5555", None)  # gone when judged: kept
    other.send(b"y")
    assert reused.recv(1) == b"y"
    for s in (judged, peer, reused, other):
        s.close()
