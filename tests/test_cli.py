"""The `saestream` command as a user meets it: --version, --help everywhere, flags documented."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from conftest import run_cli

from saestream import __version__
from saestream.tools.cli import COMMANDS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def load(name: str):
    module, attr = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def test_version_and_top_level_help_list_every_command() -> None:
    version = run_cli(["--version"], timeout=60)
    assert version.returncode == 0 and __version__ in version.stdout
    top = run_cli(["--help"], timeout=60)
    assert top.returncode == 0
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", top.stdout, re.M), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str) -> None:
    result = run_cli([name, "--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"Usage: saestream {name}" in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_documented_in_the_readme(name: str) -> None:
    flags = [o for p in load(name).params for o in p.opts if o.startswith("--")]
    assert flags or name in ("status", "keygen")
    assert [f for f in flags if f"`{f}" not in README] == []


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli(["no-such-command"], timeout=60)
    assert result.returncode == 2
    assert "No such command" in result.stderr


def test_readme_sae_key_table_is_the_one_derived_from_the_config_fields() -> None:
    from saestream.consumer.config import sae_keys_table

    assert sae_keys_table() in README


def test_every_consumer_metric_is_documented_with_its_type() -> None:
    """The metrics tables give name, type and labels: a program reading them (a dashboard, a
    rule) relies on all three, so a metric added, retyped or relabelled shows here."""
    from saestream.consumer.metrics import ConsumerMetrics

    rows = dict(re.findall(r"^\| `(saestream_[a-z0-9_]+)` \| (counter|gauge|histogram) \|",
                           README, re.M))
    for fam in ConsumerMetrics().registry.collect():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        assert rows.get(name) == fam.type, (name, fam.type, rows.get(name))
