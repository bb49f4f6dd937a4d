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

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# Rows of the gathered [chunk, k, d_in] block in the ∂v computation: bounded memory on CPU.
_GATHER_CHUNK = 512


def latent_token_matrix(indices: torch.Tensor, coef: torch.Tensor, n_latents: int) -> torch.Tensor:
    """CSR matrix S [n_latents, batch] with S[indices[b, j], b] += coef[b, j].

    `S @ rows` ([batch, d] -> [n_latents, d]) scatters each token's row, weighted, into the
    latents it activated; duplicate (latent, token) pairs add up as they should.
    """
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, dim=0, out=crow[1:])
    cols = torch.div(order, k, rounding_mode="floor")
    return torch.sparse_csr_tensor(
        crow, cols, coef.reshape(-1)[order], size=(n_latents, batch), check_invariants=False
    )


def scatter_outer(
    indices: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """out[l] = Σ_{(b,j): indices[b,j]=l} coef[b,j] · rows[b]   -> [n_latents, d] (dense)."""
    if indices.numel() == 0:
        return rows.new_zeros(n_latents, rows.shape[1])
    coef = coef.to(rows.dtype)
    return latent_token_matrix(indices, coef, n_latents) @ rows


def gathered_dot(indices: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[b, j] = rows[b] · weight[indices[b, j]]   -> [batch, k]."""
    out = rows.new_empty(indices.shape)
    step = indices.shape[0] if rows.is_cuda else _GATHER_CHUNK
    for s in range(0, indices.shape[0], step):
        w = F.embedding(indices[s : s + step], weight)  # [chunk, k, d]
        out[s : s + step] = torch.bmm(w, rows[s : s + step, :, None].to(w.dtype)).squeeze(-1)
    return out


class TopKEncode(Function):
    """(x, W_enc, b_enc, b_dec) -> (values, indices, aux_values, aux_indices), values pre-ReLU.

    `dead` (int64 latent ids, or None) restricts the AuxK selection; `k_aux` is already capped
    at len(dead). Gradients flow to W_enc, b_enc and b_dec, never to x.
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
        pre = F.linear(xc, W_enc, b_enc)  # the one dense matmul; runs in bf16 under autocast
        values, indices = pre.topk(k, dim=1, sorted=True)
        if dead is not None and k_aux > 0:
            aux_values, j = pre.index_select(1, dead).topk(k_aux, dim=1, sorted=False)
            aux_indices = dead[j]
        else:
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        del pre
        ctx.save_for_backward(xc, W_enc, indices, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_values: torch.Tensor,
        _g_indices: torch.Tensor | None,
        g_aux: torch.Tensor,
        _g_aux_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        xc, W_enc, indices, aux_indices = ctx.saved_tensors  # type: ignore[attr-defined]
        n_latents = W_enc.shape[0]
        idx = torch.cat([indices, aux_indices], dim=1)
        g = torch.cat([g_values, g_aux], dim=1).to(W_enc.dtype)
        g_lat = torch.zeros(n_latents, dtype=W_enc.dtype, device=W_enc.device)
        g_lat.index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_W = scatter_outer(idx, g, xc.to(W_enc.dtype), n_latents)
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
        grad_values = gathered_dot(indices, W_dec, g_out) if ctx.needs_input_grad[0] else None
        grad_W = scatter_outer(indices, values, g_out, W_dec.shape[0])
        return grad_values, None, grad_W


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


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Typed wrapper of `SparseDecode.apply` (no b_dec added)."""
    return SparseDecode.apply(values, indices, W_dec)  # type: ignore[no-any-return]
