"""The sparse fast path of the TopK SAE: after the one dense encoder matmul, everything —
decoder forward, the decoder-weight gradient, the encoder-weight gradient — touches only the
latents each token keeps (k, plus k_aux dead latents for AuxK).

Two autograd functions:

- `TopKEncode`: pre = (x − b_dec) W_encᵀ + b_enc, then TopK (and the AuxK top-k among dead
  latents). The [batch, n_latents] pre-activations are freed before backward; backward gets
  gradients for the kept values only ([batch, k]), so
      ∂W_enc[l] = Σ_{(b,j): idx[b,j]=l} g[b,j] · (x_b − b_dec)      (a sparse × dense matmul)
      ∂b_enc[l] = Σ_{(b,j): idx[b,j]=l} g[b,j]                      (index_add)
      ∂b_dec    = −∂b_enc W_enc                                     (one vector × matrix)
  instead of the dense gradᵀ @ x matmul, which would cost as much as the forward.
- `SparseDecode`: x̂ = Σ_j v[b,j] W_dec[idx[b,j]] (embedding_bag); backward
      ∂W_dec[l] = Σ_{(b,j): idx[b,j]=l} v[b,j] · ∂x̂_b               (sparse × dense matmul)
      ∂v[b,j]   = ∂x̂_b · W_dec[idx[b,j]]                            (gathered row dot products)

The sparse matrices are CSR [n_latents, batch], built by sorting the flattened indices, so
the scatter-add runs as one `sparse @ dense` product (MKL on CPU, cuSPARSE on CUDA).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

# Dense-over-support kernels when entries fill at least 1/COMPACT_RATIO of the block.
COMPACT_RATIO = 8
# Rows of the gathered [chunk, k, d_in] block in the ∂v computation: bounded memory on CPU.
_GATHER_CHUNK = 512
# Columns per strided group in the two-stage CPU top-k (`topk_rows`).
_TOPK_GROUP = 8


def encoder_matmul(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """The one dense matmul, xc W_encᵀ + b_enc -> [batch, n_latents] (bf16 under autocast).

    On CPU one addmm (as nn.Linear), which is faster there than mm and a separate bias add.
    On CUDA the bias is added in place afterwards: addmm would first broadcast it into the
    whole output. The dense reference path calls this too on CPU, so both rank the latents
    on bit-identical pre-activations.
    """
    if xc.is_cuda:
        pre = torch.mm(xc, W_enc.t())
        pre += b_enc
        return pre
    return torch.addmm(b_enc, xc, W_enc.t())


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pre.topk(k, dim=1, sorted=True)` for a contiguous [batch, n] tensor; the same values
    (indices may differ only among equal values).

    On CPU torch's top-k costs several ns per element, more than half the encoder matmul at
    d_in = 256. Two stages instead: the maxima of column groups {g, g + G, g + 2G, ...}
    (one vectorised reduction), the k groups with the largest maxima, and the top k of their
    k · 8 columns. Exact: an element outside those groups is ≤ its group's maximum ≤ each of
    the k chosen maxima, so at least k candidates are ≥ it.
    """
    batch, n = pre.shape
    s = _TOPK_GROUP
    if pre.is_cuda or n % s or n // s < 4 * k or not pre.is_contiguous():
        return pre.topk(k, dim=1, sorted=True)
    G = n // s
    groups = pre.view(batch, s, G).amax(dim=1).topk(k, dim=1, sorted=False).indices
    cols = (groups.unsqueeze(2) + torch.arange(0, n, G, device=pre.device)).view(batch, k * s)
    values, j = pre.gather(1, cols).topk(k, dim=1, sorted=True)
    return values, cols.gather(1, j)


def latent_token_matrix(
    indices: torch.Tensor, coef: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR matrix S [n_latents, batch] with S[indices[b, j], b] = coef[b, j], and the
    permutation `order` such that S.values() == coef.reshape(-1)[order].

    `S @ rows` ([batch, d] -> [n_latents, d]) scatters each token's row, weighted, into the
    latents it activated. Each row of `indices` must hold distinct latents (TopK output).
    """
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: token order within a latent's row
    counts = torch.bincount(flat, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, dim=0, out=crow[1:])
    cols = torch.div(order, k, rounding_mode="floor")
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        S = torch.sparse_csr_tensor(
            crow, cols, coef.reshape(-1)[order], size=(n_latents, batch), check_invariants=False
        )
    return S, order


def scatter_outer(
    indices: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """out[l] = Σ_{(b,j): indices[b,j]=l} coef[b,j] · rows[b]   -> [n_latents, d] (dense)."""
    if indices.numel() == 0:
        return rows.new_zeros(n_latents, rows.shape[1])
    S, _ = latent_token_matrix(indices, coef.to(rows.dtype), n_latents)
    return S @ rows


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
        out[order] = sampled.values()
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xc = x - b_dec
        pre = encoder_matmul(xc, W_enc, b_enc)
        values, indices = topk_rows(pre, k)
        if dead is not None and k_aux > 0:
            aux_values = pre.index_select(1, dead)
            if k_aux < dead.numel():
                aux_values, aux_local = aux_values.topk(k_aux, dim=1, sorted=False)
            else:  # every dead latent is kept: no selection needed
                aux_local = torch.arange(k_aux, device=dead.device).expand_as(aux_values)
        else:
            dead = indices.new_zeros(0)
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_local = indices.new_zeros(x.shape[0], 0)
        del pre
        ctx.save_for_backward(xc, W_enc, indices, aux_local, dead)
        ctx.mark_non_differentiable(indices, aux_local)
        return values, indices, aux_values, aux_local

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_values: torch.Tensor,
        _g_indices: torch.Tensor | None,
        g_aux: torch.Tensor,
        _g_aux_local: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        xc, W_enc, indices, aux_local, dead = ctx.saved_tensors  # type: ignore[attr-defined]
        n_latents = W_enc.shape[0]
        xc = xc.to(W_enc.dtype)
        g_values, g_aux = g_values.to(W_enc.dtype), g_aux.to(W_enc.dtype)
        g_lat = torch.zeros(n_latents, dtype=W_enc.dtype, device=W_enc.device)
        g_lat.index_add_(0, indices.reshape(-1), g_values.reshape(-1))
        grad_W = scatter_outer(indices, g_values, xc, n_latents)
        # The AuxK part separately: a dead latent may be in both sets for one token.
        if aux_local.numel() and use_compact(aux_local.numel(), xc.shape[0], dead.numel()):
            G = torch.zeros(xc.shape[0], dead.numel(), dtype=W_enc.dtype, device=W_enc.device)
            G.scatter_(1, aux_local, g_aux)
            g_lat.index_add_(0, dead, G.sum(dim=0))
            # `dead` holds distinct ids: gather, add, write back (index_add_ is serial on CPU).
            grad_W.index_copy_(0, dead, grad_W.index_select(0, dead).add_(G.t() @ xc))
        elif aux_local.numel():
            aux_indices = dead[aux_local]
            g_lat.index_add_(0, aux_indices.reshape(-1), g_aux.reshape(-1))
            grad_W += scatter_outer(aux_indices, g_aux, xc, n_latents)
        grad_b_dec = -(g_lat @ W_enc)
        return None, grad_W, g_lat, grad_b_dec, None, None, None


class SparseDecode(Function):
    """(values [batch, k], indices [batch, k], W_dec) -> Σ_j values[:, j] W_dec[indices[:, j]]."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor
    ) -> torch.Tensor:
        values = values.to(W_dec.dtype)
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        values, indices, W_dec = ctx.saved_tensors  # type: ignore[attr-defined]
        g_out = g_out.to(W_dec.dtype).contiguous()
        csr = latent_token_matrix(indices, values, W_dec.shape[0])
        grad_values = gathered_dot(indices, W_dec, g_out, csr) if ctx.needs_input_grad[0] else None
        grad_W = csr[0] @ g_out
        return grad_values, None, grad_W


class CompactDecode(Function):
    """Like SparseDecode for entries confined to a few latents `support`: `local` [batch, k]
    are positions in `support`. Dense over those latents only: Z [batch, len(support)]."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        values: torch.Tensor,
        local: torch.Tensor,
        support: torch.Tensor,
        W_dec: torch.Tensor,
    ) -> torch.Tensor:
        Z = torch.zeros(values.shape[0], support.numel(), dtype=W_dec.dtype, device=W_dec.device)
        Z.scatter_(1, local, values.to(W_dec.dtype))
        W_s = W_dec.index_select(0, support)
        ctx.save_for_backward(Z, local, support, W_s)
        ctx.n_latents = W_dec.shape[0]  # type: ignore[attr-defined]
        return Z @ W_s

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        Z, local, support, W_s = ctx.saved_tensors  # type: ignore[attr-defined]
        g_out = g_out.to(W_s.dtype)
        grad_values = (g_out @ W_s.t()).gather(1, local) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros(ctx.n_latents, W_s.shape[1], dtype=W_s.dtype, device=W_s.device)  # type: ignore[attr-defined]
        grad_W.index_copy_(0, support, Z.t() @ g_out)  # support ids are distinct
        return grad_values, None, None, grad_W


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Typed wrapper of `TopKEncode.apply`."""
    return TopKEncode.apply(x, W_enc, b_enc, b_dec, k, dead, k_aux)  # type: ignore[no-any-return]


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    support: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_j values[:, j] · W_dec[latent(b, j)] (no b_dec added).

    Without `support`, `indices` are latent ids. With `support` (sorted latent ids), they are
    positions in it, and the dense-over-support kernels run when that is cheaper."""
    if support is None:
        return SparseDecode.apply(values, indices, W_dec)  # type: ignore[no-any-return]
    if use_compact(indices.numel(), indices.shape[0], support.numel()):
        return CompactDecode.apply(values, indices, support, W_dec)  # type: ignore[no-any-return]
    return SparseDecode.apply(values, support[indices], W_dec)  # type: ignore[no-any-return]
