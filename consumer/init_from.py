"""`--init-from SNAPSHOT`: a new training run that starts from given weights (one of our
snapshots, or one `saestream import` wrote) instead of a fresh initialisation.

Each SAE of the run takes the snapshot's SAE of the same name, or its only SAE. The shape
and meaning of the weights (latents, input normalisation) come from that SAE unless the run
sets them, and must then agree; k and Multi-TopK may differ (a fine-tune at another
sparsity). Optimiser state and counters start fresh (`Trainer.start_from`), and every
snapshot's cfg.json records the origin, the source's own origin nested in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from saestream.common.errors import UserError
from saestream.consumer.checkpoint import (
    SNAPSHOT_RE,
    CheckpointError,
    LoadedSAE,
    load_sae,
    read_json_file,
    sae_config_of,
    sae_dirs,
)
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer

ADOPTED = ("n_latents", "k", "multi_topk", "input_normalization")
"""`SAEConfig` fields taken from the source SAE unless the run sets them."""
MUST_AGREE = ("n_latents", "input_normalization")
"""Of those, the ones a run may not set otherwise: the weights would mean something else."""


class InitSource(NamedTuple):
    """The weights one SAE of the run starts from."""

    loaded: LoadedSAE
    origin: dict[str, Any]
    """What the snapshot's cfg.json will record (`Trainer.origin`)."""


def source_dirs(path: Path, names: Iterable[str]) -> dict[str, Path]:
    """{run SAE name: the source SAE folder it starts from}. Raises UserError."""
    try:
        dirs = sae_dirs(path)
    except CheckpointError as exc:
        raise UserError(f"--init-from: {exc}") from None
    by_name = {d.name: d for d in dirs}
    out = {}
    for name in names:
        if name in by_name:
            out[name] = by_name[name]
        elif len(dirs) == 1:
            out[name] = dirs[0]
        else:
            raise UserError(
                f"--init-from {path}: holds SAEs {', '.join(sorted(by_name))}, none named "
                f"{name} (point it at one SAE folder, e.g. {dirs[0]})"
            )
    return out


def adopt(sae_cfg: SAEConfig, source: Path, given: Iterable[str], what: str) -> SAEConfig:
    """`sae_cfg` with the source SAE's latents, k, Multi-TopK and input normalisation, except
    the fields in `given` (set by the user); UserError when a given field that must agree
    does not, or when the input width differs. `what` names the SAE in messages."""
    src = _source_cfg(source)
    given = set(given)
    for key in MUST_AGREE:
        if key in given and getattr(sae_cfg, key) != src[key]:
            label = "latents" if key == "n_latents" else key  # as --latents and latents= say
            raise UserError(
                f"--init-from {source}: its SAE has {label} {src[key]}, {what} asks for "
                f"{getattr(sae_cfg, key)} (leave it unset to take the snapshot's)"
            )
    if sae_cfg.d_in is not None and sae_cfg.d_in != src["d_in"]:
        raise UserError(f"--init-from {source}: its SAE reads d_in {src['d_in']}, {what} has "
                        f"width {sae_cfg.d_in}")
    changes = {k: src[k] for k in ADOPTED if k not in given}
    out = dataclasses.replace(sae_cfg, **changes)
    if "multi_topk" not in given and out.multi_topk and 4 * out.k > out.n_latents:
        out = dataclasses.replace(out, multi_topk=False)  # a k given here may leave no room
    try:
        out.validate()
    except ValueError as exc:
        raise UserError(f"--init-from {source}: {what}: {exc}") from None
    return out


def load_sources(path: Path, names: Iterable[str], device: torch.device | str = "cpu"
                 ) -> dict[str, InitSource]:
    """The weights every named SAE of the run starts from, read once at start-up."""
    sources: dict[Path, InitSource] = {}
    out = {}
    for name, d in source_dirs(path, names).items():
        if d not in sources:
            try:
                loaded = load_sae(d, device)
            except CheckpointError as exc:
                raise UserError(f"--init-from: {exc}") from None
            match = SNAPSHOT_RE.match(d.resolve().parent.name)
            sources[d] = InitSource(loaded, {
                "kind": "init-from",
                "path": str(d.resolve()),
                "sae": d.name,
                "step": int(match.group(1)) if match else None,
                "origin": loaded.cfg.get("origin"),
            })
        out[name] = sources[d]
    return out


def hook_widths(sources: Mapping[str, InitSource], sae_hooks: Mapping[str, str],
                d_in: int | None) -> dict[str, int]:
    """{hook: width} the started SAEs pin (so a stream of another width is rejected, as with
    --d-in). `sae_hooks` maps run SAE names to their hooks. Raises UserError on conflicts."""
    widths: dict[str, int] = {}
    for name, src in sources.items():
        hook, d = sae_hooks[name], int(src.loaded.sae.cfg.d_in)  # type: ignore[arg-type]
        if widths.setdefault(hook, d) != d or (d_in is not None and d_in != d):
            raise UserError(f"--init-from: SAE {name} reads d_in {d}, but hook {hook} has "
                            f"width {d_in if d_in is not None else widths[hook]}")
    return widths


def start(trainer: Trainer, source: InitSource) -> None:
    """Give a new trainer the source's weights (UserError when they do not fit it)."""
    have, want = source.loaded.sae.cfg, trainer.sae_cfg
    for key in ("d_in", *MUST_AGREE):
        if getattr(have, key) != getattr(want, key):
            raise UserError(f"--init-from {source.loaded.directory}: {key} {getattr(have, key)}"
                            f", SAE {trainer.name} has {getattr(want, key)}")
    weights = {n: p.detach() for n, p in source.loaded.sae.named_parameters()}
    trainer.start_from(weights, source.loaded.sae.input_scale, source.origin)


def _source_cfg(d: Path) -> dict[str, Any]:
    """The source SAE's shape and sparsity from its cfg.json, checked as `load_sae` checks
    them (whole numbers, a valid SAE): UserError in one line for a hostile file."""
    try:
        cfg = read_json_file(Path(d) / "cfg.json")
        sae_cfg = sae_config_of(cfg, Path(d) / "cfg.json")
    except (OSError, CheckpointError) as exc:
        raise UserError(f"--init-from {d}: unreadable cfg.json ({exc})") from None
    return {"d_in": sae_cfg.d_in, "n_latents": sae_cfg.n_latents, "k": sae_cfg.k,
            "multi_topk": sae_cfg.multi_topk,
            "input_normalization": sae_cfg.input_normalization}
