"""Every metric the consumer exports, declared in one place.

Names follow the Prometheus conventions: `saestream_` prefix, base units (seconds, bytes),
`_total` for counters. Labels: `hook` and `sae` on training metrics, `producer` on what is
received per producer, `reason` on rejects. The registry is created by the caller (no
global state), so tests can run several consumers in one process. Under torchrun every rank
serves `served(rank)`: the same series plus a `rank` label on everything but the training
metrics, which are the global batch's figures, the same on every rank (one process keeps
its label sets, so its dashboards and queries do not change).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric

# Step times of a TopK SAE range from ~1 ms (tiny, GPU) to seconds (wide, CPU).
STEP_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class ConsumerMetrics:
    """The consumer's metrics on `registry` (a new `CollectorRegistry` if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        sae = ["hook", "sae"]

        # -- training quality (per SAE) --
        self.normalized_mse = Gauge(
            "saestream_normalized_mse",
            "Normalized MSE (fraction of variance unexplained, unitless): sum of squared "
            "reconstruction errors / sum of squared deviations from the batch mean, both "
            "summed over the last --metrics-window training steps.",
            sae, registry=r,
        )
        self.dead_latent_fraction = Gauge(
            "saestream_dead_latent_fraction",
            "Fraction (0..1) of latents that have not fired in the last dead_tokens trained "
            "tokens, at the latest step.",
            sae, registry=r,
        )
        self.l0 = Gauge(
            "saestream_l0",
            "Mean number of non-zero latents per token (count) in the latest batch.",
            sae, registry=r,
        )
        self.auxk_loss = Gauge(
            "saestream_auxk_loss",
            "AuxK loss (unitless, normalized MSE of the dead-latent reconstruction of the "
            "residual) of the latest batch; 0 when no latent is dead.",
            sae, registry=r,
        )
        self.loss = Gauge(
            "saestream_loss",
            "Total training loss (unitless) of the latest batch: normalized MSE against the "
            "fixed start-of-training constant + auxk_coef * AuxK (+ Multi-TopK term).",
            sae, registry=r,
        )

        # -- training progress (per SAE) --
        self.trained_tokens = Counter(
            "saestream_trained_tokens_total",
            "Tokens (count) this SAE has trained on, including those before a --resume.",
            sae, registry=r,
        )
        self.train_steps = Counter(
            "saestream_train_steps_total",
            "Optimizer steps (count) of this SAE, including those before a --resume.",
            sae, registry=r,
        )
        self.skipped_steps = Counter(
            "saestream_skipped_steps_total",
            "Steps (count) skipped with the SAE left as it was, because their loss was not "
            "finite (values in the batch whose squares pass float32's range); since start-up.",
            sae, registry=r,
        )
        self.skipped_tokens = Counter(
            "saestream_skipped_tokens_total",
            "Tokens (count) of the skipped steps: taken from the buffer, never trained on.",
            sae, registry=r,
        )
        self.train_step_seconds = Histogram(
            "saestream_train_step_seconds",
            "Wall time (seconds) of one training step of this SAE: forward, backward, update "
            "and metric read-out, excluding the wait for data.",
            sae, buckets=STEP_SECONDS_BUCKETS, registry=r,
        )

        # -- shuffle buffer (per hook) --
        self.buffer_tokens = Gauge(
            "saestream_buffer_tokens",
            "Tokens (count) held in the shuffle buffer, ready to be trained on.",
            ["hook"], registry=r,
        )
        self.buffer_capacity_tokens = Gauge(
            "saestream_buffer_capacity_tokens",
            "Capacity (tokens) of the shuffle buffer (--buffer-tokens).",
            ["hook"], registry=r,
        )

        # -- receiving (per producer) --
        self.received_messages = Counter(
            "saestream_received_messages_total",
            "Messages (count) accepted from this producer; rejected ones are counted only "
            "under saestream_rejected_messages_total.",
            ["producer"], registry=r,
        )
        self.received_tokens = Counter(
            "saestream_received_tokens_total",
            "Tokens (count) in the accepted messages of this producer.",
            ["producer"], registry=r,
        )
        self.received_wire_bytes = Counter(
            "saestream_received_wire_bytes_total",
            "Bytes on the wire (header + payload) of the accepted messages of this producer.",
            ["producer"], registry=r,
        )
        self.rejected_messages = Counter(
            "saestream_rejected_messages_total",
            "Messages (count) dropped as invalid, by reason (the wire module's reasons, plus "
            "'model' for a model other than the hook's first one, 'error' for anything else).",
            ["reason"], registry=r,
        )
        self.sequence_gaps = Counter(
            "saestream_sequence_gaps_total",
            "Gaps (count) in a producer run's message sequence numbers: each time a message's "
            "seq is not the previous seq + 1. Counted, never fatal.",
            ["producer"], registry=r,
        )
        self.producer_restarts = Counter(
            "saestream_producer_restarts_total",
            "Times (count) a producer id appeared with a new run id after an earlier one.",
            ["producer"], registry=r,
        )
        self.producer_last_seen = Gauge(
            "saestream_producer_last_seen_timestamp_seconds",
            "Unix time (seconds) of the last accepted message from this producer.",
            ["producer"], registry=r,
        )

        # -- checkpoints --
        self.checkpoints = Counter(
            "saestream_checkpoints_total",
            "Snapshots (count) written by this process (signal, periodic and final).",
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "saestream_last_checkpoint_timestamp_seconds",
            "Unix time (seconds) at which the newest snapshot was written; 0 before the first.",
            registry=r,
        )

        self.checkpoint_failures = Counter(
            "saestream_checkpoint_failures_total",
            "Snapshots (count) that could not be written, by reason (no_space, read_only, "
            "permission, io, other); training goes on and the previous snapshot is kept.",
            ["reason"], registry=r,
        )

        # -- delivery guarantees and limits --
        self.duplicate_tokens = Counter(
            "saestream_duplicate_tokens_total",
            "Rows (count) dropped because their stream positions were already accounted for "
            "(re-sent after a producer rewound); never trained twice.",
            ["producer"], registry=r,
        )
        self.producers_tracked = Gauge(
            "saestream_producers_tracked",
            "Producer ids heard from within --producer-expiry-seconds (at most "
            "--max-producers).",
            registry=r,
        )
        self.receive_budget_bytes = Gauge(
            "saestream_receive_memory_budget_bytes",
            "Worst-case bytes ZeroMQ may hold for received messages: --max-connections x "
            "((--hwm + 1) x the largest message accepted + 5 control requests of 256 KiB).",
            registry=r,
        )
        self.control_rejected = Counter(
            "saestream_control_rejected_total",
            "Control-channel messages (count) dropped as malformed.",
            registry=r,
        )
        self.refused_connections = _Refusals()
        r.register(self.refused_connections)  # type: ignore[arg-type]

        # -- recording (--record, saestream record; per hook) --
        self.recorded_tokens = Counter(
            "saestream_recorded_tokens_total",
            "Rows (count) of accepted chunks written to complete recording shards.",
            ["hook"], registry=r,
        )
        self.recorded_shards = Counter(
            "saestream_recorded_shards_total",
            "Recording shards (count) written, each complete and renamed into place.",
            ["hook"], registry=r,
        )
        self.recorded_bytes = Counter(
            "saestream_recorded_bytes_total",
            "Bytes written to complete recording shards (header, index and rows).",
            ["hook"], registry=r,
        )
        self.record_pending_tokens = Gauge(
            "saestream_record_pending_tokens",
            "Rows (count) held for the next recording shard, not yet on disk (a SIGKILL "
            "loses them; SIGTERM writes them).",
            ["hook"], registry=r,
        )
        self.record_dropped_tokens = Counter(
            "saestream_record_dropped_tokens_total",
            "Accepted rows (count) missing from the recording: their shard could not be "
            "written (see saestream_record_failures_total).",
            ["hook"], registry=r,
        )
        self.record_skipped_tokens = Counter(
            "saestream_record_skipped_tokens_total",
            "Accepted rows (count) not written again: a shard of the recording already holds "
            "their stream positions (re-sent after a crash of the recording process).",
            ["hook"], registry=r,
        )
        self.record_failures = Counter(
            "saestream_record_failures_total",
            "Recording shards (count) that could not be written, by reason (no_space, "
            "read_only, permission, io, other); training and receiving go on.",
            ["reason"], registry=r,
        )

    def served(self, rank: int | None) -> CollectorRegistry:
        """What /metrics serves: the registry itself in one process; under torchrun a view
        of it with `rank` on every series but the (global) training metrics."""
        if rank is None:
            return self.registry
        training = {f.name for m in (self.normalized_mse, self.dead_latent_fraction, self.l0,
                                     self.auxk_loss, self.loss, self.trained_tokens,
                                     self.train_steps, self.train_step_seconds,
                                     self.skipped_steps, self.skipped_tokens)
                    for f in m.describe()}
        view = CollectorRegistry(auto_describe=False)
        view.register(_RankLabelled(self.registry, str(rank), training))  # type: ignore[arg-type]
        return view

    def declare_rejects(self, reasons: Iterable[str]) -> None:
        """Export every reject reason from the start (at 0), so dashboards see the series."""
        for reason in reasons:
            self.rejected_messages.labels(reason=reason)

    def declare_sae(self, hook: str, sae: str) -> None:
        """Export the SAE's skip counters from the start (at 0): a dashboard panel and an
        alert's `increase` need the series before the first skip, not from it."""
        self.skipped_steps.labels(hook=hook, sae=sae)
        self.skipped_tokens.labels(hook=hook, sae=sae)

    def declare_hook(self, hook: str, capacity: int,
                     fill: Callable[[], float] | None = None) -> None:
        """The hook's buffer gauges: capacity, and the fill (read at scrape time if given)."""
        self.buffer_capacity_tokens.labels(hook=hook).set(capacity)
        if fill is None:
            self.buffer_tokens.labels(hook=hook).set(0)
        else:
            self.buffer_tokens.labels(hook=hook).set_function(fill)

    def forget_producer(self, producer: str) -> None:
        """Drop an expired producer's series (its counts stay in the ledger)."""
        for metric in (self.received_messages, self.received_tokens, self.received_wire_bytes,
                       self.sequence_gaps, self.producer_restarts, self.producer_last_seen,
                       self.duplicate_tokens):
            try:
                metric.remove(producer)
            except KeyError:
                pass


class _Refusals:
    """saestream_refused_connections_total{socket}: read at scrape time from the sockets'
    connection monitors, which count the connections they shut down."""

    NAME = "saestream_refused_connections"
    HELP = ("Connections (count) shut down at their handshake because --max-connections were "
            "open, by socket (data, control).")

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], int]] = {}

    def watch(self, socket: str, count: Callable[[], int]) -> None:
        self.sources[socket] = count

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["socket"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["socket"])
        for socket, count in self.sources.items():
            family.add_metric([socket], count())
        yield family


class _RankLabelled:
    """A collector re-serving `source` with `rank` added to every family not in `keep`."""

    def __init__(self, source: CollectorRegistry, rank: str, keep: set[str]) -> None:
        self.source, self.rank, self.keep = source, rank, keep

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():  # fresh objects on every scrape
            if family.name not in self.keep:
                family.samples = [s._replace(labels={**s.labels, "rank": self.rank})
                                  for s in family.samples]
            yield family
