"""`saestream record`: a sink that only records. Its flags are `ConsumerConfig` fields (the
receiving ones, and `--out` for `record`), so defaults and help come from one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from saestream.common.errors import UserError, cli_errors
from saestream.common.settings import FiniteFloat, GivenPath, config_option
from saestream.consumer.config import MAX_DECODE_THREADS, ConsumerConfig

C = ConsumerConfig
_POSITIVE = click.IntRange(min=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option(C, "bind")
@config_option(C, "control_bind")
@config_option(C, "hooks", "--hook", multiple=True, default=(),
               help="Hook to accept and record (repeatable; at least one).")
@config_option(C, "record", "--out", required=True,
               type=GivenPath(file_okay=False, path_type=Path),
               help="Recording directory: shards go to DIR/<hook>/.")
@config_option(C, "record_shard_tokens", type=_POSITIVE)
@config_option(C, "d_in")
@config_option(C, "metrics_port", type=click.IntRange(0, 65535))
@config_option(C, "metrics_addr")
@config_option(C, "hwm")
@config_option(C, "max_chunk_bytes", type=_POSITIVE)
@config_option(C, "max_connections", type=_POSITIVE)
@config_option(C, "max_producers", type=_POSITIVE)
@config_option(C, "producer_expiry_seconds", type=FiniteFloat(0.0, min_open=True))
@config_option(C, "decode_threads", type=click.IntRange(0, MAX_DECODE_THREADS))
@click.option("--curve-secret-key", type=GivenPath(dir_okay=False, path_type=Path),
              default=None, help="This sink's CURVE key pair (NAME.key_secret).")
@click.option("--curve-authorized-dir", type=GivenPath(file_okay=False, path_type=Path),
              default=None, help="Directory of the producers' public keys (*.key) to admit.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@config_option(C, "log_every", type=FiniteFloat(0.0, min_open=True))
@cli_errors
def record(**opts: Any) -> None:
    """Receive activations from producers and only record them: DIR/<hook>/ shards that
    `saestream train --input` and `saestream replay` read.

    Signals: SIGUSR1 writes every hook's held rows as shards now; SIGTERM/SIGINT write them
    and exit 0. A SIGKILL loses the rows held (at most --record-shard-tokens per hook),
    never a written shard.
    """
    from saestream.common.control import check_binds
    from saestream.common.logs import setup_logging
    from saestream.common.native import enabled as native_enabled
    from saestream.common.signals import SignalFlags
    from saestream.common.transport import CurveServerKeys

    setup_logging(opts.pop("log_level"), "saestream.record")
    native_enabled()  # a bad $SAESTREAM_NATIVE is one line now, not a decode thread's log
    check_binds(opts["bind"], opts["control_bind"])
    if not opts["hooks"]:
        raise UserError("give at least one --hook to record")
    key, keys_dir = opts.pop("curve_secret_key"), opts.pop("curve_authorized_dir")
    if (key is None) != (keys_dir is None):
        raise UserError("--curve-secret-key and --curve-authorized-dir go together")
    if key is not None and not key.is_file():
        raise UserError(f"--curve-secret-key {key}: no such file")
    cfg = ConsumerConfig(
        saes=[], checkpoint_dir=None, hooks=list(dict.fromkeys(opts.pop("hooks"))),
        curve=None if key is None else CurveServerKeys(key, keys_dir), **opts)

    from saestream.consumer.record_sink import run_record

    run_record(cfg, SignalFlags().install())
