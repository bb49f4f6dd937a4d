"""CPU kernels in plain C (`cpu_kernels.c`), compiled on first use and loaded with ctypes.

Why: on CPU the sparse SAE step's largest cost after the encoder matmul was the top-k over
the [batch, n_latents] pre-activations, which torch's ops can only do in several passes over
memory (each reading 16 MB at the small benchmark shape); the C kernel ranks each row in
one pass while it sits in cache (BENCHMARKS.md, "SAE training step"). ctypes releases the
GIL for the call, so the consumer's receive and decode threads run meanwhile.

The shared object is built with the system C compiler ($CC, else `cc`; about a second) into
a cache folder ($SAESTREAM_CACHE/kernels, else ~/.cache/saestream/kernels, else
$TMPDIR/saestream-kernels-<uid>; failing all three, a fresh private folder used once), keyed
by the source, the flags and this CPU, and renamed into place atomically, so concurrent
processes share one build. A shared object is code, and loading one another user could have
placed would run theirs: a folder is used only if it is a real folder this user owns and no
one else may write, the build only if it is a regular file of ours, and both are reached and
loaded through the descriptors that were checked (no path is looked up twice). A cached build
that does not load is built again. With no compiler, a failed build, or SAESTREAM_NATIVE=0,
`load()` returns None (with one warning for a failure) and callers use their pure-torch
path: the same results, slower.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from saestream.common.files import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp"],  # no -march=native here
    ["-O3", "-fno-math-errno", "-fPIC", "-shared"],  # no OpenMP: one thread
)
# Rows per thread below which fewer threads rank them (a parallel region costs a few µs).
ROWS_PER_THREAD = 16
_COMPILE_TIMEOUT_S = 60

_lock = threading.Lock()
_state: dict[str, object] = {}


class _CompileError(Exception):
    """The compiler failed with these flags (another folder would not help)."""


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
        return _state["lib"]  # type: ignore[return-value]


def library_path() -> Path | None:
    """Where the loaded build lives (None before `load()` or without one); for logs."""
    return _state.get("path")  # type: ignore[return-value]


def _cache_dirs() -> list[Path]:
    """Where a build may be cached, in order of preference."""
    user_tmp = Path(tempfile.gettempdir()) / f"saestream-kernels-{os.getuid()}"
    return [cache_root() / "kernels", user_tmp]


def _open_private_dir(folder: Path) -> int:
    """A descriptor of `folder` (made 0700 if missing); OSError unless it is a real folder
    (not a symlink) that this user owns and no one else may write. Everything after goes
    through the descriptor, so renaming or replacing the path afterwards changes nothing."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        os.close(fd)
        raise OSError(f"{folder} is not private to this user (owner, or group/other write)")
    return fd


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
    if sys.platform != "linux":  # the checks below need O_NOFOLLOW, dir_fd and /proc
        log.info("CPU kernels are built on Linux only: torch ops rank the latents")
        return None
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        log.warning("no C compiler (%s) found: CPU kernels fall back to torch ops", " ".join(cc))
        return None
    source, cpu = SOURCE.read_bytes(), _cpu_tag()
    errors: list[str] = []
    # Cache folders first; last, a fresh private folder of our own, used once and removed.
    for folder in [*_cache_dirs(), None]:
        scratch = None
        try:
            if folder is None:
                folder = scratch = Path(tempfile.mkdtemp(prefix="saestream-kernels-"))
            dfd = _open_private_dir(folder)
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            continue
        try:
            for flags in FLAG_SETS:
                key = hashlib.sha256(source + " ".join([*cc, *flags, cpu]).encode())
                name = f"cpu_kernels-{key.hexdigest()[:20]}.so"
                try:
                    lib = _load_or_build(dfd, name, cc, flags)
                except _CompileError as exc:
                    errors.append(f"{' '.join(cc + flags)}: {exc}")
                    continue
                _state["path"] = folder / name
                return lib
            break  # the compiler fails with every flag set: another folder would not help
        except OSError as exc:  # the folder: read-only, full, ...
            errors.append(f"{folder}: {exc}")
        finally:
            os.close(dfd)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)  # what is loaded stays mapped
    log.warning("CPU kernels not built, falling back to torch ops: %s", "; ".join(errors))
    return None


def _load_or_build(dfd: int, name: str, cc: list[str], flags: list[str]) -> ctypes.CDLL:
    try:
        lib = _open_built(dfd, name)
    except (OSError, AttributeError) as exc:  # not ours, truncated, not our symbols, ...
        log.warning("cached CPU kernels %s unusable (%s): building them again", name, exc)
        os.unlink(name, dir_fd=dfd)
        lib = None
    if lib is None:
        _compile(cc, flags, dfd, name)
        lib = _open_built(dfd, name)
        if lib is None:
            raise OSError(f"{name} vanished after it was built")
    return lib


def _open_built(dfd: int, name: str) -> ctypes.CDLL | None:
    """The build `name` in the folder `dfd`, or None if there is none. OSError if it is not a
    regular file of ours that no one else may write; it is loaded through the very
    descriptor that was checked (/proc/self/fd), so it cannot be swapped in between."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise OSError(f"{name} is not a private regular file of this user")
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        try:
            return _bind(lib)
        except AttributeError:  # not our library: unload it, or the next dlopen of the
            _ctypes.dlclose(lib._handle)  # same /proc path would be handed it again
            raise
    finally:
        os.close(fd)


def _compile(cc: list[str], flags: list[str], dfd: int, name: str) -> None:
    """Compile in a fresh private temporary folder, then copy into the cache folder `dfd`
    under a unique name and rename it into place (atomic: concurrent builders all succeed,
    and a reader sees a whole file or none)."""
    with tempfile.TemporaryDirectory(prefix="saestream-cc-") as work:
        out = os.path.join(work, name)
        try:
            proc = subprocess.run(
                [*cc, *flags, "-o", out, str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=_COMPILE_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise _CompileError(str(exc)) from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise _CompileError(lines[-1])
        data = Path(out).read_bytes()
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dfd)  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.topk_rows_f32.argtypes = [p, p, i64, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.topk_rows_f32.restype = i64
    f32 = ctypes.c_float
    lib.decoder_adam_f32.argtypes = [p, p, p, p, i64, i64, f32, f32, f32, f32, f32, ctypes.c_int]
    lib.decoder_adam_f32.restype = None
    lib.loss_stats_f32.argtypes = [p, p, p, i64, i64, p, p, p, ctypes.c_int]
    lib.loss_stats_f32.restype = ctypes.c_int
    return lib


def _threads(rows: int) -> int:
    """OpenMP threads for a kernel over `rows` rows: torch's count, fewer for few rows."""
    return max(1, min(torch.get_num_threads(), rows // ROWS_PER_THREAD))


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
    flagged = lib.topk_rows_f32(
        pre.data_ptr(), None if b is None else b.data_ptr(), batch, n, k, m,
        values.data_ptr(), indices.data_ptr(), bad.data_ptr(), _threads(batch),
    )  # fmt: skip
    if flagged:  # NaN rows: torch ranks NaN first
        rows = bad.nonzero()[:, 0]
        sub = pre.index_select(0, rows)
        if b is not None:
            sub += b
        values[rows], indices[rows] = sub.topk(k, dim=1, sorted=True)
    return values, indices


def decoder_adam_(
    W: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    step: float,
) -> bool:
    """In place, one pass over the rows: remove from `grad` each row's component along the
    (unit-norm) row of `W`, take torch's Adam step with that gradient (`exp_avg`,
    `exp_avg_sq` updated; `step` is the step count after it), renormalise the rows of `W`.
    `grad` itself is left as it is. False (nothing done) where the kernel does not apply:
    not contiguous float32 CPU tensors of one shape, or no build."""
    tensors = (W, grad, exp_avg, exp_avg_sq)
    if W.dim() != 2 or any(
        t.device.type != "cpu" or t.dtype != torch.float32 or t.shape != W.shape
        or not t.is_contiguous() for t in tensors
    ):  # fmt: skip
        return False
    lib = load()
    if lib is None:
        return False
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    n, d = W.shape
    lib.decoder_adam_f32(
        *(t.data_ptr() for t in tensors), n, d, beta1, beta2, step_size, bc2_sqrt, eps, _threads(n)
    )
    for t in (W, exp_avg, exp_avg_sq):  # written behind autograd's back: say so, as `_` ops do
        torch.autograd.graph.increment_version(t)
    return True


def loss_stats(
    xn: torch.Tensor, x_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One pass over a batch and its reconstruction [batch, d] (float32, CPU): the residual
    e = xn − x_hat (float32), and in float64 Σ_b e_b [d], Σ‖e‖², Σ_b xn_b [d], Σ‖xn‖². None
    where the kernel does not apply (other dtypes or devices, no build, no memory)."""
    if xn.dim() != 2 or xn.shape != x_hat.shape or any(
        t.device.type != "cpu" or t.dtype != torch.float32 for t in (xn, x_hat)
    ):  # fmt: skip
        return None
    lib = load()
    if lib is None:
        return None
    xn, x_hat = xn.detach().contiguous(), x_hat.detach().contiguous()
    n, d = xn.shape
    e = torch.empty(n, d)
    esum, xsum = torch.empty(d, dtype=torch.float64), torch.empty(d, dtype=torch.float64)
    sums = torch.empty(2, dtype=torch.float64)
    if lib.loss_stats_f32(
        xn.data_ptr(), x_hat.data_ptr(), e.data_ptr(), n, d, esum.data_ptr(), xsum.data_ptr(),
        sums.data_ptr(), _threads(n),
    ):  # fmt: skip
        return None  # out of memory for the partial sums
    return e, esum, sums[0], xsum, sums[1]
