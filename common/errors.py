"""Errors shared by every command, and the one place they turn into exit codes."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def escaped(text: str) -> str:
    """`text` with its unprintable characters escaped (`\\n`, `\\x1b`, `\\udcff` for a byte
    of a path that is not UTF-8): a file name or what a peer sent may hold newlines or
    terminal escapes, which must not reach the screen as they are."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_line(message: object) -> str:
    """`saestream: error: <message>`, on one line whatever the message holds."""
    return f"saestream: error: {escaped(str(message))}"


class UserError(Exception):
    """Bad input a person can fix (missing file, bad flag value, unknown model).

    The CLI prints `saestream: error: <message>` on one line and exits with code 2.
    """


PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                         errno.ELOOP, errno.EROFS})
"""OSErrors that say a path given cannot be used as it is, whatever reads it: a person's to
fix, so a line like a UserError's, not a traceback, where no check caught them first."""


def cli_errors(func: F) -> F:
    """Wrap a click command body: a `UserError` becomes one line on stderr and exit code 2;
    so does an OSError of PATH_ERRNOS about a named file (a name too long, a folder it may
    not read)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(error_line(exc), err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in PATH_ERRNOS or exc.filename is None:
                raise
            click.echo(error_line(f"{exc.filename}: {exc.strerror}"), err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
