"""CPU kernels in plain C (`cpu_kernels.c`), compiled on first use and loaded with ctypes
(`common/native.py`: where builds are cached, and how safely).

Why: on CPU the sparse SAE step's largest cost after the encoder matmul was the top-k over
the [batch, n_latents] pre-activations, which torch's ops can only do in several passes over
memory (each reading 16 MB at the small benchmark shape); the C kernel ranks each row in
one pass while it sits in cache (BENCHMARKS.md, "SAE training step"). ctypes releases the
GIL for the call, so the consumer's receive and decode threads run meanwhile. With no
compiler, a failed build, or SAESTREAM_NATIVE=0, `load()` returns None (with one warning for
a failure) and callers use their pure-torch path: the same results, slower.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from saestream.common import native
from saestream.common.native import enabled

__all__ = [
    "csr_backward", "csr_pattern", "decoder_adam_", "enabled", "layer_norm", "library_path",
    "load", "loss_stats", "topk_rows",
]

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp"],  # no -march=native here
    ["-O3", "-fno-math-errno", "-fPIC", "-shared"],  # no OpenMP: one thread
)
# Rows per thread below which fewer threads rank them (a parallel region costs a few µs).
ROWS_PER_THREAD = 16


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; None where they cannot be had."""
    return _LIBRARY.load()


def library_path() -> Path | None:
    """Where the loaded build lives (None before `load()` or without one); for logs."""
    return _LIBRARY.path


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.topk_rows_f32.argtypes = [p, p, i64, i64, i64, i64, p, p, p, ctypes.c_int, p, i64,
                                  p, i64, i64]
    lib.topk_rows_f32.restype = i64
    f32 = ctypes.c_float
    lib.decoder_adam_f32.argtypes = [p, p, p, p, i64, i64, f32, f32, f32, f32, f32, ctypes.c_int]
    lib.decoder_adam_f32.restype = None
    lib.loss_stats_f32.argtypes = [p, p, p, i64, i64, p, p, p, ctypes.c_int]
    lib.loss_stats_f32.restype = ctypes.c_int
    lib.layer_norm_f32.argtypes = [p, p, p, p, i64, i64, f32, ctypes.c_int]
    lib.layer_norm_f32.restype = None
    lib.csr_pattern_i64.argtypes = [p, i64, i64, i64, p, p, p]
    lib.csr_pattern_i64.restype = ctypes.c_int
    lib.csr_backward_f32.argtypes = [p, p, p, p, p, p, i64, i64, p, ctypes.c_int, p, ctypes.c_int]
    lib.csr_backward_f32.restype = ctypes.c_int
    return lib


_LIBRARY = native.NativeLibrary(SOURCE, FLAG_SETS, _bind, what="CPU kernels",
                               fallback="torch ops")


def _threads(rows: int) -> int:
    """OpenMP threads for a kernel over `rows` rows: torch's count, fewer for few rows."""
    return max(1, min(torch.get_num_threads(), rows // ROWS_PER_THREAD))


def topk_rows(
    pre: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(pre + bias).topk(k, dim=1, sorted=True)` of a float32 CPU matrix [batch, n] and an
    optional float32 bias [n] (ties by column ascending; rows with a NaN ranked by torch),
    without materialising the sum; None where the kernel does not apply or is not built.

    `gather` = (columns, out): also fill out [batch, len(columns)] (float32, any strides)
    with `(pre + bias)[:, columns]`, bit for bit, from each row while it is in cache; None
    (nothing written) for ids outside [0, n)."""
    if pre.dim() != 2 or pre.device.type != "cpu" or pre.dtype != torch.float32:
        return None
    batch, n = pre.shape
    if not 1 <= k <= n or n >= 2**32 or pre.requires_grad:
        return None
    if bias is not None and (
        bias.shape != (n,) or bias.device.type != "cpu" or bias.dtype != torch.float32
    ):
        return None
    cols, out = (None, None) if gather is None else gather
    if gather is not None and not _gather_fits(*gather, batch, n):
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
    n_cols = 0 if cols is None else cols.numel()
    flagged = lib.topk_rows_f32(
        pre.data_ptr(), None if b is None else b.data_ptr(), batch, n, k, m,
        values.data_ptr(), indices.data_ptr(), bad.data_ptr(), _threads(batch),
        None if cols is None else cols.data_ptr(), n_cols,
        None if out is None else out.data_ptr(), 0 if out is None else out.stride(0),
        0 if out is None else out.stride(1),
    )  # fmt: skip
    if flagged:  # NaN rows: torch ranks NaN first
        rows = bad.nonzero()[:, 0]
        sub = pre.index_select(0, rows)
        if b is not None:
            sub += b
        values[rows], indices[rows] = sub.topk(k, dim=1, sorted=True)
    return values, indices


def _gather_fits(cols: torch.Tensor, out: torch.Tensor, batch: int, n: int) -> bool:
    """Whether the kernel can gather columns `cols` of a [batch, n] matrix into `out`."""
    if cols.dim() != 1 or cols.dtype != torch.int64 or cols.device.type != "cpu" or \
            not cols.is_contiguous():
        return False
    if out.dtype != torch.float32 or out.device.type != "cpu" or \
            out.shape != (batch, cols.numel()) or out.requires_grad:
        return False
    return not cols.numel() or (int(cols.min()) >= 0 and int(cols.max()) < n)


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
    e = torch.empty(n, d, dtype=torch.float32)
    esum, xsum = torch.empty(d, dtype=torch.float64), torch.empty(d, dtype=torch.float64)
    sums = torch.empty(2, dtype=torch.float64)
    if lib.loss_stats_f32(
        xn.data_ptr(), x_hat.data_ptr(), e.data_ptr(), n, d, esum.data_ptr(), xsum.data_ptr(),
        sums.data_ptr(), _threads(n),
    ):  # fmt: skip
        return None  # out of memory for the partial sums
    return e, esum, sums[0], xsum, sums[1]


def layer_norm(
    x: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(x − μ) / (σ + eps) per row of a float32 CPU matrix [n, d], d >= 2 (σ: the unbiased
    standard deviation), with μ and σ [n, 1]: one C pass per row where torch's ops take five
    over the matrix. None where the kernel does not apply (other dtypes or devices, an input
    that needs a gradient, no build)."""
    if x.dim() != 2 or x.shape[1] < 2 or x.device.type != "cpu" or \
            x.dtype != torch.float32 or x.requires_grad:
        return None
    lib = load()
    if lib is None:
        return None
    x = x.contiguous()
    n, d = x.shape
    f32 = torch.float32  # whatever torch's default dtype: the C code writes float32
    y, mu, sd = torch.empty(n, d, dtype=f32), torch.empty(n, 1, dtype=f32), \
        torch.empty(n, 1, dtype=f32)
    lib.layer_norm_f32(x.data_ptr(), y.data_ptr(), mu.data_ptr(), sd.data_ptr(), n, d, eps,
                       _threads(n))
    return y, mu, sd


def csr_pattern(
    indices: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For int64 CPU latent ids [batch, k]: (crow [n_latents + 1], cols, order) of their CSR
    pattern [n_latents, batch], by one counting sort — exactly what a stable argsort of the
    flattened ids, a bincount and a cumulative sum give (`sparse_ops.LatentPattern`). None
    where the kernel does not apply (other dtypes or devices, an id out of range, no build,
    no memory)."""
    if indices.dim() != 2 or indices.device.type != "cpu" or indices.dtype != torch.int64:
        return None
    if indices.shape[1] < 1 or n_latents < 1:
        return None
    lib = load()
    if lib is None:
        return None
    flat = indices.contiguous().view(-1)
    crow = torch.empty(n_latents + 1, dtype=torch.int64)
    order = torch.empty(flat.numel(), dtype=torch.int64)
    cols = torch.empty(flat.numel(), dtype=torch.int64)
    if lib.csr_pattern_i64(
        flat.data_ptr(), flat.numel(), n_latents, indices.shape[1], crow.data_ptr(),
        order.data_ptr(), cols.data_ptr(),
    ):  # fmt: skip
        return None
    return crow, cols, order


def csr_backward(
    pattern: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    coef: torch.Tensor | None,
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The sparse products of a backward over the CSR pattern (crow, cols, order) of latent
    ids [batch, k] (`csr_pattern`), in one walk over it (C kernel `csr_backward_f32`):

    - with `coef` [batch, k]: ∂W [n, d], ∂W[l] = Σ_{(b,j): ids[b,j]=l} coef[b,j] · rows[b]
      (added into `grad` when given, else a new tensor) — `spmm` of the pattern's matrix;
    - with `weight` [n, d]: gv [batch, k], gv[b,j] = rows[b] · weight[ids[b,j]] —
      `gathered_dot`.

    Returns (∂W or None, gv or None); None where the kernel does not apply (not contiguous
    float32 CPU tensors of matching shapes, no build, no memory)."""
    crow, cols, order = pattern
    n = crow.numel() - 1
    if rows.dim() != 2 or (coef is None and weight is None):
        return None
    if any(
        t.device.type != "cpu" or t.dtype != torch.int64 or not t.is_contiguous()
        for t in pattern
    ) or cols.numel() != order.numel():
        return None
    batch, d = rows.shape
    if batch == 0 or order.numel() % batch:
        return None
    k = order.numel() // batch
    floats = [t for t in (coef, rows, weight, grad) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in floats):
        return None
    if coef is not None and coef.numel() != order.numel():
        return None
    if weight is not None and weight.shape != (n, d):
        return None
    if grad is not None and (grad.shape != (n, d) or not grad.is_contiguous() or coef is None):
        return None
    lib = load()
    if lib is None:
        return None
    rows = rows.detach().contiguous()
    c = None if coef is None else coef.detach().contiguous()
    w = None if weight is None else weight.detach().contiguous()
    out = grad
    if out is None and coef is not None:
        out = torch.empty(n, d)
    gv = None if w is None else torch.empty(batch, k)
    if lib.csr_backward_f32(
        crow.data_ptr(), cols.data_ptr(), order.data_ptr(),
        None if c is None else c.data_ptr(), rows.data_ptr(),
        None if w is None else w.data_ptr(), n, d,
        None if out is None else out.data_ptr(), int(grad is not None),
        None if gv is None else gv.data_ptr(), _threads(n),
    ):  # fmt: skip
        return None  # no memory for the scratch: nothing written
    return out, gv
