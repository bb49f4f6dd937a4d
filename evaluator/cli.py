"""`saestream eval SNAPSHOT_OR_CHECKPOINT_DIR`: the paper's metric groups for the SAEs of a
snapshot (downstream loss, reconstruction, progressive codes by default; ablation sparsity,
explanations and probe loss on request), as one table and one JSON document per SAE.

Cheap checks (the path, `--sae`, `--metrics`, `--corpus`, where to write) come before the
language model is loaded, so a typo costs no model load. Every bad input is a `UserError`:
one line `saestream: error: ...`, exit 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from saestream import __version__
from saestream.common.errors import UserError, cli_errors
from saestream.common.files import check_writable_file
from saestream.common.settings import GivenPath
from saestream.evaluator.config import MAX_BATCH
from saestream.evaluator.options import model_text_options, one_model

DEFAULT_CONTEXTS = 64
"""Contexts evaluated when neither --contexts nor --tokens is given."""
DEFAULT_OUT = "eval.json"


def parse_metrics(text: str, groups: tuple[str, ...]) -> list[str]:
    """`--metrics a,b` -> the groups in report order; `all` = every group."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--metrics: no group named (use all or " + ", ".join(groups) + ")")
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(groups)
        elif name in groups:
            chosen.add(name)
        else:
            raise UserError(f"--metrics {name!r}: unknown group (use all, {', '.join(groups)})")
    return [g for g in groups if g in chosen]


class ProgressBar:
    """A one-line bar on stderr, redrawn in place; silent unless stderr is a terminal."""

    def __init__(self, label: str = "evaluating") -> None:
        self.enabled = sys.stderr.isatty()
        self.label = label
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        filled = int(30 * done / max(total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                         f"{done}/{total} forwards")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=GivenPath(path_type=Path))
@model_text_options
@click.option("--contexts", default=None, type=click.IntRange(min=1),
              help=f"Contexts to evaluate [default: {DEFAULT_CONTEXTS}].")
@click.option("--tokens", default=None, type=click.IntRange(min=1),
              help="Evaluate at least N tokens instead: ceil(N / (seq_len - 1)) contexts.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Contexts per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--sae", "sae_name", default=None,
              help="Evaluate only this SAE of the snapshot [default: all].")
@click.option("--metrics", default="downstream,reconstruction,progressive", show_default=True,
              help="Comma-separated groups: downstream, reconstruction, progressive, "
                   "ablation, explanations, probes, or all.")
@click.option("--ablation-latents", default=64, show_default=True, type=click.IntRange(min=1),
              help="Latents sampled for the ablation sparsity.")
@click.option("--ablation-positions", default=16, show_default=True,
              type=click.IntRange(min=1),
              help="Positions (from the ablated one on) whose logits the effect is measured on.")
@click.option("--explanation-latents", default=64, show_default=True,
              type=click.IntRange(min=1), help="Latents sampled for explanations.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seed of the samples (latents, baseline channels, wildcard replacements).")
@click.option("--out", type=GivenPath(path_type=Path), default=None,
              help=f"JSON file to write [default: {DEFAULT_OUT} beside each SAE's cfg.json].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the JSON (one document per SAE, one per line) instead of the table.")
@cli_errors
def eval_command(
    path: Path, model: str | None, hook: str | None, corpus: str, split: str, seq_len: int,
    contexts: int | None, tokens: int | None, batch_size: int, device: str,
    sae_name: str | None, metrics: str, ablation_latents: int, ablation_positions: int,
    explanation_latents: int, seed: int, out: Path | None, as_json: bool,
) -> None:
    """Evaluate the SAEs of a snapshot, SAE folder or checkpoint directory (its `latest`)."""

    from saestream.common.devices import resolve_device, set_threads
    from saestream.consumer.checkpoint import CheckpointError, load_sae, sae_dirs
    from saestream.evaluator.data import eval_ids, load_eval_model
    from saestream.evaluator.engine import GROUPS, EvalError, GroupSettings, evaluate
    from saestream.evaluator.report import table, to_json, write_json
    from saestream.producer.corpus import CorpusError, precheck_corpus
    from saestream.producer.hooks import HookError
    from saestream.producer.models import ModelError

    started = time.perf_counter()
    groups = parse_metrics(metrics, GROUPS)
    if contexts is not None and tokens is not None:
        raise UserError("give --contexts or --tokens, not both")
    if contexts is None and tokens is None:
        contexts = DEFAULT_CONTEXTS
    try:
        dirs = sae_dirs(path, sae_name)
    except CheckpointError as exc:
        raise UserError(str(exc).replace("no SAE named", "--sae: no SAE named")) from None
    if out is not None and len(dirs) > 1:
        raise UserError(f"--out names one file but {path} holds {len(dirs)} SAEs "
                        f"({', '.join(d.name for d in dirs)}); pick one with --sae, or leave "
                        f"--out out to write {DEFAULT_OUT} beside each cfg.json")
    targets = [out] if out is not None else [d / DEFAULT_OUT for d in dirs]
    for target in targets:
        check_writable_file(target, "--out" if out is not None else "eval.json")
    try:
        precheck_corpus(corpus)
    except CorpusError as exc:
        raise UserError(str(exc)) from None
    dev = resolve_device(device)
    try:
        loaded = [load_sae(d, dev) for d in dirs]
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    model_name = model or one_model(loaded)
    hooks = [hook or str(s.cfg.get("hook")) for s in loaded]
    set_threads()

    try:
        lm = load_eval_model(model_name, str(dev), hooks, seq_len=seq_len,
                             hook_given=hook is not None)
        ids = eval_ids(lm, corpus, split=split, seq_len=seq_len, contexts=contexts,
                       tokens=tokens)
        settings = GroupSettings(ablation_latents=ablation_latents,
                                 ablation_positions=ablation_positions,
                                 explanation_latents=explanation_latents, seed=seed)
        if "explanations" in groups or "probes" in groups:
            _add_text_inputs(settings, lm, groups, corpus, ids)
        results = evaluate(lm.model, ids, list(zip(loaded, hooks, strict=True)), groups,
                           batch_size=batch_size, progress=ProgressBar(), settings=settings)
    except (ModelError, HookError, CorpusError, EvalError) as exc:
        raise UserError(str(exc)) from None

    seconds = time.perf_counter() - started
    docs = []
    for s, h in zip(loaded, hooks, strict=True):
        doc = _document(s, h, model_name, corpus, split, ids, groups, str(dev), seconds)
        doc.update(results[s.name])
        docs.append(doc)
    # The result is shown before any file is written: a disk that fills up during the run
    # (start-up checks only permissions) costs the file, never the numbers.
    if as_json:
        for doc in docs:
            click.echo(to_json(doc, indent=None))
    else:
        click.echo(table(docs))
    failed = []
    for target, doc in zip(targets, docs, strict=True):
        try:
            write_json(target, doc)
        except OSError as exc:
            failed.append(f"{target}: could not write ({exc.strerror or exc})")
            continue
        click.echo(f"wrote {target}", err=as_json)
    if failed:
        more = f"; also {len(failed) - 1} more eval.json" if len(failed) > 1 else ""
        raise UserError(f"{'--out' if out is not None else 'eval.json'} {failed[0]}{more}")


def _add_text_inputs(settings: Any, lm: Any, groups: list[str], corpus: str, ids: Any) -> None:
    """What explanations and probes need: the train split's contexts (as many as evaluated)
    and every token id's text. Raises EvalError (no tokenizer for probes) or CorpusError."""
    from saestream.evaluator.data import eval_ids
    from saestream.evaluator.engine import EvalError
    from saestream.evaluator.probes import ProbeError, token_texts

    settings.prefix_id = lm.separator_id
    if lm.tokenizer is not None:
        try:
            settings.texts = token_texts(lm.tokenizer, lm.vocab_size)
        except ProbeError as exc:
            raise EvalError(str(exc)) from None
        settings.decode = settings.texts.__getitem__
    elif "probes" in groups:
        raise EvalError(f"--metrics probes: model {lm.name} has no tokenizer, so its tokens "
                        "have no text to label")
    if "explanations" in groups:
        settings.train_ids = eval_ids(lm, corpus, split="train", seq_len=int(ids.shape[1]),
                                      contexts=int(ids.shape[0]), tokens=None)


def _document(sae: Any, hook: str, model: str, corpus: str, split: str, ids: Any,
              groups: list[str], device: str, seconds: float) -> dict[str, Any]:
    """The JSON fields that say what was evaluated, on what (the groups are added after)."""
    from saestream.consumer.checkpoint import SNAPSHOT_RE

    match = SNAPSHOT_RE.match(sae.directory.parent.name)
    n_ctx, seq = int(ids.shape[0]), int(ids.shape[1])
    c = sae.sae.cfg
    return {
        "sae": sae.name,
        "path": str(sae.directory),
        "step": int(match.group(1)) if match else None,
        "model": model,
        "hook": hook,
        "d_in": c.d_in,
        "n_latents": c.n_latents,
        "k": c.k,
        "input_normalization": c.input_normalization,
        "corpus": corpus,
        "split": split,
        "seq_len": seq,
        "contexts": n_ctx,
        "tokens": n_ctx * (seq - 1),
        "metrics": groups,
        "device": device,
        "seconds": round(seconds, 3),
        "saestream_version": __version__,
    }
