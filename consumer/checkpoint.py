"""Snapshots of one or more SAEs and their trainers, in a layout other SAE tools can read.

    DIR/step-00001234/<name>/sae.safetensors   the four float32 tensors (EMA weights if on)
    DIR/step-00001234/<name>/cfg.json          SAE configuration (sparsify-style keys + ours)
    DIR/step-00001234/<name>/trainer.json      trainer configuration and counters (readable)
    DIR/step-00001234/<name>/trainer.pt        optimiser, dead counters, RNG (weights_only)
    DIR/step-00001234/extra.json               provenance supplied by the caller
    DIR/latest                                 text: the newest snapshot's directory name

Each snapshot is written under `DIR/.tmp-…`, fsynced and renamed into place; `latest` is
replaced atomically afterwards, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from saestream import __version__
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.consumer.trainer import Trainer, TrainerConfig

log = logging.getLogger("saestream.checkpoint")

SNAPSHOT_RE = re.compile(r"^step-(\d{8,})$")
WEIGHT_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
LATEST = "latest"


class CheckpointError(Exception):
    """A snapshot that cannot be read (missing or corrupt file, inconsistent contents)."""


def snapshot_name(step: int) -> str:
    return f"step-{step:08d}"


def sae_cfg_json(trainer: Trainer) -> dict[str, Any]:
    """cfg.json: the keys other SAE tools read (sparsify: activation, num_latents, k,
    multi_topk, normalize_decoder, d_in) plus the input normalisation and provenance."""
    c = trainer.sae_cfg
    return {
        "activation": "topk",
        "d_in": c.d_in,
        "num_latents": c.n_latents,
        "k": c.k,
        "multi_topk": c.multi_topk,
        "normalize_decoder": True,
        "input_normalization": c.input_normalization,
        "input_scale": trainer.sae.input_scale if c.input_normalization == "scalar" else None,
        "layer_norm_eps": 1e-5,
        "name": trainer.name,
        "hook": trainer.hook,
        "model": trainer.model,
        "saestream_version": __version__,
    }


def save_snapshot(
    root: Path, step: int, trainers: Mapping[str, Trainer], extra: dict | None = None
) -> Path:
    """Write `root/step-XXXXXXXX/` for every trainer (keyed by SAE name) and point
    `root/latest` at it. Returns the snapshot's path. A snapshot of the same step is replaced."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / snapshot_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, trainer in trainers.items():
            _check_name(name)
            d = tmp / name
            d.mkdir()
            save_file(trainer.export_weights(), str(d / "sae.safetensors"))
            _write_json(d / "cfg.json", sae_cfg_json(trainer))
            _write_json(
                d / "trainer.json",
                {
                    "trainer": dataclasses.asdict(trainer.cfg),
                    "sae": dataclasses.asdict(trainer.sae_cfg),
                    "name": trainer.name,
                    "hook": trainer.hook,
                    "model": trainer.model,
                    "step": trainer.step,
                    "tokens_seen": trainer.tokens_seen,
                    "mse_scale": trainer.mse_scale,
                },
            )
            torch.save(trainer.state_dict(), d / "trainer.pt")
            for f in d.iterdir():
                _fsync(f)
            _fsync(d)
        _write_json(tmp / "extra.json", extra or {})
        _fsync(tmp)
        old = None
        if final.exists():
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    _fsync(root)
    return final


def list_snapshots(root: Path) -> list[Path]:
    """Complete snapshot directories under `root`, oldest to newest (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = SNAPSHOT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def load_snapshot(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Trainer], dict]:
    """Read one snapshot: ({name: Trainer}, extra). Raises CheckpointError."""
    path = Path(path)
    try:
        extra_file = path / "extra.json"
        extra = json.loads(extra_file.read_text()) if extra_file.exists() else {}
        dirs = sorted(d for d in path.iterdir() if (d / "cfg.json").exists())
        if not dirs:
            raise CheckpointError(f"{path}: no SAE directory (none holds cfg.json)")
        return {d.name: load_trainer(d, device) for d in dirs}, extra
    except CheckpointError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_trainer(directory: Path, device: str | torch.device = "cpu") -> Trainer:
    """Read one `<snapshot>/<name>/` directory back into a Trainer. Raises CheckpointError."""
    d = Path(directory)
    try:
        meta = json.loads((d / "trainer.json").read_text())
        sae_cfg = SAEConfig(**meta["sae"])
        cfg = TrainerConfig(**meta["trainer"])
        trainer = Trainer(
            sae_cfg, cfg, name=meta["name"], hook=meta["hook"], model=meta["model"], device=device
        )
        weights = load_file(str(d / "sae.safetensors"))
        if set(weights) != set(WEIGHT_NAMES):
            raise CheckpointError(f"{d}: sae.safetensors holds {sorted(weights)}")
        for n, p in trainer.sae.named_parameters():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{d}: {n} has shape {tuple(weights[n].shape)}, expected {tuple(p.shape)}"
                )
        state = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
        trainer.load_state_dict(weights, state)
        return trainer
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt files surface as many exception types
        raise CheckpointError(f"{d}: {type(exc).__name__}: {exc}") from exc


def load_latest(
    root: Path, device: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Trainer], dict] | None:
    """The newest readable snapshot under `root`, or None. Unreadable ones are skipped with
    a warning."""
    for path in reversed(list_snapshots(root)):
        try:
            trainers, extra = load_snapshot(path, device)
        except CheckpointError as exc:
            log.warning("skipping unreadable snapshot %s: %s", path, exc)
            continue
        return path, trainers, extra
    return None


class LoadedSAE(NamedTuple):
    """An SAE read for inference (evaluation, export, the feature browser): weights only."""

    name: str
    """The SAE folder's name (the `sae` label)."""
    directory: Path
    sae: SparseAutoencoder
    """In eval mode, float32, on the device asked for; `input_scale` set for `scalar`."""
    cfg: dict[str, Any]
    """cfg.json as written (hook, model, k, input_normalization, ...)."""


def sae_dirs(path: Path, name: str | None = None) -> list[Path]:
    """The SAE folders `path` names: an SAE folder itself (holds cfg.json), every SAE of a
    snapshot, or every SAE of the snapshot a checkpoint directory's `latest` names.
    `name` picks one SAE. Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if (path / LATEST).is_file() and not (path / "cfg.json").exists():
        target = (path / LATEST).read_text().strip()
        if not SNAPSHOT_RE.match(target) or not (path / target).is_dir():
            raise CheckpointError(f"{path}/{LATEST} names {target!r}, which is not a snapshot")
        path = path / target
    if (path / "cfg.json").is_file():
        found = [path]
    else:
        found = sorted(d for d in path.iterdir() if (d / "cfg.json").is_file())
    if not found:
        raise CheckpointError(f"{path}: neither an SAE folder, a snapshot nor a checkpoint dir")
    if name is not None:
        found = [d for d in found if d.name == name]
        if not found:
            raise CheckpointError(f"{path}: no SAE named {name!r}")
    return found


def load_sae(directory: Path, device: str | torch.device = "cpu") -> LoadedSAE:
    """Read `<sae folder>/cfg.json` and `sae.safetensors` (no trainer state). Raises
    CheckpointError."""
    d = Path(directory)
    try:
        cfg = json.loads((d / "cfg.json").read_text())
        sae_cfg = SAEConfig(
            d_in=int(cfg["d_in"]), n_latents=int(cfg["num_latents"]), k=int(cfg["k"]),
            multi_topk=bool(cfg.get("multi_topk", False)),
            input_normalization=str(cfg.get("input_normalization", "none")),
        )
        sae = SparseAutoencoder(sae_cfg, device="meta")  # shapes only; filled below
        weights = load_file(str(d / "sae.safetensors"))
        if set(weights) != set(WEIGHT_NAMES):
            raise CheckpointError(f"{d}: sae.safetensors holds {sorted(weights)}")
        for n, p in sae.named_parameters():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{d}: {n} has shape {tuple(weights[n].shape)}, expected {tuple(p.shape)}"
                )
        sae = sae.to_empty(device=device)
        sae.load_state_dict({n: w.float() for n, w in weights.items()})
        if sae_cfg.input_normalization == "scalar":
            sae.input_scale = float(cfg["input_scale"])
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or foreign files surface as many exception types
        raise CheckpointError(f"{d}: {type(exc).__name__}: {exc}") from exc
    return LoadedSAE(d.name, d, sae.eval().requires_grad_(False), cfg)


def prune_snapshots(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` snapshots (never the one `latest` names)."""
    root = Path(root)
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    try:
        pinned = (root / LATEST).read_text().strip()
    except OSError:
        pinned = None
    for path in list_snapshots(root)[:-keep]:
        if path.name != pinned:
            shutil.rmtree(path, ignore_errors=True)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"SAE name {name!r} cannot be a directory name")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
