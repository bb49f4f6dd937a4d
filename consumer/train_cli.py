"""`saestream train`: train one TopK SAE from activations stored on disk, then checkpoint it.

Flags map one-to-one onto `SAEConfig` and `TrainerConfig`; the data is memory-mapped and
drawn in shuffled batches, every token once per pass.
"""

from __future__ import annotations

import math
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from saestream.common import bounded_json
from saestream.common.devices import DEVICE_HELP, resolve_device
from saestream.common.errors import UserError, cli_errors, error_line
from saestream.common.files import check_writable_dir
from saestream.common.recording import Recording
from saestream.common.settings import FiniteFloat, GivenPath, config_option, given
from saestream.consumer.config import ConsumerConfig
from saestream.consumer.distributed import peer_errors
from saestream.consumer.sae import INPUT_NORMALIZATIONS, SAEConfig
from saestream.consumer.shard_files import LAYOUTS
from saestream.consumer.trainer import TrainerConfig

if TYPE_CHECKING:
    from saestream.consumer.distributed import Mesh
    from saestream.consumer.trainer import Trainer

# safetensors dtype names -> (numpy dtype to map the bytes with, is bfloat16)
_ST_DTYPES = {
    "F64": (np.float64, False),
    "F32": (np.float32, False),
    "F16": (np.float16, False),
    "BF16": (np.uint16, True),
}
_SCAN_ROWS = 1 << 16
NPY_FLOAT_SIZES = (2, 4, 8)
"""Item sizes of the .npy float dtypes training reads (either byte order)."""
SAVE_ATTEMPTS = 3
"""Tries of the final snapshot, a second apart, before it goes to the rescue directory."""
MAX_SKIP_LINES = 10
"""Skipped steps named one by one; later ones only in the progress lines' count."""
S, T = SAEConfig, TrainerConfig
"""Every SAE and trainer option's default and help come from these dataclass fields."""
_POSITIVE = click.IntRange(min=1)
MAX_LENGTH = 1 << 62
"""The most --tokens or --steps a run may ask for (more than any run sees)."""


class Activations:
    """A [tokens, d_in] float matrix on disk (.npy or .safetensors), memory-mapped."""

    def __init__(self, array: np.ndarray, bf16: bool, label: str) -> None:
        self.array = array
        self.bf16 = bf16
        self.label = label

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape  # type: ignore[return-value]

    def rows(self, index: np.ndarray):  # -> torch.Tensor [len(index), d_in], float32
        import torch

        block = np.ascontiguousarray(self.array[index])
        if not block.dtype.isnative:  # a big-endian .npy: torch reads native bytes only
            block = block.astype(block.dtype.newbyteorder("="))
        t = torch.from_numpy(block)
        if self.bf16:
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.float()

    def check_finite(self) -> None:
        """UserError naming the first row holding NaN or ±inf (one pass over the file)."""
        for start in range(0, self.shape[0], _SCAN_ROWS):
            block = self.rows(np.arange(start, min(start + _SCAN_ROWS, self.shape[0])))
            bad = (~block.isfinite()).any(dim=1).nonzero()
            if bad.numel():
                row = start + int(bad[0])
                wide = self.array.dtype == np.float64
                raise UserError(f"{self.label}: NaN or infinite value in row {row}"
                                + (" (or one beyond float32's range)" if wide else ""))


def open_activations(path: Path, tensor: str | None) -> Activations | Recording:
    """Memory-map `path` (.npy, one tensor of a .safetensors file, or a recorded hook
    directory: its shards as one dataset). Raises UserError."""
    if path.is_dir():
        if tensor is not None:
            raise UserError(f"--tensor: {path} is a recording, its tensor is fixed")
        return Recording(path)
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise UserError(f"--input {path}: {what}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if tensor is not None:
            raise UserError(f"--tensor: {path} is a .npy file, which holds one array")
        try:
            with np.errstate(over="ignore"):  # a hostile shape's size overflows: one line
                array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"--input {path}: not a readable .npy file ({exc})") from None
        if array.dtype.kind != "f" or array.dtype.itemsize not in NPY_FLOAT_SIZES:
            # float128 (long double) and complex have no torch dtype to train in
            raise UserError(f"--input {path}: dtype {array.dtype}, expected float16, float32 "
                            "or float64")
        act = Activations(array, False, str(path))
    elif suffix == ".safetensors":
        act = _open_safetensors(path, tensor)
    else:
        raise UserError(f"--input {path}: expected a .npy or .safetensors file")
    if act.array.ndim != 2:
        raise UserError(f"--input {path}: shape {tuple(act.array.shape)}, expected [tokens, d_in]")
    if act.shape[0] < 1 or act.shape[1] < 1:
        raise UserError(f"--input {path}: empty array of shape {act.shape}")
    return act


def _open_safetensors(path: Path, tensor: str | None) -> Activations:
    # The format: u64 little-endian header length, JSON header, then the raw tensors.
    # Mapping it with numpy directly gives random row access without reading the file.
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(100_000_000, size - 8):
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            header = bounded_json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        for key, info in header.items():
            _check_tensor_entry(key, info, size - 8 - n)
    except RecursionError:
        raise UserError(f"--input {path}: not a readable .safetensors file (its header is "
                        "nested too deeply)") from None
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"--input {path}: not a readable .safetensors file ({exc})") from None
    if tensor is None:
        if len(header) != 1:
            raise UserError(
                f"--input {path}: holds {len(header)} tensors ({', '.join(sorted(header))}); "
                "choose one with --tensor"
            )
        tensor = next(iter(header))
    if tensor not in header:
        raise UserError(f"--input {path}: no tensor {tensor!r} (has {', '.join(sorted(header))})")
    info = header[tensor]
    dtype_name = info.get("dtype")
    if dtype_name not in _ST_DTYPES:
        raise UserError(f"--input {path}: tensor {tensor!r} has dtype {dtype_name}, expected float")
    np_dtype, bf16 = _ST_DTYPES[dtype_name]
    shape = tuple(info.get("shape", ()))
    begin, end = info.get("data_offsets", (0, -1))
    if end - begin != math.prod(shape) * np.dtype(np_dtype).itemsize:
        raise UserError(f"--input {path}: tensor {tensor!r} has inconsistent size")
    try:
        array = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + n + begin, shape=shape)
    except (ValueError, OSError) as exc:
        raise UserError(f"--input {path}: cannot map tensor {tensor!r} ({exc})") from None
    return Activations(array, bf16, f"{path}:{tensor}")


def _check_tensor_entry(key: str, info: object, data_bytes: int) -> None:
    """ValueError unless a header entry is {dtype: str, shape: [int >= 0, ...],
    data_offsets: [begin, end]} with 0 <= begin <= end <= the data section's size."""

    def whole(v: object) -> bool:
        return type(v) is int and v >= 0

    ok = (
        isinstance(info, dict) and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list) and all(whole(d) for d in info["shape"])
        and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        and all(whole(o) for o in info["data_offsets"])
        and info["data_offsets"][0] <= info["data_offsets"][1] <= data_bytes
    )
    if not ok:
        raise ValueError(f"malformed header entry for tensor {key!r}")


def check_memory(sae_cfg: SAEConfig, cfg: TrainerConfig, batch_size: int, device: object,
                 shards: int = 1) -> None:
    """UserError when training this SAE (one rank's 1/`shards` of its latents) cannot fit
    the device's memory (host RAM on CPU)."""
    from saestream.consumer.config import SAESpec, machine_memory_bytes, sae_train_bytes

    assert sae_cfg.d_in is not None
    need = sae_train_bytes(SAESpec("sae", "hook", sae_cfg, cfg), sae_cfg.d_in, batch_size,
                           shards)
    have = machine_memory_bytes(str(device))
    if need > have:
        raise UserError(
            f"--latents {sae_cfg.n_latents}: training needs at least {need / 2**30:,.1f} GiB "
            f"at d_in {sae_cfg.d_in} and batch {batch_size}; {device} has "
            f"{have / 2**30:,.1f} GiB"
        )


class ShuffledBatches:
    """Batches of row indices: a fresh random permutation per pass, every row once per pass;
    a batch that crosses the end of a pass continues into the next one."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.perm = self.rng.permutation(n)
        self.pos = 0

    def next(self, size: int | None = None) -> np.ndarray:
        """The next `size` rows (default: a whole batch)."""
        parts = []
        need = self.batch_size if size is None else size
        while need:
            if self.pos == self.n:
                self.perm = self.rng.permutation(self.n)
                self.pos = 0
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        # Sorted: memory-mapped reads in file order. Order within a batch does not matter.
        return np.sort(np.concatenate(parts))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--input",
    "input_path",
    required=True,
    type=GivenPath(path_type=Path),
    help="Activations [tokens, d_in]: a .npy file (memory-mapped), a .safetensors file, or a "
    "recorded hook directory DIR/<hook> (`--record`, `saestream record`).",
)
@click.option(
    "--tensor",
    default=None,
    help="Tensor to read from a .safetensors file (default: its only tensor).",
)
@click.option(
    "--hook",
    default=None,
    callback=given,
    help="Label of the hook the activations come from (recorded in cfg.json); required "
    "unless --input is a recording, which names its own.",
)
@click.option(
    "--name", default=None, callback=given,
    help="SAE name: the checkpoint's sub-directory (default: the hook).",
)
@click.option(
    "--model", default=None, callback=given,
    help="Model the activations come from (recorded; default: unknown).",
)
@config_option(S, "n_latents", "--latents", type=_POSITIVE)
@config_option(S, "k", type=_POSITIVE)
@config_option(T, "k_aux", type=click.IntRange(min=0))
@config_option(T, "auxk_coef", type=FiniteFloat(0.0))
@config_option(T, "dead_tokens", type=_POSITIVE)
@config_option(S, "multi_topk")
@config_option(ConsumerConfig, "batch_size", type=int)
@click.option(
    "--tokens",
    default=None,
    type=click.IntRange(1, MAX_LENGTH),
    help="Train on this many tokens (default: one pass over the file).",
)
@click.option(
    "--steps", default=None, type=click.IntRange(1, MAX_LENGTH),
    help="Train this many steps (instead of --tokens).",
)
@config_option(T, "lr", type=FiniteFloat(0.0, min_open=True))
@config_option(T, "grad_clip", type=FiniteFloat(0.0, min_open=True))
@config_option(T, "ema_decay", type=FiniteFloat(0.0, min_open=True, max=1.0))
@config_option(S, "input_normalization", type=click.Choice(list(INPUT_NORMALIZATIONS)))
@click.option("--dense", is_flag=True, help="Use the dense reference path (slow; for checks).")
@config_option(T, "autocast_bf16", "--bf16")
@config_option(T, "seed", help="Seed of the initialisation and of the batch order.")
@config_option(ConsumerConfig, "init_from", metavar="SNAPSHOT", type=GivenPath(path_type=Path))
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--latent-shards", default=1, show_default=True, type=_POSITIVE,
              help="Under torchrun: split the latents over this many ranks (it must divide "
                   "the world size; the rest is data parallel).")
@config_option(ConsumerConfig, "dist_timeout", type=FiniteFloat(0.0, min_open=True))
@config_option(ConsumerConfig, "snapshot_shards", type=click.Choice(LAYOUTS))
@click.option(
    "--out",
    required=True,
    type=GivenPath(path_type=Path),
    help="Checkpoint directory (DIR/step-XXXXXXXX/<name>/, DIR/latest).",
)
@click.option(
    "--log-interval",
    default=5.0,
    show_default=True,
    type=FiniteFloat(0.0),
    help="Seconds between progress lines.",
)
@cli_errors
@peer_errors
def train(
    input_path: Path,
    tensor: str | None,
    hook: str | None,
    name: str | None,
    model: str | None,
    n_latents: int,
    k: int,
    k_aux: int,
    auxk_coef: float,
    dead_tokens: int,
    multi_topk: bool,
    batch_size: int,
    tokens: int | None,
    steps: int | None,
    lr: float | None,
    grad_clip: float | None,
    ema_decay: float | None,
    input_normalization: str,
    dense: bool,
    autocast_bf16: bool,
    seed: int,
    device: str,
    out: Path,
    log_interval: float,
    snapshot_shards: str,
    init_from: Path | None,
    latent_shards: int,
    dist_timeout: float,
) -> None:
    """Train a TopK SAE on activations stored on disk, then write a checkpoint to --out."""
    import torch

    from saestream.common.native import enabled as native_enabled
    from saestream.common.signals import SignalFlags
    from saestream.consumer.checkpoint import RUN_FILE
    from saestream.consumer.distributed import Agreement, mesh_from_env, rank_slice
    from saestream.consumer.heap import keep_freed_memory, release_freed_memory
    from saestream.consumer.trainer import Trainer

    native_enabled()  # a bad $SAESTREAM_NATIVE now, not at the first step after the scan
    if tokens is not None and steps is not None:
        raise UserError("give --tokens or --steps, not both")
    for flag, value in (("--batch-size", batch_size), ("--tokens", tokens), ("--steps", steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    act = open_activations(input_path, tensor)
    if isinstance(act, Recording):
        hook, model = hook or act.hook, model or act.model
    if hook is None:
        raise UserError("--hook is required (unless --input is a recorded hook directory)")
    n_rows, d_in = act.shape
    sae_cfg = SAEConfig(
        d_in=d_in,
        n_latents=n_latents,
        k=k,
        multi_topk=multi_topk,
        input_normalization=input_normalization,
    )
    source = None
    if init_from is not None:
        sae_cfg, source = _init_source(init_from, sae_cfg, name or hook)
    cfg = TrainerConfig(
        lr=lr,
        k_aux=k_aux,
        auxk_coef=auxk_coef,
        dead_tokens=dead_tokens,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        sparse=not dense,
        autocast_bf16=autocast_bf16,
        seed=seed,
    )
    try:
        sae_cfg.validate()
        cfg.validate()
    except ValueError as exc:
        raise UserError(str(exc).replace("n_latents", "--latents")) from None
    name = name or hook
    if not name or name.startswith(".") or "/" in name or "\\" in name \
            or not name.isprintable() or len(name.encode("utf-8", "surrogateescape")) > 255:
        raise UserError(f"--name {name!r:.300}: cannot be a directory name (no leading dot, "
                        "slash, control character, or more than 255 bytes)")
    dev = resolve_device(device)
    act.check_finite()
    if batch_size > n_rows:
        click.echo(
            f"note: --batch-size {batch_size} > {n_rows} tokens in the file; using {n_rows}",
            err=True,
        )
        batch_size = n_rows
    total_tokens = None if steps is not None else (tokens or n_rows)
    total_steps = steps if steps is not None else -(-total_tokens // batch_size)
    check_memory(sae_cfg, cfg, batch_size, dev, latent_shards)
    check_writable_dir(out, "--out")
    if (out / RUN_FILE).exists():  # `latest` would then name a snapshot of another run
        raise UserError(f"--out {out}: holds a consumer's run ({RUN_FILE}); choose another "
                        "directory")

    if latent_shards > 1 and dense:
        raise UserError("--latent-shards needs the sparse path (drop --dense)")
    if sae_cfg.n_latents % latent_shards:
        raise UserError(f"--latent-shards {latent_shards} must divide --latents "
                        f"{sae_cfg.n_latents}")
    mesh, dev = mesh_from_env(dev, latent_shards, dist_timeout)
    # On the CPU the step's large tensors are reused, not mapped and zeroed anew each step.
    kept = dev.type == "cpu" and keep_freed_memory()
    dp, shard = mesh.dp, mesh.shard(sae_cfg.n_latents)
    torch.manual_seed(seed)
    trainer = Trainer(sae_cfg, cfg, name=name, hook=hook, model=model, device=dev, dp=dp,
                      shard=shard)
    if source is not None:
        from saestream.consumer.init_from import start

        start(trainer, source)
        release_freed_memory()  # the loaded weights' copies are gone
    batches = ShuffledBatches(n_rows, batch_size, seed)
    first = dp.rank == 0 and (shard is None or shard.rank == 0)
    echo = click.echo if first else (lambda *a, **k: None)
    ranks = f" × {dp.size} data-parallel ranks" if dp.size > 1 else ""
    ranks += f" × {shard.size} latent shards" if shard is not None else ""
    echo(
        f"training {name}: d_in={d_in} latents={sae_cfg.n_latents} k={sae_cfg.k} on {n_rows} "
        f"tokens from {act.label}, {total_steps} steps of {batch_size} on {dev}{ranks}"
        + (" (freed memory kept for reuse)" if kept else "")
    )
    # From here a stop signal ends the loop at a step boundary and the checkpoint is written
    # (before, it ends the process: nothing is trained yet). The ranks agree on it.
    flags, agreement = SignalFlags().install(), Agreement(mesh.world)
    stopped = False
    start = last = time.perf_counter()
    window: list = []
    for step in range(1, total_steps + 1):
        if agreement.max([int(flags.stop.is_set())])[0]:
            stopped = True
            echo(f"stopping after step {trainer.step} of {total_steps} (signal): writing the "
                 "checkpoint", err=True)
            break
        size = batch_size  # the last one cut: --tokens (one pass: the rows) exactly, but
        if total_tokens is not None:  # a row for every data-parallel rank at least
            size = min(batch_size, max(total_tokens - (step - 1) * batch_size, dp.size))
        index = batches.next(size)  # the same global batch on every rank; each takes its part
        m = trainer.train_step(act.rows(index[rank_slice(len(index), dp.rank, dp.size)]))
        if m.skipped and trainer.skipped_steps <= MAX_SKIP_LINES:
            echo(f"step {step}: skipped, its loss not finite (values whose squares pass "
                 f"float32's range); the weights are unchanged", err=True)
        if not m.skipped:
            window.append(m)
        now = time.perf_counter()
        if now - last >= log_interval or step == total_steps:
            echo(_progress(step, total_steps, trainer.tokens_seen, now - start, window,
                           trainer.skipped_steps))
            window, last = [], now
    extra = {
        "source": "saestream train",
        "input": str(input_path),
        "tensor": tensor,
        "hook": hook,
        "model": model,
        "tokens": trainer.tokens_seen,
        "skipped_steps": trainer.skipped_steps,
        "seed": seed,
        "init_from": None if init_from is None else str(init_from),
    }
    if stopped:
        extra["stop_reason"] = "signal"
    if stopped and trainer.step == 0:  # stopped before its first step: nothing to write
        dp.finish()
        echo("stopped before the first step: no checkpoint written", err=True)
        return
    failure = None
    if shard is not None and _layout(snapshot_shards, trainer, mesh) == "per-rank":
        path = _save_per_rank(out, trainer, extra, mesh)
    else:
        whole = trainer.unsharded() if dp.rank == 0 else None  # collective over the shards
        # every data-parallel rank holds the same SAE: rank 0 writes it
        path, failure = _save_final(out, trainer.step, name, whole, extra) \
            if whole is not None else (None, None)
    dp.finish()
    if failure is not None:
        click.echo(error_line(failure), err=True)
        sys.exit(1)
    if path is not None:
        click.echo(f"checkpoint: {path / name}")
        sys.stdout.flush()


def _save_final(out: Path, step: int, name: str, trainer: Trainer, extra: dict
                ) -> tuple[Path | None, str | None]:
    """Write the run's one snapshot to --out: (its path, None), or, when that fails
    SAVE_ATTEMPTS times (a full or broken disk), (None, the one-line error). Hours of
    training are not dropped for want of disk space: the snapshot then goes to a fresh
    `saestream-rescue-*` directory in the system's temporary directory (TMPDIR), and the
    error says where. A failed attempt leaves nothing in --out (`save_snapshot`)."""
    import shutil
    import tempfile

    from saestream.consumer.checkpoint import CheckpointError, check_complete, save_snapshot

    final = out / f"step-{step:08d}"
    existed = final.exists()  # a snapshot of this step from an earlier run, to be replaced
    error: Exception | None = None
    for attempt in range(SAVE_ATTEMPTS):
        if attempt:
            time.sleep(1.0)
        try:
            path = save_snapshot(out, step, {name: trainer}, extra=extra)
            if existed:
                click.echo(f"note: replaced {final}, an earlier run's snapshot of the same step",
                           err=True)
            return path, None
        except Exception as exc:  # OSError, or safetensors' own error for the same causes
            error = exc
    assert error is not None
    why = _reason(error)
    if not existed:
        try:  # renamed into place, complete, but `latest` could not be replaced
            check_complete(final)
            return None, (f"wrote the snapshot {final}, but could not point {out}/latest at "
                          f"it ({why})")
        except CheckpointError:
            pass
    rescue = None
    try:
        rescue = Path(tempfile.mkdtemp(prefix="saestream-rescue-"))
        path = save_snapshot(rescue, step, {name: trainer}, extra=extra)
    except Exception as exc:
        if rescue is not None:
            shutil.rmtree(rescue, ignore_errors=True)
        return None, (f"could not write the snapshot to {out} ({why}; {SAVE_ATTEMPTS} tries), "
                      f"nor to a rescue directory ({_reason(exc)}): the training is lost")
    return None, (f"could not write the snapshot to {out} ({why}; {SAVE_ATTEMPTS} tries): "
                  f"wrote it to {path} instead; move it into {out} once there is room")


def _reason(exc: BaseException) -> str:
    """Why a write failed, in a few words: an OSError's strerror, else the first line."""
    from saestream.consumer.checkpoint import one_line

    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = one_line(exc)
    return "No space left on device" if "StorageFull" in text else text


def _layout(asked: str, trainer: Trainer, mesh: Mesh) -> str:
    """--snapshot-shards as rank 0 decides it (`auto`: per-rank files when gathering the SAE
    would not fit half of rank 0's free memory), on every rank."""
    from saestream.consumer.distributed import Agreement
    from saestream.consumer.shard_files import choose_layout

    layout = None
    if mesh.world.rank == 0:
        layout, why = choose_layout(asked, [trainer], trainer.device)
        if why is not None:
            click.echo(f"note: {why}: writing per-rank shard files (saestream reads them; "
                       "sparsify cannot)", err=True)
    return str(Agreement(mesh.world).broadcast(layout))


def _save_per_rank(out: Path, trainer: Trainer, extra: dict, mesh: Mesh) -> Path | None:
    """Every rank of shard group 0 writes its rows into rank 0's temporary snapshot, which
    rank 0 then completes (consumer/shard_files.py). Returns the path on rank 0."""
    from saestream.consumer.checkpoint import save_snapshot
    from saestream.consumer.distributed import Agreement
    from saestream.consumer.shard_files import stage_per_rank

    staged, error, why = stage_per_rank(Agreement(mesh.world), mesh, out, trainer.step,
                                        {trainer.name: trainer})
    if why is not None:
        raise UserError(f"rank {mesh.world.rank}: writing the per-rank snapshot in {out} "
                        f"failed: {error}" if error is not None
                        else "another rank could not write its part of the snapshot")
    if staged is None:
        return None
    try:
        return save_snapshot(out, trainer.step, {trainer.name: trainer}, extra=extra,
                             staged=staged)
    except Exception as exc:  # it removed the staged directory
        raise UserError(f"writing the snapshot in {out} failed: {exc}") from None


def _init_source(path: Path, sae_cfg: SAEConfig, name: str) -> tuple[SAEConfig, object]:
    """--init-from: the snapshot SAE's latents, k, Multi-TopK and input normalisation where
    their flags were left at the default, and its weights (consumer/init_from.py)."""
    from click.core import ParameterSource

    from saestream.consumer import init_from as init

    ctx = click.get_current_context()
    given = [f for f in init.ADOPTED
             if ctx.get_parameter_source(f) not in (ParameterSource.DEFAULT, None)]
    sae_cfg = init.adopt(sae_cfg, init.source_dirs(path, [name])[name], given, "--input")
    return sae_cfg, init.load_sources(path, [name])[name]


def _progress(
    step: int, total: int, tokens: int, seconds: float, window: list, skipped: int = 0
) -> str:
    line = f"step {step}/{total}  tokens {tokens}  {tokens / max(seconds, 1e-9):,.0f} tok/s"
    if window:
        sse = sum(m.sse for m in window)
        sst = sum(m.sst for m in window)
        last = window[-1]
        nmse = sse / sst if sst > 0 else float("nan")
        line += (f"  nmse {nmse:.4f}  dead {100 * last.dead_fraction:.1f}%  "
                 f"L0 {last.l0:.1f}  auxk {last.auxk_loss:.4f}")
    return line + (f"  skipped {skipped}" if skipped else "")
