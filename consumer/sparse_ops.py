"""The sparse fast path of the TopK SAE: after the one dense encoder matmul, everything —
top-k, decoder forward, the decoder-weight gradient, the encoder-weight gradient — touches
only the latents each token keeps (k, plus k_aux dead latents for AuxK).

Two autograd functions:

- `TopKEncode`: pre = (x − b_dec) W_encᵀ + b_enc, then TopK (`topk_rows`, and the AuxK
  top-k among dead latents). The [batch, n_latents] pre-activations live in a per-thread
  buffer on CPU and are dropped before backward; backward gets gradients for the kept
  values only ([batch, k]), so
      ∂W_enc[l] = Σ_{(b,j): idx[b,j]=l} g[b,j] · (x_b − b_dec)      (a sparse × dense matmul)
      ∂b_enc[l] = Σ_{(b,j): idx[b,j]=l} g[b,j]                      (index_add)
      ∂b_dec    = −∂b_enc W_enc                                     (one vector × matrix)
  instead of the dense gradᵀ @ x matmul, which would cost as much as the forward.
- `_Decode` (`decode`, `sparse_decode`): x̂ = Σ_j v[b,j] W_dec[idx[b,j]] (embedding_bag) for
  each of several sets of kept latents (top k, top 4k, AuxK) in one node; backward
      ∂W_dec[l] = Σ_{(b,j): idx[b,j]=l} v[b,j] · ∂x̂_b               (sparse × dense matmul)
      ∂v[b,j]   = ∂x̂_b · W_dec[idx[b,j]]                            (gathered row dot products)
  accumulated into one W_dec gradient.

The sparse matrices are CSR [n_latents, batch], built by one counting sort of the flattened
indices (`LatentPattern`, built once per step and shared by both backward passes; a stable
argsort where the C kernels are not built), so the
scatter-add runs as one `sparse @ dense` product (`spmm`: an `embedding_bag` over the CSR
arrays on CPU, cuSPARSE on CUDA).
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from saestream.consumer import cpu_kernels

# Dense-over-support kernels when entries fill at least 1/COMPACT_RATIO of the block.
COMPACT_RATIO = 8
# Rows of the gathered [chunk, k, d_in] block in the ∂v computation: bounded memory on CPU.
_GATHER_CHUNK = 512
# Adjacent columns per group in the CPU top-k (`topk_rows`).
_TOPK_GROUP = 8
_INT32_MIN = -(2**31)


def encoder_matmul(
    xc: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one dense matmul, xc W_encᵀ + b_enc -> [batch, n_latents] (bf16 under autocast),
    into `out` when given; without the bias when `b_enc` is None.

    The bias is added after the product, one float add per element, not by addmm: addmm
    first broadcasts it into the whole output and then has its GEMM read that back. So every
    path — the dense reference, `SparseAutoencoder.encode`, and the CPU top-k kernel, which
    adds the bias on the fly and spares the training step that pass (`TopKEncode`) — ranks
    the latents on bit-identical pre-activations.
    """
    pre = torch.mm(xc, W_enc.t()) if out is None else torch.mm(xc, W_enc.t(), out=out)
    if b_enc is not None:
        pre += b_enc
    return pre


_workspace = threading.local()


def _pre_buffer(
    batch: int, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """A [batch, n] CPU buffer for TopKEncode's pre-activations, kept per thread and dtype
    between steps (as large as the largest batch × n_latents seen: memory the forward needs
    anyway), or None off the CPU or under CPU autocast. Past glibc's mmap threshold (32 MiB)
    a fresh tensor this size is new pages from the OS each step, every one faulted in on
    first write: about 8 % of the encoder matmul at 4096 × 16384. Nothing outlives
    TopKEncode.forward's use of it, so one per thread is safe."""
    if device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    key = f"pre_{dtype}"
    buf: torch.Tensor | None = getattr(_workspace, key, None)
    if buf is None or buf.numel() < batch * n:
        buf = None
        setattr(_workspace, key, None)  # free the smaller one before allocating
        buf = torch.empty(batch * n, dtype=dtype)
        setattr(_workspace, key, buf)
    return buf[: batch * n].view(batch, n)


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre.topk(k, dim=1, sorted=True)` for a [batch, n] tensor: the same values (indices
    may differ only among equal values).

    On CPU torch's top-k costs several ns per element it reads, more than half the encoder
    matmul at d_in = 256. The C kernel (`cpu_kernels.topk_rows`) ranks each row in one pass
    while it is in cache. Without it (no C compiler, SAESTREAM_NATIVE=0), torch's top-k
    runs only on a few candidates per row. A threshold first:
    t = the k-th largest of 2k maxima of disjoint column sets, so at least k elements are
    ≥ t, and every element < t is outside the top k. One pass (`max_pool1d`) gives the
    maxima of groups of 8 adjacent columns, so that a group is half a cache line: the groups
    whose maximum is ≥ t (about 1.3 k per row on random data) are gathered whole, one
    memory access each, and their elements ≥ t kept. These few candidates of all rows are
    then ordered at once by one flat integer sort on (row, value) keys, instead of a top-k
    per row (whose per-row overhead dominates at this width). Rows that hold a NaN, where
    the bound says nothing, take torch's top-k.
    """
    native = cpu_kernels.topk_rows(pre, k)  # one pass per row in C, where it can be built
    if native is not None:
        return native
    batch, n = pre.shape
    s = _TOPK_GROUP
    G = n // s
    if pre.is_cuda or pre.dtype != torch.float32 or G < 2 * k or k < 1:
        return pre.topk(k, dim=1, sorted=True)
    pre = pre.contiguous()
    n0 = s * G
    group_max = F.max_pool1d(pre.view(batch, 1, n), s).view(batch, G)  # NaN propagates
    m = 2 * k  # super-sets of G // m groups (strided); leftover groups join none
    super_max = group_max[:, : m * (G // m)].view(batch, G // m, m).amax(dim=1)
    t = super_max.kthvalue(m - k + 1, dim=1, keepdim=True).values  # k-th largest, [batch, 1]
    fg = (group_max >= t).view(-1).nonzero()[:, 0]  # flat group ids: row * G + group
    row = torch.div(fg, G, rounding_mode="floor")
    if n0 == n:  # whole groups as rows of 8
        cand = pre.view(-1, s).index_select(0, fg)
    else:
        cand = pre[:, :n0].reshape(batch, G, s)[row, fg - row * G]
    keep = (cand >= t.view(-1).index_select(0, row)[:, None]).view(-1).nonzero()[:, 0]
    vals = cand.view(-1).index_select(0, keep)
    grp = keep.div(s, rounding_mode="floor")
    # flat ids in pre: the group's first element (row * n + group * s), plus the offset in it
    first = fg * s if n0 == n else fg * s + row * (n - n0)
    elem = first.index_select(0, grp).add_(keep.remainder(s))
    if n0 < n:  # the last n % 8 columns belong to no group: candidates when ≥ t
        tail = pre[:, n0:]
        t_row, t_col = (tail >= t).nonzero().unbind(1)
        elem = torch.cat([elem, t_row * n + n0 + t_col])
        vals = torch.cat([vals, tail[t_row, t_col]])
    rows = torch.div(elem, n, rounding_mode="floor")
    count = torch.bincount(rows, minlength=batch)
    bad = None
    if batch and (int(count.min()) < k or bool(super_max.isnan().any())):
        bad = (count < k) | super_max.isnan().any(dim=1)
        if bool(bad.all()):
            return pre.topk(k, dim=1, sorted=True)
    order = torch.sort(_descending_keys(vals, rows), stable=True).indices
    pos = (count.cumsum(0) - count)[:, None] + torch.arange(k, device=pre.device)
    if bad is not None:  # their slots may run past the end; they are replaced below
        pos.clamp_(max=len(order) - 1)
    sel = order[pos]  # each row's k first candidates, in descending order
    values = vals[sel]
    indices = elem[sel].sub_(torch.arange(0, batch * n, n, device=pre.device)[:, None])
    if bad is not None:
        fix = bad.nonzero()[:, 0]
        values[fix], indices[fix] = pre.index_select(0, fix).topk(k, dim=1, sorted=True)
    return values, indices


def _descending_keys(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is `rows` ascending, then float32 `values`
    descending (NaN first, as in torch.topk): a value's bits map to an int32 that falls as
    the value rises (flip all bits of a non-negative float, only the sign bit of a negative
    one), in [-2^31, 2^31), and row r adds r · 2^32."""
    bits = values.view(torch.int32)
    flip = (bits >> 31).bitwise_not_().bitwise_or_(_INT32_MIN)
    return bits.bitwise_xor(flip).to(torch.int64).add_(rows, alpha=2**32)


class LatentPattern:
    """The CSR pattern [n_latents, batch] of the latent ids `indices` [batch, k] a TopK kept,
    built on first use and shared by every product over those ids: the backward passes of
    TopKEncode (∂W_enc) and of the decoder (∂W_dec, ∂v) read the same ids, and sorting them
    cost as much as either pass's sparse product. Each row of `indices` must hold distinct
    latents."""

    def __init__(self, indices: torch.Tensor | None = None, n_latents: int = 0) -> None:
        self.indices = indices
        self.n_latents = n_latents
        self._csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def bind(self, indices: torch.Tensor, n_latents: int) -> None:
        """Describe `indices` from now on (TopKEncode's forward fills the caller's holder)."""
        self.indices, self.n_latents, self._csr = indices, n_latents, None

    def serves(self, indices: torch.Tensor, n_latents: int) -> bool:
        """Whether `indices` are the very ids this pattern describes (the same memory)."""
        mine = self.indices
        return (
            mine is not None
            and n_latents == self.n_latents
            and mine.device == indices.device
            and mine.data_ptr() == indices.data_ptr()
            and mine.shape == indices.shape
            and mine.stride() == indices.stride()
        )

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crow [n_latents + 1], cols, order): the CSR pattern, entries grouped by latent,
        token order kept within one; `cols` holds each entry's token and `order` its flat
        position in `indices`."""
        if self.indices is None:
            raise RuntimeError("LatentPattern used before bind()")
        k = self.indices.shape[1]
        if self._csr is None:  # one counting sort in C where it can be had
            self._csr = cpu_kernels.csr_pattern(self.indices, self.n_latents)
        if self._csr is None:
            flat = self.indices.reshape(-1)
            # stable: token order within a latent; int32 keys sort in fewer radix passes
            keys = flat.to(torch.int32) if self.n_latents < 2**31 else flat
            order = torch.argsort(keys, stable=True)
            counts = torch.bincount(flat, minlength=self.n_latents)
            crow = torch.zeros(self.n_latents + 1, dtype=torch.int64, device=flat.device)
            torch.cumsum(counts, dim=0, out=crow[1:])
            self._csr = crow, torch.div(order, k, rounding_mode="floor"), order
        return self._csr

    def matrix(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR matrix S [n_latents, batch] with S[indices[b, j], b] = coef[b, j], and the
        permutation `order` such that S.values() == coef.reshape(-1)[order].

        `S @ rows` ([batch, d] -> [n_latents, d]) scatters each token's row, weighted, into
        the latents it activated."""
        crow, cols, order = self.arrays()
        batch = self.indices.shape[0]  # type: ignore[union-attr]  # bound: arrays() checked
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            S = torch.sparse_csr_tensor(
                crow,
                cols,
                coef.reshape(-1).index_select(0, order),  # a gather: faster than [order]
                size=(self.n_latents, batch),
                check_invariants=False,
            )
        return S, order


def latent_token_matrix(
    indices: torch.Tensor, coef: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`LatentPattern(indices, n_latents).matrix(coef)`: a one-off CSR matrix."""
    return LatentPattern(indices, n_latents).matrix(coef)


def spmm(S: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """S @ rows for a CSR S [n, batch] and dense rows [batch, d] -> [n, d].

    On CPU as `embedding_bag` over the CSR arrays (bag l = row l's column ids, weighted by
    its values, `include_last_offset` with crow as the offsets): the same sums as MKL's CSR
    product, in the same order per output row, at about half its time at d = 256 (fbgemm's
    kernel for bags of rows), with no zero-filled output. On CUDA cuSPARSE's product."""
    if rows.is_cuda:
        return S @ rows
    return F.embedding_bag(
        S.col_indices(),
        rows,
        S.crow_indices(),
        mode="sum",
        per_sample_weights=S.values().to(rows.dtype),
        include_last_offset=True,
    )


def scatter_outer(
    indices: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """out[l] = Σ_{(b,j): indices[b,j]=l} coef[b,j] · rows[b]   -> [n_latents, d] (dense)."""
    if indices.numel() == 0:
        return rows.new_zeros(n_latents, rows.shape[1])
    S, _ = latent_token_matrix(indices, coef.to(rows.dtype), n_latents)
    return spmm(S, rows)


def gathered_dot(
    indices: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    csr: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """out[b, j] = rows[b] · weight[indices[b, j]]   -> [batch, k].

    A sampled dense-dense product (SDDMM) over the CSR pattern of `indices` (pass `csr` =
    `latent_token_matrix(indices, ...)` to reuse one; only its pattern is read), which walks
    each weight row once. Falls back to gathering rows in chunks where torch lacks the kernel.
    """
    if csr is None:
        csr = latent_token_matrix(
            indices, torch.ones_like(indices, dtype=weight.dtype), len(weight)
        )
    S, order = csr
    try:
        sampled = torch.sparse.sampled_addmm(S, weight, rows.to(weight.dtype).t(), beta=0.0)
        out = torch.empty(indices.numel(), dtype=weight.dtype, device=weight.device)
        out.index_copy_(0, order, sampled.values())  # a permutation: no accumulation
        return out.view(indices.shape)
    except (RuntimeError, NotImplementedError):
        pass
    out = rows.new_empty(indices.shape, dtype=weight.dtype)
    step = indices.shape[0] if rows.is_cuda else _GATHER_CHUNK
    for s in range(0, indices.shape[0], step):
        w = F.embedding(indices[s : s + step], weight)  # [chunk, k, d]
        out[s : s + step] = torch.bmm(w, rows[s : s + step, :, None].to(w.dtype)).squeeze(-1)
    return out


def use_compact(nnz: int, batch: int, support: int) -> bool:
    """Whether entries confined to `support` latents are dense enough there (≥ 1/8 of the
    [batch, support] block) that dense matmuls over those latents beat the sparse kernels —
    typical for AuxK, where k_aux is close to the number of dead latents."""
    return batch * support <= COMPACT_RATIO * nnz


class TopKEncode(Function):
    """(x, W_enc, b_enc, b_dec) -> (values, indices, aux_values, aux_local), values pre-ReLU.

    `dead` (sorted int64 latent ids, or None) restricts the AuxK selection; `k_aux` is already
    capped at len(dead). `aux_local` holds positions in `dead` (the latent ids are
    `dead[aux_local]`). Gradients flow to W_enc, b_enc and b_dec, never to x.

    `aux_relu` says the caller applies a ReLU to `aux_values`. Then, where AuxK's entries
    fill the dead latents densely enough for the dense-over-dead kernels (`use_compact`),
    every dead latent is returned (`aux_local` = 0, 1, ..., len(dead) − 1) with the values
    outside each row's top k_aux set to 0 (`_zero_outside_topk`): the same AuxK values and
    gradients, without a top-k over the dead latents or a scatter into the dense block.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        k: int,
        dead: torch.Tensor | None,
        k_aux: int,
        pattern: LatentPattern | None,
        aux_relu: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # no zero gradients made up for the index outputs
        xc = x - b_dec
        out = _pre_buffer(xc.shape[0], W_enc.shape[0], torch.result_type(xc, W_enc), xc.device)
        pre = encoder_matmul(xc, W_enc, None, out)
        batch = x.shape[0]
        auxk = dead is not None and k_aux > 0
        n_dead = dead.numel() if auxk else 0
        # AuxK over every dead latent (all kept, or dense over them: `use_compact`) wants
        # their columns column-major (`_Decode`); a top-k among them wants rows.
        every = auxk and aux_relu and (k_aux >= n_dead or use_compact(batch * k_aux, batch, n_dead))
        gathered = None
        if auxk and pre.device.type == "cpu":  # the C top-k gathers them as it ranks each row
            gathered = pre.new_empty(n_dead, batch).t() if every else pre.new_empty(batch, n_dead)
        ranked = cpu_kernels.topk_rows(pre, k, bias=b_enc,  # adds the bias as it ranks
                                       gather=None if gathered is None else (dead, gathered))
        if ranked is None:
            pre += b_enc
            ranked = topk_rows(pre, k)
            if auxk:
                gathered = pre.index_select(1, dead)
                if every:
                    gathered = gathered.t().contiguous().t()
        values, indices = ranked
        if auxk:
            aux_values = gathered
            if k_aux < n_dead and every:
                _zero_outside_topk(aux_values, k_aux)  # dense over `dead` anyway: keep them all
                aux_local = torch.arange(n_dead, device=dead.device).expand_as(aux_values)
            elif k_aux < n_dead:
                aux_values, aux_local = aux_values.topk(k_aux, dim=1, sorted=False)
            else:  # every dead latent is kept: no selection needed
                aux_local = torch.arange(k_aux, device=dead.device).expand_as(aux_values)
        else:
            dead = indices.new_zeros(0)
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_local = indices.new_zeros(x.shape[0], 0)
        del pre
        if pattern is None:
            pattern = LatentPattern()
        pattern.bind(indices, W_enc.shape[0])
        ctx.pattern = pattern  # type: ignore[attr-defined]
        ctx.save_for_backward(xc, W_enc, indices, aux_local, dead)
        ctx.mark_non_differentiable(indices, aux_local)
        return values, indices, aux_values, aux_local

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_values: torch.Tensor | None,
        _g_indices: torch.Tensor | None,
        g_aux: torch.Tensor | None,
        _g_aux_local: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        xc, W_enc, indices, aux_local, dead = ctx.saved_tensors  # type: ignore[attr-defined]
        n_latents = W_enc.shape[0]
        xc = xc.to(W_enc.dtype)
        if g_values is None:  # the kept values fed no loss
            g_values = xc.new_zeros(indices.shape)
        g_values = g_values.to(W_enc.dtype)
        g_lat = torch.zeros(n_latents, dtype=W_enc.dtype, device=W_enc.device)
        g_lat.index_add_(0, indices.reshape(-1), g_values.reshape(-1))
        pattern = ctx.pattern  # type: ignore[attr-defined]
        if not pattern.serves(indices, n_latents):  # e.g. saved tensors moved meanwhile
            pattern = LatentPattern(indices, n_latents)
        fused = cpu_kernels.csr_backward(pattern.arrays(), g_values, xc, None)
        grad_W = spmm(pattern.matrix(g_values)[0], xc) if fused is None else fused[0]
        # The AuxK part separately: a dead latent may be in both sets for one token.
        if g_aux is None or not aux_local.numel():  # no AuxK, or it fed no loss
            pass
        elif use_compact(aux_local.numel(), xc.shape[0], dead.numel()):
            g_aux = g_aux.to(W_enc.dtype)
            if _all_positions(aux_local, dead.numel()):
                G = g_aux  # column-major: Gᵀ below is contiguous
            else:
                G = xc.new_zeros(xc.shape[0], dead.numel())
                G.scatter_(1, aux_local, g_aux)
            g_lat.index_add_(0, dead, G.sum(dim=0))
            # `dead` holds distinct ids: gather, add, write back (index_add_ is serial on CPU).
            grad_W.index_copy_(0, dead, grad_W.index_select(0, dead).add_(G.t() @ xc))
        else:
            g_aux = g_aux.to(W_enc.dtype)
            aux_indices = dead[aux_local]
            g_lat.index_add_(0, aux_indices.reshape(-1), g_aux.reshape(-1))
            grad_W += scatter_outer(aux_indices, g_aux, xc, n_latents)
        grad_b_dec = -(g_lat @ W_enc)
        return None, grad_W, g_lat, grad_b_dec, None, None, None, None, None


def _zero_outside_topk(values: torch.Tensor, k: int) -> None:
    """In place: in each row with more than k positive values, every value outside the row's
    top k becomes 0. A row with at most k positive values has them all in its top k, so after
    a ReLU each row is what its top k followed by the ReLU gives, in value and in gradient
    (ReLU passes none at 0) — and on random or trained dead latents (mostly negative) that is
    nearly every row, which then needs no top-k."""
    over = ((values > 0).sum(dim=1) > k).nonzero()[:, 0]
    if over.numel():
        rows = values.index_select(0, over)
        top = rows.topk(k, dim=1, sorted=False).indices
        values[over] = torch.zeros_like(rows).scatter_(1, top, rows.gather(1, top))


class DecodeTerm(NamedTuple):
    """One reconstruction Σ_j values[:, j] · W_dec[latent(b, j)] for `decode`."""

    values: torch.Tensor
    """[batch, k] coefficients (gradients flow to them)."""
    indices: torch.Tensor
    """[batch, k] latent ids, or positions in `support` when it is given."""
    support: torch.Tensor | None = None
    """Sorted latent ids the positions refer to (the dead latents, for AuxK)."""
    pattern: LatentPattern | None = None
    """`topk_encode`'s pattern: reused in backward when it describes these very ids."""


class _Decode(Function):
    """Several reconstructions from one decoder in one autograd node, so that their W_dec
    gradients accumulate in one tensor: separate nodes would each allocate a whole
    [n_latents, d] gradient (zero-filled for a compact term), and autograd would add them.

    Apply as (W_dec, terms, *values): `terms` carries each DecodeTerm's indices, support and
    pattern, `values` their coefficients, as separate arguments so that autograd sees them.

    A term with latent ids (or with positions spread thin over a large support) runs sparse:
        forward   x̂_b = Σ_j v[b,j] W_dec[idx[b,j]]                 (embedding_bag)
        backward  ∂W_dec[l] = Σ_{(b,j): idx[b,j]=l} v[b,j] · ∂x̂_b  (CSR × dense, `spmm`)
                  ∂v[b,j]   = ∂x̂_b · W_dec[idx[b,j]]               (`gathered_dot`)
    A term dense over its support (`use_compact`) runs as matmuls over those rows only:
    Z [batch, len(support)], x̂ = Z W_dec[support], ∂W_dec[support] = Zᵀ ∂x̂.
    AuxK's Z comes column-major from TopKEncode, and ∂Z is computed as (W_dec[support] ∂x̂ᵀ)ᵀ,
    column-major too: torch's CPU product writing the [batch, n_dead] ∂Z row-major (an odd
    width) ran 1.2–1.3× as long at 768 × 819 dead × 4096 tokens, and the ReLU's backward on
    two layouts that differ runs ~20× as long as on two that agree (BENCHMARKS.md).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        W_dec: torch.Tensor,
        terms: tuple[DecodeTerm, ...],
        *values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        outs, saved, plan = [], [W_dec], []
        for term, v in zip(terms, values, strict=True):
            v = v.to(W_dec.dtype)
            idx, support = term.indices, term.support
            if support is not None and use_compact(idx.numel(), idx.shape[0], support.numel()):
                if _all_positions(idx, support.numel()):  # every support latent, in order
                    Z = v  # column-major from TopKEncode: see the class docstring
                else:
                    Z = W_dec.new_zeros(v.shape[0], support.numel())
                    Z.scatter_(1, idx, v)
                W_s = W_dec.index_select(0, support)
                outs.append(Z @ W_s)
                saved += [Z, idx, support, W_s]
                plan.append((True, None))
            else:
                ids = idx if support is None else support[idx]
                pattern = term.pattern if support is None else None
                outs.append(F.embedding_bag(ids, W_dec, per_sample_weights=v, mode="sum"))
                saved += [v, ids]
                plan.append((False, pattern))
        ctx.save_for_backward(*saved)
        ctx.plan = plan  # type: ignore[attr-defined]
        return tuple(outs)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, *g_outs: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        W_dec, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        n_latents = W_dec.shape[0]
        want_W = ctx.needs_input_grad[0]
        grad_W: torch.Tensor | None = None
        grad_values: list[torch.Tensor | None] = []
        compact: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, ((is_compact, pattern), g) in enumerate(zip(ctx.plan, g_outs, strict=True)):  # type: ignore[attr-defined]
            want_v = ctx.needs_input_grad[2 + i]
            if is_compact:
                Z, local, support, W_s = saved[:4]
                saved = saved[4:]
                if g is None:
                    grad_values.append(None)
                    continue
                g = g.to(W_dec.dtype)
                gv = None
                if want_v:
                    gv = (W_s @ g.t()).t()  # column-major, as Z
                    if not _all_positions(local, support.numel()):
                        gv = gv.gather(1, local)
                grad_values.append(gv)
                if want_W:
                    compact.append((support, Z.t() @ g))
                continue
            v, ids = saved[:2]
            saved = saved[2:]
            if g is None:
                grad_values.append(None)
                continue
            g = g.to(W_dec.dtype).contiguous()
            if pattern is None or not pattern.serves(ids, n_latents):
                pattern = LatentPattern(ids, n_latents)
            fused = cpu_kernels.csr_backward(  # both products in one C walk, where built
                pattern.arrays(), v if want_W else None, g, W_dec if want_v else None,
                grad_W if want_W else None,
            )  # fmt: skip
            if fused is not None:
                grad_W = fused[0] if want_W else grad_W
                grad_values.append(fused[1])
                continue
            csr = pattern.matrix(v)
            grad_values.append(gathered_dot(ids, W_dec, g, csr) if want_v else None)
            if not want_W:
                pass
            elif grad_W is None:
                grad_W = spmm(csr[0], g)
            else:
                grad_W += spmm(csr[0], g)
        for support, rows in compact:  # support ids are distinct
            if grad_W is None:
                grad_W = W_dec.new_zeros(W_dec.shape)
            # gather, add, write back: index_add_ is serial on CPU
            grad_W.index_copy_(0, support, grad_W.index_select(0, support).add_(rows))
        return (grad_W, None, *grad_values)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    pattern: LatentPattern | None = None,
    aux_relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Typed wrapper of `TopKEncode.apply`. Pass an empty `LatentPattern()` as `pattern` to
    have it describe the returned indices, and hand it to `decode` with them."""
    return TopKEncode.apply(x, W_enc, b_enc, b_dec, k, dead, k_aux, pattern, aux_relu)  # type: ignore[no-any-return]


def decode(W_dec: torch.Tensor, terms: list[DecodeTerm]) -> list[torch.Tensor]:
    """Σ_j values[:, j] · W_dec[latent(b, j)] for each term (no b_dec added), in one
    autograd node (one W_dec gradient)."""
    if not terms:
        return []
    return list(_Decode.apply(W_dec, tuple(terms), *(t.values for t in terms)))


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    support: torch.Tensor | None = None,
    pattern: LatentPattern | None = None,
) -> torch.Tensor:
    """Σ_j values[:, j] · W_dec[latent(b, j)] (no b_dec added): `decode` of one term.

    Without `support`, `indices` are latent ids; `pattern` (from `topk_encode`) is reused in
    the backward pass when it describes these very ids. With `support` (sorted latent ids),
    they are positions in it, and the dense-over-support kernels run when that is cheaper."""
    return decode(W_dec, [DecodeTerm(values, indices, support, pattern)])[0]


def _all_positions(local: torch.Tensor, width: int) -> bool:
    """Whether `local` [batch, width] is 0, 1, ..., width − 1 in every row, as TopKEncode
    returns it when AuxK keeps every dead latent (an expanded arange): then scattering into
    and gathering from the dense [batch, width] block are identities."""
    return (
        local.dim() == 2
        and local.shape[1] == width
        and local.stride(0) == 0
        and bool(torch.equal(local[0], torch.arange(width, device=local.device)))
    )
