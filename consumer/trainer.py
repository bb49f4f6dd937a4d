"""Training a TopK SAE: losses (normalised MSE, AuxK, Multi-TopK), Adam, decoder constraints,
dead-latent bookkeeping. One `Trainer` per SAE; the daemon and `saestream train` feed it
batches of raw activations through `train_step`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from saestream.consumer.geometric_median import geometric_median
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.consumer.sparse_ops import encoder_matmul, sparse_decode, topk_encode

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10
# Rows of the first sample used for b_dec's geometric median and the normalisation constants.
INIT_SAMPLE_ROWS = 8192


@dataclass
class TrainerConfig:
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(n_latents / 2^14) (Gao et al.)."""
    k_aux: int = 512
    """Dead latents that reconstruct the residual in the AuxK loss (capped by how many are dead)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired in this many training tokens."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None = no clipping."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); the
    saved `sae.safetensors` then holds the EMA weights. None = off."""
    sparse: bool = True
    """Sparse fast path (True) or the dense reference implementation (False)."""
    autocast_bf16: bool = False
    """Run the encoder matmul under bf16 autocast (CUDA only; ignored on CPU)."""
    seed: int = 0
    """Seed of the decoder initialisation."""

    def validate(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.k_aux < 0:
            raise ValueError(f"k_aux must be >= 0, got {self.k_aux}")
        if self.dead_tokens < 1:
            raise ValueError(f"dead_tokens must be >= 1, got {self.dead_tokens}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


def default_lr(n_latents: int) -> float:
    """2e-4 / sqrt(n_latents / 2^14): the learning-rate scaling of Gao et al."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


class StepMetrics(NamedTuple):
    loss: float
    """Total loss minimised this step: main + auxk_coef · AuxK (+ Multi-TopK / 8)."""
    normalized_mse: float
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over this batch, in the normalised space (FVU)."""
    dead_fraction: float
    """Fraction of latents not fired in the last `dead_tokens` tokens (after this step)."""
    l0: float
    """Mean number of latents with a positive value per token (at most k)."""
    auxk_loss: float
    """AuxK loss before its coefficient (0 when no latent is dead)."""
    multi_topk_loss: float
    """L(4k): MSE of the top-4k reconstruction over the initial constant (0 when off)."""
    sse: float
    """Σ‖x − x̂‖² over this batch (normalised space)."""
    sst: float
    """Σ‖x − x̄‖² over this batch (normalised space), x̄ the batch mean."""
    tokens: int
    """Tokens in this batch."""


class _Losses(NamedTuple):
    total: torch.Tensor
    main: torch.Tensor
    auxk: torch.Tensor
    multi_topk: torch.Tensor
    sse: torch.Tensor
    sst: torch.Tensor
    l0: torch.Tensor
    fired: torch.Tensor  # int64 latent ids among the top k with value > 0 (may repeat)


class Trainer:
    """Owns one SAE, its optimiser and its training state.

    Attributes: `name`, `hook`, `model`, `sae`, `sae_cfg`, `cfg`, `step` (optimizer steps taken),
    `tokens_seen`, `initialized`, `mse_scale` (the constant the main loss is divided by),
    `tokens_since_fired` (int64 [n_latents]).
    """

    def __init__(
        self,
        sae_cfg: SAEConfig,
        cfg: TrainerConfig,
        *,
        name: str,
        hook: str,
        model: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        sae_cfg.validate()
        cfg.validate()
        self.sae_cfg = sae_cfg
        self.cfg = cfg
        self.name = name
        self.hook = hook
        self.model = model
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.sae = SparseAutoencoder(sae_cfg, generator=self.generator).to(self.device)
        self.lr = cfg.lr if cfg.lr is not None else default_lr(sae_cfg.n_latents)
        self.optimizer = _adam(list(self.sae.parameters()), self.lr)
        self.ema: list[torch.Tensor] | None = None
        if cfg.ema_decay is not None:
            self.ema = [p.detach().clone() for p in self.sae.parameters()]
        self.step = 0
        self.tokens_seen = 0
        self.initialized = False
        self.mse_scale = 1.0
        self.tokens_since_fired = torch.zeros(
            sae_cfg.n_latents, dtype=torch.int64, device=self.device
        )

    # -- initialisation ------------------------------------------------------------------------

    def initialize(self, sample: torch.Tensor) -> None:
        """From the first sample [n, d_in] of raw activations: the `scalar` input constant,
        b_dec = geometric median, and the main loss's constant (MSE of predicting the sample
        mean). Does nothing when already initialised."""
        if self.initialized:
            return
        x = self._check_input(sample)[:INIT_SAMPLE_ROWS]
        with torch.no_grad():
            if self.sae_cfg.input_normalization == "scalar":
                self.sae.set_input_scale(x)
            xn, _ = self.sae.normalize(x)
            self.sae.b_dec.copy_(geometric_median(xn))
            if self.ema is not None:
                self.ema[list(dict(self.sae.named_parameters())).index("b_dec")].copy_(
                    self.sae.b_dec
                )
            mse = float((xn - xn.mean(dim=0)).pow(2).mean())
            self.mse_scale = mse if mse > 0 else 1.0
        self.initialized = True

    # -- training --------------------------------------------------------------------------------

    def dead_mask(self) -> torch.Tensor:
        """bool [n_latents]: latents that have not fired in the last `dead_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> _Losses:
        """Forward pass and losses on a normalised batch [batch, d_in] (graph kept for backward).

        :param dead: int64 ids of the dead latents for AuxK (None or empty = no AuxK).
        """
        cfg, sae = self.cfg, self.sae
        k = self.sae_cfg.k
        k_top = 4 * k if self.sae_cfg.multi_topk else k
        k_aux = min(cfg.k_aux, 0 if dead is None else int(dead.numel()))
        use_autocast = cfg.autocast_bf16 and x.is_cuda
        ctx: Any = contextlib.nullcontext()
        if use_autocast:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16)
        W_enc, b_enc, W_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
        if cfg.sparse:
            with ctx:
                pre_top, idx_top, pre_aux, idx_aux = topk_encode(
                    x, W_enc, b_enc, b_dec, k_top, dead if k_aux else None, k_aux
                )
            vals_top = F.relu(pre_top.float())
            x_hat = sparse_decode(vals_top[:, :k], idx_top[:, :k], W_dec) + b_dec
            x_hat_4k = sparse_decode(vals_top, idx_top, W_dec) + b_dec if k_top > k else None
            aux_recon = None
            if k_aux:
                aux_recon = sparse_decode(F.relu(pre_aux.float()), idx_aux, W_dec, support=dead)
        else:
            with ctx:
                if x.is_cuda:
                    pre = (x - b_dec) @ W_enc.t() + b_enc
                else:  # the sparse path's addmm: both rank latents on identical values
                    pre = encoder_matmul(x - b_dec, W_enc, b_enc)
            pre = pre.float()
            pre_top, idx_top = pre.topk(k_top, dim=1, sorted=True)
            vals_top = F.relu(pre_top)
            z = torch.zeros_like(pre).scatter(1, idx_top[:, :k], vals_top[:, :k])
            x_hat = z @ W_dec + b_dec
            x_hat_4k = None
            if k_top > k:
                x_hat_4k = torch.zeros_like(pre).scatter(1, idx_top, vals_top) @ W_dec + b_dec
            aux_recon = None
            if k_aux:
                live = torch.ones(pre.shape[1], dtype=torch.bool, device=pre.device)
                live[dead] = False
                aux_v, aux_i = pre.masked_fill(live, float("-inf")).topk(k_aux, dim=1)
                z_aux = torch.zeros_like(pre).scatter(1, aux_i, F.relu(aux_v))
                aux_recon = z_aux @ W_dec

        err = x_hat - x
        main = err.pow(2).mean() / self.mse_scale
        total = main
        zero = x.new_zeros(())
        multi = zero
        if x_hat_4k is not None:
            multi = (x_hat_4k - x).pow(2).mean() / self.mse_scale
            total = total + multi / 8
        auxk = zero
        if aux_recon is not None:
            # Dead latents reconstruct the residual; neither side holds b_dec (x − x̂ has it
            # removed, and the aux reconstruction is decoded without it).
            e = (x - x_hat).detach()
            auxk = (aux_recon - e).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum()
            auxk = torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
            total = total + cfg.auxk_coef * auxk
        with torch.no_grad():
            sse = err.pow(2).sum()
            sst = (x - x.mean(dim=0)).pow(2).sum()
            active = vals_top[:, :k] > 0
            l0 = active.sum(dim=1).float().mean()
            fired = idx_top[:, :k][active]
        return _Losses(total, main, auxk, multi, sse, sst, l0, fired)

    def train_step(self, x: torch.Tensor) -> StepMetrics:
        """One optimiser step on a batch of raw activations [batch, d_in] (any float dtype or
        device). Initialises from this batch on first use."""
        x = self._check_input(x)
        if not self.initialized:
            self.initialize(x)
        sae = self.sae
        with torch.no_grad():
            xn, _ = sae.normalize(x)
        dead_ids = self.dead_mask().nonzero().squeeze(1)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.losses(xn, dead_ids if dead_ids.numel() else None)
        out.total.backward()
        with torch.no_grad():
            _project_decoder_grad(sae.W_dec)
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if self.ema is not None:
                torch._foreach_lerp_(
                    self.ema, [p.detach() for p in sae.parameters()], 1 - self.cfg.ema_decay
                )
            n = x.shape[0]
            self.tokens_since_fired += n
            self.tokens_since_fired[out.fired] = 0
            dead_fraction = self.dead_mask().float().mean()
        self.step += 1
        self.tokens_seen += n
        # One device->host transfer for all the numbers.
        total, l0, auxk, multi, sse, sst, dead = torch.stack(
            [
                out.total.detach(),
                out.l0,
                out.auxk.detach(),
                out.multi_topk.detach(),
                out.sse,
                out.sst,
                dead_fraction,
            ]
        ).tolist()
        return StepMetrics(
            loss=total,
            normalized_mse=sse / sst if sst > 0 else float("nan"),
            dead_fraction=dead,
            l0=l0,
            auxk_loss=auxk,
            multi_topk_loss=multi,
            sse=sse,
            sst=sst,
            tokens=n,
        )

    # -- weights and state ---------------------------------------------------------------------

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The four SAE tensors as float32 CPU tensors (the EMA weights when EMA is on)."""
        params = dict(self.sae.named_parameters())
        tensors = self.ema if self.ema is not None else list(params.values())
        return {
            n: t.detach().float().cpu().contiguous() for n, t in zip(params, tensors, strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the exported weights needed to continue training exactly
        (plain tensors, numbers, lists and dicts: loadable with torch.load(weights_only=True))."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "initialized": self.initialized,
            "mse_scale": self.mse_scale,
            "input_scale": self.sae.input_scale,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "generator": self.generator.get_state(),
        }
        if self.ema is not None:
            # The safetensors file holds the EMA weights; the raw ones live here.
            state["params"] = {n: p.detach().cpu() for n, p in self.sae.named_parameters()}
        return state

    def load_state_dict(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Inverse of (`export_weights`, `state_dict`)."""
        params = dict(self.sae.named_parameters())
        raw = state.get("params", weights) if self.ema is not None else weights
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(raw[n])
            if self.ema is not None:
                for t, n in zip(self.ema, params, strict=True):
                    t.copy_(weights[n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.initialized = bool(state["initialized"])
        self.mse_scale = float(state["mse_scale"])
        self.sae.input_scale = None if state["input_scale"] is None else float(state["input_scale"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device, torch.int64)
        self.generator.set_state(state["generator"])

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.sae_cfg.d_in:
            raise ValueError(f"expected a [batch, {self.sae_cfg.d_in}] batch, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point activations, got {x.dtype}")
        return x.to(self.device, torch.float32)


def _project_decoder_grad(W_dec: torch.Tensor) -> None:
    """Remove, per latent, the gradient component parallel to its (unit-norm) decoder row."""
    g = W_dec.grad
    if g is None:
        return
    parallel = torch.linalg.vecdot(g, W_dec, dim=1)
    g.addcmul_(parallel[:, None], W_dec, value=-1.0)


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the paper's betas and eps; the fused kernel where this torch has one (CPU
    fused Adam needs torch >= 2.4), else the multi-tensor one."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)
