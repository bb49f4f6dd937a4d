"""`saestream consumer`: the training daemon's command line, mapped one-to-one onto
`ConsumerConfig` (and `--sae` specs onto `SAESpec`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from saestream.common.errors import UserError, cli_errors

SPEC_KEYS: dict[str, str] = {
    "name": "snapshot folder and `sae` label (default: the hook)",
    "hook": "hook the SAE reads (default: every --hook)",
    "latents": "number of latents (default 16384)",
    "k": "latents kept per token by TopK (default 32)",
    "k_aux": "dead latents used by AuxK (default 512)",
    "auxk_coef": "weight of the AuxK loss (default 1/32)",
    "multi_topk": "true/false: add the Multi-TopK term L(4k)/8 (default false)",
    "lr": "Adam learning rate (default 2e-4 / sqrt(latents / 2^14))",
    "input_normalization": "none | layer_norm | scalar (default layer_norm)",
    "dead_tokens": "tokens without firing after which a latent counts as dead (default 1e7)",
    "grad_clip": "gradient-norm clip (default off)",
    "seed": "initialisation seed (default 0)",
}
_INT_KEYS = {"latents", "k", "k_aux", "dead_tokens", "seed"}
_FLOAT_KEYS = {"auxk_coef", "lr", "grad_clip"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def _parse_int(key: str, value: str) -> int:
    try:
        f = float(value.replace("_", ""))
    except ValueError:
        raise UserError(f"--sae {key}={value!r}: not a number") from None
    if not f.is_integer():
        raise UserError(f"--sae {key}={value!r}: not a whole number")
    return int(f)


def _parse_value(key: str, value: str) -> Any:
    if key in _INT_KEYS:
        return _parse_int(key, value)
    if key in _FLOAT_KEYS:
        try:
            return float(value)
        except ValueError:
            raise UserError(f"--sae {key}={value!r}: not a number") from None
    if key == "multi_topk":
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--sae multi_topk={value!r}: use true or false")
    return value


def parse_sae_spec(text: str) -> dict[str, Any]:
    """`name=k32,latents=16384,k=32` -> {"name": "k32", "latents": 16384, "k": 32}."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not value.strip():
            raise UserError(f"--sae {text!r}: expected key=value, got {part!r}")
        if key not in SPEC_KEYS:
            raise UserError(
                f"--sae {text!r}: unknown key {key!r} (known: {', '.join(SPEC_KEYS)})"
            )
        if key in out:
            raise UserError(f"--sae {text!r}: {key} given twice")
        out[key] = _parse_value(key, value.strip())
    return out


def build_sae_specs(sae_texts: Sequence[str], hooks: Sequence[str]) -> tuple[list[str], list[Any]]:
    """Hooks and `SAESpec`s from `--hook` and `--sae` values, validated.

    No --sae: one SAE with default settings per hook, named after it. A spec without `hook=`
    is trained on every hook (named `NAME-HOOK` when there are several). Without --hook, the
    hooks are those the specs name.
    """
    from saestream.consumer.daemon import SAESpec
    from saestream.consumer.sae import INPUT_NORMALIZATIONS

    parsed = [parse_sae_spec(t) for t in sae_texts] or [{}]
    hooks = list(dict.fromkeys(hooks))
    for p in parsed:
        if "hook" in p and p["hook"] not in hooks:
            hooks.append(p["hook"])
    if not hooks:
        raise UserError("give at least one --hook (or hook= in every --sae)")
    specs = []
    for p in parsed:
        targets = [p["hook"]] if "hook" in p else hooks
        for hook in targets:
            fields = dict(p, hook=hook)
            if "name" not in p:
                fields["name"] = hook if len(parsed) == 1 else _auto_name(p, hook)
            elif len(targets) > 1:
                fields["name"] = f"{p['name']}-{hook}"
            specs.append(SAESpec(**fields))
    idle = [h for h in hooks if not any(s.hook == h for s in specs)]
    if idle:
        raise UserError(f"--hook {idle[0]} has no --sae (add one without hook= or with hook=it)")
    names = [s.name for s in specs]
    for s in specs:
        if not _NAME_RE.match(s.name):
            raise UserError(f"--sae name {s.name!r}: use letters, digits and . _ + - only")
        if names.count(s.name) > 1:
            raise UserError(f"--sae name {s.name!r} is used twice: give each SAE a distinct name")
        if s.latents < 1 or not 1 <= s.k <= s.latents:
            raise UserError(f"--sae {s.name}: need latents >= 1 and 1 <= k <= latents")
        if s.multi_topk and 4 * s.k > s.latents:
            raise UserError(f"--sae {s.name}: multi_topk needs 4k <= latents")
        if s.k_aux < 1 or s.dead_tokens < 1:
            raise UserError(f"--sae {s.name}: k_aux and dead_tokens must be positive")
        if (s.lr is not None and s.lr <= 0) or s.auxk_coef < 0:
            raise UserError(f"--sae {s.name}: lr must be > 0 and auxk_coef >= 0")
        if s.input_normalization not in INPUT_NORMALIZATIONS:
            raise UserError(
                f"--sae {s.name}: input_normalization must be one of "
                f"{', '.join(INPUT_NORMALIZATIONS)}"
            )
    return hooks, specs


def _auto_name(p: dict[str, Any], hook: str) -> str:
    return f"{hook}-k{p.get('k', 32)}-l{p.get('latents', 16384)}"


SAE_HELP = (
    "An SAE to train, as comma-separated key=value (repeatable; all train on the same "
    "batches). Keys: " + "; ".join(f"{k}: {v}" for k, v in SPEC_KEYS.items()) + "."
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bind", default="tcp://127.0.0.1:5557", show_default=True,
              help="ZeroMQ endpoint to bind the PULL socket to; producers connect here. "
                   "Binding beyond loopback is your explicit choice (use CURVE keys).")
@click.option("--hook", "hooks", multiple=True,
              help="Hook to accept and train on (repeatable), e.g. model.layers.6.")
@click.option("--sae", "saes", multiple=True, metavar="KEY=VALUE,...", help=SAE_HELP)
@click.option("--d-in", type=click.IntRange(min=1), default=None,
              help="Width of every hook; default: learned from its first valid message.")
@click.option("--buffer-tokens", type=click.IntRange(min=1), default=1 << 18, show_default=True,
              help="Shuffle buffer capacity per hook (tokens).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens per training batch.")
@click.option("--min-fill", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Training waits while a buffer is below this fraction of its capacity.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("checkpoints"), show_default=True,
              help="Where snapshots are written (step-XXXXXXXX/<sae name>/).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Also snapshot every N steps.")
@click.option("--checkpoint-every-seconds", type=click.FloatRange(min=0, min_open=True),
              default=None, help="Also snapshot every N seconds.")
@click.option("--keep", type=click.IntRange(min=0), default=3, show_default=True,
              help="Keep the newest N snapshots (0 = all).")
@click.option("--resume", is_flag=True,
              help="Continue exactly from the newest readable snapshot in --checkpoint-dir "
                   "(a fresh start if there is none).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Stop with a final snapshot after training on N tokens.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop with a final snapshot after N steps.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9101, show_default=True,
              help="Port of the Prometheus /metrics endpoint (0 = off).")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True,
              help="Address /metrics listens on (0.0.0.0 for a scraper on another host).")
@click.option("--metrics-window", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps over which saestream_normalized_mse is computed.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA if present), cpu, cuda or cuda:N.")
@click.option("--hwm", type=click.IntRange(min=1), default=16, show_default=True,
              help="Receive high-water mark: messages queued per producer before it blocks.")
@click.option("--curve-secret-key", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="This consumer's CURVE key pair (NAME.key_secret).")
@click.option("--curve-authorized-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Directory of the producers' public keys (*.key) to admit.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-every", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds between progress log lines.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the buffer's batch sampling.")
@cli_errors
def consumer(**opts: Any) -> None:
    """Receive activations from producers, shuffle them, and train TopK SAEs online.

    Signals: SIGUSR1 writes a snapshot and training continues; SIGTERM/SIGINT write a final
    snapshot and exit 0. Metrics are served on --metrics-port.
    """
    from saestream.common.logs import setup_logging
    from saestream.common.signals import SignalFlags

    setup_logging(opts["log_level"], "saestream.consumer")
    cfg = build_config(opts)
    from saestream.consumer.daemon import run_consumer

    run_consumer(cfg, SignalFlags().install())


def build_config(opts: dict[str, Any]) -> Any:
    """Validate the options as a whole and map them onto `ConsumerConfig`."""
    import torch

    from saestream.common.transport import CurveServerKeys
    from saestream.consumer.daemon import ConsumerConfig

    hooks, specs = build_sae_specs(opts["saes"], opts["hooks"])
    if opts["batch_size"] > opts["buffer_tokens"]:
        raise UserError(
            f"--batch-size {opts['batch_size']} is larger than --buffer-tokens "
            f"{opts['buffer_tokens']}"
        )
    curve_key, curve_dir = opts["curve_secret_key"], opts["curve_authorized_dir"]
    if (curve_key is None) != (curve_dir is None):
        raise UserError("--curve-secret-key and --curve-authorized-dir go together")
    if curve_key is not None and not curve_key.is_file():
        raise UserError(f"--curve-secret-key {curve_key}: no such file")
    device = opts["device"]
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {device!r}: not a torch device") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here")
    fields = {f.name for f in dataclasses.fields(ConsumerConfig)}
    direct = {k: v for k, v in opts.items() if k in fields and k not in ("hooks", "saes")}
    return ConsumerConfig(
        hooks=hooks, saes=specs,
        curve=None if curve_key is None else CurveServerKeys(curve_key, curve_dir),
        **{k: v for k, v in direct.items() if k != "curve"},
    )
