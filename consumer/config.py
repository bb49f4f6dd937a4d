"""What a consumer is configured with: `ConsumerConfig` (one field per flag) and `SAESpec`s.

Every SAE setting is a field of `SAEConfig` (the model) or `TrainerConfig` (its training);
`--sae key=value,...` keys map onto those fields (`SAE_KEYS`), so defaults, help texts, the
README's key table and validation all come from one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saestream.common.errors import UserError
from saestream.common.settings import (
    MAX_COUNT,
    field_default,
    field_docs,
    parse_setting,
    ranged,
    render_default,
)
from saestream.common.transport import DEFAULT_HWM, MAX_HWM, CurveServerKeys
from saestream.common.wire import DecodeLimits
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import MAX_SEED, TrainerConfig

DEFAULT_BIND = "tcp://127.0.0.1:5557"
MAX_DIST_TIMEOUT = 30 * 86_400.0
MAX_DECODE_THREADS = 64
"""Most `--decode-threads`: each holds up to two chunks in flight, beyond the receive budget."""

SAE_KEYS: dict[str, tuple[type, str]] = {
    "latents": (SAEConfig, "n_latents"),
    "k": (SAEConfig, "k"),
    "multi_topk": (SAEConfig, "multi_topk"),
    "input_normalization": (SAEConfig, "input_normalization"),
    **{f.name: (TrainerConfig, f.name) for f in dataclasses.fields(TrainerConfig)},
}
"""`--sae` key -> (config class, field). Besides these: `name` and `hook`."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@dataclass
class SAESpec:
    """One SAE the consumer trains: a name, the hook it reads, and its two configurations."""

    name: str
    """Snapshot folder and `sae` label (letters, digits, `._+-`)."""
    hook: str
    """Hook whose activations this SAE reads."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE; `d_in` stays None until the hook's width is known."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """How it is trained."""
    given: frozenset[str] = frozenset()
    """The `SAEConfig`/`TrainerConfig` fields its `--sae` keys set (the rest are defaults,
    which `--init-from` may replace with the snapshot's)."""

    @property
    def latents(self) -> int:
        return self.sae.n_latents

    @property
    def k(self) -> int:
        return self.sae.k

    def sae_config(self, d_in: int) -> SAEConfig:
        return dataclasses.replace(self.sae, d_in=d_in)


@dataclass
class ConsumerConfig:
    """Everything `saestream consumer` is configured with; one field per CLI flag."""

    hooks: list[str]
    """Hook to accept and train on (repeatable)."""
    saes: list[SAESpec]
    """SAEs to train, each on one of `hooks`."""
    bind: str = DEFAULT_BIND
    """ZeroMQ endpoint the PULL socket binds; producers connect here. Binding beyond loopback
    is an explicit choice (use CURVE keys)."""
    control_bind: str | None = None
    """ZeroMQ endpoint of the control socket (ROUTER) where producers ask where to continue;
    default: the --bind port + 1 (`off` disables it: no exactly-once rewinds)."""
    d_in: int | None = ranged(None, 1, DecodeLimits().max_d)
    """Width of every hook (at most 32,768, the widest chunk a receiver takes); default:
    learned from its first valid message."""
    buffer_tokens: int = 1 << 18
    """Shuffle buffer capacity per hook (tokens)."""
    batch_size: int = 4096
    """Tokens per training batch."""
    min_fill: float = 0.5
    """Training waits while a buffer holds fewer than this fraction of its capacity."""
    checkpoint_dir: Path | None = Path("checkpoints")
    """Where snapshots are written (step-XXXXXXXX/<sae name>/); None = no snapshots."""
    checkpoint_every: int | None = None
    """Also snapshot every N steps."""
    checkpoint_every_seconds: float | None = None
    """Also snapshot every N seconds."""
    keep: int = 3
    """Keep the newest N complete snapshots of this run (0 = all)."""
    resume: bool = False
    """Continue exactly from the snapshot `latest` names (or the next older complete one of
    the same run); a new run if the directory holds none."""
    overwrite: bool = False
    """Discard the run already in --checkpoint-dir (its snapshots) and start a new one."""
    max_tokens: int | None = ranged(None, 1, MAX_COUNT)
    """Stop with a final snapshot once the run (resumed tokens included) has trained N tokens;
    the last batch is cut so that it trains exactly N."""
    max_steps: int | None = ranged(None, 1, MAX_COUNT)
    """Stop with a final snapshot after N steps (resumed steps included)."""
    metrics_port: int = 9101
    """Port of the Prometheus /metrics endpoint (0 = off)."""
    metrics_addr: str = "127.0.0.1"
    """Address /metrics listens on (0.0.0.0 for a scraper on another host)."""
    metrics_window: int = ranged(100, 1, 1 << 20)
    """Steps over which saestream_normalized_mse is computed."""
    device: str = "auto"
    """auto (CUDA if present), cpu, cuda or cuda:N."""
    hwm: int = ranged(DEFAULT_HWM, 1, MAX_HWM)
    """Receive high-water mark: messages queued per producer connection before it blocks."""
    max_chunk_bytes: int = ranged(16 << 20, 1, 1 << 40)
    """Largest chunk accepted, in raw bytes (n · d · itemsize); bounds every receive
    allocation and ZeroMQ's message size cap (an int64 with the header's room: at most
    2^40)."""
    max_connections: int = ranged(32, 1, 1 << 16)
    """Most producer connections admitted at once (at most 65,536); more are refused at the
    handshake."""
    max_producers: int = ranged(256, 1, 1 << 20)
    """Most producer ids tracked at once; messages from further ids are rejected
    (`producers`) until idle ones expire."""
    producer_expiry_seconds: float = 600.0
    """A producer not heard from for this long leaves the per-producer metrics and frees its
    slot (its ledger positions are kept)."""
    decode_threads: int = 0
    """Threads that decode and validate received chunks in parallel (each producer's chunks
    still reach the ledger and buffer in order); 1 = on the receiver thread; 0 = half the
    CPUs this process may use, 1 to 4 (the training step needs the rest, and four decode
    several GB/s)."""
    curve: CurveServerKeys | None = None
    """CURVE server keys; None = plaintext."""
    log_every: float = 30.0
    """Seconds between progress log lines."""
    reject_log_interval: float = 10.0
    """Seconds between log lines for one reject reason."""
    final_snapshot_attempts: int = ranged(3, 1, 1000)
    """Tries of the final snapshot before the consumer gives up and exits 1 (at most 1,000)."""
    record: Path | None = None
    """Also append every accepted chunk, in its wire dtype, to a recording: DIR/<hook>/
    safetensors shards with each chunk's provenance (`saestream train --input DIR/<hook>`,
    `saestream replay DIR/<hook>` read it)."""
    record_shard_tokens: int = 1 << 16
    """Rows per recording shard: the unit written atomically, and the most a SIGKILL loses
    per hook."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seed of the buffer's batch sampling (each hook's buffer takes seed + its index)."""
    dist_timeout: float = ranged(300.0, 0.001, MAX_DIST_TIMEOUT)
    """Under torchrun: seconds a rank waits for the others (joining, and in every
    collective) before it exits 1 with a one-line error; a rank that dies is noticed at
    once. At most 30 days (torch keeps it in milliseconds in a C int's range)."""
    latent_shards: int = 1
    """Under torchrun: split each SAE's latents over this many consecutive ranks, which
    train on the same rows (their parts of the global batch, gathered); it divides the world
    size and every SAE's latents, and the rest is data parallel."""
    snapshot_shards: str = "auto"
    """With --latent-shards: `gather` writes each SAE whole from rank 0 (sparsify's layout),
    `per-rank` has every rank of the first shard group write its own rows (only saestream
    reads them: `--resume` on any shard count, eval/export reading them whole), `auto`
    gathers when that fits half of rank 0's free memory (~32 bytes per latent × d_in) and
    writes per-rank files otherwise."""
    init_from: Path | None = None
    """Start each new SAE from a snapshot's weights (ours or `saestream import`ed; the SAE of
    the same name, else its only one) with fresh optimiser state, instead of a fresh
    initialisation; its latents, k and input normalisation unless set here. cfg.json records
    the origin. A resumed run continues from its own snapshot."""

    def low_water(self) -> int:
        """Buffered tokens below which training waits."""
        return max(self.batch_size, math.ceil(self.min_fill * self.buffer_tokens))


# -- --sae specs ------------------------------------------------------------------------------


def parse_sae_spec(text: str) -> dict[str, Any]:
    """`name=k32,latents=16384,k=32` -> {"name": "k32", "latents": 16384, "k": 32}."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not eq or not value:
            raise UserError(f"--sae {text!r}: expected key=value, got {part!r}")
        if key not in SAE_KEYS and key not in ("name", "hook"):
            known = ", ".join(["name", "hook", *SAE_KEYS])
            raise UserError(f"--sae {text!r}: unknown key {key!r} (known: {known})")
        if key in out:
            raise UserError(f"--sae {text!r}: {key} given twice")
        out[key] = value if key in ("name", "hook") else parse_setting(
            *SAE_KEYS[key], value, f"--sae {key}"
        )
    return out


def spec_from_keys(name: str, hook: str, keys: dict[str, Any]) -> SAESpec:
    """An `SAESpec` from parsed `--sae` keys, validated (UserError naming the SAE)."""
    sae, trainer = {}, {}
    for key, value in keys.items():
        if key in SAE_KEYS:
            cls, attr = SAE_KEYS[key]
            (sae if cls is SAEConfig else trainer)[attr] = value
    spec = SAESpec(name, hook, SAEConfig(**sae), TrainerConfig(**trainer),
                   frozenset([*sae, *trainer]))
    if not _NAME_RE.match(name):
        raise UserError(f"--sae name {name!r}: use letters, digits and . _ + - only")
    try:
        spec.sae.validate()
        spec.trainer.validate()
    except ValueError as exc:
        raise UserError(f"--sae {name}: {str(exc).replace('n_latents', 'latents')}") from None
    return spec


def build_sae_specs(
    sae_texts: Sequence[str], hooks: Sequence[str]
) -> tuple[list[str], list[SAESpec]]:
    """Hooks and `SAESpec`s from `--hook` and `--sae` values, validated.

    No --sae: one SAE with default settings per hook, named after it. A spec without `hook=`
    is trained on every hook (named `NAME-HOOK` when there are several). Without --hook, the
    hooks are those the specs name.
    """
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
            if "name" not in p:
                name = hook if len(parsed) == 1 else _auto_name(p, hook)
            else:
                name = f"{p['name']}-{hook}" if len(targets) > 1 else p["name"]
            specs.append(spec_from_keys(name, hook, p))
    idle = [h for h in hooks if not any(s.hook == h for s in specs)]
    if idle:
        raise UserError(f"--hook {idle[0]} has no --sae (add one without hook= or with hook=it)")
    names = [s.name for s in specs]
    for n in names:
        if names.count(n) > 1:
            raise UserError(f"--sae name {n!r} is used twice: give each SAE a distinct name")
    return hooks, specs


def _auto_name(p: dict[str, Any], hook: str) -> str:
    k = p.get("k", field_default(SAEConfig, "k"))
    latents = p.get("latents", field_default(SAEConfig, "n_latents"))
    return f"{hook}-k{k}-l{latents}"


def sae_keys_table() -> str:
    """The README's table of `--sae` keys, derived from the config fields."""
    rows = [
        "| `--sae` key | default | meaning |",
        "| --- | --- | --- |",
        "| `name` | the hook | snapshot sub-folder and `sae` label (letters, digits, `._+-`) |",
        "| `hook` | every `--hook` | hook the SAE reads |",
    ]
    for key, (cls, attr) in SAE_KEYS.items():
        doc = field_docs(cls)[attr]
        rows.append(f"| `{key}` | {render_default(field_default(cls, attr))} | {doc} |")
    return "\n".join(rows)


def sae_help() -> str:
    keys = "; ".join(
        f"{k}: {field_docs(c)[a]} (default {render_default(field_default(c, a))})"
        for k, (c, a) in SAE_KEYS.items()
    )
    return (
        "An SAE to train, as comma-separated key=value (repeatable; all train on the same "
        f"batches). Keys: name (default: the hook); hook (default: every --hook); {keys}."
    )


# -- resources ---------------------------------------------------------------------------------


def machine_memory_bytes(device: str) -> int:
    """Physical memory of the device that will hold the SAEs (host RAM on CPU)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sae_train_bytes(spec: SAESpec, d_in: int, batch_size: int, shards: int = 1) -> int:
    """A lower bound of what training one SAE allocates on one rank: weights, gradients,
    Adam's two moments (and the EMA copy), and the dense [batch, latents] pre-activations,
    over the rank's 1/`shards` of the latents; the dead-latent counters are whole."""
    n = spec.sae.n_latents
    local = n // shards
    params = 2 * local * d_in + local + d_in
    copies = 4 + (1 if spec.trainer.ema_decay is not None else 0)
    return 4 * (copies * params + 2 * batch_size * local) + 8 * n


def check_fits(cfg: ConsumerConfig, device: str, d_in: int | None = None) -> None:
    """UserError when the buffers and SAEs cannot fit this machine's memory (with d_in
    unknown, at the width 1: a lower bound that still catches absurd sizes), or when an SAE
    cannot have the width once it is known (`layer_norm` over one dimension)."""
    if d_in or cfg.d_in:
        for spec in cfg.saes:
            try:
                spec.sae_config(d_in or cfg.d_in).validate()  # type: ignore[arg-type]
            except ValueError as exc:
                raise UserError(f"--sae {spec.name}: at d_in {d_in or cfg.d_in}: {exc}") from None
    d = d_in or cfg.d_in or 1
    total = machine_memory_bytes("cpu")
    buffers = len(cfg.hooks) * cfg.buffer_tokens * d * 2
    if buffers > total:
        raise UserError(
            f"--buffer-tokens {cfg.buffer_tokens}: {len(cfg.hooks)} buffer(s) need at least "
            f"{_gb(buffers)} (d_in {d}), this machine has {_gb(total)}"
        )
    on_device = machine_memory_bytes(device)
    need = sum(sae_train_bytes(s, d, cfg.batch_size, cfg.latent_shards) for s in cfg.saes)
    if need + (buffers if not device.startswith("cuda") else 0) > on_device:
        raise UserError(
            f"--sae: training {len(cfg.saes)} SAE(s) needs at least {_gb(need)} at d_in {d} "
            f"and batch {cfg.batch_size}"
            + (f" per rank of {cfg.latent_shards} latent shards" if cfg.latent_shards > 1
               else "") + f"; {device} has {_gb(on_device)}"
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
