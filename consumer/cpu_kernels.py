"""CPU kernels in plain C (`cpu_kernels.c`), compiled on first use and loaded with ctypes.

Why: on CPU the sparse SAE step's largest cost after the encoder matmul was the top-k over
the [batch, n_latents] pre-activations, which torch's ops can only do in several passes over
memory (each reading 16 MB at the small benchmark shape); the C kernel ranks each row in
one pass while it sits in cache (BENCHMARKS.md, "SAE training step"). ctypes releases the
GIL for the call, so the consumer's receive and decode threads run meanwhile.

The shared object is built with the system C compiler ($CC, else `cc`; about a second) into
a cache folder ($SAESTREAM_CACHE/kernels, else ~/.cache/saestream/kernels; else a per-user
folder under the temporary directory), keyed by the
source, the flags and this CPU, and moved into place atomically, so concurrent processes
share one build. A folder is used only if it belongs to this user and no one else may write
to it: a shared object is code, and loading one another user could have placed there would
run theirs. With no compiler, a failed build, or SAESTREAM_NATIVE=0, `load()` returns None
(with one warning for a failure) and callers use their pure-torch path: the same results,
slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from saestream.common.files import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAG_SETS = (
    ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"],
    ["-O3", "-fPIC", "-shared", "-fopenmp"],  # compilers or CPUs without -march=native
    ["-O3", "-fPIC", "-shared"],  # no OpenMP: one thread
)
# Rows per thread below which fewer threads rank them (a parallel region costs a few µs).
ROWS_PER_THREAD = 16
_COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False when SAESTREAM_NATIVE is 0/false/no/off (the pure-torch paths then run)."""
    value = os.environ.get("SAESTREAM_NATIVE", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; None where they cannot be had."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build_and_load()
        return _state["lib"]


def _cache_dirs() -> list[Path]:
    """Where a build may live, in order of preference."""
    user_tmp = Path(tempfile.gettempdir()) / f"saestream-kernels-{os.getuid()}"
    return [cache_root() / "kernels", user_tmp]


def _private(folder: Path) -> None:
    """Create `folder` (0700) if need be; OSError unless it is ours and only we may write it,
    in a parent where no one else may rename it (not writable by others, or sticky: /tmp)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    up = folder.parent.stat()
    if up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX:
        raise OSError(f"{folder.parent} is writable by others")
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{folder} is not private to this user (owner, or group/other write)")


def _cpu_tag() -> str:
    """What -march=native depends on: a build for one CPU may not run on another."""
    tag = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                tag += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return tag


def _build_and_load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        log.warning("no C compiler (%s) found: CPU kernels fall back to torch ops", cc)
        return None
    source = SOURCE.read_bytes()
    errors: list[str] = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_tag()]).encode()).hexdigest()
        for folder in _cache_dirs():
            target = folder / f"cpu_kernels-{key[:20]}.so"
            try:
                _private(folder)
                if not target.exists():
                    _compile(cc, flags, folder, target)
                return _bind(ctypes.CDLL(str(target)))
            except (OSError, subprocess.SubprocessError) as exc:
                lines = str(exc).strip().splitlines() or [repr(exc)]
                errors.append(f"{target}: {lines[-1]}")
    log.warning("CPU kernels not built, falling back to torch ops: %s", "; ".join(errors))
    return None


def _compile(cc: str, flags: list[str], folder: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise subprocess.SubprocessError(proc.stderr or f"{cc} exited {proc.returncode}")
        os.replace(tmp, target)  # atomic: a concurrent builder's copy is as good as ours
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.topk_rows_f32.argtypes = [p, p, i64, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.topk_rows_f32.restype = i64
    return lib


def topk_rows(
    pre: torch.Tensor, k: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(pre + bias).topk(k, dim=1, sorted=True)` of a float32 CPU matrix [batch, n] and an
    optional float32 bias [n] (ties by column ascending; rows with a NaN ranked by torch),
    without materialising the sum; None where the kernel does not apply or is not built."""
    if pre.dim() != 2 or pre.device.type != "cpu" or pre.dtype != torch.float32:
        return None
    batch, n = pre.shape
    if not 1 <= k <= n or n >= 2**32 or pre.requires_grad:
        return None
    if bias is not None and (
        bias.shape != (n,) or bias.device.type != "cpu" or bias.dtype != torch.float32
    ):
        return None
    lib = load()
    if lib is None:
        return None
    pre = pre.contiguous()
    b = None if bias is None else bias.detach().contiguous()
    m = min(n, -(-2 * k // 8) * 8)  # column sets for the threshold: 2k, whole vectors
    values = torch.empty(batch, k, dtype=torch.float32)
    indices = torch.empty(batch, k, dtype=torch.int64)
    bad = torch.empty(batch, dtype=torch.uint8)
    threads = max(1, min(torch.get_num_threads(), batch // ROWS_PER_THREAD))
    flagged = lib.topk_rows_f32(
        pre.data_ptr(), None if b is None else b.data_ptr(), batch, n, k, m,
        values.data_ptr(), indices.data_ptr(), bad.data_ptr(), threads,
    )  # fmt: skip
    if flagged:  # NaN rows: torch ranks NaN first
        rows = bad.nonzero()[:, 0]
        sub = pre.index_select(0, rows)
        if b is not None:
            sub += b
        values[rows], indices[rows] = sub.topk(k, dim=1, sorted=True)
    return values, indices
