"""What the commands that run a model over a corpus with a snapshot's SAEs (`saestream eval`,
`saestream features`) share: the options naming model, hook and text, and the model the SAEs
were trained on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from saestream.common.errors import UserError
from saestream.common.settings import given


def model_text_options(func: Callable) -> Callable:
    """--model, --hook, --corpus, --split, --seq-len, in that order."""
    options = [
        click.option("--model", default=None, callback=given,
                     help="Model to run [default: the `model` in the SAEs' cfg.json]."),
        click.option("--hook", default=None, callback=given,
                     help="Module whose output the SAE reads [default: the `hook` in "
                          "cfg.json]."),
        click.option("--corpus", default="wiki-sample", show_default=True,
                     help="text:PATH_OR_GLOB, tokens:PATH, wiki-sample or synthetic[:N] (as "
                          "the producer's)."),
        click.option("--split", default="eval", show_default=True,
                     type=click.Choice(["train", "eval", "all"]),
                     help="Part of the corpus to read (eval: the held-out tenth)."),
        click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=2),
                     help="Tokens per context (the producer's default; 2-D .npy corpora "
                          "bring their own)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def one_model(loaded: list[Any]) -> str:
    """The model every SAE's cfg.json names; UserError when it is missing, not a string (the
    SAE folder named), or they differ."""
    for s in loaded:
        name = s.cfg.get("model")
        if name is not None and not isinstance(name, str):
            raise UserError(f"{s.directory}/cfg.json: model must be a model name (a string), "
                            f"not {type(name).__name__}; pass --model")
    names = {s.cfg.get("model") for s in loaded}
    if None in names or "" in names:
        raise UserError("cfg.json names no model (an SAE trained without --model); pass --model")
    if len(names) > 1:
        raise UserError(f"the SAEs name different models ({', '.join(sorted(names))}); pick "
                        "one with --sae, or pass --model")
    return str(names.pop())
