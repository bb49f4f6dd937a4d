"""`saestream status`: summaries from real /metrics endpoints, unreachable ones, exit codes."""

from __future__ import annotations

import time

import pytest
from conftest import free_tcp_port, run_cli
from prometheus_client import CollectorRegistry, Counter, Gauge

from saestream.common.metrics import serve_metrics
from saestream.consumer.metrics import ConsumerMetrics
from saestream.tools.status import fetch_samples, metrics_url, summarize


@pytest.mark.parametrize(
    "target, url",
    [
        ("9101", "http://127.0.0.1:9101/metrics"),
        (":9101", "http://127.0.0.1:9101/metrics"),
        ("host:9101", "http://host:9101/metrics"),
        ("http://host:9101", "http://host:9101/metrics"),
        ("https://host/x/metrics", "https://host/x/metrics"),
    ],
)
def test_metrics_url_accepts_ports_hosts_and_urls(target: str, url: str) -> None:
    assert metrics_url(target) == url


def consumer_registry() -> CollectorRegistry:
    m = ConsumerMetrics()
    lab = {"hook": "model.layers.4", "sae": "k32"}
    m.normalized_mse.labels(**lab).set(0.1234)
    m.dead_latent_fraction.labels(**lab).set(0.05)
    m.l0.labels(**lab).set(32)
    m.auxk_loss.labels(**lab).set(0.01)
    m.train_steps.labels(**lab).inc(1234)
    m.trained_tokens.labels(**lab).inc(1234 * 4096)
    m.train_step_seconds.labels(**lab).observe(0.05)
    m.declare_hook("model.layers.4", 1000)
    m.buffer_tokens.labels(hook="model.layers.4").set(750)
    m.received_tokens.labels(producer="gpu-1").inc(5_000_000)
    m.received_messages.labels(producer="gpu-1").inc(1221)
    m.producer_last_seen.labels(producer="gpu-1").set(time.time() - 3)
    m.rejected_messages.labels(reason="checksum").inc(2)
    m.checkpoints.inc()
    m.last_checkpoint.set(time.time() - 60)
    return m.registry


def test_consumer_summary_shows_training_buffer_producers_rejects_checkpoints() -> None:
    port = free_tcp_port()
    serve_metrics(consumer_registry(), port)
    lines = summarize(str(port), fetch_samples(str(port)))
    text = "\n".join(lines)
    assert lines[0].endswith("consumer")
    assert "sae k32 (model.layers.4): step 1,234" in text
    assert "nmse 0.1234" in text and "dead 5.0%" in text and "L0 32" in text
    assert "buffer model.layers.4: 750/1,000 tokens (75%)" in text
    assert "producer gpu-1: 5.00M tokens in 1.22k messages" in text
    assert "rejected: checksum 2" in text
    assert "checkpoints: 1 written, last 60s ago" in text
    assert len(lines) <= 24  # one screen


def test_other_daemons_get_a_compact_listing() -> None:
    reg = CollectorRegistry()
    Counter("saestream_thing", "A thing.", ["hook"], registry=reg).labels(hook="h").inc(3)
    Gauge("saestream_level", "A level.", registry=reg).set(0.5)
    port = free_tcp_port()
    serve_metrics(reg, port)
    text = "\n".join(summarize(str(port), fetch_samples(str(port))))
    assert "thing_total{hook=h} 3" in text and "level 0.5" in text


def test_unreachable_endpoint_is_reported_and_exit_code_is_0_if_any_answers() -> None:
    port, dead = free_tcp_port(), free_tcp_port()
    serve_metrics(consumer_registry(), port)
    # the CLI runs in another process; this one serves the metrics on a thread
    result = run_cli(["status", str(port), str(dead)], timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"http://127.0.0.1:{dead}/metrics  unreachable" in result.stdout
    assert "sae k32" in result.stdout


def test_exit_code_is_1_when_every_endpoint_is_unreachable() -> None:
    result = run_cli(["status", str(free_tcp_port()), str(free_tcp_port())], timeout=60)
    assert result.returncode == 1
    assert result.stdout.count("unreachable") == 2


def test_recording_shows_in_a_consumer_and_a_record_sink_summary() -> None:
    reg = consumer_registry()
    m = ConsumerMetrics()  # as a `saestream record` sink has it: no trainer, no buffer
    m.received_tokens.labels(producer="gpu-2").inc(4096)
    m.recorded_tokens.labels(hook="model.layers.4").inc(4096)
    m.recorded_shards.labels(hook="model.layers.4").inc(2)
    m.recorded_bytes.labels(hook="model.layers.4").inc(5 << 20)
    m.record_pending_tokens.labels(hook="model.layers.4").set(100)
    m.record_failures.labels(reason="no_space").inc()
    for registry, kind in ((reg, "consumer"), (m.registry, "recorder")):
        port = free_tcp_port()
        serve_metrics(registry, port)
        lines = summarize(str(port), fetch_samples(str(port)))
        assert lines[0].endswith(kind)
    text = "\n".join(lines)
    assert "producer gpu-2: 4.10k tokens" in text
    assert ("recording model.layers.4: 4.10k tokens in 2 shards, 5.24MB, pending 100, "
            "dropped 0") in text
    assert "recording failures: no_space 1" in text and "checkpoints" not in text
