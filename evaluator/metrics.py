"""Every metric the evaluator daemon exports, declared in one place.

The per-SAE gauges (labels `hook`, `sae`) hold the figures of the latest evaluated snapshot,
computed on the same held-out contexts every time, so a change between snapshots is the
SAE's, not the sample's. Definitions are those of `saestream eval` (README, "Evaluation").
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# One evaluation takes from well under a second (tiny model, GPU) to minutes (CPU, big model).
EVAL_SECONDS_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

FAILURE_REASONS = ("missing", "incomplete", "unreadable", "mismatch", "error", "history",
                   "features")
"""`saestream_eval_failures_total` reasons: the snapshot vanished while read (`--keep`
pruned it), is not complete, has unreadable files, does not fit the model (another model,
hook or width), the evaluation itself failed, the --history line could not be written, or
the --features browser could not be built."""


class EvaluatorMetrics:
    """The evaluator's metrics on `registry` (a new `CollectorRegistry` if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        sae = ["hook", "sae"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"saestream_eval_{name}", doc, sae, registry=r)

        self.delta_ce = gauge(
            "delta_ce", "Downstream loss increase (nats per token): next-token cross-entropy "
            "with the SAE's reconstruction spliced in, minus the clean cross-entropy.")
        self.loss_recovered = gauge(
            "loss_recovered", "Fraction of the loss gap recovered (unitless, 1 = perfect): "
            "(ce_zero - ce_spliced) / (ce_zero - ce_clean), ce_zero with the hook output "
            "zeroed.")
        self.kl = gauge(
            "kl", "Mean KL divergence (nats per token) of the spliced model's next-token "
            "distribution from the clean model's, KL(p_clean || p_spliced).")
        self.ce_clean = gauge(
            "ce_clean", "Clean next-token cross-entropy (nats per token) of the model on the "
            "evaluated contexts.")
        self.normalized_mse = gauge(
            "normalized_mse", "Normalized MSE (unitless) on the evaluated tokens in the SAE's "
            "input space: sum of squared errors / sum of squared deviations from the mean.")
        self.explained_variance = gauge(
            "explained_variance", "Explained variance (unitless, 1 = perfect) in the raw "
            "activation space: 1 - sum of squared errors / sum of squared deviations.")
        self.l0 = gauge(
            "l0", "Mean number of firing latents per evaluated token (count).")
        self.dead_fraction = gauge(
            "dead_fraction", "Fraction (0..1) of latents that fired on none of the evaluated "
            "tokens.")
        self.snapshot_step = gauge(
            "snapshot_step", "Step (count) of the snapshot these figures belong to.")
        self.snapshot_timestamp = gauge(
            "snapshot_timestamp_seconds", "Unix time (seconds) the evaluated snapshot was "
            "written.")
        self.seconds = Histogram(
            "saestream_eval_seconds",
            "Wall time (seconds) of evaluating one snapshot (all its SAEs), loading included.",
            buckets=EVAL_SECONDS_BUCKETS, registry=r,
        )
        self.failures = Counter(
            "saestream_eval_failures_total",
            "Snapshots (count) that could not be evaluated, by reason: " +
            ", ".join(FAILURE_REASONS) + ".",
            ["reason"], registry=r,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    def per_sae(self) -> list[Gauge]:
        return [self.delta_ce, self.loss_recovered, self.kl, self.ce_clean, self.normalized_mse,
                self.explained_variance, self.l0, self.dead_fraction, self.snapshot_step,
                self.snapshot_timestamp]
