"""The `saestream` command: a click group whose subcommands load on first use.

Subcommands live next to the code they drive (`producer/cli.py`, `consumer/cli.py`, ...);
this group names them by import path so that `saestream --help` stays instant (no torch
import). It stands above both daemons (`tools/`), since it names commands of each.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from saestream import __version__
from saestream.common.errors import error_line

# name -> ("module:attribute", one-line help shown by `saestream --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("saestream.consumer.train_cli:train", "Train a TopK SAE from activations on disk."),
    "consumer": (
        "saestream.consumer.cli:consumer", "Run the training daemon (receive, shuffle, train)."
    ),
    "producer": (
        "saestream.producer.cli:producer", "Run the harvesting daemon (LM forward, stream acts)."
    ),
    "demo": ("saestream.tools.demo:demo", "Start a consumer and two producers on 127.0.0.1."),
    "status": ("saestream.tools.status:status", "One-screen summary from the daemons' /metrics."),
    "keygen": ("saestream.common.keygen:keygen", "Write a ZeroMQ CURVE key pair."),
    "export": (
        "saestream.consumer.interop_cli:export",
        "Write a snapshot's SAEs for SAELens or sparsify.",
    ),
    "import": (
        "saestream.consumer.interop_cli:import_command",
        "Import SAEs from OpenAI's release, SAELens or sparsify as a snapshot.",
    ),
    "record": (
        "saestream.consumer.record_cli:record",
        "Receive activations and only record them (DIR/<hook>/ shards).",
    ),
    "replay": (
        "saestream.producer.replay_cli:replay",
        "Stream a recording to consumers, as a producer would.",
    ),
    "eval": (
        "saestream.evaluator.cli:eval_command",
        "Evaluate a snapshot's SAEs: downstream loss, reconstruction, progressive codes.",
    ),
    "evaluator": (
        "saestream.evaluator.daemon_cli:evaluator",
        "Run the live-evaluation daemon (each new snapshot's downstream loss on /metrics).",
    ),
    "features": (
        "saestream.evaluator.features_cli:features",
        "Write a feature browser (static HTML) of a snapshot's SAEs.",
    ),
}


DAEMONS = frozenset({"consumer", "producer", "record", "replay", "evaluator", "train", "demo"})
"""Commands that take SIGUSR1 (a snapshot, or nothing) rather than die of it."""


READ_ENVIRONMENT = DAEMONS | {"eval", "features"}
"""Commands that read SAESTREAM_THREADS, SAESTREAM_NATIVE and SAESTREAM_KEEP_FREED_MEMORY,
each at its own point of start-up: all three are checked before anything else."""


def _check_environment() -> None:
    """One line and exit 2 for a malformed SAESTREAM_* variable, before any work (some were
    read only after sockets were bound, one not at all by some commands)."""
    from saestream.common.devices import env_threads
    from saestream.common.errors import UserError
    from saestream.common.native import switch

    try:
        env_threads()
        for name in ("SAESTREAM_NATIVE", "SAESTREAM_KEEP_FREED_MEMORY"):
            switch(name)
    except UserError as exc:
        click.echo(error_line(exc), err=True)
        sys.exit(2)


class LazyGroup(click.Group):
    """Resolves subcommands from `COMMANDS` only when they are invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="saestream")
def cli() -> None:
    """saestream: stream LM activations to online TopK SAE training."""


def main() -> None:
    """Console-script entry point. Bad usage (an unknown flag, a value out of range) is one
    line on stderr and exit 2, like every other user error (common/errors.py)."""
    try:
        sys.exit(_run())
    except SystemExit as exc:
        if _joined_a_process_group():
            _leave_now(exc.code)
        raise


def _before_import(args: list[str]) -> None:
    """What a command needs before its module (and torch) loads: SIGUSR1 caught, for the
    daemons; the SAESTREAM_* variables checked. Not for `--help`."""
    if not args or args[0] not in COMMANDS or "--help" in args or "-h" in args:
        return
    if args[0] in DAEMONS:
        from saestream.common.signals import catch_snapshot_early

        catch_snapshot_early()
    if args[0] in READ_ENVIRONMENT:
        _check_environment()


def _run() -> int:
    _before_import(sys.argv[1:])
    try:
        code = cli.main(prog_name="saestream", standalone_mode=False)
    except click.ClickException as exc:  # usage errors included: their exit code is 2
        click.echo(error_line(exc.format_message()), err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("saestream: aborted", err=True)
        return 1
    return code if isinstance(code, int) else 0


def _joined_a_process_group() -> bool:
    """Whether this process was a torch.distributed rank (consumer/distributed.py), looked
    up without importing torch where the command never did."""
    module = sys.modules.get("saestream.consumer.distributed")
    return module is not None and module.joined_a_process_group()


def _leave_now(code: object) -> None:
    """End a torchrun rank without the interpreter's teardown. After a data-parallel run
    (process group joined, used and destroyed, every file written and closed), tearing
    torch's C++ state down at interpreter exit aborts now and then under load ('terminate
    called without an active exception', SIGABRT), and torchrun then reports the whole job
    failed, the checkpoint written or not. What a normal exit does that matters here is
    done first: the atexit handlers, and flushing stdout and stderr."""
    import atexit

    atexit._run_exitfuncs()  # what the interpreter runs first at exit (no public name)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr, flush=True)
        status = 1
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
