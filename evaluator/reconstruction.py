"""Reconstruction metrics on the evaluated tokens: the training metric (normalized MSE), the
explained variance in the raw space, L0, dead latents and the latent density histogram.

Sums are accumulated batch by batch (float64 where they are large), so any number of tokens
can be evaluated in constant memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saestream.consumer.sae import SparseAutoencoder

DENSITY_BIN_EDGES = [x / 2 for x in range(-16, 1)]
"""log10 firing-frequency bin edges: −8, −7.5, …, 0 (16 bins). Frequencies below 1e-8 count in
the first bin; latents that never fire are counted apart (`never_fired`)."""


class Reconstruction(NamedTuple):
    """One SAE pass over raw activations x [n, d_in]."""

    normalized_x: torch.Tensor
    """x in the SAE's space (after `input_normalization`) [n, d_in]."""
    normalized_x_hat: torch.Tensor
    """The reconstruction in that space, b_dec included [n, d_in]."""
    x_hat: torch.Tensor
    """The reconstruction mapped back to the raw space [n, d_in]: what is spliced in."""
    values: torch.Tensor
    """Kept latents' values, ReLU applied [n, k]."""
    indices: torch.Tensor
    """Kept latents' ids [n, k]."""


def reconstruct(sae: SparseAutoencoder, x: torch.Tensor, k: int) -> Reconstruction:
    """Encode raw activations x [n, d_in] with the top `k` latents (any k ≤ n_latents: the
    progressive codes use k′ ≠ the trained k) and decode them."""
    return reconstruct_many(sae, x, [k])[k]


def reconstruct_many(
    sae: SparseAutoencoder, x: torch.Tensor, ks: list[int]
) -> dict[int, Reconstruction]:
    """`reconstruct` at every k of `ks`, sharing the normalisation, the encoder matmul and one
    sorted top-max(ks): the top k′ are its first k′ columns (ties aside, what a top-k′ of its
    own would pick)."""
    xn, stats = sae.normalize(x.to(sae.W_dec.dtype))
    top_values, top_indices = sae.encode(xn, max(ks))  # sorted, ReLU applied
    out = {}
    for k in ks:
        values, indices = top_values[:, :k], top_indices[:, :k]
        xn_hat = sae.decode(values, indices)
        out[k] = Reconstruction(xn, xn_hat, sae.denormalize(xn_hat, stats), values, indices)
    return out


class Moments:
    """Σx and Σ‖x‖² over rows, for Σ‖x − x̄‖² (x̄ = the mean of every row added)."""

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.sq = 0.0
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """:param x: [n, d]."""
        xd = x.double()
        self.sum += xd.sum(dim=0)
        self.sq += float(xd.pow(2).sum())
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        """x̄ [d] (float64)."""
        return self.sum / max(self.n, 1)

    def sst(self) -> float:
        """Σ‖x − x̄‖²."""
        return self.sq - float(self.sum.pow(2).sum()) / max(self.n, 1)


def sse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ‖a − b‖² over rows of two [n, d] tensors."""
    return float((a - b).pow(2).sum(dtype=torch.float64))


def ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


class ReconstructionSums:
    """What the reconstruction group accumulates for one SAE over the evaluated tokens."""

    def __init__(self, n_latents: int, d_in: int, device: torch.device | str) -> None:
        self.normalized = Moments(d_in, device)
        """Moments of the normalised input: the denominator of normalized MSE."""
        self.sse_normalized = 0.0
        self.sse_raw = 0.0
        self.l0 = 0
        self.fired = torch.zeros(n_latents, dtype=torch.int64, device=device)
        """Per latent: tokens on which it was among the top k with a positive value."""

    def add(self, x: torch.Tensor, r: Reconstruction) -> None:
        """:param x: raw activations [n, d_in]; `r` their reconstruction at the trained k."""
        self.sse_normalized += sse(r.normalized_x, r.normalized_x_hat)
        self.sse_raw += sse(x.to(r.x_hat.dtype), r.x_hat)
        active = r.values > 0
        self.l0 += int(active.sum())
        self.fired.index_add_(0, r.indices[active], torch.ones_like(r.indices[active]))

    def result(self, raw: Moments) -> dict[str, object]:
        """The group's fields; `raw` holds the moments of the same tokens in the raw space."""
        n = max(self.normalized.n, 1)
        freq = self.fired.double().cpu() / n
        return {
            "normalized_mse": ratio(self.sse_normalized, self.normalized.sst()),
            "explained_variance": 1.0 - ratio(self.sse_raw, raw.sst()),
            "l0": self.l0 / n,
            "dead_fraction": float((self.fired == 0).double().mean()),
            "density_histogram": density_histogram(freq),
        }


def density_histogram(freq: torch.Tensor) -> dict[str, object]:
    """Histogram of log10(firing frequency) over latents, fixed bins (`DENSITY_BIN_EDGES`).

    :param freq: [n_latents] fraction of evaluated tokens each latent fired on.
    """
    edges = DENSITY_BIN_EDGES
    alive = freq[freq > 0]
    logs = alive.log10().clamp(edges[0], edges[-1])
    counts = torch.histc(logs.float(), bins=len(edges) - 1, min=edges[0], max=edges[-1])
    return {
        "log10_bin_edges": edges,
        "counts": [int(c) for c in counts.tolist()],
        "never_fired": int((freq == 0).sum()),
    }
