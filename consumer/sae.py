"""The TopK sparse autoencoder of Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

Plain PyTorch, no I/O:  z = ReLU(TopK(encoder(x − b_dec))),  x̂ = z W_dec + b_dec,
on inputs normalised by a recorded `input_normalization`. Training (losses, the sparse
backward, the optimiser) lives in `consumer/trainer.py` and `consumer/sparse_ops.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

INPUT_NORMALIZATIONS = ("none", "layer_norm", "scalar")
LAYER_NORM_EPS = 1e-5


@dataclass
class SAEConfig:
    d_in: int
    """Width of the activations the SAE reads (the model's d_model at the hook)."""
    n_latents: int
    """Number of latents (dictionary size)."""
    k: int
    """Latents kept per token by TopK (the L0 target)."""
    multi_topk: bool = False
    """Also train on the top 4k latents: loss L(k) + L(4k)/8 (Gao et al., section 5.3)."""
    input_normalization: str = "layer_norm"
    """`none`; `layer_norm` (per token: (x − mean) / (unbiased std + 1e-5), no affine, as
    OpenAI's released GPT-2 SAEs); or `scalar` (x · c, one constant c estimated once from the
    first training sample so that E‖x‖² = d_in)."""

    def validate(self) -> None:
        """Raise ValueError for a configuration no SAE can have."""
        if self.d_in < 1 or self.n_latents < 1:
            raise ValueError("d_in and n_latents must be positive")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k must be in 1..n_latents ({self.n_latents}), got {self.k}")
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise ValueError(f"multi_topk needs 4k <= n_latents, got 4*{self.k} > {self.n_latents}")
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(
                f"input_normalization must be one of {', '.join(INPUT_NORMALIZATIONS)}, "
                f"got {self.input_normalization!r}"
            )


class NormStats(NamedTuple):
    """What `normalize` removed from each token, so `denormalize` can put it back."""

    shift: torch.Tensor | None
    """Subtracted before scaling (shape [batch, 1]), or None."""
    scale: torch.Tensor | float
    """Divisor applied after the shift (shape [batch, 1], or one float)."""


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """Reconstruction in the raw input space (shape [batch, d_in])."""
    latent_acts: torch.Tensor
    """Values of the kept latents, ReLU applied (shape [batch, k])."""
    latent_indices: torch.Tensor
    """Indices of the kept latents (shape [batch, k], int64)."""


class SparseAutoencoder(nn.Module):
    """Parameters: `encoder.weight` [n_latents, d_in], `encoder.bias` [n_latents],
    `W_dec` [n_latents, d_in] (unit-norm rows), `b_dec` [d_in]."""

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.n_latents, device=device)
        self.W_dec = nn.Parameter(torch.empty(cfg.n_latents, cfg.d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        # For `scalar` normalisation: x_norm = x * input_scale. Set once by the trainer from
        # the first sample (`set_input_scale`) and recorded in the checkpoint's cfg.json.
        self.input_scale: float | None = None
        if self.W_dec.is_meta:  # shapes only (e.g. to be loaded with `to_empty`): no init
            return
        with torch.no_grad():
            w = torch.randn(cfg.n_latents, cfg.d_in, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()

    # -- input normalisation ---------------------------------------------------------------

    def set_input_scale(self, sample: torch.Tensor) -> float:
        """Estimate the `scalar` constant c from a sample [n, d_in], so that E‖c·x‖² = d_in."""
        mean_sq = float(sample.double().pow(2).sum(dim=1).mean())
        self.input_scale = math.sqrt(self.cfg.d_in / mean_sq) if mean_sq > 0 else 1.0
        return self.input_scale

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormStats]:
        """Raw activations [batch, d_in] -> the space the SAE works in, and what was removed."""
        mode = self.cfg.input_normalization
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            # The unbiased std from the centred values (needed anyway): on CPU a dozen times
            # faster than torch's one-pass (Welford) `x.std`, the same value up to rounding.
            std = xc.pow(2).sum(dim=-1, keepdim=True).div_(x.shape[-1] - 1).sqrt_()
            std = std.add_(LAYER_NORM_EPS)
            return xc / std, NormStats(mu, std)
        if mode == "scalar":
            if self.input_scale is None:
                raise RuntimeError("scalar input normalisation needs set_input_scale() first")
            return x * self.input_scale, NormStats(None, 1.0 / self.input_scale)
        return x, NormStats(None, 1.0)

    @staticmethod
    def denormalize(x: torch.Tensor, stats: NormStats) -> torch.Tensor:
        """Map a reconstruction from the SAE's space back to the raw space."""
        x = x * stats.scale
        return x if stats.shift is None else x + stats.shift

    # -- the model ---------------------------------------------------------------------------

    def encode_pre_act(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: normalised input [batch, d_in]. :return: pre-activations [batch, n_latents]."""
        return self.encoder(x - self.b_dec)

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:param x: normalised input [batch, d_in].
        :return: (values [batch, k] with ReLU applied, indices [batch, k]) of the top-k latents."""
        values, indices = self.encode_pre_act(x).topk(k or self.cfg.k, dim=-1, sorted=True)
        return F.relu(values), indices

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse decode: x̂ = Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec  [batch, d_in]."""
        out = F.embedding_bag(
            indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum"
        )
        return out + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """:param x: raw activations [batch, d_in]. Normalise, encode, decode, map back."""
        xn, stats = self.normalize(x.to(self.W_dec.dtype))
        values, indices = self.encode(xn)
        return ForwardOutput(self.denormalize(self.decode(values, indices), stats), values, indices)
