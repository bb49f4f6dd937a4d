"""`saestream export` and `saestream import`: our snapshots out to SAELens and sparsify, and
SAEs of OpenAI's release, SAELens and sparsify in as one of our snapshots. The formats and
their mappings are in `consumer/interop.py`; this is the command line around them: cheap
checks first, every output written under a temporary name and renamed into place, one line
per SAE saying what was written and one `note:` per thing folded or left out.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from saestream import __version__
from saestream.common.errors import UserError, cli_errors
from saestream.common.files import check_writable_dir
from saestream.common.settings import GivenPath, given

if TYPE_CHECKING:  # torch and the formats load only when a command runs
    from saestream.consumer.interop import PortableSAE
    from saestream.consumer.trainer import Trainer

EXPORT_FORMATS = ("saelens", "sparsify")
IMPORT_FORMATS = ("openai", "saelens", "sparsify")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", metavar="SNAPSHOT_DIR", type=GivenPath(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(EXPORT_FORMATS),
              help="saelens: SAELens 6.x inference folder; sparsify: a sparsify run folder.")
@click.option("--out", required=True, type=GivenPath(path_type=Path),
              help="Directory to create (must not exist, or be empty).")
@click.option("--sae", "sae_name", default=None,
              help="Export only this SAE of the snapshot [default: all].")
@click.option("--context-size", type=click.IntRange(1, 1 << 31), default=None,
              help="Context length recorded in the metadata [default: the seq_len of the "
                   "snapshot's producers, when they agree].")
@click.option("--prepend-bos", is_flag=True,
              help="Record prepend_bos true (our producers cut contexts from a token stream "
                   "and prepend nothing).")
@cli_errors
def export(path: Path, fmt: str, out: Path, sae_name: str | None, context_size: int | None,
           prepend_bos: bool) -> None:
    """Write a snapshot's SAEs (a snapshot, an SAE folder, or a checkpoint directory's
    `latest`) in SAELens' or sparsify's layout."""
    from saestream.consumer import interop
    from saestream.consumer.checkpoint import SNAPSHOT_RE, CheckpointError, sae_dirs

    try:
        dirs = sae_dirs(path, sae_name)
    except CheckpointError as exc:
        raise UserError(str(exc).replace("no SAE named", "--sae: no SAE named")) from None
    snapshot = dirs[0].parent
    match = SNAPSHOT_RE.match(snapshot.name)
    created = _first_missing(out.parent)  # what checking --out's parent may create
    tmp = _temp_beside(out)
    try:
        _check_new_dir(out)
        saes = [_read(interop.fold_scalar, _read(interop.read_ours, d)) for d in dirs]
        context = context_size or interop.snapshot_context(snapshot, warn=_warn)

        def provenance(p: PortableSAE) -> dict[str, Any]:
            return {"name": p.name, "saestream_version": __version__,
                    "snapshot": str(snapshot.resolve()),
                    "step": int(match.group(1)) if match else None, "origin": p.origin,
                    "folded_input_scale": p.folded_scale}

        # Every path written is `tmp` or one checked component inside it (a hook or a name):
        # nothing lands outside --out, whatever a cfg.json says.
        if fmt == "saelens":
            targets = [tmp] if len(saes) == 1 else [interop.path_inside(tmp, p.name) for p in saes]
            for p, target in zip(saes, targets, strict=True):
                interop.write_saelens(p, target, context_size=context, prepend_bos=prepend_bos,
                                      provenance=provenance(p))
            where = [out] if len(saes) == 1 else [out / p.name for p in saes]
        else:
            folders = interop.write_sparsify(saes, tmp, context_size=context, provenance={
                "saestream_version": __version__, "snapshot": str(snapshot.resolve()),
                "step": int(match.group(1)) if match else None,
                "saes": {p.name: provenance(p) for p in saes}})
            where = [out / f for f in folders]
        _publish(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        _raise_write_error(exc, out)
        raise
    for p, target in zip(saes, where, strict=True):
        click.echo(f"exported {p.name} ({p.describe()}) to {target}")
        for note in p.notes:
            click.echo(f"note: {note}")
        if fmt == "sparsify" and p.input_normalization == "layer_norm":
            click.echo(f"note: {p.name}: sparsify applies no input normalisation of its own: "
                       "layer-normalise its inputs ((x - mean) / (unbiased std + 1e-5) per "
                       "token) and map its outputs back (x_hat * std + mean)")
        if fmt == "saelens" and interop.firing_frequency(p) is None:
            click.echo(f"note: {p.name}: no firing counts in the snapshot: "
                       f"{interop.SAELENS_SPARSITY} not written")
    if fmt == "saelens":
        folder = str(where[0]) if len(where) == 1 else f"{out}/<name>"
        click.echo(f"load with: sae_lens.SAE.load_from_disk({folder!r})")
    elif len(where) == 1:
        click.echo(f"load with: sparsify.SparseCoder.load_from_disk({str(where[0])!r})")
    else:
        click.echo(f"load with: sparsify.SparseCoder.load_many({str(out)!r}, local=True)")


@click.command("import", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", metavar="SRC", type=GivenPath(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(IMPORT_FORMATS),
              help="openai: a torch.save file of OpenAI's release; saelens: a SAELens SAE "
                   "folder; sparsify: a sparsify SAE or run folder.")
@click.option("--out", required=True, type=GivenPath(path_type=Path),
              help="Checkpoint directory to write (DIR/step-00000000/<name>/, DIR/latest); "
                   "must hold no run.")
@click.option("--sae", "sae_name", default=None,
              help="sparsify run folder: import only the SAE in this sub-folder [default: "
                   "all].")
@click.option("--name", default=None, callback=given,
              help="Name of the imported SAE (one SAE only) [default: its folder or file "
                   "name].")
@click.option("--hook", default=None, callback=given,
              help="Hook (module path) the SAE reads, recorded in cfg.json; required for "
                   "openai files, which do not say [default: the source's].")
@click.option("--model", default=None, callback=given,
              help="Model the SAE was trained on, recorded in cfg.json [default: the "
                   "source's].")
@click.option("--tokens-per-step", type=click.IntRange(min=1), default=131072,
              show_default=True,
              help="openai: tokens per training step of the run that wrote "
                   "stats_last_nonzero (it counts steps; ours counts tokens); the default is "
                   "the batch of OpenAI's reference train.py.")
@cli_errors
def import_command(source: Path, fmt: str, out: Path, sae_name: str | None, name: str | None,
                   hook: str | None, model: str | None, tokens_per_step: int) -> None:
    """Import SAEs from OpenAI's release, SAELens or sparsify as one of our snapshots, ready
    for `saestream eval` and `--init-from`."""
    from saestream.consumer import interop
    from saestream.consumer.checkpoint import holds_a_run, save_snapshot

    if fmt == "openai":
        if hook is None:
            raise UserError("--format openai: the file does not say which hook the SAE reads: "
                            "give --hook (e.g. transformer.h.8)")
        saes = [_read(interop.read_openai, source, tokens_per_step=tokens_per_step)]
    elif fmt == "saelens":
        if not Path(source).is_dir():
            raise UserError(f"{source}: not a directory (a SAELens SAE folder)")
        saes = [_read(interop.read_saelens, source)]
    else:
        if not Path(source).is_dir():
            raise UserError(f"{source}: not a directory (a sparsify SAE or run folder)")
        saes = _read(interop.read_sparsify, source, only=sae_name)
    by_folder = fmt == "sparsify" and sae_name is not None \
        and (Path(source) / sae_name / "cfg.json").is_file()  # the sub-folder read alone
    if sae_name is not None and not by_folder:
        picked = [p for p in saes if p.name == sae_name or p.hook == sae_name]
        if not picked:
            raise UserError(f"--sae: {source} holds no SAE {sae_name!r} (it holds "
                            f"{', '.join(p.name for p in saes)})")
        saes = picked
    if name is not None and len(saes) > 1:
        raise UserError(f"--name names one SAE but {source} holds {len(saes)}: pick one with "
                        "--sae")
    for p in saes:
        p.name = name or p.name
        p.hook = hook or p.hook
        p.model = model or p.model
        if not isinstance(p.name, str) or not _NAME_RE.match(p.name):
            raise UserError(f"SAE name {p.name!r:.100} cannot be a snapshot folder: give --name "
                            "(letters, digits, ._+-)")
        if p.hook is None or p.hook == "":
            raise UserError(f"{source}: SAE {p.name} names no hook: give --hook")
        if not isinstance(p.hook, str):
            raise UserError(f"{source}: SAE {p.name} names hook {p.hook!r:.100}, which is not a "
                            "string: give --hook")
        if p.model is not None and not isinstance(p.model, str):
            raise UserError(f"{source}: SAE {p.name} names model {p.model!r:.100}, which is not "
                            "a string: give --model")
    names = [p.name for p in saes]
    if len(set(names)) < len(names):
        raise UserError(f"{source}: two SAEs are named alike ({', '.join(names)})")
    if holds_a_run(out):
        raise UserError(f"--out {out} already holds a run: choose a new directory")

    origin = {"kind": "import", "format": fmt, "path": str(Path(source).resolve())}
    trainers = {p.name: _trainer(p, origin) for p in saes}
    # A failed write leaves --out as it was: the directories this command made are removed,
    # and in one that was there, every entry that was not (save_snapshot cleans its own
    # temporary folder, but not a `latest` it could not finish after the rename).
    created = _first_missing(out)
    before = _entries(out) if created is None else None
    try:
        check_writable_dir(out, "--out")
        path = save_snapshot(out, 0, trainers, extra={
            "source": "saestream import", "imported": origin, "time": time.time(), "step": 0,
            "tokens": 0, "saes": {p.name: {"hook": p.hook, "model": p.model, "step": 0,
                                           "tokens": 0} for p in saes},
        })
    except BaseException as exc:
        _remove_created(created)
        if before is not None:
            for entry in (_entries(out) or set()) - before:
                _remove(out / entry)
        _raise_write_error(exc, out)
        raise
    for p in saes:
        click.echo(f"imported {p.name} ({p.describe()}) to {path / p.name}")
        for note in p.notes:
            click.echo(f"note: {note}")
    click.echo(f"evaluate with: saestream eval {out}")


def _trainer(p: PortableSAE, origin: dict[str, Any]) -> Trainer:
    """A trainer holding the imported weights (fresh optimiser state) and counters."""
    import torch

    from saestream.consumer.sae import SAEConfig
    from saestream.consumer.trainer import Trainer, TrainerConfig

    sae_cfg = SAEConfig(d_in=p.d_in, n_latents=p.n_latents, k=p.k, multi_topk=p.multi_topk,
                        input_normalization=p.input_normalization)
    trainer = Trainer(sae_cfg, TrainerConfig(), name=p.name, hook=p.hook, model=p.model)
    sae_origin = {**origin, "sae": p.name, "origin": p.origin}
    trainer.start_from(p.weights, p.input_scale, sae_origin)
    if p.tokens_since_fired is not None:
        trainer.tokens_since_fired = p.tokens_since_fired.to(torch.int64).clone()
    return trainer


def _read(reader: Any, *args: Any, **kw: Any) -> Any:
    from saestream.consumer.interop import InteropError

    try:
        return reader(*args, **kw)
    except InteropError as exc:
        raise UserError(str(exc)) from None


def _warn(message: str) -> None:
    click.echo(f"saestream: warning: {message}", err=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` (itself included) that does not exist yet: what
    creating `path` with its parents makes, and a failure must remove. None if it exists."""
    path = Path(os.path.abspath(path))
    missing = None
    while not os.path.lexists(path):
        missing = path
        if path.parent == path:
            break
        path = path.parent
    return missing


def _entries(path: Path) -> set[str] | None:
    """The names in directory `path`; None when it is none or cannot be listed."""
    try:
        return set(os.listdir(path))
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _remove_created(created: Path | None) -> None:
    """Remove `created` (from `_first_missing`), if this command made it."""
    if created is not None and os.path.lexists(created):
        _remove(created)


def _raise_write_error(exc: BaseException, out: Path) -> None:
    """A full, read-only or failing disk (OSError; safetensors' SafetensorError, which carries
    the OS's words) as one line; anything else is left to the caller."""
    from safetensors import SafetensorError

    from saestream.consumer.interop import InteropError

    if isinstance(exc, UserError):
        raise exc
    if isinstance(exc, InteropError):
        raise UserError(str(exc)) from None
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    elif isinstance(exc, SafetensorError):
        found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(exc).strip())
        reason = found.group(1) if found else str(exc).strip()
    else:
        return
    reason = " ".join(str(reason).split())[:200]
    raise UserError(f"--out {out}: could not write ({reason})") from None


def _check_new_dir(out: Path) -> None:
    """UserError unless `out` is missing or an empty directory, in a writable parent."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory")
    check_writable_dir(out.parent if str(out.parent) else Path("."), "--out")


def _temp_beside(out: Path) -> Path:
    return Path(out).parent / f".tmp-{Path(out).name}-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out`: rename(2) replaces an empty `out`
    in the same step, so a failure leaves it as it was."""
    os.rename(tmp, out)
