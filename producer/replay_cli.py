"""`saestream replay`: the sending flags are `ProducerConfig` fields (a replayer sends as a
producer does), the rest `ReplayConfig` fields (producer/replay.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from saestream.common.errors import UserError, cli_errors
from saestream.common.settings import FiniteFloat, GivenPath, config_option, given
from saestream.common.wire import CODECS
from saestream.producer.config import MAX_ENCODE_THREADS, ProducerConfig
from saestream.producer.replay import ReplayConfig

P, R = ProducerConfig, ReplayConfig
_POSITIVE = click.IntRange(min=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recording", type=GivenPath(path_type=Path))
@config_option(P, "connect", multiple=True, show_default=True)
@config_option(P, "control_connect", multiple=True, default=(),
               help="Consumer control endpoint to ask where to continue (repeatable); "
               "default: each --connect endpoint's port + 1; `off`: never ask (no rewinds; "
               "exit once everything is handed to ZeroMQ).")
@config_option(P, "shard", help="I/N: replay the recording's chunks j with j mod N == I (in "
               "recording order), to split it among N replayers.")
@config_option(R, "loop")
@config_option(R, "verify")
@config_option(P, "producer_id", callback=given,
               help="Id sent in every header and known to the consumer's ledger (restart "
                    "with the same id to continue where the consumer is); default: "
                    "replay-HOST-PID.")
@config_option(P, "codec", type=click.Choice(list(CODECS)), default="raw",
               help="Payload codec: raw, lz4 or lz4-shuffle. Default raw: a replayer encodes "
               "what it sends, and lz4-shuffle encoding costs it more than twice what "
               "decoding costs the consumer, for ~14 % fewer bytes on bf16 (bench_replay in "
               "BENCHMARKS.md).")
@config_option(P, "queue_size", type=_POSITIVE)
@config_option(P, "encode_threads", type=click.IntRange(0, MAX_ENCODE_THREADS))
@config_option(P, "hwm", type=_POSITIVE)
@config_option(P, "linger", type=FiniteFloat(0.0))
@config_option(P, "metrics_port", type=click.IntRange(0, 65535))
@config_option(P, "metrics_addr")
@click.option("--curve-secret-key", type=GivenPath(dir_okay=False, path_type=Path),
              default=None, help="This replayer's CURVE key pair (NAME.key_secret).")
@click.option("--curve-server-key", type=GivenPath(dir_okay=False, path_type=Path),
              default=None, help="The consumer's CURVE public key (NAME.key).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@cli_errors
def replay(recording: Path, loop: bool, verify: bool, **kw: Any) -> None:
    """Stream a recorded hook directory (DIR/<hook>) to consumers, as a producer would:
    same wire format, backpressure, control channel and metrics.

    One pass, then wait until the consumer holds it and exit 0 (--loop: pass after pass
    until SIGTERM/SIGINT, which send what is queued within --linger and exit 0).
    """
    from saestream.common.control import check_connects
    from saestream.common.logs import setup_logging
    from saestream.common.native import enabled as native_enabled
    from saestream.common.signals import SignalFlags
    from saestream.common.transport import CurveClientKeys
    from saestream.producer.replay import run_replay

    setup_logging(str(kw.pop("log_level")), "saestream.replay")
    check_connects(list(kw["connect"]), list(kw["control_connect"]))
    native_enabled()  # a bad $SAESTREAM_NATIVE is one line now, not an encode thread's log
    secret, server = kw.pop("curve_secret_key"), kw.pop("curve_server_key")
    if (secret is None) != (server is None):
        raise UserError("--curve-secret-key and --curve-server-key go together")
    for path in (secret, server):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{path}: no such key file")
    curve = CurveClientKeys(secret, server) if secret is not None else None
    cfg = ReplayConfig(recording, loop, verify, ProducerConfig(curve=curve, **kw))
    summary = run_replay(cfg, stop=SignalFlags().install().stop)
    click.echo(f"replayed {summary.tokens} rows in {summary.messages} messages, "
               f"{summary.passes} full pass(es)")
