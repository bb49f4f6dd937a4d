"""Every Prometheus metric of the producer, declared on a registry the daemon creates."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class ProducerMetrics:
    tokens: Counter
    messages: Counter
    raw_bytes: Counter
    wire_bytes: Counter
    compression_ratio: Gauge
    forward_seconds: Histogram
    send_blocked_seconds: Counter
    queue_depth: Gauge
    rewinds: Counter
    state_write_failures: Counter
    dropped_inputs: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ProducerMetrics:
        return cls(
            tokens=Counter(
                "saestream_producer_tokens_total",
                "Token activations sent (rows of chunks handed to ZeroMQ).",
                ["hook"], registry=registry,
            ),
            messages=Counter(
                "saestream_producer_messages_total", "Chunk messages sent.", ["hook"],
                registry=registry,
            ),
            raw_bytes=Counter(
                "saestream_producer_raw_bytes_total",
                "Bytes of activations sent before compression (n * d * wire itemsize).",
                ["hook"], registry=registry,
            ),
            wire_bytes=Counter(
                "saestream_producer_wire_bytes_total",
                "Bytes sent on the wire (header + compressed payload).",
                ["hook"], registry=registry,
            ),
            compression_ratio=Gauge(
                "saestream_producer_compression_ratio",
                "raw_bytes / wire_bytes of the last chunk sent (dimensionless).",
                ["hook"], registry=registry,
            ),
            forward_seconds=Histogram(
                "saestream_producer_forward_seconds",
                "Seconds per batch for the truncated forward pass, activations on the host.",
                buckets=FORWARD_BUCKETS, registry=registry,
            ),
            send_blocked_seconds=Counter(
                "saestream_producer_send_blocked_seconds_total",
                "Seconds the model loop waited for room in the full send queue (backpressure).",
                registry=registry,
            ),
            queue_depth=Gauge(
                "saestream_producer_queue_depth", "Chunks waiting in the send queue.",
                registry=registry,
            ),
            rewinds=Counter(
                "saestream_producer_rewinds_total",
                "Times (count) the producer moved to where the consumer said to continue: back "
                "(re-sending what the consumer does not hold) or forward (skipping what it "
                "holds), by direction.",
                ["direction"], registry=registry,
            ),
            state_write_failures=Counter(
                "saestream_producer_state_write_failures_total",
                "Saves of --state-file the disk refused (full, read-only); streaming goes on "
                "and the next save tries again.",
                registry=registry,
            ),
            dropped_inputs=Counter(
                "saestream_producer_dropped_inputs_total",
                "Inputs (count) skipped while reading the corpus, by reason: unreadable_file, "
                "not_a_regular_file (corpus files), bad_jsonl_line, truncated_tokens (contexts "
                "past the end of a tokens: file that shrank), bad_token_ids (contexts).",
                ["reason"], registry=registry,
            ),
        )
