"""ZeroMQ sockets for the activation stream: producers PUSH (connect), the consumer PULLs (binds).

Every socket option is set here, once, for both daemons (README "wire" has the same table):

- `SNDHWM` / `RCVHWM` = `hwm` (16 messages per peer): backpressure; `send` blocks, nothing
  is dropped.
- `IMMEDIATE` = 1 (PUSH): queue only to peers whose connection (and CURVE handshake)
  completed, so a dead or refusing endpoint gets no chunks stuck in its pipe.
- `LINGER`: PUSH `linger_ms` (5 s) to deliver queued chunks on close, then give up (never
  hang); PULL 0 (what was not read is dropped).
- `RECONNECT_IVL` 100 ms, `RECONNECT_IVL_MAX` 5 s: reconnect fast after a restart, back off
  exponentially while a peer is down.
- `TCP_KEEPALIVE` on (idle 60 s, interval 10 s, 6 probes): the kernel notices a vanished peer.
- No ZMTP heartbeats, on either side. A consumer whose buffer is full stops reading its
  socket, so libzmq stops reading that connection too and a producer's PING goes
  unanswered: the heartbeat timeout then closed a healthy, merely backlogged connection,
  and closing it discarded the chunks queued on it (29 % of one producer's chunks in a
  5-minute backpressure run). On the PULL side a ping sent to a producer that had already
  closed drew a TCP reset, which discards what the kernel still held unread. TCP
  keepalive notices a vanished peer instead; chunks lost to a real disconnect are re-sent
  through the control channel (common/control.py).
- `MAXMSGSIZE` = `max_message_bytes` (PULL): a peer sending a larger frame is disconnected
  before ZeroMQ buffers it.
- CURVE (optional): PUSH sets `curve_serverkey` and its key pair; PULL `curve_server`, its key
  pair and a ZAP domain.

With CURVE, a ZAP handler (pyzmq's `ThreadAuthenticator`) admits only the public keys found
in the consumer's authorised directory (read once, when the socket is made); a producer
with any other key never completes the handshake, so none of its messages reach the
consumer. Without keys the stream is plain, unauthenticated TCP: a warning is logged when
such a socket binds beyond loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from saestream.common.control import MAX_CONTROL_BYTES
from saestream.common.errors import UserError

log = logging.getLogger("saestream.transport")

DEFAULT_HWM = 16
"""Messages queued per peer (each a chunk of a few MB) before senders block."""
MAX_HWM = 2**31 - 1
"""Largest high-water mark: ZeroMQ's SNDHWM/RCVHWM are C ints."""
DEFAULT_PUSH_LINGER_MS = 5000
MAX_LINGER_MS = 2**31 - 1
"""Largest LINGER in ms (a C int)."""
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000
TCP_KEEPALIVE_IDLE_S = 60
TCP_KEEPALIVE_INTVL_S = 10
TCP_KEEPALIVE_CNT = 6
SYNC_WARN_S = 2.0
"""A handshake waiting this long for the connection monitor is logged (rate-limited), and
again after each further SYNC_WARN_S."""
CONTROL_HWM = 4
"""Control requests queued per producer connection (a producer asks twice a second)."""
DEFAULT_MAX_MESSAGE_BYTES = (256 << 20) + (2 << 20)
"""Largest frame the PULL socket accepts: wire.DecodeLimits' default max_raw_nbytes plus the
LZ4 worst-case expansion (~0.4 %) and the header."""


@dataclass
class CurveServerKeys:
    """The consumer's CURVE material."""

    secret_key_file: Path
    """Its own key pair (`NAME.key_secret`, as written by `saestream keygen`)."""
    authorized_dir: Path
    """Directory of the producers' public keys (`*.key`) that may connect."""


@dataclass
class CurveClientKeys:
    """A producer's CURVE material."""

    secret_key_file: Path
    """Its own key pair (`NAME.key_secret`)."""
    server_public_key_file: Path
    """The consumer's public key (`NAME.key`; a `.key_secret` file works too)."""


def load_keypair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `zmq.auth` secret certificate; UserError if unusable."""
    path = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read CURVE key pair {path}: {exc}") from exc
    if not public or not secret:
        raise UserError(f"{path} holds no secret key (use the NAME.key_secret file)")
    return public, secret


def load_public_key(path: Path) -> bytes:
    """The Z85 public key of a `zmq.auth` certificate (public or secret); UserError if unusable."""
    path = Path(path)
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read CURVE public key {path}: {exc}") from exc
    if not public:
        raise UserError(f"{path} holds no public key")
    return public


def _set_keys(sock: zmq.Socket, path: Path, *, public: bytes | None = None,
              secret: bytes | None = None, server: bytes | None = None) -> None:
    """Set CURVE keys; a malformed key (wrong length, not Z85) is the user's to fix."""
    try:
        if public is not None:
            sock.curve_publickey = public
        if secret is not None:
            sock.curve_secretkey = secret
        if server is not None:
            sock.curve_serverkey = server
    except zmq.ZMQError as exc:
        raise UserError(f"{path}: not a valid CURVE key ({exc})") from exc


def _common_options(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)


def _check_limits(hwm: int, linger_ms: int = 0) -> None:
    """UserError for a high-water mark or linger ZeroMQ cannot take (its options are C ints:
    pyzmq raises OverflowError otherwise); every daemon's --hwm and --linger end here."""
    if not 0 <= hwm <= MAX_HWM:
        raise UserError(f"--hwm {hwm}: a high-water mark is 1 to {MAX_HWM} messages")
    if not -1 <= linger_ms <= MAX_LINGER_MS:
        raise UserError(f"--linger: {linger_ms} ms is beyond ZeroMQ's limit ({MAX_LINGER_MS})")


def push_socket(
    ctx: zmq.Context,
    endpoints: Sequence[str],
    *,
    hwm: int = DEFAULT_HWM,
    curve: CurveClientKeys | None = None,
    linger_ms: int = DEFAULT_PUSH_LINGER_MS,
    monitor: bool = True,
) -> Socket:
    """A PUSH socket connected to every endpoint (chunks are dealt round-robin among them).

    `send` blocks while every connected peer's queue holds `hwm` messages (backpressure).
    With `monitor`, a `ConnectionMonitor` thread logs refused handshakes (e.g. a key the
    consumer does not admit: otherwise the producer would just wait, silently).
    """
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not endpoints:
        raise UserError("a producer needs at least one endpoint to connect to")
    _check_limits(hwm, linger_ms)
    sock = _new_socket(ctx, zmq.PUSH, monitor, "producer socket")
    try:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        _common_options(sock)
        _connect(sock, endpoints, curve)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def dealer_socket(
    ctx: zmq.Context, endpoint: str, *, curve: CurveClientKeys | None = None
) -> Socket:
    """A DEALER socket connected to one consumer's control endpoint (see common/control.py).

    Requests are small and re-sent every interval, so nothing is queued for a peer that is
    not connected (`IMMEDIATE`) and nothing lingers on close.
    """
    sock = _new_socket(ctx, zmq.DEALER, False, "control socket")
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        _common_options(sock)
        _connect(sock, [endpoint], curve)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _connect(sock: zmq.Socket, endpoints: Sequence[str], curve: CurveClientKeys | None) -> None:
    if curve is not None:
        public, secret = load_keypair(curve.secret_key_file)
        server = load_public_key(curve.server_public_key_file)
        _set_keys(sock, curve.secret_key_file, public=public, secret=secret)
        _set_keys(sock, curve.server_public_key_file, server=server)
    for endpoint in endpoints:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise UserError(f"cannot connect to {endpoint!r}: {exc}") from exc


class Socket(zmq.Socket):
    """A zmq.Socket that also owns its connection monitor and its share of the context's
    authenticator, and releases both on close."""

    connection_monitor: ConnectionMonitor | None = None
    """The thread logging this socket's handshake failures (None if `monitor=False`)."""
    _release_auth: Any = None

    def refused(self) -> int:
        """Connections shut down so far because the cap was reached (0 without a monitor)."""
        mon = self.connection_monitor
        return mon.counts["refused"] if mon is not None else 0

    def close(self, linger: int | None = None) -> None:
        super().close(linger=linger)
        release, self._release_auth = self._release_auth, None
        if release is not None:
            release()
        if self.connection_monitor is not None:
            self.connection_monitor.join(1.0)  # ends on the MONITOR_STOPPED event


def _new_socket(ctx: zmq.Context, kind: int, monitor: bool, label: str) -> Socket:
    sock: Socket = ctx.socket(kind, socket_class=Socket)
    if monitor:
        sock.connection_monitor = ConnectionMonitor(sock, label)
        sock.connection_monitor.start()
    return sock


# --------------------------------------------------------------------------------------------
# PULL side: one ZAP authenticator per context, one ZAP domain per CURVE socket.


class _LimitingAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator, plus a per-domain admission check run before its own. The check
    holds a handshake until the socket's connection monitor has judged every connection
    accepted so far (`ConnectionMonitor.sync`): one beyond the limit is shut down before its
    handshake can complete, so it never buffers a message."""

    def __init__(self, ctx: zmq.Context) -> None:
        super().__init__(ctx, log=logging.getLogger("saestream.zap"))
        self.admit: dict[str, Callable[[], bool]] = {}

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6:
            check = self.admit.get(msg[2].decode("utf-8", "replace"))
            if check is not None and not check():  # the socket is closing
                self._send_zap_reply(msg[1], b"400", b"closing")
                return
        await super().handle_zap_message(msg)


class _ContextAuth:
    """The authenticator shared by the sockets of one context (ZeroMQ allows one ZAP handler
    per context); stopped when its last socket closes."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.auth = _LimitingAuthenticator(ctx)
        self.auth.start()
        self.users = 0


_AUTH: weakref.WeakKeyDictionary[zmq.Context, _ContextAuth] = weakref.WeakKeyDictionary()
_AUTH_LOCK = threading.Lock()


def _acquire_auth(
    ctx: zmq.Context, domain: str, authorized_dir: Path | None,
    admit: Callable[[], bool] | None = None,
) -> Any:
    """Register a ZAP domain (CURVE keys from `authorized_dir`, and/or an admission check);
    returns the function that unregisters it."""
    with _AUTH_LOCK:
        entry = _AUTH.get(ctx)
        if entry is None:
            entry = _AUTH[ctx] = _ContextAuth(ctx)
        entry.users += 1
        if authorized_dir is not None:
            entry.auth.configure_curve(domain=domain, location=str(authorized_dir))
        if admit is not None:
            entry.auth.admit[domain] = admit

    def release() -> None:
        with _AUTH_LOCK:
            entry.users -= 1
            entry.auth.certs.pop(domain, None)
            entry.auth.admit.pop(domain, None)
            if entry.users == 0:
                entry.auth.stop()
                if _AUTH.get(ctx) is entry:
                    del _AUTH[ctx]

    return release


def _curve_server(ctx: zmq.Context, sock: Socket, curve: CurveServerKeys, bind: str,
                  admit: Callable[[], bool] | None = None) -> None:
    public, secret = load_keypair(curve.secret_key_file)
    authorized_dir = Path(curve.authorized_dir)
    if not authorized_dir.is_dir():
        raise UserError(f"authorised-keys directory {authorized_dir} does not exist")
    keys = authorized_keys(authorized_dir)
    for key in keys:  # a broken file would otherwise silently lock everyone out
        load_public_key(key)
    if not keys:
        log.warning("no *.key files in %s: every producer will be refused", authorized_dir)
    domain = f"saestream-{uuid.uuid4().hex}"
    sock._release_auth = _acquire_auth(ctx, domain, authorized_dir, admit)
    sock.zap_domain = domain.encode()
    sock.curve_server = True
    _set_keys(sock, curve.secret_key_file, public=public, secret=secret)
    log.info("CURVE on %s: %d authorised producer key(s) in %s", bind, len(keys), authorized_dir)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints bound to a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a hostname: assume reachable from outside


def authorized_keys(authorized_dir: Path) -> list[Path]:
    """The public-key files (`*.key`) a consumer would admit."""
    return sorted(Path(authorized_dir).glob("*.key"))


def pull_socket(
    ctx: zmq.Context,
    bind: str,
    *,
    hwm: int = DEFAULT_HWM,
    curve: CurveServerKeys | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_connections: int | None = None,
    monitor: bool = True,
) -> Socket:
    """A PULL socket bound to `bind`, fair-queueing the chunks of every connected producer.

    With `curve`, only producers whose public key is in `curve.authorized_dir` get in.
    With `max_connections`, a connection accepted while that many are open is shut down
    before its handshake completes (judged by the connection monitor, so `monitor` must be
    on: `ConnectionMonitor`).
    With `monitor`, a `ConnectionMonitor` thread logs refused handshakes.
    Close the socket before terminating the context (it owns an authenticator thread).
    """
    if max_connections is not None and not monitor:
        raise ValueError("max_connections needs the connection monitor")
    _check_limits(hwm)
    sock = _new_socket(ctx, zmq.PULL, monitor, "consumer socket")
    try:
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        _common_options(sock)
        _admit_and_bind(ctx, sock, bind, curve, max_connections)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def router_socket(
    ctx: zmq.Context, bind: str, *, curve: CurveServerKeys | None = None,
    max_connections: int | None = None, hwm: int = CONTROL_HWM,
    max_message_bytes: int = MAX_CONTROL_BYTES,
) -> Socket:
    """The consumer's control socket (ROUTER, bound), authenticated and capped like its data
    socket: at most `max_connections` peers, `hwm` requests queued from each, none larger
    than `max_message_bytes`, so what strangers can make it hold is bounded."""
    sock = _new_socket(ctx, zmq.ROUTER, max_connections is not None, "consumer control socket")
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a gone peer is dropped
        sock.setsockopt(zmq.SNDHWM, 64)
        _common_options(sock)
        _admit_and_bind(ctx, sock, bind, curve, max_connections)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _admit_and_bind(ctx: zmq.Context, sock: Socket, bind: str, curve: CurveServerKeys | None,
                    max_connections: int | None) -> None:
    """Authentication (CURVE, or a ZAP handler that only counts connections), then bind."""
    admit = None
    if max_connections is not None:
        mon = sock.connection_monitor
        assert mon is not None
        mon.limit = max_connections  # before the bind: every connection is judged
        admit = mon.sync
    if curve is not None:
        _curve_server(ctx, sock, curve, bind, admit)
    elif admit is not None:  # NULL security still asks the ZAP handler once a domain is set
        domain = f"saestream-{uuid.uuid4().hex}"
        sock._release_auth = _acquire_auth(ctx, domain, None, admit)
        sock.zap_domain = domain.encode()
    if curve is None and not is_loopback_endpoint(bind):
        log.warning(
            "binding %s without CURVE: anyone who can reach it can send activations and "
            "the stream is unencrypted (see `saestream keygen`)", bind
        )
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        raise UserError(f"cannot bind {bind!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# connection events: make refused handshakes visible (otherwise a refused producer just waits)

_EVENT_NAMES = {
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_ACCEPTED: "accepted",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}
_FAILED = {"handshake_failed_auth", "handshake_failed_protocol", "handshake_failed"}


class ConnectionMonitor(threading.Thread):
    """Watches one socket's connection events in a thread of its own, and enforces its cap on
    connections.

    Handshake failures (a CURVE key the consumer does not admit, CURVE on one side only) are
    logged as warnings, at most once per `interval` seconds per kind; connects and
    disconnects at debug level. `counts` maps event names (`_EVENT_NAMES` values) to how
    often they happened, plus "refused" (connections beyond `limit`), for metrics. Start it
    right after making the socket; it ends by itself when the socket is closed, or on
    `stop()`.

    With `limit` set (before the socket binds), each accepted connection is judged in the
    order ZeroMQ accepted them: one arriving while `limit` are open is shut down (its file
    descriptor, from the `accepted` event, gets `shutdown(2)`; ZeroMQ then closes it).
    Judging by descriptor is exact, where ZeroMQ's handshake events do not say which
    connection they belong to. The ZAP handler calls `sync` before it answers a handshake, so
    a connection's handshake cannot complete before its judgement, however far this thread
    lags: every event ZeroMQ emitted before it asked ZAP has been taken by then (that order
    holds with the context's one I/O thread, the default every daemon keeps). There is no
    time limit on that wait: refusing a handshake by ZAP would make the producer give up
    for good (ZeroMQ does not reconnect after an ERROR command, and a ZAP "300" leaves the
    connection hanging until the handshake timeout), while a connection shut down here is
    reconnected by its producer. So a flood of connections faster than this thread takes
    their events holds handshakes back while it lasts. Connections still in their handshake
    count, so a peer that connects and never completes one holds a place until ZeroMQ's
    handshake timeout (30 s).
    """

    def __init__(self, sock: zmq.Socket, name: str, *, interval: float = 30.0,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(name=f"zmq-monitor-{name}", daemon=True)
        from saestream.common.logs import RateLimitedLog

        self.label = name
        self.limit: int | None = None
        self.counts: dict[str, int] = dict.fromkeys([*_EVENT_NAMES.values(), "refused"], 0)
        self._open: set[int] = set()  # fds of accepted connections within the limit, open
        self._refusing: dict[int, tuple[str, int | None]] = {}
        """fds beyond the limit, not yet closed: their endpoint and socket cookie."""
        self._log = logger or log
        self._rlog = RateLimitedLog(self._log, interval)
        self._stop_event = threading.Event()
        self._sync = threading.Condition()
        self._asked = self._served = 0
        self._ended = False
        addr = f"inproc://saestream-monitor-{uuid.uuid4().hex}"
        sock.monitor(addr, sum(_EVENT_NAMES) | zmq.EVENT_MONITOR_STOPPED)
        # Connected here, before the socket connects anywhere, so no early event is lost
        # (libzmq drops events while nobody listens); only the thread uses it from now on.
        self._mon = sock.context.socket(zmq.PAIR)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(addr)
        self._wake_r, self._wake_w = os.pipe()  # closed by the thread when it ends
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self) -> None:
        mon = self._mon
        poller = zmq.Poller()
        poller.register(mon, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop_event.is_set():
                if not poller.poll(200):
                    continue
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                with self._sync:  # read after the wake-ups: a later ask leaves one unread
                    asked = self._asked
                if not self._take_events(mon):
                    break
                with self._sync:
                    self._served = asked
                    self._sync.notify_all()
        except zmq.ZMQError:  # context terminated under us: nothing left to watch
            pass
        finally:
            mon.close(linger=0)
            with self._sync:
                self._ended = True
                self._sync.notify_all()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def sync(self) -> bool:
        """Wait until this thread has taken (and judged) every event the socket emitted before
        the call, however long that takes (a warning after each `SYNC_WARN_S` of waiting,
        rate-limited); False if the thread ended (the socket closed)."""
        with self._sync:
            if self._ended:
                return False
            self._asked += 1
            want = self._asked
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:  # the pipe is full of earlier wake-ups: it will wake
                pass
            waited = 0.0
            while not self._sync.wait_for(lambda: self._served >= want or self._ended,
                                          SYNC_WARN_S):
                waited += SYNC_WARN_S
                self._rlog.warning(
                    "behind", "%s: a handshake has waited %.0f s for the connection monitor "
                    "to take the events before it (a flood of connections?)", self.label,
                    waited)
            return not self._ended

    def _take_events(self, mon: zmq.Socket) -> bool:
        """Take every event queued now; False once the socket's monitoring stopped."""
        from zmq.utils.monitor import recv_monitor_message

        judged: list[int] = []
        running = True
        while running:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            running = event["event"] != zmq.EVENT_MONITOR_STOPPED
            if running:
                self._record(event, judged)
        for fd in dict.fromkeys(judged):
            if fd in self._refusing:  # still open after every event taken: shut it now
                _shutdown_fd(fd, *self._refusing[fd])
        return running

    def _record(self, event: dict[str, Any], judged: list[int]) -> None:
        """Count the event; judge an accepted connection (`judged` gets those to shut down)."""
        kind = _EVENT_NAMES.get(event["event"])
        if kind is None:
            return
        self.counts[kind] += 1
        endpoint = event["endpoint"].decode(errors="replace")
        fd = event["value"]
        if kind == "accepted":
            if self.limit is None or len(self._open) < self.limit:
                self._open.add(fd)
            else:
                self._refusing[fd] = (endpoint, _socket_cookie(fd))
                self.counts["refused"] += 1
                judged.append(fd)
                self._rlog.warning(
                    "refused", "%s: refused a connection on %s: %d are open, the most it "
                    "admits (--max-connections)", self.label, endpoint, self.limit)
        elif kind == "disconnected":
            self._open.discard(fd)
            self._refusing.pop(fd, None)
        if kind in _FAILED:
            self._rlog.warning(
                kind,
                "%s: %s on %s (code %s): a peer was refused (an unauthorised CURVE key, CURVE "
                "on one side only, or more connections than the consumer admits)",
                self.label, kind, endpoint, fd,
            )
        else:
            self._log.debug("%s: %s %s", self.label, kind, endpoint)

    def open_connections(self) -> int:
        """Accepted connections within the limit not yet closed, as far as the events taken
        so far tell."""
        return len(self._open)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop_event.set()
        self.join(timeout)


SO_COOKIE = 57
"""Linux's socket cookie: a number the kernel never gives two sockets (Python lacks the name)."""


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket | None]:
    """A socket object over ZeroMQ's descriptor `fd` (None if no socket is open there),
    detached again afterwards, so the descriptor stays ZeroMQ's to close."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        yield None
        return
    try:
        yield sock
    finally:
        sock.detach()


def _cookie_of(sock: socket.socket) -> int:
    """The socket's cookie; 0 where the kernel has none."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    except OSError:
        return 0


def _socket_cookie(fd: int) -> int | None:
    """The cookie of the socket on `fd`; 0 where the kernel has none, None for no socket."""
    with _borrowed(fd) as sock:
        return None if sock is None else _cookie_of(sock)


def _shutdown_fd(fd: int, endpoint: str, cookie: int | None) -> None:
    """Shut down the connection on `fd` (ZeroMQ's: it sees the end of the stream and closes it;
    the descriptor stays ZeroMQ's to close).

    Between the events taken and this call ZeroMQ may have closed the descriptor and the
    process reused its number. So only the very socket judged is touched: the same cookie,
    where the kernel has them (Linux); elsewhere a socket of the endpoint's kind, on its TCP
    port or its ipc path, which a new connection on the same endpoint would also pass (it
    would be refused once and reconnect)."""
    if cookie is None:  # no socket there when it was judged: closed, its close event due
        return
    with _borrowed(fd) as sock:
        if sock is None:  # closed already
            return
        try:
            if cookie:
                same = _cookie_of(sock) == cookie
            elif endpoint.startswith("tcp://"):
                port = endpoint.rsplit(":", 1)[-1]
                same = (sock.family in (socket.AF_INET, socket.AF_INET6) and port.isdigit()
                        and sock.getsockname()[1] == int(port))
            elif endpoint.startswith("ipc://"):
                same = sock.family == socket.AF_UNIX and sock.getsockname() == endpoint[6:]
            else:
                same = False
            if same:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
