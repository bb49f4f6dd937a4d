"""The end of a run on the control channel: a producer waiting for its rows to be committed
learns that they are, whether it reads the consumer's last word at once, late, or never
(then from the answer to its own next request, which a stopping consumer still gives)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import zmq
from conftest import free_tcp_port
from test_ledger import HOOK, STREAM, receive

from saestream.common.control import decode_position, decode_where, encode
from saestream.common.transport import dealer_socket, router_socket
from saestream.consumer import control as consumer_control
from saestream.consumer.control import ControlServer
from saestream.consumer.ledger import MAX_POS, Ledger
from saestream.consumer.metrics import ConsumerMetrics
from saestream.producer import control as producer_control
from saestream.producer.control import ControlClient, where_request
from saestream.producer.sender import Progress

COMMITTED = 100
"""Positions [0, 100) of producer p's stream are in the consumer's newest snapshot."""


def where() -> dict:
    return where_request(producer="p", run="x", hooks=[HOOK], stream=STREAM,
                         propose={"*": [0, 0]}, void=[], flush=True)


@pytest.fixture
def served():
    """A consumer's control thread on a real ROUTER socket, its snapshot holding [0, 100)."""
    ledger = Ledger()
    ledger.declare("p", STREAM, [HOOK], (0, 0), now=0.0)
    receive(ledger, "p", 0, COMMITTED)
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = ControlServer(router_socket(ctx, endpoint), ledger, ConsumerMetrics(),
                           run_id="c1", durable=True)
    server.committed = ledger.copy()
    server.start()
    yield server, ctx, endpoint
    server.stop()
    ctx.destroy(linger=0)


def ask(sock: zmq.Socket) -> dict:
    """Send `where` until the connection takes it (IMMEDIATE), then the reply."""
    for _ in range(200):
        try:
            sock.send(encode(where()), flags=zmq.NOBLOCK)
            break
        except zmq.Again:
            threading.Event().wait(0.05)
    return answer(sock)


def answer(sock: zmq.Socket) -> dict:
    assert sock.poll(10_000), "no reply"
    return decode_position(sock.recv())


def test_a_stopping_consumer_answers_each_recent_producer_once_more(served, monkeypatch) -> None:
    monkeypatch.setattr(consumer_control, "STOP_GRACE_SECONDS", 60.0)
    server, ctx, endpoint = served
    dealer = dealer_socket(ctx, endpoint)
    assert ask(dealer)["stopping"] is False
    stopper = threading.Thread(target=server.stop, args=(90.0,))
    stopper.start()
    last = answer(dealer)  # the last word, sent unasked
    assert last["stopping"] is True
    assert last["hooks"][HOOK]["committed"] == (0, COMMITTED)
    threading.Event().wait(0.5)
    assert stopper.is_alive(), "the consumer did not wait for this producer to ask again"
    again = ask(dealer)  # had the last word been lost, this answer carries it
    assert again["stopping"] is True
    assert again["hooks"][HOOK]["committed"] == (0, COMMITTED)
    stopper.join(30)  # every recent producer asked again: the grace ends before its 60 s
    assert not stopper.is_alive() and not server.is_alive()
    assert server.error is None
    dealer.close(linger=0)


def test_a_producer_that_does_not_ask_again_holds_the_stop_for_the_grace_only(
    served, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(consumer_control, "STOP_GRACE_SECONDS", 2.5)
    server, ctx, endpoint = served
    dealer = dealer_socket(ctx, endpoint)
    ask(dealer)
    with caplog.at_level(logging.INFO, logger="saestream.consumer.control"):
        stopper = threading.Thread(target=server.stop, args=(30.0,))
        stopper.start()
        assert answer(dealer)["stopping"] is True  # it was told, and does not ask again
        stopper.join(30)
    assert not stopper.is_alive() and not server.is_alive()
    assert "1 producer(s) did not ask again" in caplog.text
    dealer.close(linger=0)


@pytest.fixture
def after_stop(served):
    """A producer's control thread that was answered, and then the consumer stopped."""
    server, ctx, endpoint = served
    client = ControlClient(ctx, [endpoint], curve=None, request=where)
    client.start()
    try:
        assert client.ever_answered.wait(10)
        server.stop(10.0)
        yield client
    finally:
        client.stop()


def test_the_answer_to_the_last_request_stays_readable_for_a_while(served, monkeypatch) -> None:
    # A DEALER drops what it has not read when the connection closes: the consumer keeps
    # the socket open READ_SECONDS after its last answer.
    monkeypatch.setattr(consumer_control, "READ_SECONDS", 2.0)
    server, ctx, endpoint = served
    dealer = dealer_socket(ctx, endpoint)
    ask(dealer)
    stopper = threading.Thread(target=server.stop, args=(30.0,))
    stopper.start()
    assert answer(dealer)["stopping"] is True
    dealer.send(encode(where()))
    threading.Event().wait(1.0)  # read late, as a busy producer might
    assert answer(dealer)["stopping"] is True
    stopper.join(30)
    dealer.close(linger=0)


def test_a_producer_already_gone_does_not_hold_the_stop(served, monkeypatch, caplog) -> None:
    monkeypatch.setattr(consumer_control, "STOP_GRACE_SECONDS", 60.0)
    server, ctx, endpoint = served
    dealer = dealer_socket(ctx, endpoint)
    ask(dealer)
    dealer.close(linger=0)  # it had its answer and exited
    threading.Event().wait(0.5)  # the consumer's side sees the connection close
    with caplog.at_level(logging.INFO, logger="saestream.consumer.control"):
        stopper = threading.Thread(target=server.stop, args=(90.0,))
        stopper.start()
        stopper.join(30)  # not the 60 s grace
    assert not stopper.is_alive()
    assert "did not ask again" not in caplog.text


def reply(run: str, stopping: bool, committed: int, durable: bool = True) -> dict:
    return {"consumer": run, "stopping": stopping, "durable": durable, "error": None,
            "hooks": {HOOK: {"frontier": (0, committed), "committed":
                             (0, committed) if durable else None, "beyond": False}}}


@pytest.mark.parametrize("answers, final", [
    ([reply("c1", True, 100)], True),  # stale or not: it is what c1 committed
    ([reply("c1", False, 100)], False),  # a running consumer's answer goes stale
    ([reply("c1", True, 50), reply("c1", False, 50)], False),  # restarted, answering again
    ([reply("c1", True, 100), reply("c2", True, 100)], False),  # two consumer runs
])
def test_which_stale_answer_is_a_last_word(answers, final) -> None:
    ctx = zmq.Context()
    endpoints = [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in answers]
    client = ControlClient(ctx, endpoints, curve=None, request=where)
    try:
        client.replies = {i: (float(i), r) for i, r in enumerate(answers)}
        assert client.view() is None  # all stale
        assert client.last_word() is (answers[-1] if final else None)
    finally:
        for sock in client.socks:
            sock.close(linger=0)
        ctx.term()


def settle(client: ControlClient, end: Progress, wait: float) -> list:
    """`client.settle` for up to `wait` seconds (then stopped): what it returned."""
    stop, out = threading.Event(), []
    t = threading.Thread(target=lambda: out.append(
        client.settle(end, Progress(0, 0), stop, lambda: None)), daemon=True)
    t.start()
    t.join(wait)
    stop.set()
    t.join(10)
    return out


def test_a_producer_that_reads_the_last_word_late_still_knows_it_is_done(
    after_stop, monkeypatch
) -> None:
    monkeypatch.setattr(producer_control, "FRESH_SECONDS", 0.3)
    threading.Event().wait(0.6)  # every answer is stale now: the consumer is gone
    assert after_stop.view() is None
    assert settle(after_stop, Progress(0, COMMITTED), 10) == [("done", Progress(0, COMMITTED))]


def test_a_producer_whose_rows_a_stopped_consumer_lacks_waits_for_it_and_says_so(
    after_stop, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="saestream.producer.control"):
        assert settle(after_stop, Progress(0, 2 * COMMITTED), 1.5) == [("stop", None)]
    assert ("consumer run c1 stopped holding this stream up to position 100 of epoch 0 "
            "(it ends at position 200 of epoch 0): waiting for it to come back" in caplog.text)


# -- the producer's last request ----------------------------------------------------------------


def test_a_stopping_producer_hands_over_the_void_that_closes_its_epoch(served, monkeypatch) -> None:
    """The void that closes an epoch travels only in control requests: one declared after the
    last periodic request reaches the consumer's ledger in the request `stop` makes."""
    monkeypatch.setattr(producer_control, "ASK_SECONDS", 60.0)  # no periodic request after
    server, ctx, endpoint = served
    request = where()
    client = ControlClient(ctx, [endpoint], curve=None, request=lambda: request)
    client.start()
    assert client.ever_answered.wait(10)
    request = {**request, "void": [[0, COMMITTED, MAX_POS]]}  # epoch 0 ended at 100
    client.stop()
    assert not client.is_alive()
    hl = server.ledger.get("p").hooks[HOOK]
    assert hl.void == {0: [[COMMITTED, MAX_POS]]}
    assert hl.frontier((0, 0)) == (1, 0)


def test_a_consumer_that_does_not_answer_holds_a_producer_s_stop_for_a_moment_only(
    monkeypatch, caplog
) -> None:
    monkeypatch.setattr(producer_control, "LAST_REQUEST_SECONDS", 0.5)
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    silent = router_socket(ctx, endpoint)  # takes requests, answers none
    client = ControlClient(ctx, [endpoint], curve=None, request=where)
    try:
        client.start()
        assert silent.poll(10_000), "no request"
        with caplog.at_level(logging.INFO, logger="saestream.producer.control"):
            t0 = time.monotonic()
            client.stop()
            waited = time.monotonic() - t0
        assert not client.is_alive()
        assert 0.5 <= waited < 5.0
        assert f"no answer to the last control request within 0.5 s from {endpoint}" \
            in caplog.text
        requests = []
        while silent.poll(0):
            requests.append(decode_where(silent.recv_multipart()[1]))
        assert requests and requests[-1]["producer"] == "p"  # the last one arrived
    finally:
        silent.close(linger=0)
        ctx.term()
