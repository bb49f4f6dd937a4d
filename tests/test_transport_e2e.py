"""CURVE end to end with the real CLIs: keys from `saestream keygen`, a consumer that admits one
producer, and an intruder whose chunks never reach it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli, saestream_cmd
from test_consumer import HOOK, Consumer, child_env

pytestmark = pytest.mark.slow


def start_producer(tmp_path: Path, consumer: Consumer, pid: str, keys: Path,
                   consumer_keys: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{pid}.log"
    proc = subprocess.Popen(
        saestream_cmd(
            "producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
            "--connect", consumer.endpoint, "--producer-id", pid, "--chunk-tokens", "256",
            "--batch-size", "2", "--seq-len", "64", "--threads", "1", "--max-tokens", "2048",
            "--curve-secret-key", str(keys / f"{pid}.key_secret"),
            "--curve-server-key", str(consumer_keys / "consumer.key"),
        ),
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env(),
    )
    return proc, log


def test_only_the_authorised_producer_gets_chunks_in(tmp_path: Path) -> None:
    for directory, name in (("consumer", "consumer"), ("producers", "good"),
                            ("producers", "intruder")):
        assert run_cli(["keygen", str(tmp_path / directory), "--name", name],
                       timeout=60).returncode == 0
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "good.key").write_bytes((tmp_path / "producers" / "good.key").read_bytes())

    consumer = Consumer(
        tmp_path, "--curve-secret-key", str(tmp_path / "consumer" / "consumer.key_secret"),
        "--curve-authorized-dir", str(authorized),
    )
    procs = []
    try:
        for pid in ("good", "intruder"):
            procs.append(start_producer(tmp_path, consumer, pid, tmp_path / "producers",
                                        tmp_path / "consumer"))
        good, intruder = procs
        assert good[0].wait(120) == 0, good[1].read_text()
        consumer.wait_for("the good producer's tokens", lambda: consumer.value(
            "saestream_received_tokens_total", producer="good") >= 2048)
        deadline = time.monotonic() + 60
        while "handshake_failed_auth" not in consumer.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "handshake_failed_auth" in consumer.log()
        assert consumer.value("saestream_received_tokens_total", producer="intruder") == 0
        assert consumer.value("saestream_rejected_messages_total") == 0  # not even seen
        assert intruder[0].poll() is None  # still waiting to be admitted, never got in
        assert "handshake_failed_auth" in intruder[1].read_text()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        consumer.close()
