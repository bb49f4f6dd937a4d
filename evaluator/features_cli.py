"""`saestream features SNAPSHOT_DIR --out DIR`: the feature browser of a snapshot's SAEs.

Cheap checks (the path, `--sae`, `--latents`, `--out`, `--corpus`, `--eval-json`) come
before the language model loads. Every bad input is a `UserError`: one line
`saestream: error: ...`, exit 2.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import click

from saestream.common import bounded_json
from saestream.common.errors import UserError, cli_errors
from saestream.common.settings import GivenPath
from saestream.evaluator.config import MAX_BATCH
from saestream.evaluator.options import model_text_options, one_model

DEFAULT_TOKENS = 200_000
"""Tokens encoded when --tokens is not given: enough for the rarer latents to show a few
examples, a few minutes of a 135M model on a laptop CPU."""
EVAL_JSON = "eval.json"

log = logging.getLogger("saestream.features")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=GivenPath(path_type=Path))
@click.option("--out", type=GivenPath(file_okay=False, path_type=Path), required=True,
              help="Directory of the browser (new, empty, or an earlier browser: a build is "
                   "added and DIR/index.html points at it).")
@model_text_options
@click.option("--tokens", default=DEFAULT_TOKENS, show_default=True,
              type=click.IntRange(min=1),
              help="Encode at least N tokens: ceil(N / (seq_len - 1)) contexts.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Contexts per forward pass.")
@click.option("--latents", default="all", show_default=True,
              help="Latents given a page: all, N (the N most frequent) or a comma-separated "
                   "list of ids (7, for one).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--sae", "sae_name", default=None,
              help="Only this SAE of the snapshot [default: all].")
@click.option("--eval-json", type=GivenPath(dir_okay=False, path_type=Path), default=None,
              help=f"`saestream eval` results to show (ΔCE, explanations) [default: "
                   f"{EVAL_JSON} beside the SAE's cfg.json, if there].")
@cli_errors
def features(
    path: Path, out: Path, model: str | None, hook: str | None, corpus: str, split: str,
    seq_len: int, tokens: int, batch_size: int, latents: str, device: str,
    sae_name: str | None, eval_json: Path | None,
) -> None:
    """Write a feature browser (DIR/index.html, opened from disk) for the SAEs of a
    snapshot, SAE folder or checkpoint directory (its `latest`)."""
    from saestream.common.devices import resolve_device, set_threads
    from saestream.consumer.checkpoint import SNAPSHOT_RE, CheckpointError, load_sae, sae_dirs
    from saestream.evaluator.browser import build_browser, check_out_dir
    from saestream.evaluator.cli import ProgressBar
    from saestream.evaluator.data import eval_ids, load_eval_model
    from saestream.evaluator.features import FeatureError, parse_latents
    from saestream.producer.corpus import CorpusError, precheck_corpus
    from saestream.producer.hooks import HookError
    from saestream.producer.models import ModelError

    started = time.perf_counter()
    try:
        dirs = sae_dirs(path, sae_name)
    except CheckpointError as exc:
        raise UserError(str(exc).replace("no SAE named", "--sae: no SAE named")) from None
    if eval_json is not None and len(dirs) > 1:
        raise UserError(f"--eval-json names one SAE's results but {path} holds {len(dirs)} "
                        f"SAEs ({', '.join(d.name for d in dirs)}); pick one with --sae")
    try:
        check_out_dir(out)
        precheck_corpus(corpus)
    except (FeatureError, CorpusError) as exc:
        raise UserError(str(exc)) from None
    evaluated = {d.name: _evaluated(eval_json or d / EVAL_JSON, eval_json is not None)
                 for d in dirs}
    dev = resolve_device(device)
    try:
        loaded = [load_sae(d, dev) for d in dirs]
        for s in loaded:
            parse_latents(latents, s.sae.cfg.n_latents)
    except (CheckpointError, FeatureError) as exc:
        raise UserError(str(exc)) from None
    model_name = model or one_model(loaded)
    hooks = [hook or str(s.cfg.get("hook")) for s in loaded]
    set_threads()

    snapshot = dirs[0].parent if SNAPSHOT_RE.match(dirs[0].parent.name) else dirs[0]
    step = SNAPSHOT_RE.match(snapshot.name)
    about = {"model": model_name, "corpus": corpus, "split": split, "snapshot": str(snapshot),
             "step": int(step.group(1)) if step else None}
    try:
        lm = load_eval_model(model_name, str(dev), hooks, seq_len=seq_len,
                             hook_given=hook is not None)
        ids = eval_ids(lm, corpus, split=split, seq_len=seq_len, contexts=None, tokens=tokens)
        _stop_by_exception()  # so a build cut short by a signal removes what it wrote
        built = build_browser(out, lm, ids, list(zip(loaded, hooks, strict=True)),
                              label=snapshot.name, texts=token_texts_of(lm), latents=latents,
                              about=about, evaluated=evaluated, batch_size=batch_size,
                              progress=ProgressBar("encoding"))
    except (ModelError, HookError, CorpusError, FeatureError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # a disk full or gone read-only since the start-up check
        raise UserError(f"--out {out}: could not write ({exc.strerror or exc}); nothing of "
                        "this build was kept") from None
    for note in built.notes:
        click.echo(note)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in built.seconds.items())
    click.echo(f"wrote {built.build} ({built.files} files, {built.bytes / 1e6:.1f} MB) in "
               f"{time.perf_counter() - started:.1f} s ({stages})")
    click.echo(f"feature browser: {built.entry.resolve().as_uri()}")


def _stop_by_exception() -> None:
    """SIGTERM and SIGHUP end the command through SystemExit (status 128 + signal), not at
    once: `build_browser` then removes its unfinished build, as it does on any error."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the clean-up
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def token_texts_of(lm: Any) -> list[str]:
    """Every token id's text; `#id` for a model without a tokenizer."""
    from saestream.evaluator.probes import ProbeError, token_texts

    try:
        return token_texts(lm.tokenizer, lm.vocab_size)
    except ProbeError:
        return [f"#{i}" for i in range(lm.vocab_size)]


def _evaluated(path: Path, given: bool) -> dict[str, Any]:
    """The groups of an eval.json the browser shows (empty when there is none, or an
    unreadable default one); UserError when --eval-json names a file that cannot be read.
    Malformed parts (a `downstream` that is not an object, ...) are left out with one
    warning."""
    from saestream.consumer.checkpoint import CheckpointError, read_small_file
    from saestream.evaluator.browser import evaluated_groups

    try:  # a regular file of at most 64 MiB (a FIFO would block, /dev/zero never end)
        doc = bounded_json.loads(read_small_file(path), limit=None)  # per-latent lists
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except CheckpointError as exc:
        if given:
            raise UserError(f"--eval-json {exc}") from None
        log.warning("%s: left out of the browser (%s)", path, exc)
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        if given:
            raise UserError(f"--eval-json {path}: {getattr(exc, 'strerror', None) or exc}"
                            ) from None
        return {}
    checked, problems = evaluated_groups(doc)
    if problems:
        log.warning("%s: left out of the browser, as malformed: %s", path,
                    "; ".join(problems))
    return checked


