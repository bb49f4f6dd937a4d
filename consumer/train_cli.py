"""`saestream train`: train one TopK SAE from activations stored on disk, then checkpoint it.

Flags map one-to-one onto `SAEConfig` and `TrainerConfig`; the data is memory-mapped and
drawn in shuffled batches, every token once per pass.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

import click
import numpy as np

from saestream.common.devices import DEVICE_HELP, resolve_device
from saestream.common.errors import UserError, cli_errors
from saestream.common.files import check_writable_dir
from saestream.common.settings import FiniteFloat, config_option
from saestream.consumer.config import ConsumerConfig
from saestream.consumer.sae import INPUT_NORMALIZATIONS, SAEConfig
from saestream.consumer.trainer import TrainerConfig

# safetensors dtype names -> (numpy dtype to map the bytes with, is bfloat16)
_ST_DTYPES = {
    "F64": (np.float64, False),
    "F32": (np.float32, False),
    "F16": (np.float16, False),
    "BF16": (np.uint16, True),
}
_SCAN_ROWS = 1 << 16
S, T = SAEConfig, TrainerConfig
"""Every SAE and trainer option's default and help come from these dataclass fields."""
_POSITIVE = click.IntRange(min=1)


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
                raise UserError(f"{self.label}: NaN or infinite value in row {row}")


def open_activations(path: Path, tensor: str | None) -> Activations:
    """Memory-map `path` (.npy, or one tensor of a .safetensors file). Raises UserError."""
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"--input {path}: not a readable .npy file ({exc})") from None
        if array.dtype.kind != "f":
            raise UserError(f"--input {path}: dtype {array.dtype}, expected floating point")
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
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        for key, info in header.items():
            _check_tensor_entry(key, info, size - 8 - n)
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


def check_memory(sae_cfg: SAEConfig, cfg: TrainerConfig, batch_size: int, device: object) -> None:
    """UserError when training this SAE cannot fit the device's memory (host RAM on CPU)."""
    from saestream.consumer.config import SAESpec, machine_memory_bytes, sae_train_bytes

    assert sae_cfg.d_in is not None
    need = sae_train_bytes(SAESpec("sae", "hook", sae_cfg, cfg), sae_cfg.d_in, batch_size)
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

    def next(self) -> np.ndarray:
        parts = []
        need = self.batch_size
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
    type=click.Path(path_type=Path),
    help="Activations [tokens, d_in]: a .npy file (memory-mapped) or a .safetensors file.",
)
@click.option(
    "--tensor",
    default=None,
    help="Tensor to read from a .safetensors file (default: its only tensor).",
)
@click.option(
    "--hook",
    required=True,
    help="Label of the hook the activations come from (recorded in cfg.json).",
)
@click.option(
    "--name", default=None, help="SAE name: the checkpoint's sub-directory (default: the hook)."
)
@click.option(
    "--model", default=None, help="Model the activations come from (recorded; default: unknown)."
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
    type=int,
    help="Train on this many tokens (default: one pass over the file).",
)
@click.option(
    "--steps", default=None, type=int, help="Train this many steps (instead of --tokens)."
)
@config_option(T, "lr", type=FiniteFloat(0.0, min_open=True))
@config_option(T, "grad_clip", type=FiniteFloat(0.0, min_open=True))
@config_option(T, "ema_decay", type=FiniteFloat(0.0, min_open=True, max=1.0))
@config_option(S, "input_normalization", type=click.Choice(list(INPUT_NORMALIZATIONS)))
@click.option("--dense", is_flag=True, help="Use the dense reference path (slow; for checks).")
@config_option(T, "autocast_bf16", "--bf16")
@config_option(T, "seed", help="Seed of the initialisation and of the batch order.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint directory (DIR/step-XXXXXXXX/<name>/, DIR/latest).",
)
@click.option(
    "--log-interval",
    default=5.0,
    show_default=True,
    type=float,
    help="Seconds between progress lines.",
)
@cli_errors
def train(
    input_path: Path,
    tensor: str | None,
    hook: str,
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
) -> None:
    """Train a TopK SAE on activations stored on disk, then write a checkpoint to --out."""
    import torch

    from saestream.consumer.checkpoint import save_snapshot
    from saestream.consumer.trainer import Trainer

    if tokens is not None and steps is not None:
        raise UserError("give --tokens or --steps, not both")
    for flag, value in (("--batch-size", batch_size), ("--tokens", tokens), ("--steps", steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    act = open_activations(input_path, tensor)
    n_rows, d_in = act.shape
    sae_cfg = SAEConfig(
        d_in=d_in,
        n_latents=n_latents,
        k=k,
        multi_topk=multi_topk,
        input_normalization=input_normalization,
    )
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
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise UserError(f"--name {name!r}: cannot be a directory name")
    dev = resolve_device(device)
    act.check_finite()
    if batch_size > n_rows:
        click.echo(
            f"note: --batch-size {batch_size} > {n_rows} tokens in the file; using {n_rows}",
            err=True,
        )
        batch_size = n_rows
    total_steps = steps if steps is not None else math.ceil((tokens or n_rows) / batch_size)
    check_memory(sae_cfg, cfg, batch_size, dev)
    check_writable_dir(out, "--out")

    torch.manual_seed(seed)
    trainer = Trainer(sae_cfg, cfg, name=name, hook=hook, model=model, device=dev)
    batches = ShuffledBatches(n_rows, batch_size, seed)
    click.echo(
        f"training {name}: d_in={d_in} latents={n_latents} k={k} on {n_rows} tokens from "
        f"{act.label}, {total_steps} steps of {batch_size} on {dev}"
    )
    start = last = time.perf_counter()
    window: list = []
    for step in range(1, total_steps + 1):
        m = trainer.train_step(act.rows(batches.next()))
        window.append(m)
        now = time.perf_counter()
        if now - last >= log_interval or step == total_steps:
            click.echo(_progress(step, total_steps, trainer.tokens_seen, now - start, window))
            window, last = [], now
    path = save_snapshot(
        out,
        trainer.step,
        {name: trainer},
        extra={
            "source": "saestream train",
            "input": str(input_path),
            "tensor": tensor,
            "hook": hook,
            "model": model,
            "tokens": trainer.tokens_seen,
            "seed": seed,
        },
    )
    click.echo(f"checkpoint: {path / name}")
    sys.stdout.flush()


def _progress(step: int, total: int, tokens: int, seconds: float, window: list) -> str:
    sse = sum(m.sse for m in window)
    sst = sum(m.sst for m in window)
    last = window[-1]
    nmse = sse / sst if sst > 0 else float("nan")
    return (
        f"step {step}/{total}  tokens {tokens}  {tokens / max(seconds, 1e-9):,.0f} tok/s  "
        f"nmse {nmse:.4f}  dead {100 * last.dead_fraction:.1f}%  L0 {last.l0:.1f}  "
        f"auxk {last.auxk_loss:.4f}"
    )
