"""PUSH/PULL helpers over real sockets on 127.0.0.1, with and without CURVE."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from common.errors import UserError
from common.keygen import write_keypair
from common.transport import (
    CurveClientKeys,
    CurveServerKeys,
    is_loopback_endpoint,
    pull_socket,
    push_socket,
)
from common.wire import decode_chunk, encode_chunk

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
    endpoints = [p.getsockopt_string(zmq.LAST_ENDPOINT) for p in pulls]
    push = push_socket(ctx, endpoints)
    time.sleep(0.2)  # let both connections complete, so round-robin sees both peers
    for seq in range(4):
        push.send_multipart(chunk_frames("p0", seq))
    got = []
    for pull in pulls:
        while pull.poll(2000):
            got.append(decode_chunk(pull.recv_multipart(copy=False)).seq)
            if len(got) == 4:
                break
    assert sorted(got) == [0, 1, 2, 3]
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
    with pytest.raises(UserError):  # a public key where the secret pair is needed
        push_socket(ctx, ["tcp://127.0.0.1:1"],
                    curve=CurveClientKeys(keys["server_public"], keys["server_public"]))
    with pytest.raises(UserError):
        push_socket(ctx, ["not-an-endpoint"])
