"""Real producers (the tiny random Llama over the synthetic corpus) into a real consumer."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import LoggedProcess, saestream_cmd
from test_consumer import HOOK, Consumer, child_env

pytestmark = pytest.mark.slow


class Producer(LoggedProcess):
    def __init__(self, tmp_path: Path, consumer: Consumer, pid: str,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(
            saestream_cmd(
                "producer", "--model", "tiny", "--corpus", "synthetic", "--hook", HOOK,
                "--connect", consumer.endpoint, "--producer-id", pid, "--chunk-tokens", "256",
                "--batch-size", "2", "--seq-len", "64", "--threads", "1", "--seed", "0",
                "--shard", "0/2" if pid.endswith("a") else "1/2",
            ),
            tmp_path / f"{pid}.log", {**child_env(), **(env or {})},
        )


@pytest.fixture
def pipeline(tmp_path: Path):
    procs: list = []

    def start(*consumer_args: str, env_a: dict[str, str] | None = None
              ) -> tuple[Consumer, Producer, Producer]:
        c = Consumer(tmp_path, "--metrics-window", "10", *consumer_args)
        procs.append(c)
        a, b = Producer(tmp_path, c, "prod-a", env_a), Producer(tmp_path, c, "prod-b")
        procs.extend([a, b])
        return c, a, b

    yield start
    for p in procs:
        p.close()


def test_two_producers_feed_one_consumer_and_normalized_mse_falls(pipeline) -> None:
    """One producer regroups lz4-shuffle bytes with numpy (SAESTREAM_NATIVE=0), the other
    and the consumer with the C kernels: the same bytes, so nothing is rejected."""
    c, a, b = pipeline(env_a={"SAESTREAM_NATIVE": "0"})
    c.wait_for("a few steps", lambda: c.steps() >= 3)
    first = c.value("saestream_normalized_mse", hook=HOOK, sae=HOOK)
    c.wait_for("both producers", lambda: all(
        c.value("saestream_received_tokens_total", producer=p) > 0 for p in ("prod-a", "prod-b")
    ))
    c.wait_for("60 steps", lambda: c.steps() >= 60)
    later = c.value("saestream_normalized_mse", hook=HOOK, sae=HOOK)
    assert later < first
    assert c.value("saestream_rejected_messages_total") == 0
    assert c.value("saestream_sequence_gaps_total") == 0
    assert "byte regrouping: numpy" in a.log() and "byte regrouping: C kernels" in b.log()
    assert "byte regrouping: C kernels" in c.log()
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0
    assert "final snapshot" in c.log()


def test_kill_9_of_one_producer_leaves_training_running_on_the_other(pipeline) -> None:
    c, a, b = pipeline()
    c.wait_for("both producers", lambda: all(
        c.value("saestream_received_tokens_total", producer=p) > 0 for p in ("prod-a", "prod-b")
    ))
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(30)
    steps = c.steps()
    from_b = c.value("saestream_received_tokens_total", producer="prod-b")
    c.wait_for("training on the survivor", lambda: c.steps() >= steps + 20 and c.value(
        "saestream_received_tokens_total", producer="prod-b") >= from_b + 20 * 256)
    assert c.proc.poll() is None and b.proc.poll() is None
