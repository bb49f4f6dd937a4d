"""`saestream status URL...`: a one-screen summary read from the daemons' /metrics endpoints.

Each URL is scraped once and parsed with prometheus_client's text parser. A consumer (it
exports `saestream_train_steps_total`) gets a summary of training, buffer, producers,
rejects and checkpoints; a producer one of what it sent; anything else a compact list of
its `saestream_*` values. An unreachable URL gets one line saying so. Exit code: 0 if at
least one URL answered, 1 if none did.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

import click

from saestream.common.errors import cli_errors


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


def fetch_samples(url: str, timeout: float = 3.0) -> list[Sample]:
    """Scrape `url` (see `metrics_url`) and return every sample; raises OSError if unreachable
    and ValueError if the body is not Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url(url), timeout=timeout) as resp:
        text = resp.read().decode("utf-8", errors="replace")
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def by_name(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        out[s.name].append(s)
    return out


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (None if there are none)."""
    hits = [
        s.value for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(hits) if hits else None


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x:  # NaN
        return "nan"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.4g}"


def _bytes(x: float | None) -> str:
    return "-" if x is None else f"{_num(x)}B"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, now - ts):.0f}s ago"


def summarize_consumer(s: dict[str, list[Sample]], now: float) -> list[str]:
    lines = []
    saes = sorted({(x.labels["hook"], x.labels["sae"])
                   for x in s.get("saestream_train_steps_total", [])})
    for hook, sae in saes:
        lab = {"hook": hook, "sae": sae}
        steps = value(s, "saestream_train_steps_total", **lab)
        n_obs = value(s, "saestream_train_step_seconds_count", **lab)
        t_sum = value(s, "saestream_train_step_seconds_sum", **lab)
        dead = value(s, "saestream_dead_latent_fraction", **lab)
        step_s = f"{t_sum / n_obs:.3f}s" if n_obs and t_sum is not None else "-"
        lines.append(
            f"  sae {sae} ({hook}): step {'-' if steps is None else f'{int(steps):,}'}, "
            f"{_num(value(s, 'saestream_trained_tokens_total', **lab))} tokens, "
            f"nmse {_num(value(s, 'saestream_normalized_mse', **lab))}, "
            f"dead {'-' if dead is None else f'{100 * dead:.1f}%'}, "
            f"L0 {_num(value(s, 'saestream_l0', **lab))}, "
            f"auxk {_num(value(s, 'saestream_auxk_loss', **lab))}, step time {step_s}"
        )
    if not saes:
        lines.append("  no SAE has trained yet")
    for x in s.get("saestream_buffer_tokens", []):
        hook = x.labels.get("hook", "")
        cap = value(s, "saestream_buffer_capacity_tokens", hook=hook) or 0
        pct = f" ({100 * x.value / cap:.0f}%)" if cap else ""
        lines.append(f"  buffer {hook}: {int(x.value):,}/{int(cap):,} tokens{pct}")
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
    fwd = f"{total / n:.3f}s mean over {_num(n)} batches" if n and total is not None else "-"
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
            shown = f"{short}{{{lab}}}" if lab else short
            if name.endswith("_sum"):
                cnt = value(s, name[: -len("_sum")] + "_count", **r.labels)
                lines.append(f"  {shown[:-4] if not lab else shown} mean "
                             f"{_num(r.value / cnt) if cnt else '-'} over {_num(cnt)}")
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("urls", nargs=-1, required=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3.0,
              show_default=True, help="Seconds to wait for each endpoint.")
@cli_errors
def status(urls: tuple[str, ...], timeout: float) -> None:
    """One-screen summary from the daemons' /metrics endpoints.

    URL may be a port (9101), host:port, or a full URL. Exits 0 if at least one endpoint
    answered, 1 if none did.
    """
    ok = 0
    for url in urls:
        try:
            samples = fetch_samples(url, timeout)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            click.echo(f"{metrics_url(url)}  unreachable: {reason}")
            continue
        ok += 1
        for line in summarize(url, samples):
            click.echo(line)
    if not ok:
        raise SystemExit(1)
