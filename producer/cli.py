"""`saestream producer`: flags map one-to-one onto `ProducerConfig` fields."""

from __future__ import annotations

from pathlib import Path

import click

from saestream.common.errors import UserError, cli_errors

CODECS = ("raw", "lz4", "lz4-shuffle")  # = common.wire.CODECS (not imported: keeps --help fast)
WIRE_DTYPES = ("bfloat16", "float16", "float32")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="smollm2-135m", show_default=True,
              help="smollm2-135m (embedded), tiny (random test Llama), random:CONFIG.json, "
                   "a model directory, or a Hugging Face hub id already in the local cache.")
@click.option("--hook", "hooks", multiple=True,
              help="Module path to capture, e.g. model.layers.20 (repeatable). "
                   "Default: block round(2/3 * n_layers).")
@click.option("--corpus", default="wiki-sample", show_default=True,
              help="text:PATH_OR_GLOB, tokens:PATH[.npy|.bin][:uint16|:uint32], wiki-sample, "
                   "synthetic[:N_CONTEXTS].")
@click.option("--split", type=click.Choice(["train", "eval", "all"]), default="train",
              show_default=True,
              help="Part of the corpus to stream: train, eval (every 10th document held out "
                   "for evaluation) or all.")
@click.option("--connect", multiple=True, default=("tcp://127.0.0.1:5557",), show_default=True,
              help="Consumer endpoint to PUSH to (repeatable; round-robin).")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Token rows per message.")
@click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default="bfloat16",
              show_default=True)
@click.option("--codec", type=click.Choice(CODECS), default="lz4-shuffle", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Contexts per forward pass.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per context (2-D .npy corpora bring their own).")
@click.option("--shard", default="0/1", show_default=True,
              help="I/N: read the contexts i with i mod N == I.")
@click.option("--producer-id", default=None, help="Id sent in every header [default: HOST-PID].")
@click.option("--epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Passes over the shard; 0 = endless.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Send exactly N tokens per hook, flush, exit 0; 0 = no limit.")
@click.option("--state-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Progress file: read on start (resume), written on exit and periodically.")
@click.option("--state-every", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds between state-file writes while running.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Prometheus /metrics port; 0 = off.")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True,
              help="Address /metrics listens on (0.0.0.0 for a scraper on another host).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--model-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True,
              help="auto = bfloat16 on CUDA, float32 on CPU.")
@click.option("--keep-first-token", is_flag=True,
              help="Also send position 0 of each context (dropped by default: outlier norm).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random models and the synthetic corpus.")
@click.option("--curve-secret-key", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="This producer's CURVE key pair (NAME.key_secret).")
@click.option("--curve-server-key", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The consumer's CURVE public key (NAME.key).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the dequantised smollm2-135m copy is cached "
                   "[default: $SAESTREAM_CACHE/models or ~/.cache/saestream/models].")
@click.option("--token-dtype", type=click.Choice(["uint16", "uint32"]), default="uint16",
              show_default=True, help="Element type of tokens:FILE.bin corpora.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch CPU threads; 0 = $SAESTREAM_THREADS or torch's default.")
@click.option("--queue-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Chunks queued for the sending thread before the model loop blocks.")
@click.option("--hwm", type=click.IntRange(min=1), default=16, show_default=True,
              help="ZeroMQ send high-water mark (messages per consumer).")
@click.option("--linger", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds allowed after SIGTERM/SIGINT to send what is queued.")
@click.option("--log-level", default="INFO", show_default=True)
@cli_errors
def producer(**kw: object) -> None:
    """Run a language model over a corpus and stream its residual activations to consumers."""
    from saestream.common.logs import setup_logging
    from saestream.common.signals import SignalFlags
    from saestream.producer.corpus import CorpusError, Shard, precheck_corpus

    setup_logging(str(kw.pop("log_level")))
    secret, server = kw.pop("curve_secret_key"), kw.pop("curve_server_key")
    if (secret is None) != (server is None):
        raise UserError("--curve-secret-key and --curve-server-key go together")
    try:  # cheap checks first: a typo should not wait for torch and the model to load
        Shard.parse(str(kw["shard"]))
        precheck_corpus(str(kw["corpus"]), str(kw["token_dtype"]))
    except CorpusError as exc:
        raise UserError(str(exc)) from exc
    flags = SignalFlags().install()

    from saestream.common.transport import CurveClientKeys
    from saestream.producer.daemon import ProducerConfig, run_producer
    from saestream.producer.hooks import HookError
    from saestream.producer.models import ModelError
    from saestream.producer.state import StateError

    curve = CurveClientKeys(secret, server) if secret is not None else None  # type: ignore[arg-type]
    cfg = ProducerConfig(curve=curve, **kw)  # type: ignore[arg-type]
    try:
        run_producer(cfg, stop=flags.stop)
    except (ModelError, HookError, CorpusError, StateError) as exc:
        raise UserError(str(exc)) from exc
