"""`saestream demo`: a consumer and two producers as real processes on 127.0.0.1.

The demo is only an orchestrator: it runs `saestream consumer` and `saestream producer`
exactly as a person would, reads the consumer's /metrics once a second for one live
progress line, and stops everything with SIGTERM (the consumer writes its final snapshot).
The first producer starts alone: on a fresh machine it builds the model cache first
(smollm2-135m: dequantising the embedded GGUF once), and the second producer starts once
the first one's activations arrive.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import click

from saestream.common.errors import UserError, cli_errors
from saestream.common.files import check_writable_dir
from saestream.common.settings import FiniteFloat, GivenPath

DEFAULT_HOOKS = {"smollm2-135m": "model.layers.20", "tiny": "model.layers.4"}
"""The producer's default hook (block round(2/3 · n_layers)) of the models the demo knows."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int, taken: set[int], *, with_next: bool = False) -> int:
    """`preferred` if free, else any free port (never one in `taken`); `with_next`: the next
    port must be free and not taken too (the consumer's control socket binds port + 1)."""

    def usable(p: int) -> bool:
        span = (p, p + 1) if with_next else (p,)
        return all(q not in taken and q <= 65535 and _port_free(q) for q in span)

    if preferred and usable(preferred):
        return preferred
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if usable(port):
            return port


class Child:
    """A `saestream` subcommand as a process, its output in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[str] = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "saestream", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            click.echo(f"{self.name} did not stop within {timeout:.0f}s; killed", err=True)
        self._log.close()
        return rc

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


def _check_consumer_settings(hook: str, sae: str, batch_size: int, buffer_tokens: int,
                             device: str) -> None:
    """The consumer's own checks of what the demo hands it (UserError: one line, exit 2),
    before any process starts."""
    from saestream.common.devices import resolve_device
    from saestream.consumer.config import ConsumerConfig, build_sae_specs, check_fits

    hooks, specs = build_sae_specs([sae], [hook])
    cfg = ConsumerConfig(hooks=hooks, saes=specs, batch_size=batch_size,
                         buffer_tokens=buffer_tokens)
    check_fits(cfg, str(resolve_device(device)))


def _user_error(child: Child) -> str | None:
    """The one-line error of a child that exited 2 (bad input), without its prefix."""
    if child.proc.returncode != 2:
        return None
    prefix = "saestream: error: "
    lines = [x for x in child.tail(5).splitlines() if x.startswith(prefix)]
    return lines[-1][len(prefix):] if lines else None


class Progress:
    """One line of consumer progress from two scrapes of its /metrics."""

    def __init__(self, metrics_port: int, window: float = 5.0) -> None:
        self.port = metrics_port
        self.window = window
        self.points: deque[tuple[float, float, float]] = deque()  # time, received, trained

    def read(self) -> dict[str, Any] | None:
        from saestream.tools.status import by_name, fetch_samples, value

        try:
            s = by_name(fetch_samples(f"127.0.0.1:{self.port}", timeout=2))
        except (OSError, ValueError):
            return None
        now = time.monotonic()
        received = value(s, "saestream_received_tokens_total") or 0.0
        trained_rows = s.get("saestream_trained_tokens_total", [])
        trained = max((x.value for x in trained_rows), default=0.0)
        # rates over the last `window` seconds
        self.points.append((now, received, trained))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.popleft()
        t0, r0, n0 = self.points[0]
        dt = now - t0
        rates = ((received - r0) / dt, (trained - n0) / dt) if dt > 0 else (0.0, 0.0)
        cap = value(s, "saestream_buffer_capacity_tokens") or 0.0
        return {
            "received": received,
            "trained": trained,
            "recv_rate": rates[0],
            "train_rate": rates[1],
            "nmse": value(s, "saestream_normalized_mse"),
            "dead": value(s, "saestream_dead_latent_fraction"),
            "l0": value(s, "saestream_l0"),
            "fill": (value(s, "saestream_buffer_tokens") or 0.0) / cap if cap else 0.0,
            "producers": len(s.get("saestream_received_tokens_total", [])),
        }

    @staticmethod
    def line(p: dict[str, Any], elapsed: float) -> str:
        def f(x: float | None, fmt: str) -> str:
            return "-" if x is None or x != x else format(x, fmt)

        dead = None if p["dead"] is None else 100 * p["dead"]
        return (
            f"[{elapsed:5.0f}s] received {p['recv_rate']:7.0f} tok/s  trained "
            f"{p['train_rate']:7.0f} tok/s ({p['trained']:.0f} total)  nmse {f(p['nmse'], '.4f')}"
            f"  dead {f(dead, '.1f')}%  L0 {f(p['l0'], '.1f')}  buffer {100 * p['fill']:.0f}%"
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--duration",
    type=FiniteFloat(0.0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds to stream once both producers' activations arrive (start-up and the "
    "first-run model cache build are not counted).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Stop once the consumer has trained on this many tokens.",
)
@click.option(
    "--model",
    default="smollm2-135m",
    show_default=True,
    help="Producer --model (tiny: a random test model, for a quick check).",
)
@click.option("--corpus", default="wiki-sample", show_default=True, help="Producer --corpus.")
@click.option(
    "--hook",
    default=None,
    help="Hook to harvest and train on [default: the model's block 2/3 deep].",
)
@click.option(
    "--sae",
    default="name=demo,latents=4096,k=32",
    show_default=True,
    help="The consumer's --sae spec.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Consumer training batch (tokens).",
)
@click.option(
    "--buffer-tokens",
    type=click.IntRange(min=1),
    default=32768,
    show_default=True,
    help="Consumer shuffle buffer (tokens).",
)
@click.option(
    "--workdir",
    type=GivenPath(file_okay=False, path_type=Path),
    default=Path("saestream-demo"),
    show_default=True,
    help="Checkpoints and the three processes' logs go here.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=5557,
    show_default=True,
    help="Consumer port on 127.0.0.1 (another free port if taken).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9101,
    show_default=True,
    help="Consumer /metrics port; the producers use the next two (free ones if taken).",
)
@click.option("--device", default="auto", show_default=True, help="Device of all three.")
@click.option(
    "--eval-contexts",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Held-out contexts on which the final snapshot's downstream loss is measured "
    "(`saestream eval --metrics downstream`); 0 = skip.",
)
@click.option(
    "--features-tokens",
    type=click.IntRange(min=0),
    default=2048,
    show_default=True,
    help="Held-out tokens the final snapshot's feature browser is built from "
    "(`saestream features`, into WORKDIR/features); 0 = skip.",
)
@cli_errors
def demo(
    duration: float,
    tokens: int | None,
    model: str,
    corpus: str,
    hook: str | None,
    sae: str,
    batch_size: int,
    buffer_tokens: int,
    workdir: Path,
    port: int,
    metrics_port: int,
    device: str,
    eval_contexts: int,
    features_tokens: int,
) -> None:
    """Start a consumer and two producers on 127.0.0.1 and show training live.

    Stops after --duration seconds of streaming or --tokens trained tokens, or on Ctrl-C /
    SIGTERM; then stops the three processes with SIGTERM and prints the checkpoint.
    """
    from saestream.common.signals import SignalFlags

    if hook is None:
        hook = DEFAULT_HOOKS.get(model)
        if hook is None:
            raise UserError(
                f"--model {model}: give --hook (the demo knows {', '.join(DEFAULT_HOOKS)})"
            )
    if batch_size > buffer_tokens:
        raise UserError("--batch-size is larger than --buffer-tokens")
    _check_consumer_settings(hook, sae, batch_size, buffer_tokens, device)
    from saestream.producer.corpus import CorpusError, precheck_corpus

    try:  # the producers' own check, before any of them starts
        precheck_corpus(corpus)
    except CorpusError as exc:
        raise UserError(f"--corpus: {exc}") from None
    flags = SignalFlags().install()
    logs, ckpt = workdir / "logs", workdir / "checkpoints"
    check_writable_dir(workdir, "--workdir")
    logs.mkdir(exist_ok=True)
    port = _pick_port(port, set(), with_next=True)
    metrics_port = _pick_port(metrics_port, {port, port + 1})
    taken = {port, port + 1, metrics_port}
    prod_ports = []
    for i in (1, 2):
        prod_ports.append(_pick_port(metrics_port + i if metrics_port else 0, taken))
        taken.add(prod_ports[-1])
    endpoint = f"tcp://127.0.0.1:{port}"
    threads = str(max(1, (os.cpu_count() or 2) // 3))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "SAESTREAM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
    }

    consumer_args = [
        "consumer",
        "--bind",
        endpoint,
        "--hook",
        hook,
        "--sae",
        sae,
        "--batch-size",
        str(batch_size),
        "--buffer-tokens",
        str(buffer_tokens),
        "--min-fill",
        "0.25",
        "--checkpoint-dir",
        str(ckpt),
        "--resume",  # a second demo in the same --workdir continues the first one's run
        "--keep",
        "2",
        "--metrics-port",
        str(metrics_port),
        "--device",
        device,
        "--log-every",
        "10",
    ]
    if tokens is not None:
        consumer_args += ["--max-tokens", str(tokens)]

    def producer_args(i: int) -> list[str]:
        return [
            "producer",
            "--model",
            model,
            "--corpus",
            corpus,
            "--hook",
            hook,
            "--connect",
            endpoint,
            "--producer-id",
            f"demo-{i}",
            "--shard",
            f"{i - 1}/2",
            "--chunk-tokens",
            "1024",
            "--batch-size",
            "4",
            "--seq-len",
            "128",
            "--metrics-port",
            str(prod_ports[i - 1]),
            "--device",
            device,
            "--state-file",
            str(workdir / f"producer-{i}.state"),
        ]

    click.echo(f"saestream demo: {model} over {corpus}, hook {hook}, SAE {sae}")
    click.echo(
        f"  metrics: consumer http://127.0.0.1:{metrics_port}/metrics, producers "
        + ", ".join(f"http://127.0.0.1:{p}/metrics" for p in prod_ports)
    )
    all_ports = " ".join(map(str, [metrics_port, *prod_ports]))
    click.echo(
        f"  logs in {logs}/; `saestream status {all_ports}` in another terminal for a summary"
    )
    children: list[Child] = [
        Child("consumer", consumer_args, logs, env),
        Child("producer-1", producer_args(1), logs, env),
    ]
    progress = Progress(metrics_port)
    tty = sys.stdout.isatty()
    flowing: float | None = None  # first activations arrived
    started: float | None = None  # both producers streaming: the --duration clock runs
    last_print = 0.0
    failed: Child | None = None
    stop_reason = "interrupted"
    if model == "smollm2-135m":
        click.echo(
            "  waiting for producer-1's first activations (the first run builds the "
            "smollm2-135m cache: ~15-60 s)"
        )
    try:
        while not flags.stop.is_set():
            time.sleep(0.5 if started is None else 1.0)
            consumer = children[0]
            if not consumer.alive():
                if consumer.proc.returncode == 0:
                    stop_reason = "consumer reached --tokens"
                else:
                    failed = consumer
                break
            dead = [c for c in children[1:] if not c.alive() and c.proc.returncode != 0]
            if dead:
                failed = dead[0]
                break
            p = progress.read()
            if p is None:
                continue
            if flowing is None and p["received"] > 0:
                flowing = time.monotonic()
                click.echo("  activations flowing; starting producer-2")
                children.append(Child("producer-2", producer_args(2), logs, env))
            if started is None and flowing is not None and (
                p["producers"] >= 2 or time.monotonic() - flowing > 120
            ):
                started = time.monotonic()
                click.echo(f"  {p['producers']} producers streaming; running for {duration:.0f} s")
            if started is None:
                continue
            elapsed = time.monotonic() - started
            if tty:
                click.echo("\r" + Progress.line(p, elapsed) + "\x1b[K", nl=False)
            elif time.monotonic() - last_print >= 10:
                click.echo(Progress.line(p, elapsed))
                last_print = time.monotonic()
            if elapsed >= duration:
                stop_reason = f"{duration:.0f} s elapsed"
                break
    finally:
        if tty and started is not None:
            click.echo()
        # Producers first (they flush what they queued), then the consumer (final snapshot).
        for c in children[1:]:
            c.terminate()
        for c in children[1:]:
            c.wait(30)
        children[0].terminate()
        consumer_rc = children[0].wait(120)
    if failed is not None:
        refused = _user_error(failed)
        if refused is not None:  # bad input the child found (exit 2): so does the demo
            raise UserError(f"{failed.name}: {refused}")
        click.echo(
            f"{failed.name} exited with code {failed.proc.returncode}; its log "
            f"({failed.log_path}) ends:\n{failed.tail()}",
            err=True,
        )
        raise SystemExit(1)
    if flags.stop.is_set():
        stop_reason = "interrupted"
    click.echo(f"stopped ({stop_reason}); consumer exit code {consumer_rc}")
    latest = ckpt / "latest"
    if latest.is_file():
        snapshot = ckpt / latest.read_text().strip()
        click.echo(f"checkpoint: {snapshot}")
        if consumer_rc == 0 and eval_contexts and not flags.stop.is_set():
            _evaluate(snapshot, workdir / "eval.json", model=model, corpus=corpus, hook=hook,
                      contexts=eval_contexts, device=device, env=env)
        if consumer_rc == 0 and features_tokens and not flags.stop.is_set():
            _features(snapshot, workdir, model=model, corpus=corpus, hook=hook,
                      tokens=features_tokens, device=device, env=env,
                      evaluated=workdir / "eval.json" if eval_contexts else None)
    else:
        click.echo(f"no checkpoint written (nothing trained yet); logs in {logs}")
    if consumer_rc != 0:
        raise SystemExit(1)


def _features(snapshot: Path, workdir: Path, *, model: str, corpus: str, hook: str, tokens: int,
              device: str, env: dict[str, str], evaluated: Path | None) -> None:
    """`saestream features` of the final snapshot into WORKDIR/features (the ΔCE of its
    evaluation, `evaluated`, in the header); prints the browser's path."""
    argv = [sys.executable, "-m", "saestream", "features", str(snapshot), "--out",
            str(workdir / "features"), "--model", model, "--corpus", corpus, "--hook", hook,
            "--tokens", str(tokens), "--device", device]
    if evaluated is not None:
        argv += ["--eval-json", str(evaluated)]
    cores = str(os.cpu_count() or 1)
    done = subprocess.run(argv, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": cores, "SAESTREAM_THREADS": cores})
    line = next((x for x in done.stdout.splitlines() if x.startswith("feature browser: ")), None)
    if done.returncode != 0 or line is None:
        click.echo(f"feature browser failed (exit {done.returncode}): "
                   f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}", err=True)
        raise SystemExit(1)
    click.echo(line)


def _evaluate(snapshot: Path, out: Path, *, model: str, corpus: str, hook: str, contexts: int,
              device: str, env: dict[str, str]) -> None:
    """`saestream eval --metrics downstream` of the final snapshot on held-out contexts, as
    a child process like the daemons (it loads the model once more); prints ΔCE."""
    import json

    argv = [sys.executable, "-m", "saestream", "eval", str(snapshot), "--model", model,
            "--corpus", corpus, "--hook", hook, "--metrics", "downstream", "--contexts",
            str(contexts), "--device", device, "--out", str(out)]
    cores = str(os.cpu_count() or 1)  # the daemons have stopped: every core is free
    done = subprocess.run(argv, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": cores, "SAESTREAM_THREADS": cores})
    if done.returncode != 0:
        click.echo(f"evaluation failed (exit {done.returncode}): "
                   f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}", err=True)
        raise SystemExit(1)
    d = json.loads(out.read_text())["downstream"]
    recovered = d["loss_recovered"]
    click.echo(
        f"downstream on {contexts} held-out contexts: CE clean {d['ce_clean']:.4f}, spliced "
        f"{d['ce_spliced']:.4f}, delta CE {d['delta_ce']:+.4f}, loss recovered "
        f"{'n/a' if recovered is None else f'{recovered:.3f}'} ({out})"
    )
