"""The control thread: answers producers' `where` requests from the ledger (exactly-once).

One job: read the ROUTER socket, validate each request (common/control.py), register the
producer's stream and void positions in the ledger, and reply with, per hook, the frontier
of what this consumer accounts for, the frontier of its newest snapshot (`committed`) and
whether a hole was seen. A `flush` request sets `flush_requested`, so the training loop
writes a snapshot soon. On stop it sends every producer it has heard from a last reply
with `stopping` set, so producers waiting for a commit learn the state it ended in, then
keeps answering (`stopping`) for up to STOP_GRACE_SECONDS, until every producer that asked
recently has asked once more or is gone: a producer's DEALER drops what it had not read
when the connection closes, and a producer that missed the last word would wait for a
consumer that is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import zmq

from saestream.common.control import CONTROL_VERSION, ControlError, decode_where, encode
from saestream.common.logs import RateLimitedLog, shown
from saestream.consumer.ledger import Ledger, LedgerFull
from saestream.consumer.metrics import ConsumerMetrics

log = logging.getLogger("saestream.consumer.control")

MAX_PEERS = 1024
"""Most producer connections remembered for the last reply on stop."""
STOP_GRACE_SECONDS = 1.5
"""After a stop, the longest requests are still answered (producers ask every 0.5 s)."""
RECENT_SECONDS = 2.0
"""A producer that asked within this before the stop is waited for in the grace."""
READ_SECONDS = 0.25
"""How long the socket stays open after the last answer: a producer's DEALER (IMMEDIATE)
drops what it has not read yet when the connection closes, and it reads every 50 ms."""


class ControlServer(threading.Thread):
    """Owns the ROUTER socket `sock` from `start()` until `stop()` returns."""

    def __init__(
        self, sock: zmq.Socket, ledger: Ledger, metrics: ConsumerMetrics, *, run_id: str,
        durable: bool, hooks: Sequence[str] | None = None, poll_ms: int = 100,
    ) -> None:
        super().__init__(name="control", daemon=True)
        self.sock = sock
        self.hooks = None if hooks is None else set(hooks)
        """Hooks this consumer trains (None: any); a producer streaming another is refused."""
        self.ledger = ledger
        self.metrics = metrics
        self.run_id = run_id
        self.durable = durable
        self.committed: Ledger | None = None
        """The ledger as of the newest snapshot (set by the training loop after each one)."""
        self.flush_requested = threading.Event()
        self.poll_ms = poll_ms
        self._stopping = threading.Event()
        self._peers: OrderedDict[bytes, tuple[float, dict[str, Any]]] = OrderedDict()
        self._rlog = RateLimitedLog(log, 10.0)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self.sock.poll(self.poll_ms):
                    self._serve(self.sock.recv_multipart())
            self._last_word()
        except BaseException as exc:  # a bug, not a peer
            self.error = exc
            log.exception("control thread failed")
        finally:
            self.sock.close(linger=200)

    def _last_word(self) -> None:
        """A `stopping` reply to every peer, then answers until each peer that asked within
        RECENT_SECONDS has asked again (and so had a reply to a request of its own) or is
        gone, or STOP_GRACE_SECONDS pass; the socket stays open READ_SECONDS past the last
        answer."""
        if not self._peers:
            return
        now = time.monotonic()
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer: EHOSTUNREACH, not silence
        waiting = {ident for ident, (t, _) in self._peers.items() if now - t < RECENT_SECONDS}
        for ident, (_, request) in self._peers.items():
            if not self._send(ident, self.reply(request, stopping=True)):
                waiting.discard(ident)
        deadline, answered = now + STOP_GRACE_SECONDS, now
        while True:
            t = time.monotonic()
            until = answered + READ_SECONDS if not waiting else deadline
            if t >= min(until, deadline + READ_SECONDS):
                break
            if self.sock.poll(max(1, int((until - t) * 1000))):
                ident = self._serve(self.sock.recv_multipart())
                if ident is not None:
                    waiting.discard(ident)
                    answered = time.monotonic()
        if waiting:
            log.info("stopping: %d producer(s) did not ask again within %.1f s of the last "
                     "reply", len(waiting), STOP_GRACE_SECONDS)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.join(timeout)

    def _serve(self, frames: list[bytes]) -> bytes | None:
        """Answer one request (`stopping` once stopped); the peer's identity, or None when
        the message was dropped."""
        if len(frames) != 2:
            self.metrics.control_rejected.inc()
            return None
        ident, frame = frames
        try:
            request = decode_where(frame)
        except ControlError as exc:
            self.metrics.control_rejected.inc()
            self._rlog.warning("bad", "dropped a control message: %s", exc)
            return None
        self._peers[ident] = (time.monotonic(), request)
        self._peers.move_to_end(ident)
        while len(self._peers) > MAX_PEERS:
            self._peers.popitem(last=False)
        self._send(ident, self.reply(request, stopping=self._stopping.is_set()))
        return ident

    def _send(self, ident: bytes, reply: dict[str, Any]) -> bool:
        """False when the reply was not queued (that peer's queue is full, and it asks again
        soon; or, once stopping, the peer is gone)."""
        try:
            self.sock.send_multipart([ident, encode(reply)], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

    def reply(self, request: dict[str, Any], stopping: bool = False) -> dict[str, Any]:
        """The `position` reply to a validated `where` request (registers it first)."""
        name = request["producer"]
        out: dict[str, Any] = {"v": CONTROL_VERSION, "op": "position", "consumer": self.run_id,
                               "durable": self.durable, "stopping": stopping, "hooks": {},
                               "origin": None, "error": None}
        propose = request["propose"].get(self.run_id, request["propose"]["*"])
        foreign = [h for h in request["hooks"] if self.hooks is not None and h not in self.hooks]
        if foreign:  # its chunks would all be rejected: say so rather than wait forever
            out["error"] = (f"this consumer does not train hook {foreign[0]!r:.100} (its hooks: "
                            f"{', '.join(sorted(self.hooks or ()))})")
            return out
        try:
            entry = self.ledger.declare(name, request["stream"], request["hooks"], propose,
                                        now=time.time())
        except LedgerFull:
            out["error"] = f"this consumer already tracks {self.ledger.max_producers} producers"
            return out
        except ValueError as exc:
            out["error"] = str(exc)
            return out
        if request["void"]:
            refused = self.ledger.add_void(name, request["void"])
            if refused:
                self._rlog.warning("void", "producer %s: %d void range(s) not taken yet (too "
                                   "far past its frontier, or too many holes)", shown(name),
                                   refused)
            entry = self.ledger.get(name) or entry
        if request["flush"]:
            self.flush_requested.set()
        committed = self.committed.get(name) if self.committed is not None else None
        origin = entry.origin or propose
        out["origin"] = list(origin)
        for hook in request["hooks"]:
            hl = entry.hooks[hook]
            frontier = hl.frontier(origin)
            done = None
            if self.durable:
                chl = committed.hooks.get(hook) if committed is not None else None
                done = list(chl.frontier(committed.origin or origin) if chl else origin)
            out["hooks"][hook] = {"frontier": list(frontier), "committed": done,
                                  "beyond": hl.beyond(frontier)}
        return out
