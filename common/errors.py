"""Errors shared by every command, and the one place they turn into exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Bad input a person can fix (missing file, bad flag value, unknown model).

    The CLI prints `saestream: error: <message>` on one line and exits with code 2.
    """


def cli_errors(func: F) -> F:
    """Wrap a click command body: a `UserError` becomes one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(f"saestream: error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
