"""The TopK sparse autoencoder of Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

Plain PyTorch, no I/O:  z = ReLU(TopK(W_enc (x − b_dec) + b_enc)),  x̂ = z W_dec + b_dec,
on inputs normalised by a recorded `input_normalization`. `forward` is the one training
forward: the reconstruction, the kept latents, and the extra reconstructions the losses need
(AuxK over dead latents, Multi-TopK), on the sparse fast path of `consumer/sparse_ops.py` or
the dense reference. The loss arithmetic, the optimiser and the bookkeeping live in
`consumer/trainer.py`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saestream.consumer import cpu_kernels
from saestream.consumer.sparse_ops import (
    DecodeTerm,
    LatentPattern,
    decode,
    encoder_matmul,
    topk_encode,
    topk_rows,
)

INPUT_NORMALIZATIONS = ("none", "layer_norm", "scalar")
MAX_WEIGHTS = 1 << 48
"""The most weights one of an SAE's matrices may hold (1 PiB of float32, far beyond any
machine; the memory checks refuse far less): a larger size is a typo or a hostile file,
refused before torch sees it (it would overflow its size arithmetic, or fail with a page
of C++ stack trace)."""
LAYER_NORM_EPS = 1e-5
"""Added to the per-token standard deviation that `layer_norm` divides by. The way back
multiplies by the standard deviation alone: that is OpenAI's released SAEs' `LN` and
SAELens' `layer_norm`, so imported and exported SAEs reconstruct exactly as there."""


@dataclass
class SAEConfig:
    d_in: int | None = None
    """Width of the activations the SAE reads (the model's d_model at the hook); None until
    known (the consumer learns it from the hook's first message)."""
    n_latents: int = 16384
    """Number of latents (dictionary size)."""
    k: int = 32
    """Latents kept per token by TopK (the L0 target)."""
    multi_topk: bool = False
    """Also train on the top 4k latents: loss L(k) + L(4k)/8 (Gao et al., section 5.3)."""
    input_normalization: str = "layer_norm"
    """`none`; `layer_norm` (per token: (x − mean) / (unbiased std + 1e-5), no affine, as
    OpenAI's released GPT-2 SAEs); or `scalar` (x · c, one constant c estimated once from the
    first training sample so that E‖x‖² = d_in)."""

    def validate(self) -> None:
        """Raise ValueError for a configuration no SAE can have (d_in may still be None)."""
        for key in ("d_in", "n_latents", "k"):
            value = getattr(self, key)
            if value is None and key == "d_in":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{key} must be a whole number, got {value!r}")
        if self.d_in is not None and self.d_in < 1:
            raise ValueError(f"d_in must be positive, got {self.d_in}")
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if self.n_latents * (self.d_in or 1) > MAX_WEIGHTS:
            raise ValueError(
                f"n_latents {self.n_latents} × d_in {self.d_in or 1} is more than the "
                f"{MAX_WEIGHTS:,} weights a matrix of the SAE can have"
            )
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"need 1 <= k <= n_latents ({self.n_latents}), got k={self.k}")
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise ValueError(f"multi_topk needs 4k <= n_latents, got 4*{self.k} > {self.n_latents}")
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(
                f"input_normalization must be one of {', '.join(INPUT_NORMALIZATIONS)}, "
                f"got {self.input_normalization!r}"
            )
        if self.input_normalization == "layer_norm" and self.d_in == 1:
            raise ValueError("input_normalization layer_norm needs d_in >= 2 (the standard "
                             "deviation of one value is undefined); use none or scalar")


class NormStats(NamedTuple):
    """What `normalize` removed from each token, so `denormalize` can put it back."""

    shift: torch.Tensor | None
    """Subtracted before scaling (shape [batch, 1]), or None."""
    scale: torch.Tensor | float
    """What `denormalize` multiplies by (shape [batch, 1], or one float): for `layer_norm` the
    standard deviation without the epsilon `normalize` divided by (see LAYER_NORM_EPS)."""


class ForwardOutput(NamedTuple):
    """What one forward pass computes. `normalized_*` tensors are in the SAE's own space (after
    `input_normalization`), where the training losses are measured."""

    x_hat: torch.Tensor | None
    """Reconstruction in the raw input space (shape [batch, d_in]); None from a forward asked
    not to map back (`map_back=False`: training measures its losses in the normalised
    space)."""
    latent_acts: torch.Tensor
    """Values of the kept latents, ReLU applied (shape [batch, k])."""
    latent_indices: torch.Tensor
    """Indices of the kept latents (shape [batch, k], int64)."""
    normalized_x: torch.Tensor
    """The input, normalised (shape [batch, d_in])."""
    normalized_x_hat: torch.Tensor
    """The reconstruction before `denormalize`, b_dec included (shape [batch, d_in])."""
    multi_topk_x_hat: torch.Tensor | None
    """Multi-TopK: the reconstruction from the top 4k latents, normalised space, b_dec
    included; None unless `multi_topk`."""
    auxk_recon: torch.Tensor | None
    """AuxK: the top-k_aux dead latents' decoding, normalised space, without b_dec (it models
    the residual x − x̂); None when no latent is dead or k_aux is 0."""


class _Decoded(NamedTuple):
    """What either path of `forward` computes, before the reconstruction is mapped back."""

    values: torch.Tensor  # [batch, k_top], ReLU applied
    indices: torch.Tensor  # [batch, k_top]
    x_hat: torch.Tensor  # top-k reconstruction, b_dec included
    x_hat_4k: torch.Tensor | None
    auxk_recon: torch.Tensor | None


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
        if cfg.d_in is None:
            raise ValueError("an SAE needs d_in")
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
            fused = cpu_kernels.layer_norm(x, LAYER_NORM_EPS)  # CPU float32: one C pass
            if fused is not None:
                xn, mu, std = fused
                return xn, NormStats(mu, std)
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            # The unbiased std from the centred values (needed anyway): on CPU a dozen times
            # faster than torch's one-pass (Welford) `x.std`, the same value up to rounding.
            std = xc.pow(2).sum(dim=-1, keepdim=True).div_(x.shape[-1] - 1).sqrt_()
            return xc / (std + LAYER_NORM_EPS), NormStats(mu, std)
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
        return encoder_matmul(x - self.b_dec, self.encoder.weight, self.encoder.bias)

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:param x: normalised input [batch, d_in].
        :return: (values [batch, k] with ReLU applied, indices [batch, k]) of the top-k latents."""
        values, indices = topk_rows(self.encode_pre_act(x), k or self.cfg.k)
        return F.relu(values), indices

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse decode: x̂ = Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec  [batch, d_in]."""
        out = F.embedding_bag(
            indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum"
        )
        return out + self.b_dec

    def forward(
        self,
        x: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        *,
        k_aux: int = 0,
        dense: bool = False,
        autocast_bf16: bool = False,
        map_back: bool = True,
    ) -> ForwardOutput:
        """Normalise, encode, decode, map back; with the extra reconstructions training needs.

        :param x: raw activations [batch, d_in].
        :param dead_mask: bool [n_latents], the latents AuxK may use (None = no AuxK).
        :param k_aux: how many of the dead latents AuxK keeps per token (capped by how many
            are dead; 0 = no AuxK).
        :param dense: the dense reference path (every latent materialised) instead of the
            sparse fast path; both give the same values and gradients up to rounding.
        :param autocast_bf16: run this forward under bf16 autocast (CUDA only): the encoder
            matmul and the dense decodes (AuxK's over the dead latents; the dense path's)
            in bf16, the top-k values and sparse decodes in fp32.
        :param map_back: map the reconstruction back to the raw space (`x_hat`); training
            does not need it (two passes over [batch, d_in] saved).
        """
        xn, stats = self.normalize(x.to(self.W_dec.dtype))
        k = self.cfg.k
        k_top = 4 * k if self.cfg.multi_topk else k
        dead = None if dead_mask is None else dead_mask.nonzero().squeeze(1)
        k_aux = min(k_aux, 0 if dead is None else int(dead.numel()))
        amp: Any = contextlib.nullcontext()
        if autocast_bf16 and xn.is_cuda:
            amp = torch.autocast("cuda", dtype=torch.bfloat16)
        path = self._dense if dense else self._sparse
        with amp:
            vals, idx, x_hat, x_hat_4k, aux = path(xn, k, k_top, dead if k_aux else None, k_aux)
        return ForwardOutput(
            x_hat=self.denormalize(x_hat, stats) if map_back else None,
            latent_acts=vals[:, :k],
            latent_indices=idx[:, :k],
            normalized_x=xn,
            normalized_x_hat=x_hat,
            multi_topk_x_hat=x_hat_4k,
            auxk_recon=aux,
        )

    def _sparse(
        self, xn: torch.Tensor, k: int, k_top: int, dead: torch.Tensor | None, k_aux: int
    ) -> _Decoded:
        """The fast path: one dense matmul, then only the kept latents are touched. The
        CSR pattern of the kept ids is built once, for both backward passes that need it."""
        pattern = LatentPattern()
        pre_top, idx, pre_aux, idx_aux = topk_encode(
            xn,
            self.encoder.weight,
            self.encoder.bias,
            self.b_dec,
            k_top,
            dead,
            k_aux,
            pattern,
            aux_relu=True,  # the AuxK values pass through the ReLU below
        )
        vals = F.relu(pre_top.float())
        # One decoder node for all reconstructions: one W_dec gradient.
        terms = [DecodeTerm(vals[:, :k], idx[:, :k], pattern=pattern if k_top == k else None)]
        if k_top > k:
            terms.append(DecodeTerm(vals, idx, pattern=pattern))
        if k_aux:
            terms.append(DecodeTerm(F.relu(pre_aux.float()), idx_aux, support=dead))
        outs = decode(self.W_dec, terms)
        x_hat = outs[0] + self.b_dec
        x_hat_4k = outs[1] + self.b_dec if k_top > k else None
        aux = outs[-1] if k_aux else None
        return _Decoded(vals, idx, x_hat, x_hat_4k, aux)

    def _dense(
        self, xn: torch.Tensor, k: int, k_top: int, dead: torch.Tensor | None, k_aux: int
    ) -> _Decoded:
        """The reference: every latent materialised as a [batch, n_latents] matrix."""
        pre = self.encode_pre_act(xn).float()  # the sparse path's values, bit for bit
        pre_top, idx = pre.topk(k_top, dim=1, sorted=True)
        vals = F.relu(pre_top)

        def decode(v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(pre).scatter(1, i, v) @ self.W_dec

        x_hat = decode(vals[:, :k], idx[:, :k]) + self.b_dec
        x_hat_4k = decode(vals, idx) + self.b_dec if k_top > k else None
        aux = None
        if k_aux:
            live = torch.ones(pre.shape[1], dtype=torch.bool, device=pre.device)
            live[dead] = False
            aux_v, aux_i = pre.masked_fill(live, float("-inf")).topk(k_aux, dim=1)
            aux = decode(F.relu(aux_v), aux_i)
        return _Decoded(vals, idx, x_hat, x_hat_4k, aux)
