"""`saestream status URL...`: a one-screen summary read from the daemons' /metrics endpoints.

Each URL is scraped once and parsed with prometheus_client's text parser. A consumer (it
exports `saestream_train_steps_total`) gets a summary of training, buffer, producers,
rejects and checkpoints; a producer one of what it sent; anything else a compact list of
its `saestream_*` values. An endpoint that cannot be read (refused, slower than --timeout in
all, not HTTP, a body over `MAX_BODY_BYTES`, not Prometheus text) gets one line saying why.
Exit code: 0 if at least one URL answered, 1 if none did.
"""

from __future__ import annotations

import http.client
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import click

from saestream.common.errors import cli_errors, escaped

MAX_BODY_BYTES = 64 << 20
"""Most bytes of /metrics read: a daemon's are a few KiB, so more is not a daemon of ours
(and reading on would only eat memory)."""
MAX_TIMEOUT_S = 86400.0
"""Longest --timeout (a day): beyond what timers and sockets take, and no scrape's business."""
_MAX_REASON = 200
"""Most characters of a reason shown (a parser's message may quote a whole line)."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def metrics_url(target: str) -> str:
    """`9101`, `:9101`, `host:9101`, `http://host:9101` or a full URL -> the /metrics URL."""
    t = target.strip()
    if t.isdigit():
        t = f"127.0.0.1:{t}"
    elif t.startswith(":"):
        t = f"127.0.0.1{t}"
    if "://" not in t:
        t = f"http://{t}"
    scheme, _, rest = t.partition("://")
    if "/" not in rest:
        t = f"{scheme}://{rest}/metrics"
    return t


def printable(text: str, limit: int = _MAX_REASON) -> str:
    """`text` `escaped`, on one line of at most `limit` characters."""
    out = escaped(text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


class _Deadline:
    """One overall deadline for a scrape. A socket's timeout bounds each recv only, so a peer
    sending a byte at a time would hold the scrape forever; at the deadline a timer shuts
    down the sockets this scrape opened (through duplicates, which also reach the socket
    after TLS took it over), which wakes whatever read is blocked on them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                _shutdown(s)

    def error(self) -> TimeoutError:
        return TimeoutError(f"no complete answer within {self.timeout:g}s")

    def connect(self, address: tuple[str, int], timeout: Any = None,
                source_address: Any = None) -> socket.socket:
        """`socket.create_connection`, with no step allowed past the deadline."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error()
        step = left if not isinstance(timeout, (int, float)) else min(timeout, left)
        sock = socket.create_connection(address, step, source_address)
        with self._lock:
            self._socks.append(sock.dup())
            if self.expired:
                _shutdown(sock)
        return sock


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's usual opener for http and https (proxies from the environment, redirects),
    whose connections are opened by `deadline.connect`. No ftp, file or data handler: those
    reads no deadline reaches (a FIFO, a slow ftp server), nor a redirect to them."""

    def via_deadline(cls: type[http.client.HTTPConnection]) -> Any:
        def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            conn = cls(*args, **kwargs)
            conn._create_connection = deadline.connect  # type: ignore[attr-defined]
            return conn
        return make

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(via_deadline(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(via_deadline(http.client.HTTPSConnection), req,
                                context=self._context)  # type: ignore[attr-defined]

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), Http(),
                    Https(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def fetch_text(url: str, timeout: float = 3.0, max_bytes: int = MAX_BODY_BYTES) -> str:
    """The body at `url` (see `metrics_url`), read within `timeout` seconds in all. OSError
    if it cannot be had: unreachable, an HTTP error, not an HTTP answer, over `max_bytes`,
    or not whole by the deadline (TimeoutError)."""
    url = metrics_url(url)
    try:  # http.client would wrap a port past 65535 round to another one, or overflow
        port = urllib.parse.urlsplit(url).port
    except ValueError as exc:
        raise OSError(f"bad URL: {exc}") from None
    if port == 0:
        raise OSError("bad URL: port 0")
    with _Deadline(timeout) as deadline:
        try:
            with _opener(deadline).open(url, timeout=timeout) as resp:
                if resp.length is not None and resp.length > max_bytes:
                    raise OSError(f"answer of {resp.length:,} bytes, over the "
                                  f"{max_bytes >> 20} MiB a /metrics page may have")
                body, size = [], 0
                while chunk := resp.read(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise OSError(f"answer over the {max_bytes >> 20} MiB a /metrics "
                                      "page may have")
                    body.append(chunk)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if deadline.expired:  # the shutdown ended the read: say why it happened
                raise deadline.error() from None
            if isinstance(exc, OSError):
                raise
            if isinstance(exc, http.client.InvalidURL):  # a port that is no number, ...
                raise OSError(f"bad URL: {exc}") from None
            if isinstance(exc, http.client.HTTPException):  # e.g. a peer that says "hello"
                raise OSError(f"not an HTTP answer ({type(exc).__name__}: {exc})") from None
            raise OSError(str(exc)) from None  # a URL urllib cannot take
        if deadline.expired:  # a read ended early by the shutdown looks like the end
            raise deadline.error()
    return b"".join(body).decode("utf-8", errors="replace")


def fetch_samples(url: str, timeout: float = 3.0) -> list[Sample]:
    """Scrape `url` (see `metrics_url`) and return every sample; raises OSError if it cannot
    be read (`fetch_text`) and ValueError if the body is not Prometheus text. Label values
    are `escaped`, since they are shown as they are."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch_text(url, timeout)
    # Counted before parsing: the parser holds every sample of a family until the family
    # ends, so a cap while iterating came after the memory was spent (a `# TYPE` line, then
    # 16 million samples: 3.3 GB).
    lines = text.count("\n") + (not text.endswith("\n"))
    if lines - text.count("\n#") - text.startswith("#") > MAX_SAMPLES:
        raise ValueError(f"more than {MAX_SAMPLES:,} samples")
    if _LONG_LINE.search(text):  # the parser's time grows with the square of a line's length
        raise ValueError(f"a line of more than {MAX_LINE_CHARS:,} characters")
    try:
        return [
            Sample(s.name, {k: escaped(v) for k, v in s.labels.items()}, float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except Exception as exc:  # a third-party parser fed whatever the peer sent
        raise ValueError(f"not Prometheus text ({exc})") from None


MAX_LINE_CHARS = 1024
"""Characters a line of the answer may hold: prometheus_client's parser takes time growing
with the square of a line's length (100,000 labels on one line: 9.4 s; a 64 MiB line would
take hours; 64 MiB of 8,191-character lines, 41 s), and a saestream daemon's longest line is
a few hundred characters (a hook of at most 200, an SAE name of at most 128)."""
_LONG_LINE = re.compile(rf"^[^\n]{{{MAX_LINE_CHARS + 1}}}", re.M)  # tried at line starts only

MAX_SAMPLES = 1 << 20
"""Lines that are not comments (each holds at most one sample) one endpoint may answer: a
saestream daemon exports hundreds. A body of 64 MiB (the most read) can hold 16 million
4-byte samples (`a 1`), some 300 bytes each once parsed, so an endpoint answering that, by
mistake or not, would cost gigabytes."""


def by_name(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        out[s.name].append(s)
    return out


def value(samples: dict[str, list[Sample]], name: str, /, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (None if there are none).
    Positional-only, so that a series may have labels called `name` or `samples`."""
    hits = [
        s.value for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(hits) if hits else None


def _num(x: float | None) -> str:
    """A value, short: `-` for none, `nan`/`inf`/`-inf` as such (a peer may send them)."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e12:
        return f"{x:.3g}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.4g}"


def _int(x: float | None) -> str:
    """A count in full (`1,234`), where it is one; else as `_num` has it (int() would raise
    on NaN and infinities, and print hundreds of digits for 1e300)."""
    if x is None or not math.isfinite(x) or abs(x) >= 1e15:
        return _num(x)
    return f"{int(x):,}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%" if math.isfinite(x) else _num(x)


def _seconds(total: float | None, n: float | None) -> str:
    """The mean of a histogram in seconds, `-` without observations (or a finite mean)."""
    if not n or total is None:
        return "-"
    mean = total / n if math.isfinite(n) else math.nan
    return f"{mean:.3f}s" if math.isfinite(mean) else _num(mean)


def _bytes(x: float | None) -> str:
    return "-" if x is None else f"{_num(x)}B"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    if not math.isfinite(ts):
        return _num(ts)
    ago = max(0.0, now - ts)
    return f"{ago:.0f}s ago" if ago < 1e12 else f"{ago:.3g}s ago"  # a hostile stamp: short


def summarize_consumer(s: dict[str, list[Sample]], now: float) -> list[str]:
    lines = []
    saes = sorted({(x.labels["hook"], x.labels["sae"])
                   for x in s.get("saestream_train_steps_total", [])
                   if "hook" in x.labels and "sae" in x.labels})  # not ours without them
    for hook, sae in saes:
        lab = {"hook": hook, "sae": sae}
        steps = value(s, "saestream_train_steps_total", **lab)
        n_obs = value(s, "saestream_train_step_seconds_count", **lab)
        t_sum = value(s, "saestream_train_step_seconds_sum", **lab)
        dead = value(s, "saestream_dead_latent_fraction", **lab)
        step_s = _seconds(t_sum, n_obs)
        lines.append(
            f"  sae {sae} ({hook}): step {_int(steps)}, "
            f"{_num(value(s, 'saestream_trained_tokens_total', **lab))} tokens, "
            f"nmse {_num(value(s, 'saestream_normalized_mse', **lab))}, "
            f"dead {_pct(dead)}, "
            f"L0 {_num(value(s, 'saestream_l0', **lab))}, "
            f"auxk {_num(value(s, 'saestream_auxk_loss', **lab))}, step time {step_s}"
        )
    if not saes:
        lines.append("  no SAE has trained yet")
    for x in s.get("saestream_buffer_tokens", []):
        hook = x.labels.get("hook", "")
        cap = value(s, "saestream_buffer_capacity_tokens", hook=hook) or 0
        fill = x.value / cap if cap and math.isfinite(cap) else math.nan
        pct = f" ({100 * fill:.0f}%)" if math.isfinite(fill) else ""
        lines.append(f"  buffer {hook}: {_int(x.value)}/{_int(cap)} tokens{pct}")
    n_ck = value(s, "saestream_checkpoints_total") or 0
    last = value(s, "saestream_last_checkpoint_timestamp_seconds")
    checkpoints = f"  checkpoints: {_num(n_ck)} written, last {_ago(last, now)}"
    return [*lines, *summarize_intake(s, now), checkpoints]


def _by_reason(s: dict[str, list[Sample]], name: str) -> str:
    """`reason n, ...` for the non-zero series of a counter labelled by reason ("" if none)."""
    return ", ".join(f"{x.labels.get('reason', '')} {_num(x.value)}"
                     for x in s.get(name, []) if x.value)


def summarize_intake(s: dict[str, list[Sample]], now: float) -> list[str]:
    """What a consumer or a recording sink (`saestream record`) took in: producers, rejects,
    recording."""
    lines = []
    for x in s.get("saestream_received_tokens_total", []):
        p = x.labels.get("producer", "")
        lines.append(
            f"  producer {p}: {_num(x.value)} tokens in "
            f"{_num(value(s, 'saestream_received_messages_total', producer=p))} messages, "
            f"{_bytes(value(s, 'saestream_received_wire_bytes_total', producer=p))} on the wire, "
            f"gaps {_num(value(s, 'saestream_sequence_gaps_total', producer=p) or 0)}, "
            f"last seen {_ago(value(s, 'saestream_producer_last_seen_timestamp_seconds', producer=p), now)}"  # noqa: E501
        )
    if not s.get("saestream_received_tokens_total"):
        lines.append("  no producer has sent anything yet")
    lines.append("  rejected: " + (_by_reason(s, "saestream_rejected_messages_total") or "none"))
    for x in s.get("saestream_recorded_tokens_total", []):
        hook = x.labels.get("hook", "")
        lines.append(
            f"  recording {hook}: {_num(x.value)} tokens in "
            f"{_num(value(s, 'saestream_recorded_shards_total', hook=hook))} shards, "
            f"{_bytes(value(s, 'saestream_recorded_bytes_total', hook=hook))}, pending "
            f"{_num(value(s, 'saestream_record_pending_tokens', hook=hook))}, dropped "
            f"{_num(value(s, 'saestream_record_dropped_tokens_total', hook=hook) or 0)}"
        )
    failed = _by_reason(s, "saestream_record_failures_total")
    if failed:
        lines.append("  recording failures: " + failed)
    return lines


def summarize_producer(s: dict[str, list[Sample]]) -> list[str]:
    lines = []
    for x in s.get("saestream_producer_tokens_total", []):
        hook = x.labels.get("hook", "")
        lines.append(
            f"  hook {hook}: {_num(x.value)} tokens sent in "
            f"{_num(value(s, 'saestream_producer_messages_total', hook=hook))} messages, "
            f"{_bytes(value(s, 'saestream_producer_wire_bytes_total', hook=hook))} on the wire, "
            f"compression {_num(value(s, 'saestream_producer_compression_ratio', hook=hook))}x"
        )
    n = value(s, "saestream_producer_forward_seconds_count")
    total = value(s, "saestream_producer_forward_seconds_sum")
    fwd = f"{_seconds(total, n)} mean over {_num(n)} batches" if n and total is not None else "-"
    lines.append(
        f"  forward {fwd}, send blocked "
        f"{_num(value(s, 'saestream_producer_send_blocked_seconds_total'))}s, "
        f"queue {_num(value(s, 'saestream_producer_queue_depth'))}"
    )
    return lines


def summarize_other(samples: list[Sample], max_lines: int = 14) -> list[str]:
    """Compact `name{labels} value` lines of every saestream_* sample (histograms as mean)."""
    lines = []
    s = by_name(samples)
    for name, rows in s.items():
        if not name.startswith("saestream_") or name.endswith(("_bucket", "_created")):
            continue
        if name.endswith("_count") and name[: -len("_count")] + "_sum" in s:
            continue
        short = name[len("saestream_"):]
        for r in rows:
            lab = ",".join(f"{k}={v}" for k, v in r.labels.items())
            shown = escaped(f"{short}{{{lab}}}" if lab else short)  # names may hold \r, \b
            if name.endswith("_sum"):
                cnt = value(s, name[: -len("_sum")] + "_count", **r.labels)
                mean = r.value / cnt if cnt and math.isfinite(cnt) else None
                lines.append(f"  {shown[:-4] if not lab else shown} mean "
                             f"{_num(mean)} over {_num(cnt)}")
            else:
                lines.append(f"  {shown} {_num(r.value)}")
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"  ... {len(lines) - max_lines} more"]
    return lines or ["  no saestream_* metrics"]


def summarize(url: str, samples: list[Sample], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    s = by_name(samples)
    if "saestream_train_steps_total" in s or "saestream_buffer_tokens" in s:
        return [f"{metrics_url(url)}  consumer", *summarize_consumer(s, now)]
    if "saestream_recorded_tokens_total" in s or "saestream_received_tokens_total" in s:
        return [f"{metrics_url(url)}  recorder", *summarize_intake(s, now)]
    if "saestream_producer_tokens_total" in s:
        return [f"{metrics_url(url)}  producer", *summarize_producer(s)]
    return [f"{metrics_url(url)}  daemon", *summarize_other(samples)]


def _not_nan(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """FloatRange lets NaN through (every comparison with it is false)."""
    if value != value:
        raise click.BadParameter("nan is not a number of seconds")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("urls", nargs=-1, required=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=MAX_TIMEOUT_S),
              callback=_not_nan, default=3.0, show_default=True,
              help="Seconds each endpoint may take in all (connect, answer, whole body).")
@cli_errors
def status(urls: tuple[str, ...], timeout: float) -> None:
    """One-screen summary from the daemons' /metrics endpoints.

    URL may be a port (9101), host:port, or a full URL. An endpoint that cannot be read
    (refused, not whole within --timeout, not HTTP, over 64 MiB, not Prometheus text) gets a
    line `URL  unreachable: reason`. Exits 0 if at least one endpoint answered, 1 if none did.
    """
    ok = 0
    for url in urls:
        try:
            samples = fetch_samples(url, timeout)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            click.echo(f"{printable(metrics_url(url))}  unreachable: {printable(str(reason))}")
            continue
        ok += 1
        for line in summarize(url, samples):
            click.echo(line)
    if not ok:
        raise SystemExit(1)
