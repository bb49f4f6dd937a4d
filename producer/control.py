"""The producer's side of the control channel (common/control.py): a thread that asks every
consumer, twice a second, where to continue, and the rules that turn the answers into a
rewind or a skip.

- A consumer run answering for the first time (a start, or the consumer restarted): the
  producer continues from that run's frontier, backwards (re-sending what the consumer does
  not hold) or forwards (skipping what it already holds).
- A hole that stays open (`beyond` for `HOLE_SECONDS` with the frontier unmoved: a chunk was
  lost to a broken connection): rewind to the frontier.
- Answers from several consumer runs (a producer dealing to independent consumers): no
  rewinds; each consumer trims what it already has, nothing more is promised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from saestream.common.control import (
    CONTROL_VERSION,
    MAX_VOID,
    ControlError,
    decode_position,
    encode,
)
from saestream.common.logs import RateLimitedLog
from saestream.common.transport import CurveClientKeys, dealer_socket
from saestream.producer.sender import Progress

log = logging.getLogger("saestream.producer.control")

ASK_SECONDS = 0.5
HOLE_SECONDS = 5.0
FRESH_SECONDS = 5.0
"""An answer older than this no longer counts (that consumer may be gone)."""
FIRST_ANSWER_GRACE = 2.0
"""Seconds a stream's end waits, once a control connection exists, for a first answer
before it takes the consumer for one without a control channel."""
CONNECT_GRACE = 0.5
"""Seconds a stream's end waits for a control connection at all (ZeroMQ connects in the
background; on a reachable host the handshake takes milliseconds) before it takes the
endpoints for ones where no consumer listens."""
RETRY_SECONDS = 0.05
"""How often a request is tried while no control connection exists (sends to an unconnected
DEALER fail at once: IMMEDIATE), so `reachable` turns true within this of the handshake."""
LAST_REQUEST_SECONDS = 1.0
"""How long `stop` waits for the answers to its last request. That request hands over what
the stream declared since the one before it (above all the void that closes an epoch), which
no later request would carry; a consumer answers in milliseconds, a gone one never."""


class ControlClient(threading.Thread):
    """Owns one DEALER socket per control endpoint from `start()` until `stop()`.

    :param request: builds the current `where` request (called on this thread).
    """

    def __init__(self, ctx: zmq.Context, endpoints: Sequence[str], *,
                 curve: CurveClientKeys | None, request: Callable[[], dict[str, Any]]) -> None:
        super().__init__(name="control", daemon=True)
        self.socks = [dealer_socket(ctx, e, curve=curve) for e in endpoints]
        self.endpoints = list(endpoints)
        self.request = request
        self.replies: dict[int, tuple[float, dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.flush = False
        """Ask for a snapshot (the producer has sent its last rows)."""
        self.ever_answered = threading.Event()
        self.reachable = False
        """Some control endpoint took a request (a connection exists)."""
        self._stopping = threading.Event()
        self._seen_runs: set[str] = set()
        self._hole: tuple[Progress, float] | None = None
        self.error: str | None = None
        """The consumer's refusal (e.g. this id is known with another stream)."""
        self._rlog = RateLimitedLog(log)
        self._unanswered: list[deque[float]] = [deque() for _ in self.socks]
        """Per socket, when each request not yet answered was sent (replies come in order)."""

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        next_ask = 0.0
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_ask:
                    self._ask()
                    next_ask = now + (ASK_SECONDS if self.reachable else RETRY_SECONDS)
                self._poll(poller, 50)
            self._last_request(poller)
        finally:
            for sock in self.socks:
                sock.close(linger=0)

    def _ask(self) -> list[int]:
        """Send the current request on every connected socket; the ones that took it."""
        try:
            frame = encode(self.request())
        except Exception as exc:  # the thread must outlive it: it alone speaks to consumers
            self._rlog.warning("request", "could not build the control request (%s: %s); "
                               "asking again", type(exc).__name__, exc)
            return []
        took = []
        now = time.monotonic()
        for i, sock in enumerate(self.socks):
            try:
                sock.send(frame, flags=zmq.NOBLOCK)
            except zmq.Again:  # not connected yet: ask again later
                continue
            self.reachable = True
            waiting = self._unanswered[i]
            while waiting and now - waiting[0] > FRESH_SECONDS:
                waiting.popleft()  # lost with a connection or a consumer: never answered
            waiting.append(now)
            took.append(i)
        return took

    def _poll(self, poller: zmq.Poller, timeout_ms: float) -> None:
        for sock, _ in poller.poll(timeout_ms):
            self._read(self.socks.index(sock), sock.recv())

    def _last_request(self, poller: zmq.Poller) -> None:
        """Ask once more, and wait LAST_REQUEST_SECONDS at most until every consumer that
        took it has answered each request (replies come in order, so the last request has
        been handled, its voids are in that consumer's ledger)."""
        took = self._ask()
        deadline = time.monotonic() + LAST_REQUEST_SECONDS
        while any(self._unanswered[i] for i in took):
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("no answer to the last control request within %.1f s from %s",
                         LAST_REQUEST_SECONDS, ", ".join(
                             self.endpoints[i] for i in took if self._unanswered[i]))
                return
            self._poll(poller, min(50.0, left * 1000))

    def _read(self, i: int, frame: bytes) -> None:
        if self._unanswered[i]:
            self._unanswered[i].popleft()
        try:
            reply = decode_position(frame)
        except ControlError as exc:
            log.warning("ignoring a malformed control reply from %s: %s", self.endpoints[i], exc)
            return
        if reply["error"]:
            self.error = reply["error"]
        with self.lock:
            self.replies[i] = (time.monotonic(), reply)
        self.ever_answered.set()

    def stop(self) -> None:
        """Make the last request (`_last_request`), then close the sockets."""
        self._stopping.set()
        self.join(5.0 + LAST_REQUEST_SECONDS)

    # -- the end of a stream ------------------------------------------------------------------

    def expect_answers(self, stop: threading.Event, known: bool = False) -> bool:
        """Whether a consumer speaks the control channel: a first answer gets
        FIRST_ANSWER_GRACE seconds from when a control connection exists, and a connection
        CONNECT_GRACE seconds (a short stream can end before ZeroMQ has connected); with
        `known` (a consumer answered this stream before) it is awaited however long it
        takes. False on stop."""
        connect_by = time.monotonic() + CONNECT_GRACE
        answer_by: float | None = None
        while not self.ever_answered.is_set():
            now = time.monotonic()
            if self.reachable and answer_by is None:
                answer_by = now + FIRST_ANSWER_GRACE
            if not known and now >= (answer_by if answer_by is not None else connect_by):
                break
            if stop.wait(0.05):
                return False
        return self.ever_answered.is_set()

    def settle(
        self, end: Progress | None, since: Progress, stop: threading.Event,
        check: Callable[[], None],
    ) -> tuple[str, Progress | None]:
        """Wait until the consumer holds everything up to `end` (committed, when it keeps
        snapshots): ("done", held); or until it asks for a rewind, or a hole stays open
        HOLE_SECONDS (sent, never arrived: a broken connection lost it): ("rewind", where);
        or ("stop", None). `check` runs every round (it raises on a refusal)."""
        self.flush = True
        last, moved = None, time.monotonic()
        told: set[str] = set()
        while not stop.is_set():
            check()
            reply = self.view()
            word = reply if reply is not None else self.last_word()
            if word is not None and end is not None:
                held = self.frontier(word, "committed" if word["durable"] else "frontier")
                if held is not None and held >= end:
                    return "done", held
                if word["stopping"] and word["consumer"] not in told:
                    told.add(word["consumer"])
                    log.warning("consumer run %s stopped holding this stream up to %s (it "
                                "ends at %s): waiting for it to come back", word["consumer"],
                                "nothing" if held is None else
                                f"position {held.tokens_done} of epoch {held.epoch}",
                                f"position {end.tokens_done} of epoch {end.epoch}")
            if reply is not None and end is not None:
                target = self.target(end, since)
                accounted = self.frontier(reply)
                if accounted != last:
                    last, moved = accounted, time.monotonic()
                elif accounted is not None and accounted < end and \
                        time.monotonic() - moved >= HOLE_SECONDS:
                    target = accounted
                if target is not None and target < end:
                    return "rewind", target
            stop.wait(0.1)
        return "stop", None

    # -- what the answers mean ----------------------------------------------------------------

    def view(self) -> dict[str, Any] | None:
        """The freshest answer when every fresh answer comes from one consumer run (one
        consumer, or the ranks of one job); None otherwise."""
        now = time.monotonic()
        with self.lock:
            fresh = [r for t, r in self.replies.values() if now - t < FRESH_SECONDS]
            latest = max(self.replies.values(), key=lambda tr: tr[0], default=None)
        runs = {r["consumer"] for r in fresh}
        if len(runs) != 1 or latest is None or latest[1]["consumer"] not in runs:
            return None
        return latest[1]

    def last_word(self) -> dict[str, Any] | None:
        """The newest answer, however old, when it is a stopping consumer's and every answer
        came from that consumer run: what it held when it stopped stays held (committed:
        in its newest snapshot), so a producer that read it late still knows it is done."""
        with self.lock:
            answers = list(self.replies.values())
        latest = max(answers, key=lambda tr: tr[0], default=None)
        if latest is None or not latest[1]["stopping"] or \
                {r["consumer"] for _, r in answers} != {latest[1]["consumer"]}:
            return None
        return latest[1]

    def held_durably(self) -> Progress | None:
        """What the consumer has made durable of this stream (in its newest snapshot, or in
        shards on disk): the lowest `committed` of the words kept, however old, when they
        all come from one keeping consumer run. A consumer that dies keeps at least that,
        and its next run may have no ledger entry for this stream (a recorder; a producer
        new since the snapshot) and take the proposal as its origin: the proposal must not
        pass it, since what was sent and died with the run lies between. None when unknown:
        no answer yet, a consumer that keeps nothing, or several consumer runs (independent
        consumers, or ranks part-way through a restart)."""
        with self.lock:
            words = [r for _, r in self.replies.values()]
        if not words or not all(r["durable"] for r in words) \
                or len({r["consumer"] for r in words}) != 1:
            return None
        held = [self.frontier(r, "committed") for r in words]
        return None if any(h is None for h in held) else min(held)  # type: ignore[type-var]

    def frontier(self, reply: dict[str, Any], key: str = "frontier") -> Progress | None:
        """The lowest frontier (or committed frontier) over the hooks, None if unknown."""
        values = [h[key] for h in reply["hooks"].values()]
        if not values or any(v is None for v in values):
            return None
        return Progress(*min(tuple(v) for v in values))

    def target(self, emitted: Progress, since: Progress) -> Progress | None:
        """Where to continue instead of `emitted` (the emission began at `since`), or None
        to carry on."""
        reply = self.view()
        if reply is None or not reply["hooks"]:
            return None
        f = self.frontier(reply)
        if f is None:
            return None
        if reply["consumer"] not in self._seen_runs:
            first = not self._seen_runs
            self._seen_runs.add(reply["consumer"])
            self._hole = None
            if f > emitted:
                return f  # it holds more than was sent: skip ahead
            if first and f >= since:
                return None  # the first answer: what was sent since is most likely on its way
            return f if f != emitted else None
        if not any(h["beyond"] for h in reply["hooks"].values()):
            self._hole = None
            return None
        now = time.monotonic()
        if self._hole is None or self._hole[0] != f:
            self._hole = (f, now)
            return None
        if now - self._hole[1] >= HOLE_SECONDS:
            self._hole = None
            log.warning("rows after position %d of epoch %d arrived but not those before: "
                        "re-sending from there", f.tokens_done, f.epoch)
            return f
        return None

    def first_runs(self) -> set[str]:
        """Consumer runs that have answered (a new one is where `origins` are recorded)."""
        return set(self._seen_runs)


def where_request(*, producer: str, run: str, hooks: Sequence[str], stream: dict[str, Any],
                  propose: dict[str, list[int]], void: Sequence[tuple[int, int, int]],
                  flush: bool) -> dict[str, Any]:
    return {
        "v": CONTROL_VERSION, "op": "where", "producer": producer, "run": run,
        "hooks": list(hooks), "stream": stream, "propose": propose,
        "void": [list(v) for v in list(void)[-MAX_VOID:]], "flush": flush,
    }
