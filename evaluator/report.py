"""What `saestream eval` shows and writes: one table for a person, one JSON document per SAE
for programs (non-finite numbers become `null`, so any JSON reader takes the file)."""

from __future__ import annotations

import json
import math
import os
import stat
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saestream.common.files import NotRegularFile

DOWNSTREAM_ROWS = ("ce_clean", "ce_spliced", "delta_ce", "ce_zero", "ce_mean",
                   "loss_recovered", "kl")
RECONSTRUCTION_ROWS = ("normalized_mse", "explained_variance", "l0", "dead_fraction")
COSTLY_ROWS = {  # group -> (row label, path to the value in the group's dict)
    "ablation": (("ablation_sparsity", ("mean",)),
                 ("ablation_sparsity_baseline", ("baseline", "mean")),
                 ("ablation_latents", ("latents",))),
    "explanations": (("explanation_precision", ("precision_mean",)),
                     ("explanation_recall", ("recall_mean",)),
                     ("explanation_f1_ge_0.5", ("f1_ge_0_5_fraction",)),
                     ("explained_latents", ("latents",))),
    "probes": (("probe_loss", ("sae_loss_mean",)),
               ("probe_loss_baseline", ("baseline_loss_mean",))),
}


def finite(obj: Any) -> Any:
    """`obj` with every NaN/±inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(doc: Mapping[str, Any], indent: int | None = 2) -> str:
    return json.dumps(finite(doc), indent=indent, sort_keys=False)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write `doc` to `path` atomically: a temporary file beside it, written and fsynced, then
    renamed over `path` (and the directory synced), so `path` holds the old document or the
    new one, whole, never part of one. Raises OSError (a full or read-only disk) after
    removing the temporary file."""
    path = Path(path)
    data = (to_json(doc) + "\n").encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # a device or FIFO put there since the start-up check is not replaced
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise NotRegularFile(path, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash; a filesystem may refuse to sync a directory
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _dig(obj: Any, path: Sequence[str]) -> Any:
    """obj[path[0]][path[1]]..., None where anything is missing."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def table(docs: Sequence[Mapping[str, Any]]) -> str:
    """One table: a row per metric, a column per SAE (progressive rows per k′)."""
    rows: list[tuple[str, list[Any]]] = [
        ("hook", [d.get("hook") for d in docs]),
        ("k / latents", [f"{d.get('k')} / {d.get('n_latents')}" for d in docs]),
    ]
    for group, names in (("downstream", DOWNSTREAM_ROWS),
                         ("reconstruction", RECONSTRUCTION_ROWS)):
        if any(group in d for d in docs):
            rows += [(n, [d.get(group, {}).get(n) for d in docs]) for n in names]
    if any("progressive" in d for d in docs):
        ks = sorted({e["k"] for d in docs for e in d.get("progressive", [])})
        for field in ("normalized_mse", "delta_ce"):
            for k in ks:
                vals = []
                for d in docs:
                    entry = [e for e in d.get("progressive", []) if e["k"] == k]
                    vals.append(entry[0][field] if entry else None)
                rows.append((f"k'={k} {field}", vals))
    for group, entries in COSTLY_ROWS.items():
        if any(group in d for d in docs):
            rows += [(label, [_dig(d.get(group), path) for d in docs]) for label, path in entries]
    if any("probes" in d for d in docs):
        tasks = list(dict.fromkeys(t for d in docs for t in d.get("probes", {}).get("tasks", {})))
        for task in tasks:
            for side in ("sae_loss", "baseline_loss"):
                rows.append((f"probe {task} {side.split('_')[0]}",
                             [_dig(d.get("probes"), ("tasks", task, side)) for d in docs]))
    header = ["metric", *(str(d["sae"]) for d in docs)]
    body = [[name, *(_cell(v) for v in vals)] for name, vals in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in [header, *body]]
    return "\n".join(line.rstrip() for line in lines)
