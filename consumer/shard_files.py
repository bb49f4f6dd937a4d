"""Per-rank shard files: a snapshot of a latent-sharded SAE too large to gather in one process.

Normally the shards of an SAE are gathered on rank 0 and written in the usual layout
(`sae.safetensors`, loadable by sparsify). Gathering needs the whole SAE, its Adam moments
and a one-process trainer in rank 0's memory (`gather_bytes`: ~32 bytes per n_latents ×
d_in); where that does not fit (`--snapshot-shards auto`), or when asked (`per-rank`), each
rank of shard group 0 writes its own rows instead:

    <snapshot>/<name>/shard-00000-of-00004.safetensors   rank r's rows [r·n/R, (r+1)·n/R):
        weights.<param>    the exported weights (EMA if on): encoder.weight, encoder.bias,
                           W_dec, and b_dec (replicated, in every file)
        params.<param>     the raw weights, when EMA is on
        exp_avg.<param>, exp_avg_sq.<param>   Adam's moments (once a step was taken)
    <snapshot>/<name>/cfg.json, trainer.json ("shards": R), trainer.pt (without the tensors
        above)

The files go into rank 0's temporary snapshot directory, so the ranks of shard group 0
need one shared filesystem (one host, or the shared checkpoint volume of a cluster).
`RowReader` reads any row range of either layout without loading the rest (safetensors'
slices, a memory-mapped trainer.pt), so a snapshot resumes on any shard count and each
rank reads only its rows; tools that need the whole SAE (eval, export, --init-from) read
every shard and must fit it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saestream.common.files import file_mode
from saestream.consumer.sae import SAEConfig

if TYPE_CHECKING:
    from saestream.consumer.distributed import Agreement, Mesh

SHARDED_PARAMS = ("encoder.weight", "encoder.bias", "W_dec")
"""Parameters split by latent; `b_dec` is replicated."""
PARAM_ORDER = ("W_dec", "b_dec", "encoder.weight", "encoder.bias")
"""`SparseAutoencoder.named_parameters()` order: the optimiser's state indices."""
MOMENTS = ("exp_avg", "exp_avg_sq")
LAYOUTS = ("auto", "gather", "per-rank")
"""--snapshot-shards: decide by memory, always gather on rank 0, always per-rank files."""
GATHER_HEADROOM = 0.5
"""`auto` gathers when the gathered copy needs at most this share of the free memory."""



def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the file then given the default mode (`file_mode`): it
    writes 0o600, and a snapshot must be readable wherever its folders are."""
    save_file(dict(tensors), str(path), metadata=metadata)
    os.chmod(path, file_mode())

def shard_file(rank: int, size: int) -> str:
    return f"shard-{rank:05d}-of-{size:05d}.safetensors"


def param_count(cfg: SAEConfig) -> int:
    assert cfg.d_in is not None
    return 2 * cfg.n_latents * cfg.d_in + cfg.n_latents + cfg.d_in


def gather_bytes(cfg: SAEConfig, ema: bool, host: bool = False) -> int:
    """Memory rank 0 needs to gather one sharded SAE for the usual layout (BENCHMARKS.md,
    "Sizing a cluster"): the gathered weights and two Adam moments and the one-process
    trainer they are loaded into (its parameters; the moments are adopted, not copied),
    32·n·d bytes, and the raw weights with EMA; on a CPU rank (`host`) also the copy the
    snapshot's writer makes, 40·n·d in all."""
    return 4 * param_count(cfg) * (4 + (2 if ema else 0) + (1 if host else 0))


def free_bytes(device: torch.device) -> int:
    """Memory free for new allocations on `device` (host: MemAvailable; CUDA: free on the
    device plus what torch's caching allocator holds unused)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gather_fits(cfgs: list[tuple[SAEConfig, bool]], device: torch.device) -> tuple[bool, int, int]:
    """(fits, needed, free): whether gathering these SAEs (config, EMA on) one after the
    other fits rank 0's device with GATHER_HEADROOM to spare."""
    need = max((gather_bytes(c, ema, device.type != "cuda") for c, ema in cfgs), default=0)
    free = free_bytes(device)
    return need <= GATHER_HEADROOM * free, need, free


def choose_layout(asked: str, trainers: Iterable[Any], device: torch.device
                  ) -> tuple[str, str | None]:
    """(`gather` or `per-rank`, why per-rank when `auto` chose it) for --snapshot-shards
    `asked` and these sharded trainers; rank 0 decides, on its device."""
    if asked != "auto":
        return asked, None
    fits, need, free = gather_fits([(t.sae_cfg, t.cfg.ema_decay is not None) for t in trainers],
                                   device)
    if fits:
        return "gather", None
    return "per-rank", (f"gathering the sharded SAEs on rank 0 would need {need / 2**30:,.1f} "
                        f"GiB of {device}, which has {free / 2**30:,.1f} GiB free")


def stage_per_rank(agreement: Agreement, mesh: Mesh, root: Path, step: int,
                   trainers: Mapping[str, Any]) -> tuple[Path | None, BaseException | None,
                                                         str | None]:
    """One try at a per-rank snapshot's files, a collective of every rank: rank 0 creates
    the temporary snapshot (`checkpoint.begin_snapshot`), the ranks of the first shard group
    write their rows into it, and the ranks agree on the outcome. Returns (the staged
    directory, on rank 0 when every rank succeeded, for `save_snapshot(staged=)` to
    complete; this rank's own error; the failure reason all ranks agreed on, the most
    specific one any had, or None). A failed try leaves nothing behind."""
    from saestream.consumer.checkpoint import FAILURE_REASONS, begin_snapshot, failure_reason

    staged: Path | None = None
    error: BaseException | None = None
    if mesh.world.rank == 0:
        try:
            staged = begin_snapshot(root, step, list(trainers))
        except OSError as exc:
            error = exc
    where = agreement.broadcast(None if staged is None else str(staged))
    if where is not None and mesh.dp.rank == 0:
        try:
            for name, trainer in trainers.items():
                write_shard(Path(str(where)) / name, trainer)
        except Exception as exc:  # safetensors' own error on a full disk is no OSError
            error = exc
    # 0: written; else the reason, coded so that the maximum is the most specific one
    code = 0 if error is None else len(FAILURE_REASONS) - FAILURE_REASONS.index(
        failure_reason(error))
    code = agreement.max([code if where is not None else max(code, 1)])[0]
    if not code:
        return staged, None, None
    if staged is not None:
        shutil.rmtree(staged, ignore_errors=True)
    return None, error, FAILURE_REASONS[len(FAILURE_REASONS) - code]


def write_shard(directory: Path, trainer: Any) -> Path:
    """This rank's rows of a sharded `Trainer` into `directory` (the SAE's folder of a
    snapshot being written), fsynced. Returns the file."""
    shard = trainer.shard
    names = [n for n, _ in trainer.sae.named_parameters()]
    tensors: dict[str, torch.Tensor] = {}
    for n, t in trainer.export_weights().items():
        tensors[f"weights.{n}"] = t
    if trainer.ema is not None:
        for n, p in trainer.sae.named_parameters():
            tensors[f"params.{n}"] = p.detach().float().cpu()
    for i, entry in trainer.optimizer.state_dict()["state"].items():
        for key in MOMENTS:
            if key in entry:
                tensors[f"{key}.{names[int(i)]}"] = entry[key].detach().cpu()
    path = Path(directory) / shard_file(shard.rank, shard.size)
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, path,
                 metadata={"rank": str(shard.rank), "shards": str(shard.size),
                           "lo": str(shard.lo), "hi": str(shard.hi)})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def strip_state(state: dict[str, Any]) -> dict[str, Any]:
    """A sharded trainer's `state_dict()` without what its shard files hold (trainer.pt)."""
    out = dict(state)
    out.pop("params", None)
    optim = dict(out["optimizer"])
    optim["state"] = {i: {k: v for k, v in e.items() if k not in MOMENTS}
                      for i, e in optim["state"].items()}
    out["optimizer"] = optim
    return out


class RowReader:
    """Rows [lo, hi) of a saved SAE's tensors, from either layout of an SAE folder:
    `sae.safetensors` + trainer.pt, or R per-rank shard files (`shards` from trainer.json;
    1 = the usual layout). ValueError for a missing or misshapen tensor."""

    def __init__(self, directory: Path, cfg: SAEConfig, shards: int,
                 state: dict[str, Any] | None = None) -> None:
        self.dir, self.cfg, self.shards, self.state = Path(directory), cfg, shards, state
        if shards < 1 or cfg.n_latents % shards:
            raise ValueError(f"{shards} shard files cannot split {cfg.n_latents} latents")
        self.per_file = cfg.n_latents // shards
        if shards > 1:
            missing = [shard_file(r, shards) for r in range(shards)
                       if not (self.dir / shard_file(r, shards)).is_file()]
            if missing:
                raise ValueError(f"missing shard file(s) {', '.join(missing)}")
            for r in range(shards):  # every header, not only this reader's rows: a resume
                self._check_header(r)  # picks a snapshot every rank can read

    def _check_header(self, r: int) -> None:
        """Shard file `r` names itself rank r of `shards` and holds the weights' shapes."""
        path = self.dir / shard_file(r, self.shards)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("rank"), meta.get("shards")) != (str(r), str(self.shards)):
                raise ValueError(f"{path.name} says it is rank {meta.get('rank')} of "
                                 f"{meta.get('shards')}")
            for param in PARAM_ORDER:
                whole = self.whole_shape(param)
                want = (self.per_file, *whole[1:]) if param in SHARDED_PARAMS else whole
                key = f"weights.{param}"
                if key not in f.keys() or tuple(f.get_slice(key).get_shape()) != want:
                    raise ValueError(f"{path.name} lacks {key} of shape {want}")

    def whole_shape(self, param: str) -> tuple[int, ...]:
        n, d = self.cfg.n_latents, self.cfg.d_in
        assert d is not None
        return {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d),
                "b_dec": (d,)}[param]

    def rows(self, prefix: str, param: str, lo: int, hi: int) -> torch.Tensor:
        """`prefix` is weights, params, exp_avg or exp_avg_sq; `b_dec` comes whole."""
        whole = self.whole_shape(param)
        if param not in SHARDED_PARAMS:
            lo, hi = 0, whole[0]
        if self.shards == 1:
            if prefix == "weights":
                return self._slice(self.dir / "sae.safetensors", param, whole, lo, hi)
            t = self._state_tensor(prefix, param)
            if t is None or tuple(t.shape) != whole:
                raise ValueError(f"trainer.pt: {prefix} of {param} is missing or misshapen")
            return t[lo:hi].clone()
        if param not in SHARDED_PARAMS:
            return self._slice(self.dir / shard_file(0, self.shards), f"{prefix}.{param}",
                               whole, lo, hi)
        m, parts = self.per_file, []
        for r in range(lo // m, (hi - 1) // m + 1):
            part = (m, *whole[1:])
            parts.append(self._slice(self.dir / shard_file(r, self.shards), f"{prefix}.{param}",
                                     part, max(lo, r * m) - r * m, min(hi, (r + 1) * m) - r * m))
        return torch.cat(parts)

    def _slice(self, path: Path, key: str, shape: tuple[int, ...], lo: int,
               hi: int) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            if key not in f.keys():
                raise ValueError(f"{path.name} lacks {key} (holds {sorted(f.keys())})")
            view = f.get_slice(key)
            if tuple(view.get_shape()) != shape:
                raise ValueError(f"{path.name}: {key} has shape {tuple(view.get_shape())}, "
                                 f"expected {shape}")
            return view[lo:hi].float()

    def _state_tensor(self, prefix: str, param: str) -> torch.Tensor | None:
        state = self.state or {}
        if prefix == "params":
            return (state.get("params") or {}).get(param)
        entry = state.get("optimizer", {}).get("state", {}).get(PARAM_ORDER.index(param))
        return None if entry is None else entry.get(prefix)
