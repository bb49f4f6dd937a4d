"""Snapshots of one or more SAEs and their trainers, in a layout other SAE tools can read.

    DIR/step-00001234/<name>/sae.safetensors   the four float32 tensors (EMA weights if on)
    DIR/step-00001234/<name>/cfg.json          SAE configuration (sparsify-style keys + ours)
    DIR/step-00001234/<name>/trainer.json      trainer configuration and counters (readable)
    DIR/step-00001234/<name>/trainer.pt        optimiser, dead counters, RNG (weights_only)
    DIR/step-00001234/extra.json               provenance supplied by the caller
    DIR/step-00001234/buffers/<i>.safetensors  the consumer's shuffle buffers (rows, sources)
    DIR/latest                                 text: the newest snapshot's directory name

A latent-sharded SAE too large to gather on one rank is written as per-rank shard files
instead of sae.safetensors (`consumer/shard_files.py`; trainer.json says `shards`).

Each snapshot is written under `DIR/.tmp-…`, fsynced and renamed into place; `latest` is
replaced atomically afterwards, so a reader never sees half a checkpoint. A consumer's
`extra.json` names its run (`run_id`), its SAEs (`saes`) and buffers (`buffers`): a
snapshot is complete only when every one of them is there (`check_complete`), and resuming
follows `latest`, falling back only to older snapshots of the same run (`resumable`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saestream import __version__
from saestream.common import bounded_json
from saestream.common.errors import UserError
from saestream.common.files import (
    FileTooLarge,
    NotRegularFile,
    UnsafeArchive,
    check_torch_archive,
    read_regular,
)
from saestream.common.wire import DTYPES
from saestream.consumer.buffer import Batch
from saestream.consumer.sae import LAYER_NORM_EPS, SAEConfig, SparseAutoencoder
from saestream.consumer.shard_files import (
    MOMENTS,
    RowReader,
    save_tensors,
    shard_file,
    strip_state,
)
from saestream.consumer.sharding import LatentShard
from saestream.consumer.trainer import Trainer, TrainerConfig

log = logging.getLogger("saestream.checkpoint")

SNAPSHOT_RE = re.compile(r"^step-(\d{8,19})$")
"""A snapshot's directory name: a step of int64 (at most 19 digits), so a `latest` naming
hundreds of digits is garbage, not a path too long to probe."""
BUFFER_RE = re.compile(r"buffers/\d+\.safetensors")
"""A shuffle buffer's file, relative to its snapshot (`extra.json`'s `buffers`)."""
WEIGHT_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
SAE_FILES = ("sae.safetensors", "cfg.json", "trainer.json", "trainer.pt")
LATEST = "latest"
TEMP_PREFIXES = (".tmp-", ".old-", ".del-", f".{LATEST}.tmp")
"""Names of what a snapshot write (`.tmp-`, `.old-`: the one it replaces), a prune (`.del-`)
or a `latest` update leaves behind when killed; removed at the next start."""


class CheckpointError(UserError):
    """A snapshot that cannot be read (missing or corrupt file, inconsistent contents).

    A `UserError`: one that reaches a command's top is its one-line error, exit code 2."""


class NotAFile(CheckpointError):
    """Where a checkpoint file should be, something no writer of ours leaves (a FIFO, a
    device, a directory): refused outright, never skipped as mere garbage."""


class IncompleteSnapshot(CheckpointError):
    """A file the snapshot's layout names is not there (still being written, or pruned)."""


MAX_SMALL_FILE = 64 << 20
"""The most bytes `read_small_file` reads: every JSON or text file of a checkpoint is far
smaller; a larger one is not ours."""


def read_small_file(path: Path) -> str:
    """The text of a small regular file: `latest`, run.json and the JSON files of a snapshot.

    FileNotFoundError when there is none (callers may treat that as "absent"); NotAFile for
    a FIFO, device or directory (never opened blocking: it must not hang a consumer);
    CheckpointError for anything else that is not a readable UTF-8 file of at most
    MAX_SMALL_FILE bytes."""
    try:
        data = read_regular(path, MAX_SMALL_FILE)
    except FileNotFoundError:
        raise
    except NotRegularFile as exc:
        raise NotAFile(str(exc)) from None
    except FileTooLarge as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None


EXTRA_JSON_VALUES = None
"""extra.json's value limit: none but its size (MAX_SMALL_FILE). It holds the ledger: every
producer's latest `source` (up to 64 lists of 256 values each) and delivered ranges, so it
grows with the run; 64 producers with full sources made 1,048,576 values."""


def read_json_file(path: Path, limit: int | None = bounded_json.MAX_VALUES) -> Any:
    """`read_small_file`, parsed as JSON: FileNotFoundError when missing, CheckpointError
    when it is no JSON (nesting too deep to parse is no JSON we write) or holds more than
    `limit` values (`bounded_json`; None: no limit)."""
    text = read_small_file(path)
    try:
        return bounded_json.loads(text, limit)
    except RecursionError:
        raise CheckpointError(f"{path}: not JSON (nested too deeply)") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not JSON ({exc})") from None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message`, cut to its first line (a C++ error carries a stack trace) and to
    `limit` characters: what a one-line error may embed of a foreign exception."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_int(cfg: Mapping[str, Any], key: str, where: object) -> int:
    """`cfg[key]` as a whole number: an int, or a float with no fraction (JSON writers may
    write 768.0); CheckpointError for anything else (NaN, Infinity, 16.5, "16", true)."""
    if key not in cfg:
        raise CheckpointError(f"{where}: no {key}")
    value = cfg[key]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if type(value) is not int:
        raise CheckpointError(f"{where}: {key} {value!r} is not a whole number")
    return value


def sae_config_of(cfg: Any, where: object) -> SAEConfig:
    """The SAEConfig a cfg.json describes (sparsify's keys, our input normalisation),
    validated; CheckpointError for a file that describes no SAE."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    multi = cfg.get("multi_topk", False)
    norm = cfg.get("input_normalization", "none")
    if not isinstance(multi, bool):
        raise CheckpointError(f"{where}: multi_topk {multi!r} is not true or false")
    if not isinstance(norm, str):
        raise CheckpointError(f"{where}: input_normalization {norm!r} is not a string")
    out = SAEConfig(d_in=json_int(cfg, "d_in", where),
                    n_latents=json_int(cfg, "num_latents", where),
                    k=json_int(cfg, "k", where), multi_topk=multi, input_normalization=norm)
    try:
        out.validate()
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return out


def snapshot_name(step: int) -> str:
    return f"step-{step:08d}"


def _is_dir(path: Path) -> bool:
    """`path.is_dir()`, but False where probing it fails (a name too long, a permission):
    a path that cannot be probed names no snapshot, and must not end a command in a
    traceback."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def sae_cfg_json(trainer: Trainer) -> dict[str, Any]:
    """cfg.json: the keys other SAE tools read (sparsify: activation, num_latents, k,
    multi_topk, normalize_decoder, d_in) plus the input normalisation and provenance
    (`origin`: where given weights came from, `Trainer.start_from`; null otherwise)."""
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
        "layer_norm_eps": LAYER_NORM_EPS,
        "name": trainer.name,
        "hook": trainer.hook,
        "model": trainer.model,
        "origin": trainer.origin,
        "saestream_version": __version__,
    }


def begin_snapshot(root: Path, step: int, names: list[str] = ()) -> Path:  # type: ignore[assignment]
    """The temporary directory a snapshot of `step` is written into (with an empty folder
    per SAE name), for ranks to put their shard files in before `save_snapshot(staged=)`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{snapshot_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for name in names:
        _check_name(name)
        (tmp / name).mkdir()
    return tmp


def save_snapshot(
    root: Path, step: int, trainers: Mapping[str, Trainer], extra: dict | None = None,
    *, buffers: Mapping[str, Batch] | None = None, staged: Path | None = None,
) -> Path:
    """Write `root/step-XXXXXXXX/` for every trainer (keyed by SAE name) and point
    `root/latest` at it. Returns the snapshot's path. A snapshot of the same step is replaced.

    :param buffers: shuffle-buffer contents per hook; written under `buffers/` and listed in
        `extra.json` (`buffers`: hook -> file).
    :param staged: the `begin_snapshot` directory, where the ranks of a sharded trainer
        (`trainer.shard` set) have written their shard files: its folder gets the rest.
    Raises OSError (or safetensors' error) with nothing left behind but the previous state.
    """
    root = Path(root)
    final = root / snapshot_name(step)
    tmp = staged if staged is not None else begin_snapshot(root, step)
    extra = dict(extra or {})
    try:
        if buffers is not None:
            (tmp / "buffers").mkdir()
            extra["buffers"] = {}
            for i, (hook, batch) in enumerate(buffers.items()):
                rel = f"buffers/{i}.safetensors"
                save_tensors({"rows": batch.x.contiguous(),
                              "sources": batch.sources.contiguous()},
                             tmp / rel, metadata={"hook": hook})
                _fsync(tmp / rel)
                extra["buffers"][hook] = rel
            _fsync(tmp / "buffers")
        for name, trainer in trainers.items():
            _check_name(name)
            d = tmp / name
            d.mkdir(exist_ok=True)
            shards = trainer.shard.size if trainer.shard is not None else 1
            if shards == 1:
                save_tensors(trainer.export_weights(), d / "sae.safetensors")
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
                    "origin": trainer.origin,
                    **({"shards": shards} if shards > 1 else {}),
                },
            )
            state = trainer.state_dict()
            torch.save(state if shards == 1 else strip_state(state), d / "trainer.pt")
            for f in d.iterdir():
                _fsync(f)
            _fsync(d)
        _write_json(tmp / "extra.json", extra)
        _fsync(tmp / "extra.json")
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
    _replace_file(root / LATEST, final.name + "\n", root / f".{LATEST}.tmp")
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


def sae_names(path: Path, extra: Mapping[str, Any]) -> list[str]:
    """The SAEs of a snapshot: those its extra.json lists (a consumer's), else every folder
    holding a cfg.json (`saestream train`'s). CheckpointError when there is none."""
    if isinstance(extra.get("saes"), dict):
        for name in extra["saes"]:
            try:
                _check_name(name)
            except ValueError as exc:
                raise CheckpointError(f"{path}: extra.json lists {exc}") from None
        return sorted(extra["saes"])
    names = sorted(d.name for d in Path(path).iterdir() if (d / "cfg.json").exists())
    if not names:
        raise CheckpointError(f"{path}: no SAE directory (none holds cfg.json)")
    return names


def load_snapshot(
    path: Path, device: str | torch.device = "cpu",
    shard: Callable[[int], LatentShard | None] | None = None,
) -> tuple[dict[str, Trainer], dict]:
    """Read one snapshot: ({name: Trainer}, extra); with `shard`, this rank's slices
    (`load_trainer`). Raises CheckpointError."""
    path = Path(path)
    try:
        try:
            extra = read_json_file(path / "extra.json", EXTRA_JSON_VALUES)
        except FileNotFoundError:
            extra = {}
        if not isinstance(extra, dict):
            raise CheckpointError(f"{path}: extra.json is not an object")
        names = sae_names(path, extra)
        return {n: load_trainer(path / n, device, shard) for n in names}, extra
    except CheckpointError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_trainer(directory: Path, device: str | torch.device = "cpu",
                 shard: Callable[[int], LatentShard | None] | None = None) -> Trainer:
    """Read one `<snapshot>/<name>/` directory back into a Trainer: a whole one, or, with
    `shard` (n_latents -> this rank's LatentShard), this rank's slice of it, reading only
    its rows from either layout (any saved shard count). Raises CheckpointError; UserError
    when `shard` refuses the SAE's latent count."""
    d = Path(directory)
    try:
        meta = read_json_file(d / "trainer.json")
        sae_cfg = SAEConfig(**meta["sae"])
        cfg = TrainerConfig(**meta["trainer"])
        sae_cfg.validate()
        shards = _saved_shards(d)
        if shards == 1 and not (d / "sae.safetensors").is_file():
            raise CheckpointError(f"{d}: no sae.safetensors")
        if not (d / "trainer.pt").is_file():  # torch.load would wait on a FIFO forever
            raise CheckpointError(f"{d}: trainer.pt is missing or not a regular file")
        try:  # a few compressed bytes must not make torch.load allocate gigabytes
            check_torch_archive(d / "trainer.pt")
        except UnsafeArchive as exc:
            raise CheckpointError(str(exc)) from None
        state = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True, mmap=True)
        reader = RowReader(d, sae_cfg, shards, state)  # checks the shard files' shapes
        if shards == 1:
            _check_weight_shapes(d / "sae.safetensors", reader)
        # Only now, trainer.json's sizes agreeing with the weights', is the SAE allocated.
        mine = shard(sae_cfg.n_latents) if shard is not None else None
        trainer = Trainer(sae_cfg, cfg, name=meta["name"], hook=meta["hook"],
                          model=meta["model"], device=device, shard=mine)
        lo, hi = (mine.lo, mine.hi) if mine is not None else (0, sae_cfg.n_latents)
        names = [n for n, _ in trainer.sae.named_parameters()]
        weights = {n: reader.rows("weights", n, lo, hi) for n in names}
        if cfg.ema_decay is not None:  # the raw weights (the EMA ones are `weights`)
            state["params"] = {n: reader.rows("params", n, lo, hi) for n in names}
        moments = state["optimizer"]["state"]
        for i, entry in moments.items():
            for key in MOMENTS:
                if shards > 1 or key in entry:
                    entry[key] = reader.rows(key, names[int(i)], lo, hi)
        trainer.load_state_dict(weights, state)
        trainer.origin = meta.get("origin")
        return trainer
    except (CheckpointError, UserError):
        raise
    except Exception as exc:  # corrupt files surface as many exception types
        raise CheckpointError(f"{d}: {one_line(exc)}") from exc


def _check_weight_shapes(path: Path, reader: RowReader) -> None:
    """ValueError unless sae.safetensors holds the four weights at the shapes trainer.json
    gives: read from its header alone, before a Trainer of those sizes is allocated (a
    trainer.json saying d_in 2^22 must not cost gigabytes to refuse)."""
    with safe_open(str(path), framework="pt") as f:
        for name in WEIGHT_NAMES:
            want = reader.whole_shape(name)
            if name not in f.keys():
                raise ValueError(f"{path.name} lacks {name}")
            got = tuple(f.get_slice(name).get_shape())
            if got != want:
                raise ValueError(f"{path.name}: {name} has shape {got}, trainer.json says "
                                 f"{want}")


def check_complete(path: Path) -> dict[str, Any]:
    """The snapshot's extra.json if every file its layout names is present; CheckpointError
    (saying what is missing) otherwise. Cheap: nothing but extra.json is read."""
    path = Path(path)
    try:
        extra = read_json_file(path / "extra.json", EXTRA_JSON_VALUES)
    except FileNotFoundError:
        raise IncompleteSnapshot(f"{path}: no extra.json") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: no readable extra.json ({exc})") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: extra.json is not an object")
    names = sae_names(path, extra)
    for name in names:
        wanted = list(SAE_FILES)
        if not (path / name / "sae.safetensors").is_file():  # per-rank shard files?
            shards = _saved_shards(path / name)
            if shards > 1:
                wanted = [f for f in wanted if f != "sae.safetensors"]
                wanted += [shard_file(r, shards) for r in range(shards)]
        missing = _missing(path / name, wanted)
        if missing:
            raise IncompleteSnapshot(f"{path}: SAE {name} lacks {', '.join(missing)}")
    buffers = extra.get("buffers") or {}
    if not isinstance(buffers, dict) or not all(
            isinstance(rel, str) and BUFFER_RE.fullmatch(rel) for rel in buffers.values()):
        raise CheckpointError(f"{path}: extra.json's buffers are not a map of hook to "
                              "buffers/N.safetensors")
    for hook, rel in buffers.items():
        if _missing(path, [rel]):
            raise IncompleteSnapshot(f"{path}: the buffer of hook {hook} ({rel}) is missing")
    return extra


def _missing(folder: Path, names: list[str]) -> list[str]:
    """Which of `names` are not in `folder`; NotAFile for one that is something else (a
    FIFO, a directory), which no writer of ours leaves."""
    missing = []
    for name in names:
        try:
            mode = os.stat(folder / name).st_mode
        except FileNotFoundError:
            missing.append(name)
            continue
        except OSError as exc:
            raise CheckpointError(f"{folder / name}: cannot read it ({exc.strerror or exc})"
                                  ) from None
        if not stat.S_ISREG(mode):
            raise NotAFile(str(NotRegularFile(folder / name, mode)))
    return missing


def run_of(extra: Mapping[str, Any]) -> str | None:
    """The id of the run that wrote a snapshot (None for snapshots from before run ids)."""
    run = extra.get("run_id")
    return run if isinstance(run, str) else None


def latest_name(root: Path) -> str | None:
    """The snapshot `root/latest` names; None when there is no such file or it names none
    (garbage, bytes that are not text). NotAFile when it is no file at all (a FIFO, a
    device, a directory): we never write such a thing, so a person should look."""
    try:
        name = read_small_file(Path(root) / LATEST).strip()
    except FileNotFoundError:
        return None
    except NotAFile:
        raise
    except CheckpointError:
        return None
    return name if SNAPSHOT_RE.match(name) else None


def resumable(root: Path, run_id: str | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Complete snapshots to resume from, best first: the one `latest` names, then older
    ones of the same run, newest first (a warning for each one skipped), then — only when
    none of those is readable — newer ones, oldest first. The run is
    `run_id` (the directory's run file) when given, else the one `latest` names, else the
    newest complete snapshot's. Other runs' snapshots are never offered."""
    root = Path(root)
    snaps = list_snapshots(root)
    name = latest_name(root)
    if name is None and os.path.lexists(root / LATEST):
        log.warning("%s/%s names no snapshot (garbage in it): resuming from the newest "
                    "complete snapshot", root, LATEST)
    target = root / name if name else None
    if target is None or not _is_dir(target):
        if name:
            log.warning("%s/%s names %s, which is missing", root, LATEST, name)
        complete = [(p, e) for p, e in _complete(reversed(snaps), warn=False)]
        if not complete:
            return
        target = complete[0][0]
    run = run_id
    if run is None:
        try:
            run = run_of(check_complete(target))
        except CheckpointError as exc:
            log.warning("skipping incomplete snapshot %s: %s", target, exc)
    step = int(SNAPSHOT_RE.match(target.name).group(1))  # type: ignore[union-attr]
    older = [p for p in reversed(snaps) if int(SNAPSHOT_RE.match(p.name).group(1)) <= step]
    newer = [p for p in snaps if int(SNAPSHOT_RE.match(p.name).group(1)) > step]
    for path, extra in _complete(iter(older + newer), warn=True):
        if run is None and path != target and run_of(extra) is not None:
            run = run_of(extra)  # `latest` itself was unreadable: its run is the next one's
        if run_of(extra) != run:
            log.warning("skipping %s: it belongs to run %s, not %s", path, run_of(extra), run)
            continue
        if path in newer:  # the last resort, still better than starting over
            log.warning("no snapshot %s names or older is readable: resuming from %s, a "
                        "newer one", LATEST, path)
        yield path, extra


def _complete(paths: Iterator[Path], warn: bool) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in paths:
        try:
            yield path, check_complete(path)
        except CheckpointError as exc:
            if warn:
                log.warning("skipping incomplete snapshot %s: %s", path, exc)


def load_latest(
    root: Path, device: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Trainer], dict] | None:
    """The snapshot to resume from (see `resumable`), read; None if there is none. Unreadable
    ones are skipped with a warning."""
    for path, _ in resumable(root):
        try:
            trainers, extra = load_snapshot(path, device)
        except CheckpointError as exc:
            log.warning("skipping unreadable snapshot %s: %s", path, exc)
            continue
        return path, trainers, extra
    return None


def load_buffers(path: Path, extra: Mapping[str, Any]) -> dict[str, Batch]:
    """The shuffle-buffer contents a snapshot holds, per hook."""
    out = {}
    for hook, rel in (extra.get("buffers") or {}).items():
        try:
            t = load_file(str(Path(path) / str(rel)))
            rows, sources = t["rows"], t["sources"]
        except Exception as exc:  # corrupt files surface as many exception types
            raise CheckpointError(f"{path}/{rel}: {one_line(exc)}") from exc
        # what `ShuffleBuffer.restore` takes: [n, d] rows of a wire dtype, n integer tags
        if rows.ndim != 2 or rows.dtype not in DTYPES.values() or sources.shape != \
                rows.shape[:1] or sources.dtype not in (torch.int32, torch.int64):
            raise CheckpointError(
                f"{path}/{rel}: rows {str(rows.dtype).removeprefix('torch.')} "
                f"{tuple(rows.shape)} and sources {str(sources.dtype).removeprefix('torch.')} "
                f"{tuple(sources.shape)} are no buffer's ([n, d] activations, n tags)")
        out[hook] = Batch(rows, sources)
    return out


FAILURE_REASONS = ("no_space", "read_only", "permission", "io", "other")
"""The values of `failure_reason`."""


def failure_reason(exc: BaseException) -> str:
    """Why a snapshot could not be written, as a metric label."""
    import errno

    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code == errno.ENOSPC or "no space" in text:
        return "no_space"
    if code == errno.EROFS or "read-only" in text:
        return "read_only"
    if code in (errno.EACCES, errno.EPERM) or "permission" in text:
        return "permission"
    if code == errno.EIO:
        return "io"
    return "other"


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete what interrupted writes left in `root` (`.tmp-*`, `.old-*`, `.del-*`); returns
    them. First, a snapshot that a kill caught between the two renames of its replacement
    (`save_snapshot`: the one it held moved to `.old-`, the new one not yet out of `.tmp-`)
    is put back — the complete old copy, else the complete new one — so neither copy of
    that state is deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    _restore_caught_between_renames(root)
    stale = [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIXES)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def _restore_caught_between_renames(root: Path) -> None:
    """`.old-step-N-*` exists only between the two renames of a rewrite of step N: with
    `step-N` missing, put back the complete old copy, else the complete new one (`.tmp-`),
    of this directory's run."""
    run = read_run_id(root) if (root / RUN_FILE).is_file() else None
    for old in sorted(root.glob(".old-step-*")):
        name = old.name[len(".old-"):].rsplit("-", 1)[0]
        if not SNAPSHOT_RE.match(name) or os.path.lexists(root / name):
            continue
        for candidate in [old, *sorted(root.glob(f".tmp-{name}-*"))]:
            try:
                extra = check_complete(candidate)
                if run is not None and run_of(extra) != run:
                    continue
                os.rename(candidate, root / name)
                _fsync(root)
            except (CheckpointError, OSError):
                continue
            log.warning("put %s back from %s: a snapshot write was killed between its "
                        "renames", name, candidate.name)
            break


RUN_FILE = "run.json"
"""The run a checkpoint directory belongs to, written before the run accepts any data, so a
consumer killed before its first snapshot comes back as the same run."""


def holds_a_run(root: Path) -> bool:
    """Whether `root` holds a run (its run file, snapshots or a `latest` pointer)."""
    root = Path(root)
    return (root / RUN_FILE).exists() or (root / LATEST).exists() or bool(list_snapshots(root))


def read_run_id(root: Path) -> str | None:
    """The run id of the run file; None when there is none or it is garbage (a warning
    then). NotAFile when it is no regular file (as `latest_name`)."""
    path = Path(root) / RUN_FILE
    try:
        run = read_json_file(path)
    except FileNotFoundError:
        return None
    except NotAFile:
        raise
    except CheckpointError as exc:
        log.warning("ignoring %s", exc)
        return None
    run = run.get("run_id") if isinstance(run, dict) else None
    if not (isinstance(run, str) and run):
        log.warning("ignoring %s: it holds no run id", path)
        return None
    return run


def write_run_id(root: Path, run_id: str) -> None:
    root = Path(root)
    _replace_file(root / RUN_FILE, _json_text({"run_id": run_id, "created": time.time()}),
                  root / f".tmp-{RUN_FILE}")


def remove_run(root: Path) -> None:
    """`--overwrite`: delete every snapshot, the `latest` pointer and the run file. Each
    snapshot leaves its name first (`.del-*`, removed at the next start if a kill comes
    before its deletion ends), so no half-deleted `step-*` directory outlives a kill."""
    for path in list_snapshots(root):
        _delete_snapshot(path)
    (Path(root) / LATEST).unlink(missing_ok=True)
    (Path(root) / RUN_FILE).unlink(missing_ok=True)


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
        what = "not a directory" if path.exists() else "no such directory"
        raise CheckpointError(f"{path}: {what}")
    if (path / LATEST).is_file() and not (path / "cfg.json").exists():
        target = latest_name(path)
        if target is None or not _is_dir(path / target):
            raise CheckpointError(f"{path}/{LATEST} does not name a snapshot of {path}")
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
        cfg = read_json_file(d / "cfg.json")
        sae_cfg = sae_config_of(cfg, d / "cfg.json")
        sae = SparseAutoencoder(sae_cfg, device="meta")  # shapes only; filled below
        if (d / "sae.safetensors").exists() and not (d / "sae.safetensors").is_file():
            raise CheckpointError(f"{d}: sae.safetensors is not a regular file")  # a FIFO
        shards = 1 if (d / "sae.safetensors").is_file() else _saved_shards(d)
        if shards > 1:  # per-rank shard files: read every row
            reader = RowReader(d, sae_cfg, shards)
            weights = {n: reader.rows("weights", n, 0, sae_cfg.n_latents) for n in WEIGHT_NAMES}
        else:
            weights = load_file(str(d / "sae.safetensors"))
        if set(weights) != set(WEIGHT_NAMES):
            raise CheckpointError(f"{d}: sae.safetensors holds {sorted(weights)}")
        for n, p in sae.named_parameters():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{d}: {n} has shape {tuple(weights[n].shape)}, expected {tuple(p.shape)}"
                )
        for n, w in weights.items():
            if not w.is_floating_point():
                raise CheckpointError(f"{d}: {n} holds {str(w.dtype).removeprefix('torch.')} "
                                      "values, not floating point")
            if not bool(torch.isfinite(w).all()):
                raise CheckpointError(f"{d}: {n} holds NaN or infinite values")
        for key in ("hook", "model"):
            if cfg.get(key) is not None and not isinstance(cfg[key], str):
                raise CheckpointError(f"{d}: cfg.json's {key} is not a string")
        sae = sae.to_empty(device=device)
        sae.load_state_dict({n: w.float() for n, w in weights.items()})
        if sae_cfg.input_normalization == "scalar":
            scale = cfg.get("input_scale")
            if type(scale) not in (int, float) or not math.isfinite(scale) or scale <= 0:
                raise CheckpointError(f"{d}: cfg.json's input_scale {scale!r} is not a "
                                      "positive number")
            sae.input_scale = float(scale)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or foreign files surface as many exception types
        raise CheckpointError(f"{d}: {one_line(exc)}") from exc
    return LoadedSAE(d.name, d, sae.eval().requires_grad_(False), cfg)


def prune_snapshots(root: Path, keep: int, run: str | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete snapshots of `run` (never the one `latest`
    names); other runs' and incomplete snapshots are left alone. Returns what was deleted."""
    root = Path(root)
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    pinned = latest_name(root)
    ours = [p for p, e in _complete(iter(list_snapshots(root)), warn=False) if run_of(e) == run]
    doomed = [p for p in ours[:-keep] if p.name != pinned]
    deleted = []
    for path in doomed:
        try:
            _delete_snapshot(path, ignore_errors=True)
        except OSError:  # it could not even be renamed: still there
            continue
        deleted.append(path)
    return deleted


def _delete_snapshot(path: Path, *, ignore_errors: bool = False) -> None:
    """Out of the snapshots' names first (`.del-*`, which the next start removes), then
    deleted: a kill midway never leaves a half-deleted `step-*`. OSError if the rename
    fails; errors of the deletion itself only unless `ignore_errors`."""
    gone = path.parent / f".del-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=ignore_errors)


MAX_SHARD_FILES = 1 << 16


def _saved_shards(directory: Path) -> int:
    """How many per-rank shard files an SAE folder's trainer.json names (1: none, or no
    readable trainer.json: the file checks report that). CheckpointError for a count that
    is no count."""
    try:
        value = read_json_file(directory / "trainer.json").get("shards", 1)
    except (OSError, CheckpointError, AttributeError):
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or \
            not 1 <= value <= MAX_SHARD_FILES:
        raise CheckpointError(f"{directory}/trainer.json: shards {value!r} is not a count of "
                              f"shard files (1 to {MAX_SHARD_FILES})")
    return value


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"SAE name {name!r} cannot be a directory name")


def record_stop_reason(path: Path, stop_reason: str) -> None:
    """Add `stop_reason` to a written snapshot's extra.json (atomically: a reader sees the
    old file or the new one), for a run that stops in a state that snapshot already holds."""
    extra = read_json_file(path / "extra.json", EXTRA_JSON_VALUES)
    extra["stop_reason"] = stop_reason
    # the temporary beside the snapshots, where a resuming consumer removes what a crash left
    _replace_file(path / "extra.json", _json_text(extra),
                  path.parent / f".tmp-extra-{uuid.uuid4().hex[:8]}.json")


def _replace_file(dest: Path, text: str, tmp: Path) -> None:
    """Write `text` to `tmp`, fsync it and rename it over `dest`, then fsync the folders:
    a reader sees the old file or the new one, never part of one. A failed temporary is
    removed."""
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, dest)
        for folder in {dest.parent, tmp.parent}:
            _fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(_json_text(obj))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
