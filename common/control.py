"""The control channel: producers ask the consumer where to continue (exactly-once delivery).

Beside its data socket (PULL) the consumer binds a ROUTER socket; each producer connects a
DEALER to it and, about twice a second, sends a `where` request; the consumer answers with a
`position` reply. One msgpack map per frame, both ways, `v` = 1:

    where:    {"v", "op": "where", "producer", "run", "hooks": [str], "stream": {"corpus",
               "split", "shard", "seq_len", "first"}, "propose": {consumer run id or "*":
               [epoch, pos]}, "void": [[epoch, start, end]], "flush": bool}
    position: {"v", "op": "position", "consumer": run id, "durable": bool,
               "stopping": bool, "origin": [epoch, pos] | None, "hooks": {hook:
               {"frontier": [epoch, pos], "committed": [epoch, pos] | None,
               "beyond": bool}}, "error": str | None}

`frontier` is the first position of the producer's stream that the consumer does not
account for (buffered, trained or void); `committed` the same as of its newest snapshot
(None without snapshots); `origin` is where this consumer run took up the stream;
`beyond` says rows past the frontier arrived (something in
between was lost: re-send from the frontier). `propose` is where the producer would start if
the consumer does not know it yet, per consumer run. `void` declares positions that will
never carry rows (a skipped context, or [L, 2**62) when an epoch ends at L). `flush` asks
for a snapshot soon (the producer has sent its last rows). Unknown or malformed messages
are dropped, never answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from saestream.common.errors import UserError

CONTROL_VERSION = 1
MAX_CONTROL_BYTES = 256 << 10
"""Largest control message either side reads."""
MAX_VOID = 1024
"""Most void ranges in one request."""
STREAM_KEYS = ("corpus", "split", "shard", "seq_len", "first")


class ControlError(ValueError):
    """A control message that is malformed; the message says how."""


class EndpointError(UserError):
    """An endpoint no other process can use, or no control endpoint follows from a data
    endpoint (one line, exit 2)."""


SCHEMES = ("tcp", "ipc")
"""Transports that reach another process: inproc:// reaches only its own process (a daemon
given one would wait forever), and no other ZeroMQ transport carries PUSH/PULL here."""
MAX_IPC_PATH = 107
"""Longest ipc:// path in bytes (Linux's sun_path holds 108, with the terminating NUL)."""


def is_port_number(port: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and full-width
    digits (which ZeroMQ does)."""
    return port.isascii() and port.isdigit()


def check_connects(connect: Sequence[str], control_connect: Sequence[str]) -> None:
    """A producer's or replayer's --connect and --control-connect, checked at start-up."""
    if not control_connect:
        for endpoint in connect:
            control_endpoint(endpoint)  # EndpointError: a port with no port + 1
    for endpoint in connect:
        check_endpoint(endpoint, "--connect")
    if list(control_connect) != ["off"]:
        if "off" in control_connect:
            raise EndpointError("--control-connect off cannot be combined with endpoints")
        for endpoint in control_connect:
            check_endpoint(endpoint, "--control-connect")


def check_endpoint(endpoint: str, flag: str, *, bind: bool = False) -> str:
    """`endpoint` when another process can meet this one there: tcp://HOST:PORT with PORT
    1..65535 (binding: also `*` or 0, the system's choice, and HOST `*`) or ipc://PATH.
    EndpointError naming `flag` otherwise, so a typo fails at start-up, not as a daemon that
    waits forever (inproc://) or connects to a port that cannot exist."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in SCHEMES:
        raise EndpointError(f"{flag} {endpoint!r}: use tcp://HOST:PORT or ipc://PATH "
                            "(other transports do not reach another process)")
    if scheme == "ipc":
        if not rest or len(rest.encode()) > MAX_IPC_PATH:
            raise EndpointError(f"{flag} {endpoint!r}: an ipc:// path of 1 to {MAX_IPC_PATH} "
                                "bytes is needed")
        return endpoint
    host, colon, port = rest.rpartition(":")
    wildcard = bind and (port == "*" or (is_port_number(port) and int(port) == 0))
    real = is_port_number(port) and 0 < int(port) <= 65535
    if not colon or not host or not (wildcard or real):
        raise EndpointError(f"{flag} {endpoint!r}: use tcp://HOST:PORT with PORT 1..65535"
                            + (" (or * for any)" if bind else ""))
    if host == "*" and not bind:
        raise EndpointError(f"{flag} {endpoint!r}: connect to a host, not * (that is for "
                            "binding)")
    return endpoint


def check_binds(bind: str, control_bind: str | None) -> None:
    """A consumer's or sink's --bind and --control-bind (comma lists under torchrun, one
    endpoint per local rank), checked at start-up as `check_endpoint` does a producer's."""
    for part in bind.split(","):
        check_endpoint(part.strip(), "--bind", bind=True)
    for part in () if control_bind in (None, "off") else str(control_bind).split(","):
        check_endpoint(part.strip(), "--control-bind", bind=True)


def control_endpoint(data_endpoint: str) -> str:
    """The control endpoint that goes with a data endpoint: the next TCP port, or the same
    ipc path with `.control` appended. EndpointError when none follows (a port chosen by
    the system, `tcp://HOST:0`, or the last port) or the endpoint reaches no other process."""
    scheme, sep, rest = data_endpoint.partition("://")
    if not sep or scheme not in SCHEMES:
        raise EndpointError(f"not an endpoint another process can reach: {data_endpoint!r} "
                            "(use tcp://HOST:PORT or ipc://PATH)")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if is_port_number(port) and int(port) > 65535:
            raise EndpointError(f"{data_endpoint!r}: port {int(port)} is not a TCP port "
                                "(1..65535)")
        if not colon or not is_port_number(port) or not 0 < int(port) < 65535:
            raise EndpointError(
                f"cannot derive a control endpoint from {data_endpoint!r} (it is the data "
                "port + 1): give it (--control-bind, --control-connect) or `off`")
        return f"tcp://{host}:{int(port) + 1}"
    if len(f"{rest}.control".encode()) > MAX_IPC_PATH:
        raise EndpointError(f"cannot derive a control endpoint from {data_endpoint!r}: "
                            f"PATH.control is longer than {MAX_IPC_PATH} bytes; give it "
                            "(--control-bind, --control-connect) or `off`")
    return f"{data_endpoint}.control"


def encode(msg: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(msg), use_bin_type=True)


def _decode(frame: bytes | memoryview) -> dict[str, Any]:
    if len(frame) > MAX_CONTROL_BYTES:
        raise ControlError(f"{len(frame)} bytes is too large")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ControlError(f"not msgpack ({type(exc).__name__})") from None
    if type(msg) is not dict or msg.get("v") != CONTROL_VERSION:
        raise ControlError("not a version-1 control map")
    return msg


def _str(value: Any, what: str, limit: int = 1024) -> str:
    if type(value) is not str or not value or len(value) > limit:
        raise ControlError(f"{what} must be a non-empty str of at most {limit} chars")
    return value


def _position(value: Any, what: str) -> tuple[int, int]:
    if (type(value) is not list or len(value) != 2
            or not all(type(v) is int and 0 <= v < 1 << 62 for v in value)):
        raise ControlError(f"{what} must be [epoch, pos] of ints >= 0")
    return value[0], value[1]


def decode_where(frame: bytes | memoryview) -> dict[str, Any]:
    """A validated `where` request (types and sizes checked; a hostile peer gets nothing)."""
    msg = _decode(frame)
    if msg.get("op") != "where":
        raise ControlError(f"unknown op {msg.get('op')!r:.40}")
    out: dict[str, Any] = {
        "producer": _str(msg.get("producer"), "producer"),
        "run": _str(msg.get("run"), "run"),
    }
    hooks = msg.get("hooks")
    if type(hooks) is not list or not 1 <= len(hooks) <= 64:
        raise ControlError("hooks must be a list of 1..64 hook names")
    out["hooks"] = [_str(h, "hook") for h in hooks]
    stream = msg.get("stream")
    if type(stream) is not dict or set(stream) != set(STREAM_KEYS):
        raise ControlError(f"stream must hold exactly {', '.join(STREAM_KEYS)}")
    for key in ("corpus", "split", "shard"):
        _str(stream[key], f"stream.{key}")
    if not all(type(stream[k]) is int and stream[k] >= 0 for k in ("seq_len", "first")):
        raise ControlError("stream.seq_len and stream.first must be ints >= 0")
    out["stream"] = stream
    propose = msg.get("propose")
    if type(propose) is not dict or "*" not in propose or len(propose) > 64:
        raise ControlError("propose must map consumer run ids (and '*') to positions")
    out["propose"] = {_str(k, "propose key", 64): _position(v, "propose") for k, v in
                      propose.items()}
    void = msg.get("void", [])
    if type(void) is not list or len(void) > MAX_VOID:
        raise ControlError(f"void must be a list of at most {MAX_VOID} ranges")
    ranges = []
    for r in void:
        if (type(r) is not list or len(r) != 3
                or not all(type(v) is int and 0 <= v <= 1 << 62 for v in r) or r[1] >= r[2]):
            raise ControlError("void ranges must be [epoch, start, end], start < end")
        ranges.append((r[0], r[1], r[2]))
    out["void"] = ranges
    out["flush"] = msg.get("flush") is True
    return out


def decode_position(frame: bytes | memoryview) -> dict[str, Any]:
    """A validated `position` reply."""
    msg = _decode(frame)
    if msg.get("op") != "position":
        raise ControlError(f"unknown op {msg.get('op')!r:.40}")
    out: dict[str, Any] = {
        "consumer": _str(msg.get("consumer"), "consumer", 64),
        "durable": msg.get("durable") is True,
        "stopping": msg.get("stopping") is True,
        "error": msg.get("error") if type(msg.get("error")) is str else None,
        "origin": None if msg.get("origin") is None else _position(msg["origin"], "origin"),
        "hooks": {},
    }
    hooks = msg.get("hooks", {})
    if type(hooks) is not dict:
        raise ControlError("hooks must be a map")
    for hook, h in hooks.items():
        if type(h) is not dict:
            raise ControlError("each hook's entry must be a map")
        committed = h.get("committed")
        out["hooks"][_str(hook, "hook")] = {
            "frontier": _position(h.get("frontier"), "frontier"),
            "committed": None if committed is None else _position(committed, "committed"),
            "beyond": h.get("beyond") is True,
        }
    return out

