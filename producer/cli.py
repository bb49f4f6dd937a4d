"""`saestream producer`: every flag is a field of `ProducerConfig` (default and help from there)."""

from __future__ import annotations

from pathlib import Path

import click

from saestream.common.errors import UserError, cli_errors, error_line
from saestream.common.settings import FiniteFloat, GivenPath, config_option, given
from saestream.common.wire import CODECS, DTYPES
from saestream.producer.config import MAX_ENCODE_THREADS, ProducerConfig

P = ProducerConfig
_POSITIVE = click.IntRange(min=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option(P, "model")
@config_option(P, "hooks", "--hook", multiple=True, default=())
@config_option(P, "corpus")
@config_option(P, "split", type=click.Choice(["train", "eval", "all"]))
@config_option(P, "connect", multiple=True, show_default=True)
@config_option(P, "control_connect", multiple=True, default=())
@config_option(P, "chunk_tokens", type=_POSITIVE)
@config_option(P, "wire_dtype", type=click.Choice(list(DTYPES)))
@config_option(P, "codec", type=click.Choice(list(CODECS)))
@config_option(P, "batch_size", type=_POSITIVE)
@config_option(P, "seq_len", type=click.IntRange(min=2))
@config_option(P, "shard")
@config_option(P, "producer_id", callback=given)
@config_option(P, "epochs", type=click.IntRange(min=0))
@config_option(P, "max_tokens", type=click.IntRange(min=0))
@config_option(P, "state_file", type=GivenPath(dir_okay=False, path_type=Path))
@config_option(P, "state_every", type=FiniteFloat(0.1))
@config_option(P, "metrics_port", type=click.IntRange(0, 65535))
@config_option(P, "metrics_addr")
@config_option(P, "device")
@config_option(P, "model_dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@config_option(P, "keep_first_token")
@config_option(P, "seed")
@click.option("--curve-secret-key", type=GivenPath(dir_okay=False, path_type=Path),
              default=None, help="This producer's CURVE key pair (NAME.key_secret).")
@click.option("--curve-server-key", type=GivenPath(dir_okay=False, path_type=Path),
              default=None, help="The consumer's CURVE public key (NAME.key).")
@config_option(P, "cache_dir", type=GivenPath(file_okay=False, path_type=Path))
@config_option(P, "token_dtype", type=click.Choice(["uint16", "uint32"]))
@config_option(P, "threads")
@config_option(P, "queue_size", type=_POSITIVE)
@config_option(P, "encode_threads", type=click.IntRange(0, MAX_ENCODE_THREADS))
@config_option(P, "hwm")
@config_option(P, "linger")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@cli_errors
def producer(**kw: object) -> None:
    """Run a language model over a corpus and stream its residual activations to consumers."""
    from saestream.common.control import check_connects
    from saestream.common.devices import env_threads
    from saestream.common.logs import setup_logging
    from saestream.common.native import enabled as native_enabled
    from saestream.common.signals import SignalFlags
    from saestream.producer.corpus import CorpusError, Shard, precheck_corpus
    from saestream.producer.state import StateError, check_writable, read_state

    setup_logging(str(kw.pop("log_level")))
    native_enabled()  # a bad $SAESTREAM_NATIVE is one line now, not an encode thread's log
    secret, server = kw.pop("curve_secret_key"), kw.pop("curve_server_key")
    if (secret is None) != (server is None):
        raise UserError("--curve-secret-key and --curve-server-key go together")
    for path in (secret, server):
        if path is not None and not Path(str(path)).is_file():
            raise UserError(f"{path}: no such key file")
    _check_hooks(kw["hooks"])  # type: ignore[arg-type]
    if not kw["threads"]:
        env_threads()  # $SAESTREAM_THREADS stands in for --threads 0: same range, checked now
    check_connects(list(kw["connect"]), list(kw["control_connect"]))  # type: ignore[call-overload]
    try:  # cheap checks first: a typo should not wait for torch and the model to load
        Shard.parse(str(kw["shard"]))
        precheck_corpus(str(kw["corpus"]), str(kw["token_dtype"]))
        if kw["state_file"] is not None:
            read_state(kw["state_file"])  # type: ignore[arg-type]
            check_writable(kw["state_file"])  # type: ignore[arg-type]
    except (CorpusError, StateError) as exc:
        raise UserError(str(exc)) from exc
    flags = SignalFlags().install()

    from saestream.common.transport import CurveClientKeys
    from saestream.producer.daemon import StateWriteError, run_producer
    from saestream.producer.hooks import HookError
    from saestream.producer.models import ModelError

    curve = CurveClientKeys(secret, server) if secret is not None else None  # type: ignore[arg-type]
    cfg = ProducerConfig(curve=curve, **kw)  # type: ignore[arg-type]
    try:
        run_producer(cfg, stop=flags.stop)
    except (ModelError, HookError, CorpusError, StateError) as exc:
        raise UserError(str(exc)) from exc
    except StateWriteError as exc:
        click.echo(error_line(exc), err=True)
        raise SystemExit(1) from None


def _check_hooks(hooks: tuple[str, ...]) -> None:
    """An empty --hook names the model itself (`get_submodule("")`), whose output is no
    hidden state: refused before the model loads."""
    for hook in hooks:
        if not hook.strip():
            raise UserError(f"--hook {hook!r}: give a module path, e.g. model.layers.4")

