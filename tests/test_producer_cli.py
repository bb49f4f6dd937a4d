"""`saestream producer` as a real process: SIGTERM mid-stream, /metrics, bad arguments."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import zmq
from conftest import free_tcp_port, run_cli, saestream_cmd

from saestream.common.wire import decode_chunk


def test_sigterm_flushes_every_chunk_without_seq_gap_and_writes_state(tmp_path: Path) -> None:
    port, metrics_port = free_tcp_port(), free_tcp_port()
    state = tmp_path / "state.json"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    sock.bind(f"tcp://127.0.0.1:{port}")
    proc = subprocess.Popen(
        saestream_cmd(
            "producer", "--model", "tiny", "--corpus", "synthetic", "--connect",
            f"tcp://127.0.0.1:{port}", "--chunk-tokens", "300", "--batch-size", "4",
            "--threads", "1", "--state-file", str(state), "--metrics-port", str(metrics_port),
            "--producer-id", "p-sigterm",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    chunks = []
    try:
        deadline = time.monotonic() + 120
        while len(chunks) < 5 and time.monotonic() < deadline and proc.poll() is None:
            if sock.poll(100):
                chunks.append(decode_chunk(sock.recv_multipart(copy=False)))
        assert len(chunks) >= 5, proc.stderr.read() if proc.poll() is not None else "no chunks"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            page = r.read().decode()
        for name in ("tokens_total", "messages_total", "raw_bytes_total", "wire_bytes_total"):
            assert f'saestream_producer_{name}{{hook="model.layers.4"}}' in page
        for name in ("forward_seconds_bucket", "send_blocked_seconds_total", "queue_depth"):
            assert f"saestream_producer_{name}" in page

        proc.send_signal(signal.SIGTERM)
        last = time.monotonic()
        while proc.poll() is None or time.monotonic() - last < 1.0:
            if sock.poll(100):
                chunks.append(decode_chunk(sock.recv_multipart(copy=False)))
                last = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
        ctx.term()
    assert proc.returncode == 0, err
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert len({c.run for c in chunks}) == 1 and chunks[0].producer == "p-sigterm"
    assert [c.source["start"] for c in chunks[1:]] == [c.source["end"] for c in chunks[:-1]]
    saved = json.loads(state.read_text())
    assert saved["tokens_done"] == chunks[-1].source["end"] == sum(c.n for c in chunks)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return {line.split()[0]: float(line.split()[1]) for line in r.read().decode()
                .splitlines() if line.startswith("saestream_producer_")}


def test_a_producer_blocked_for_good_counts_its_wait_while_it_lasts(tmp_path: Path) -> None:
    """With no consumer the queue fills and the model loop waits: the wait counted only once
    it ended, so a producer blocked for good read 0 (and the dashboard's blocked ratio 0)."""
    metrics_port = free_tcp_port()
    proc = subprocess.Popen(saestream_cmd(
        "producer", "--model", "tiny", "--corpus", "synthetic", "--connect",
        f"tcp://127.0.0.1:{free_tcp_port()}", "--control-connect", "off", "--queue-size", "2",
        "--threads", "1", "--metrics-port", str(metrics_port), "--linger", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                m = scrape(metrics_port)
            except OSError:
                m = {}
            if m.get("saestream_producer_queue_depth") == 2:
                break
            time.sleep(0.2)
        time.sleep(2.5)
        blocked = scrape(metrics_port)["saestream_producer_send_blocked_seconds_total"]
        assert blocked >= 2.0, blocked
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "no-such-model-xyz", "--corpus", "synthetic"], "unknown model"),
        (["--model", "tiny", "--corpus", "text:/nonexistent/dir/*.txt"], "no files match"),
        (["--model", "tiny", "--corpus", "synthetic", "--hook", "model.layers.99"],
         "unknown hook"),
        (["--model", "tiny", "--corpus", "synthetic", "--encode-threads", "65"],
         "--encode-threads"),
        (["--model", "tiny", "--corpus", "synthetic", "--encode-threads", "-1"],
         "--encode-threads"),
    ],
    ids=["unknown-model", "missing-corpus", "bad-hook", "too-many-encode-threads",
         "negative-encode-threads"],
)
def test_bad_arguments_give_one_line_and_exit_code_2(args: list[str], needle: str) -> None:
    result = run_cli(["producer", *args, "--threads", "1", "--connect",
                      f"tcp://127.0.0.1:{free_tcp_port()}"], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saestream: error:") and needle in lines[0]


def test_encode_threads_is_bounded_for_the_producer_and_the_replayer() -> None:
    """Each encode thread may hold two chunks in flight: the count must not be unbounded."""
    from click.testing import CliRunner

    from saestream.producer.cli import producer
    from saestream.producer.replay_cli import replay

    for command in (producer, replay):
        for bad in ("-1", "65", "two"):
            result = CliRunner().invoke(command, ["--encode-threads", bad])
            assert result.exit_code == 2 and "--encode-threads" in result.output, result.output
