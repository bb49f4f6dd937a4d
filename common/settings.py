"""Settings have one source of truth: a dataclass field, with its default and its docstring.

Command-line options (`config_option`), `key=value` lists (`parse_setting`) and the README's
tables are derived from the fields, so no default or help text is written twice. Values are
checked for NaN and infinities at the edge (`FINITE`); ranges and cross-field rules are the
dataclass's own `validate()`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from saestream.common.errors import UserError

_MISSING = dataclasses.MISSING


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls`, as one line of text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_default(cls: type, name: str) -> Any:
    f = fields(cls)[name]
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional): `int | None` -> (int, True)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


# ---------------------------------------------------------------------------------------------
# values


def parse_int(text: str, what: str) -> int:
    """A whole number, also written as `1e7` or `10_000_000`."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise UserError(f"{what}={text!r}: not a number") from None
    if not math.isfinite(value) or not value.is_integer():
        raise UserError(f"{what}={text!r}: not a whole number")
    return int(value)


def parse_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{what}={text!r}: not a number") from None
    if not math.isfinite(value):
        raise UserError(f"{what}={text!r}: not a finite number")
    return value


def parse_bool(text: str, what: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{what}={text!r}: use true or false")


_PARSERS: dict[type, Callable[[str, str], Any]] = {
    int: parse_int, float: parse_float, bool: parse_bool, str: lambda t, _w: t,
}


def parse_setting(cls: type, name: str, text: str, what: str) -> Any:
    """The value of field `name` of `cls` written as `text` (`none` for an optional one)."""
    base, optional = field_type(cls, name)
    if optional and text.lower() in ("none", "off"):
        return None
    return _PARSERS[base](text, what)


def render_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value and not value.is_integer():
        return f"{value:.6g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# click


class FiniteFloat(click.ParamType):
    """A float option that refuses NaN and infinities (click's FloatRange lets NaN through)."""

    name = "float"

    def __init__(self, min: float | None = None, min_open: bool = False,
                 max: float | None = None) -> None:
        self.min, self.min_open, self.max = min, min_open, max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        if isinstance(value, float):
            x = value
        else:
            try:
                x = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (x < self.min or (self.min_open and x == self.min)):
            self.fail(f"{value!r} must be {'>' if self.min_open else '>='} {self.min}", param,
                      ctx)
        if self.max is not None and x > self.max:
            self.fail(f"{value!r} must be <= {self.max}", param, ctx)
        return x


class GivenPath(click.Path):
    """click.Path that refuses an empty value: `Path("")` is the current directory, which no
    one means by an empty string (a shell variable that was never set)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("an empty path (write . for the current directory)", param, ctx)
        return super().convert(value, param, ctx)


def given(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Click callback: an empty string is refused, not taken as "use the default" (the
    default is had by leaving the option out)."""
    if value == "":
        raise click.BadParameter("empty (leave the option out for its default)")
    return value


MAX_COUNT = 1 << 62
"""Largest count of tokens, steps or epochs a setting takes: int64 counters, with room for
what is added to them."""


def ranged(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """A dataclass field whose value must lie in [lo, hi] (None: unbounded that side).
    `config_option` gives its flag that range, in every command sharing the field, so a
    value the libraries underneath cannot take (an int32 socket option, a uint64 seed) is
    refused at the edge rather than in a traceback."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi)})


def field_range(cls: type, name: str) -> tuple[float | None, float | None] | None:
    """(lo, hi) of a field made with `ranged`, else None."""
    return fields(cls)[name].metadata.get("range")


def config_option(cls: type, name: str, *decls: str, **kw: Any) -> Callable:
    """A click option for field `name` of dataclass `cls`: its default and its docstring as
    help unless given; the option's value lands under the field's name. A field's own range
    (`ranged`) replaces any `type` given: the field is the one place a range is written."""
    if kw.get("required"):  # click (8.5) takes an explicit default=None as a given value
        kw.pop("default", None)
    elif "default" not in kw:
        kw["default"] = field_default(cls, name)
    kw.setdefault("help", field_docs(cls).get(name, ""))
    base, _ = field_type(cls, name)
    bounds = field_range(cls, name)
    if bounds is not None:
        lo, hi = bounds
        kw["type"] = (click.IntRange(lo, hi) if base is int  # type: ignore[arg-type]
                      else FiniteFloat(lo, max=hi))
    if base is bool and "type" not in kw:
        kw.setdefault("is_flag", True)
    elif kw.get("default") is not None and not kw.get("multiple"):
        kw.setdefault("show_default", True)
    if base is float and "type" not in kw:
        kw["type"] = FiniteFloat()
    decls = decls or (f"--{name.replace('_', '-')}",)
    return click.option(*decls, name, **kw)
