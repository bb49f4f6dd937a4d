"""`saestream consumer`: the training daemon's command line. Every flag is a field of
`ConsumerConfig` (its default and help come from there); `--sae` specs map onto `SAESpec`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from saestream.common.errors import UserError, cli_errors, error_line
from saestream.common.settings import FiniteFloat, GivenPath, config_option
from saestream.consumer.config import (
    MAX_DECODE_THREADS,
    ConsumerConfig,
    SAESpec,
    build_sae_specs,
    parse_sae_spec,
    sae_help,
)
from saestream.consumer.shard_files import LAYOUTS

__all__ = ["build_config", "build_sae_specs", "consumer", "parse_sae_spec"]

C = ConsumerConfig
_POSITIVE = click.IntRange(min=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option(C, "bind")
@config_option(C, "control_bind")
@config_option(C, "hooks", "--hook", multiple=True, default=())
@click.option("--sae", "saes", multiple=True, metavar="KEY=VALUE,...", help=sae_help())
@config_option(C, "d_in")
@config_option(C, "buffer_tokens", type=_POSITIVE)
@config_option(C, "batch_size", type=_POSITIVE)
@config_option(C, "min_fill", type=FiniteFloat(0.0, max=1.0))
@config_option(C, "checkpoint_dir", type=GivenPath(file_okay=False, path_type=Path))
@config_option(C, "checkpoint_every", type=_POSITIVE)
@config_option(C, "checkpoint_every_seconds", type=FiniteFloat(0.0, min_open=True))
@config_option(C, "keep", type=click.IntRange(min=0))
@config_option(C, "resume")
@config_option(C, "overwrite")
@config_option(C, "max_tokens", type=_POSITIVE)
@config_option(C, "max_steps", type=_POSITIVE)
@config_option(C, "metrics_port", type=click.IntRange(0, 65535))
@config_option(C, "metrics_addr")
@config_option(C, "metrics_window", type=_POSITIVE)
@config_option(C, "device")
@config_option(C, "hwm")
@config_option(C, "max_chunk_bytes", type=_POSITIVE)
@config_option(C, "max_connections", type=_POSITIVE)
@config_option(C, "max_producers", type=_POSITIVE)
@config_option(C, "producer_expiry_seconds", type=FiniteFloat(0.0, min_open=True))
@config_option(C, "decode_threads", type=click.IntRange(0, MAX_DECODE_THREADS))
@config_option(C, "final_snapshot_attempts", type=_POSITIVE)
@config_option(C, "init_from", metavar="SNAPSHOT", type=GivenPath(path_type=Path))
@config_option(C, "record", type=GivenPath(file_okay=False, path_type=Path))
@config_option(C, "record_shard_tokens", type=_POSITIVE)
@click.option("--curve-secret-key", type=GivenPath(dir_okay=False, path_type=Path),
              default=None, help="This consumer's CURVE key pair (NAME.key_secret).")
@click.option("--curve-authorized-dir", type=GivenPath(file_okay=False, path_type=Path),
              default=None, help="Directory of the producers' public keys (*.key) to admit.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@config_option(C, "log_every", type=FiniteFloat(0.0, min_open=True))
@config_option(C, "seed")
@config_option(C, "dist_timeout", type=FiniteFloat(0.0, min_open=True))
@config_option(C, "latent_shards", type=_POSITIVE)
@config_option(C, "snapshot_shards", type=click.Choice(LAYOUTS))
@cli_errors
def consumer(**opts: Any) -> None:
    """Receive activations from producers, shuffle them, and train TopK SAEs online.

    Signals: SIGUSR1 writes a snapshot and training continues; SIGTERM/SIGINT/SIGHUP write a
    final snapshot and exit 0 (1 if it cannot be written). Metrics are served on --metrics-port.
    Under torchrun every rank binds its own endpoints and trains its part of each batch
    (README: "Several processes"); a lost rank ends the others with one line and exit 1.
    """
    from saestream.common.logs import setup_logging
    from saestream.common.signals import SignalFlags

    flags = SignalFlags().install_snapshot()  # SIGUSR1 while starting must not kill it
    setup_logging(opts["log_level"], "saestream.consumer")
    cfg = build_config(opts)
    from saestream.common.devices import resolve_device
    from saestream.consumer.daemon import FinalSnapshotError, run_consumer
    from saestream.consumer.distributed import PeerLost, launched_by_torchrun, mesh_from_env

    try:
        # Joining the ranks may wait (--dist-timeout): a signal then ends the process, as
        # nothing is held yet; from here on signals are flags read at step boundaries.
        mesh, _ = mesh_from_env(resolve_device(cfg.device), cfg.latent_shards, cfg.dist_timeout)
        if launched_by_torchrun():
            _label_logs(mesh.world.rank)
        run_consumer(cfg, flags.install(), mesh=mesh)
    except (FinalSnapshotError, PeerLost) as exc:
        click.echo(error_line(exc), err=True)
        raise SystemExit(1) from None


def _label_logs(rank: int) -> None:
    """Under torchrun: every log line names its rank (the ranks share one terminal)."""
    import logging

    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s",
            "%Y-%m-%dT%H:%M:%S"))


def _adopt_init(source: Path, specs: list[SAESpec], d_in: int | None) -> list[SAESpec]:
    """--init-from: each SAE takes the snapshot SAE's latents, k and input normalisation
    unless its --sae keys set them (consumer/init_from.py)."""
    from saestream.consumer.init_from import adopt, source_dirs

    dirs = source_dirs(source, [s.name for s in specs])
    return [dataclasses.replace(s, sae=adopt(dataclasses.replace(s.sae, d_in=d_in),
                                             dirs[s.name], s.given, f"--sae {s.name}"))
            for s in specs]


def build_config(opts: dict[str, Any]) -> ConsumerConfig:
    """Validate the options as a whole and map them onto `ConsumerConfig`."""
    from saestream.common.control import check_binds
    from saestream.common.devices import resolve_device
    from saestream.common.transport import CurveServerKeys
    from saestream.consumer.distributed import rank_endpoints

    check_binds(opts["bind"], opts["control_bind"])
    hooks, specs = build_sae_specs(opts["saes"], opts["hooks"])
    if opts["init_from"] is not None:
        specs = _adopt_init(opts["init_from"], specs, opts["d_in"])
    if opts["batch_size"] > opts["buffer_tokens"]:
        raise UserError(
            f"--batch-size {opts['batch_size']} is larger than --buffer-tokens "
            f"{opts['buffer_tokens']}"
        )
    if opts["resume"] and opts["overwrite"]:
        raise UserError("--resume and --overwrite exclude each other")
    curve_key, curve_dir = opts["curve_secret_key"], opts["curve_authorized_dir"]
    if (curve_key is None) != (curve_dir is None):
        raise UserError("--curve-secret-key and --curve-authorized-dir go together")
    if curve_key is not None and not curve_key.is_file():
        raise UserError(f"--curve-secret-key {curve_key}: no such file")
    resolve_device(opts["device"])
    shards = opts["latent_shards"]
    for spec in specs if shards > 1 else ():
        if spec.latents % shards:
            raise UserError(f"--latent-shards {shards} must divide the latents of SAE "
                            f"{spec.name} ({spec.latents})")
        if not spec.trainer.sparse:
            raise UserError(f"--latent-shards needs the sparse path: SAE {spec.name} sets "
                            "sparse=false")
    from saestream.consumer.distributed import launched_by_torchrun, local_rank, local_world_size

    ranks = local_world_size() if launched_by_torchrun() else 1
    rank_endpoints(opts["bind"], opts["control_bind"], min(local_rank(), ranks - 1), ranks)
    fields = {f.name for f in dataclasses.fields(ConsumerConfig)} - {"hooks", "saes", "curve"}
    return ConsumerConfig(
        hooks=hooks, saes=specs,
        curve=None if curve_key is None else CurveServerKeys(curve_key, curve_dir),
        **{k: v for k, v in opts.items() if k in fields},
    )
