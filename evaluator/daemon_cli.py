"""`saestream evaluator`: the live-evaluation daemon's command line. Every flag is a field of
`EvaluatorConfig` (its default and help come from there)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from saestream.common.devices import DEVICE_HELP
from saestream.common.errors import UserError, cli_errors
from saestream.common.files import check_writable_file
from saestream.common.settings import FiniteFloat, GivenPath, config_option, given
from saestream.evaluator.config import EvaluatorConfig

C = EvaluatorConfig
_POSITIVE = click.IntRange(min=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option(C, "checkpoint_dir", required=True,
               type=GivenPath(file_okay=False, path_type=Path))
@config_option(C, "model", callback=given)
@config_option(C, "hook", callback=given)
@config_option(C, "corpus")
@config_option(C, "split", type=click.Choice(["train", "eval", "all"]))
@config_option(C, "seq_len", type=click.IntRange(min=2))
@config_option(C, "contexts", type=_POSITIVE)
@config_option(C, "batch_size")
@config_option(C, "device", help=DEVICE_HELP)
@config_option(C, "poll_seconds", type=FiniteFloat(0.0, min_open=True))
@config_option(C, "history", type=GivenPath(dir_okay=False, path_type=Path))
@config_option(C, "features", type=GivenPath(file_okay=False, path_type=Path))
@config_option(C, "metrics_port", type=click.IntRange(0, 65535))
@config_option(C, "metrics_addr")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@cli_errors
def evaluator(**opts: Any) -> None:
    """Evaluate each new snapshot of a checkpoint directory (downstream loss and
    reconstruction, on the same held-out contexts every time) and export the figures on
    /metrics. SIGTERM/SIGINT exit 0, also in the middle of an evaluation.
    """
    from saestream.common.devices import resolve_device, set_threads
    from saestream.common.logs import setup_logging
    from saestream.common.metrics import serve_metrics
    from saestream.common.signals import SignalFlags
    from saestream.evaluator.daemon import open_session, run_evaluator
    from saestream.evaluator.metrics import EvaluatorMetrics
    from saestream.producer.corpus import CorpusError, precheck_corpus
    from saestream.producer.hooks import HookError
    from saestream.producer.models import ModelError

    setup_logging(opts.pop("log_level"), "saestream.evaluator")
    cfg = EvaluatorConfig(**{f.name: opts[f.name] for f in dataclasses.fields(C)})
    if cfg.history is not None:
        check_writable_file(cfg.history, "--history")
    if cfg.features is not None:
        from saestream.evaluator.browser import check_out_dir
        from saestream.evaluator.features import FeatureError

        try:
            check_out_dir(cfg.features)
        except FeatureError as exc:
            raise UserError(str(exc).replace("--out", "--features", 1)) from None
    try:
        precheck_corpus(cfg.corpus)
    except CorpusError as exc:
        raise UserError(str(exc)) from None
    device = resolve_device(cfg.device)
    set_threads()
    flags = SignalFlags().install()
    metrics = EvaluatorMetrics()
    serve_metrics(metrics.registry, cfg.metrics_port, cfg.metrics_addr)
    session = None
    if cfg.model is not None:  # load the model and pick the contexts now: errors surface here
        try:
            session = open_session(cfg, cfg.model, [cfg.hook] if cfg.hook else [], device)
        except (ModelError, HookError, CorpusError) as exc:
            raise UserError(str(exc)) from None
    run_evaluator(cfg, flags.stop, metrics, session)

