"""Hostile and broken input, as a user meets it: `saestream status` run as a real process
against servers on 127.0.0.1 that drip bytes, are not HTTP, send too much or send odd metric
values; and bad values of the SAESTREAM_* environment variables given to real commands. Each
must end in one line (no traceback, no hang)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_tcp_port, run_cli

Handler = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A TCP server on 127.0.0.1 that hands each connection to `handler` on its own thread
    (with an event set at `close`, so endless handlers end)."""

    def __init__(self, handler: Handler) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.handler = handler
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.recv(65536)  # the request
                self.handler(conn, self.stop)
            except OSError:  # the client gave up: what these tests want of it
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Handler], RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler) -> RawServer:
        servers.append(RawServer(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def drip(head: bytes) -> Handler:
    """Send `head`, then one more byte every 50 ms for as long as the client listens."""

    def handler(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        while not stop.wait(0.05):
            conn.sendall(b"a")

    return handler


def status(*args: str) -> tuple[int, list[str], str]:
    """`saestream status ARGS` as a process: exit code, stdout lines, stderr. 20 s is a
    generous bound for `--timeout 1`: past it, the command hangs."""
    res = run_cli(["status", *args], timeout=20)
    return res.returncode, res.stdout.splitlines(), res.stderr


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nX-Slow: ",  # the headers never end
     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n# "],  # nor does the body
    ids=["headers", "body"],
)
def test_a_server_dripping_bytes_is_cut_off_at_the_overall_timeout(raw_server, head) -> None:
    server = raw_server(drip(head))
    code, out, err = status("--timeout", "1", str(server.port))
    assert code == 1, (out, err)
    assert out == [f"http://127.0.0.1:{server.port}/metrics  unreachable: no complete answer "
                   "within 1s"], out
    assert "Traceback" not in err


def test_a_body_over_64_mib_is_refused_not_read_into_memory(raw_server) -> None:
    line = b"# " + b"x" * 1021 + b"\n"  # valid Prometheus text (comments), 1 KiB a line

    def endless(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        block = line * 1024
        for _ in range(66):  # 66 MiB, then the end: what a reader without a cap takes in
            conn.sendall(block)

    def announced(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\n\r\n" + line)

    port1, port2 = raw_server(endless).port, raw_server(announced).port
    code, out, err = status("--timeout", "10", str(port1), str(port2))
    assert code == 1, (out, err)
    assert len(out) == 2 and all("unreachable" in x and "64 MiB" in x for x in out), out
    assert "10,737,418,240 bytes" in out[1]
    assert "Traceback" not in err


def _answer(text: bytes):
    def handler(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                     + str(len(text)).encode() + b"\r\n\r\n" + text)
    return handler


def test_an_answer_of_more_than_a_million_samples_is_refused(raw_server) -> None:
    """4 bytes a sample in the body, some 300 once kept: a cap on bytes alone let 64 MiB
    of them cost gigabytes. Typed: the parser holds a typed family's samples until it ends,
    so a cap counted while parsing came after the memory was spent (found by review)."""
    port = raw_server(_answer(b"# TYPE a gauge\n" + b"a 1\n" * ((1 << 20) + 1))).port
    code, out, err = status("--timeout", "60", str(port))
    assert code == 1, (out, err)
    assert out == [f"http://127.0.0.1:{port}/metrics  unreachable: more than 1,048,576 "
                   "samples"], out
    assert "Traceback" not in err


@pytest.mark.parametrize("line", [b"a{" + b'l="x",' * 200 + b'} 1', b"# " + b" " * 1100,
                                  b'a{l="' + b'\\"' * 600 + b'"} 1'],
                         ids=["labels", "comment", "escapes"])
def test_a_line_longer_than_the_parser_can_take_in_time_is_refused(raw_server, line) -> None:
    """prometheus_client's parser takes time growing with the square of a line's length:
    100,000 labels on one line took 9.4 s, a comment of 200,000 spaces 1.1 s (found by
    review); a 64 MiB line would take hours, 64 MiB of 8,191-character lines 41 s. 1,024
    characters a line at most."""
    port = raw_server(_answer(b"ok 1\n" + line + b"\n")).port
    code, out, err = status("--timeout", "10", str(port))
    assert code == 1, (out, err)
    assert out == [f"http://127.0.0.1:{port}/metrics  unreachable: a line of more than 1,024 "
                   "characters"], out
    assert "Traceback" not in err


def test_the_sample_cap_keeps_an_answer_of_exactly_that_many(raw_server, monkeypatch) -> None:
    from saestream.tools import status as status_module

    monkeypatch.setattr(status_module, "MAX_SAMPLES", 3)
    at, over = (raw_server(_answer(b"# HELP a x\n# TYPE a gauge\na 1\nb 2\n# c\nc 3" + extra)).port
                for extra in (b"\n", b"\nd 4"))
    got = status_module.fetch_samples(f"http://127.0.0.1:{at}/metrics")
    assert [(s.name, s.value) for s in got] == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    with pytest.raises(ValueError, match="more than 3 samples"):
        status_module.fetch_samples(f"http://127.0.0.1:{over}/metrics")


@pytest.mark.parametrize("greeting", [b"hello\n", b"SSH-2.0-x\r\n\x1b[2J\x00\xff"],
                         ids=["hello", "binary"])
def test_a_peer_that_does_not_speak_http_gets_one_line(raw_server, greeting: bytes) -> None:
    def greet(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(greeting)

    server = raw_server(greet)
    code, out, err = status("--timeout", "5", str(server.port))
    assert code == 1, (out, err)
    assert len(out) == 1 and "unreachable: not an HTTP answer" in out[0], out
    assert "\x1b" not in out[0] and "Traceback" not in err, (out, err)


def serve_text(text: str) -> tuple[ThreadingHTTPServer, int]:
    """A real HTTP server on 127.0.0.1 whose /metrics is `text`."""
    body = text.encode()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


CONSUMER = """\
saestream_train_steps_total{hook="h",sae="s"} NaN
saestream_train_steps_total{sae="no-hook"} 5
saestream_train_steps_total{hook="no-sae"} 5
saestream_trained_tokens_total{hook="h",sae="s"} +Inf
saestream_normalized_mse{hook="h",sae="s"} -Inf
saestream_dead_latent_fraction{hook="h",sae="s"} NaN
saestream_train_step_seconds_count{hook="h",sae="s"} +Inf
saestream_train_step_seconds_sum{hook="h",sae="s"} 1
saestream_buffer_tokens{hook="h"} 12.5
saestream_buffer_tokens{hook="big"} 1e300
saestream_buffer_capacity_tokens{hook="h"} +Inf
saestream_received_tokens_total{producer="p"} NaN
saestream_producer_last_seen_timestamp_seconds{producer="p"} -Inf
saestream_rejected_messages_total{reason="x"} NaN
saestream_checkpoints_total NaN
saestream_last_checkpoint_timestamp_seconds +Inf
"""
PRODUCER = """\
saestream_producer_tokens_total{hook="h"} +Inf
saestream_producer_compression_ratio{hook="h"} 1e300
saestream_producer_forward_seconds_count NaN
saestream_producer_forward_seconds_sum 2
"""
OTHER = """\
saestream_thing_sum{name="a",samples="b"} 3
saestream_thing_count{name="a",samples="b"} 0
saestream_level{where="\x1b[31mred\\nline2"} -Inf
{"saestream_ok\rsaestream_FAKE"} 1
saestream_z{"k\x08\x08\u202e"="v"} 2
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        (CONSUMER, ["sae s (h): step nan, inf tokens, nmse -inf, dead nan, L0 -, auxk -, "
                    "step time nan",
                    "buffer h: 12/inf tokens", "buffer big: 1e+300/0 tokens",
                    "producer p: nan tokens", "last seen -inf", "rejected: x nan",
                    "checkpoints: nan written, last inf"]),
        (PRODUCER, ["hook h: inf tokens sent", "compression 1e+300x",
                    "forward nan mean over nan batches"]),
        (OTHER, ["thing_sum{name=a,samples=b} mean - over 0",
                 "level{where=\\x1b[31mred\\nline2} -inf",
                 "ok\\rsaestream_FAKE 1",  # quoted names and label keys, escaped too
                 "z{k\\x08\\x08\\u202e=v} 2"]),
    ],
    ids=["consumer", "producer", "other"],
)
def test_odd_metric_values_and_labels_are_shown_not_a_traceback(text, expected) -> None:
    server, port = serve_text(text)
    try:
        code, out, err = status("--timeout", "5", str(port))
    finally:
        server.shutdown()
    shown = "\n".join(out)
    assert code == 0 and "Traceback" not in err, (out, err)
    for needle in expected:
        assert needle in shown, (needle, out)
    assert "no-hook" not in shown and "no-sae" not in shown  # a series without its labels
    assert "\x1b" not in shown and "G" not in shown  # no "infG", no raw escapes
    assert not {"\r", "\x08", "\u202e"} & set(shown)


def one_error_line(res, needle: str) -> None:
    """Exit 2 and one `saestream: error:` line, the last (a daemon may have logged its
    start-up before it reached the setting)."""
    lines = res.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("saestream: error: ")]
    assert res.returncode == 2, res.stderr[-2000:]
    assert errors == lines[-1:] and needle in errors[0], lines
    assert "Traceback" not in res.stderr


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("threads", ["abc", "-1", "99999"])
def test_a_bad_saestream_threads_is_one_line(tmp_path: Path, threads: str) -> None:
    """The evaluator daemon takes its torch threads from $SAESTREAM_THREADS alone: a word
    was a traceback, -1 silently torch's default, 99999 a crash on the first parallel op."""
    res = run_cli(["evaluator", "--checkpoint-dir", str(tmp_path), "--corpus", "synthetic",
                   "--device", "cpu", "--metrics-port", "0"], timeout=60,
                  env=env(SAESTREAM_THREADS=threads))
    one_error_line(res, f"SAESTREAM_THREADS={threads!r}")


@pytest.mark.parametrize("var", ["SAESTREAM_NATIVE", "SAESTREAM_KEEP_FREED_MEMORY"])
def test_an_on_off_switch_that_is_neither_is_one_line(tmp_path: Path, var: str) -> None:
    """A CPU consumer reads both at start-up; `maybe` used to mean "on" without a word."""
    port = free_tcp_port()
    started = time.monotonic()
    res = run_cli(["consumer", "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port", "0",
                   "--checkpoint-dir", str(tmp_path / "ckpt"), "--hook", "h", "--device", "cpu",
                   "--sae", "latents=256,k=8", "--buffer-tokens", "4096", "--batch-size", "256"],
                  timeout=60, env=env(**{var: "maybe"}))
    one_error_line(res, f"{var}='maybe': not on or off")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("command", ["consumer", "train", "producer", "record", "features"])
@pytest.mark.parametrize("setting", ["SAESTREAM_THREADS=abc", "SAESTREAM_KEEP_FREED_MEMORY=2",
                                     "SAESTREAM_NATIVE=of"])
def test_every_command_refuses_a_malformed_variable_before_anything_else(
        tmp_path: Path, command: str, setting: str) -> None:
    """The consumer and train ignored SAESTREAM_THREADS=abc, the producer took
    SAESTREAM_KEEP_FREED_MEMORY=2, and the consumer refused it only after binding its
    sockets: now it is the one and only line, whatever else the command line holds."""
    var, value = setting.split("=")
    res = run_cli([command, "--hook", "h"], timeout=60, env=env(**{var: value}))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(f"saestream: error: {var}='{value}'"), res.stderr


def test_a_saestream_cache_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """`~` is expanded (environment files set it unexpanded), and a file is not a cache
    folder: one line before any model is looked for, not a folder named `~` in the cwd."""
    (tmp_path / "not-a-folder").write_text("")
    res = run_cli(["producer", "--model", "smollm2-135m", "--corpus", "synthetic", "--threads",
                   "1", "--connect", f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=60,
                  cwd=tmp_path,
                  env=env(HOME=str(tmp_path), SAESTREAM_CACHE="~/not-a-folder"))
    one_error_line(res, "SAESTREAM_CACHE='~/not-a-folder': not a folder")
    assert not (tmp_path / "~").exists()


THREAD_PROBE = """
import logging, sys, threading, zlib
import numpy as np
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from saestream.common.wire import crc32
buf, out = np.arange(4096, dtype=np.uint8), []
for _ in range(2):  # as an encode or decode pool's threads reach the kernels first
    t = threading.Thread(target=lambda: out.append(crc32(buf)))
    t.start()
    t.join()
print(out == [zlib.crc32(buf)] * 2)
"""


def test_a_bad_saestream_native_first_read_on_a_worker_thread_is_one_log_line(
    tmp_path: Path,
) -> None:
    """Where no command is there to turn it into its one line (a pool thread reads the
    switch first: a producer sending raw or lz4 chunks), the kernels stay off with one error
    in the log, and the results are numpy's and zlib's, the same."""
    proc = subprocess.run([sys.executable, "-c", THREAD_PROBE], capture_output=True, text=True,
                          timeout=120, env=env(SAESTREAM_NATIVE="maybe",
                                               SAESTREAM_CACHE=str(tmp_path)))
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR SAESTREAM_NATIVE='maybe'"), lines
    assert not list(tmp_path.rglob("*.so"))  # nothing built


@pytest.mark.parametrize("var", ["WORLD_SIZE", "LOCAL_RANK"])
def test_a_launcher_variable_that_is_no_count_is_one_line(tmp_path: Path, var: str) -> None:
    """Set by hand (torchrun sets them as counts), `abc` was a 35-line traceback."""
    extra = {"WORLD_SIZE": "2"} if var == "LOCAL_RANK" else {}
    res = run_cli(["consumer", "--hook", "h", "--metrics-port", "0", "--checkpoint-dir",
                   str(tmp_path / "c")], timeout=60, env=env(**extra, **{var: "abc"}))
    one_error_line(res, f"${var}='abc': not a count")
