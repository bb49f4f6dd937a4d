"""Training a TopK SAE: losses (normalised MSE, AuxK, Multi-TopK), Adam, decoder constraints,
dead-latent bookkeeping. One `Trainer` per SAE; the daemon and `saestream train` feed it
batches of raw activations through `train_step`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.autograd import Function
from torch.autograd.function import FunctionCtx, once_differentiable

from saestream.common.settings import ranged
from saestream.consumer import cpu_kernels, sharding
from saestream.consumer.distributed import SINGLE, DataParallel
from saestream.consumer.geometric_median import geometric_median
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.consumer.sharding import LatentShard, ShardedSAE

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10
# Rows of the first sample used for b_dec's geometric median and the normalisation constants.
INIT_SAMPLE_ROWS = 8192
MAX_SEED = 2**63 - 1
"""Largest seed of training (SAE initialisation, batch order, the consumer's buffers): torch's
generators take at most 2^64 − 1, and a consumer's buffers add their hook's index to it."""
MAX_DEAD_TOKENS = 2**62
"""More tokens than any run sees; the counters they are compared with are int64."""


@dataclass
class TrainerConfig:
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(n_latents / 2^14) (Gao et al.)."""
    k_aux: int = 512
    """Dead latents that reconstruct the residual in the AuxK loss (capped by how many are
    dead); 0 turns AuxK off."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = ranged(10_000_000, 1, MAX_DEAD_TOKENS)
    """A latent is dead when it has not fired in this many training tokens (1 to 2^62)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None = no clipping."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); the
    saved `sae.safetensors` then holds the EMA weights. None = off."""
    sparse: bool = True
    """Sparse fast path (True) or the dense reference implementation (False, for checks)."""
    autocast_bf16: bool = False
    """Run the SAE's forward under bf16 autocast (CUDA only; ignored on CPU): the encoder
    matmul and AuxK's dense decode over the dead latents in bf16, the top-k values, sparse
    decodes and losses in fp32."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seed of the decoder initialisation."""

    def validate(self) -> None:
        """Raise ValueError for settings no run can use (NaN and infinities included)."""
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.k_aux < 0:
            raise ValueError(f"k_aux must be >= 0 (0 = AuxK off), got {self.k_aux}")
        if not (math.isfinite(self.auxk_coef) and self.auxk_coef >= 0):
            raise ValueError(f"auxk_coef must be a number >= 0, got {self.auxk_coef}")
        if not 1 <= self.dead_tokens <= MAX_DEAD_TOKENS:
            raise ValueError(f"dead_tokens must be in 1..{MAX_DEAD_TOKENS} (2^62), got "
                             f"{self.dead_tokens}")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ValueError(f"grad_clip must be a positive number, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")


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
    skipped: bool = False
    """The step was skipped, the SAE left as it was: its loss was not finite (an inf or NaN
    in the batch, or values whose squares pass float32's range). The other figures are then
    NaN, except `tokens` and `dead_fraction`."""


class MSEWindow:
    """Normalized MSE over the last `steps` steps: Σ sse / Σ sst (the training metric)."""

    def __init__(self, steps: int | None = None) -> None:
        self._steps: deque[tuple[float, float]] = deque(maxlen=steps)

    def add(self, m: StepMetrics) -> None:
        self._steps.append((m.sse, m.sst))

    def value(self) -> float:
        sst = sum(s for _, s in self._steps)
        return sum(e for e, _ in self._steps) / sst if sst > 0 else float("nan")

    def clear(self) -> None:
        self._steps.clear()

    def __len__(self) -> int:
        return len(self._steps)


class Losses(NamedTuple):
    """The loss terms of one step (graph kept for backward) and the step's statistics."""

    total: torch.Tensor
    """main + auxk_coef · auxk (+ multi_topk / 8): what is minimised."""
    main: torch.Tensor
    """MSE over the initial constant `mse_scale`."""
    auxk: torch.Tensor
    multi_topk: torch.Tensor
    sse: torch.Tensor
    sst: torch.Tensor
    l0: torch.Tensor
    fired: torch.Tensor
    """int64 [n_latents]: on how many of this rank's tokens each latent was among the top k
    with a positive value."""
    xn_sums: torch.Tensor
    """float64 [d_in + 1]: Σ of the normalised rows and Σ of their squared norms (this rank's
    part of the global batch's sum of squared deviations)."""


class Trainer:
    """Owns one SAE, its optimiser and its training state.

    Attributes: `name`, `hook`, `model`, `sae`, `sae_cfg`, `cfg`, `step` (optimizer steps taken),
    `tokens_seen`, `initialized`, `mse_scale` (the constant the main loss is divided by),
    `tokens_since_fired` (int64 [n_latents]), `fired_tokens` (int64 [n_latents]: tokens each
    latent fired on, over `counted_tokens` tokens), `origin` (where given weights came from:
    see `start_from`; None for a fresh initialisation).
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
        dp: DataParallel = SINGLE,
        shard: LatentShard | None = None,
    ) -> None:
        sae_cfg.validate()
        cfg.validate()
        self.sae_cfg = sae_cfg
        self.cfg = cfg
        self.name = name
        self.hook = hook
        self.model = model
        self.device = torch.device(device)
        self.dp = dp
        """The data-parallel ranks this trainer's steps span (SINGLE: one process)."""
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.shard = shard if shard is not None and shard.size > 1 else None
        """This rank's latents when they are split over ranks (`--latent-shards`), else None."""
        self.sae: SparseAutoencoder | ShardedSAE
        if self.shard is not None:
            self.sae = ShardedSAE(sae_cfg, self.shard, generator=self.generator).to(self.device)
        else:
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
        self.fired_tokens = torch.zeros_like(self.tokens_since_fired)
        self.counted_tokens = 0
        self.skipped_steps = 0
        """Steps skipped since this process started, their loss not finite (`train_step`)."""
        self.origin: dict[str, Any] | None = None

    # -- initialisation ------------------------------------------------------------------------

    def initialize(self, sample: torch.Tensor) -> None:
        """From the first sample [n, d_in] of raw activations: the `scalar` input constant,
        b_dec = geometric median, and the main loss's constant (MSE of predicting the sample
        mean). Does nothing when already initialised. Weights given by `start_from` are kept:
        then only the loss constant comes from the sample."""
        if self.initialized:
            return
        # Every rank initialises from the same rows: the global batch's first ones.
        x = self.dp.gather_rows(self._check_input(sample))[:INIT_SAMPLE_ROWS]
        with torch.no_grad():
            if self.origin is None and self.sae_cfg.input_normalization == "scalar":
                self.sae.set_input_scale(x)
            xn, _ = self.sae.normalize(x)
            if self.origin is None:
                self.sae.b_dec.copy_(geometric_median(xn))
                if self.ema is not None:
                    self.ema[list(dict(self.sae.named_parameters())).index("b_dec")].copy_(
                        self.sae.b_dec
                    )
            mse = float((xn - xn.mean(dim=0)).pow(2).mean())
            self.mse_scale = mse if mse > 0 else 1.0
        self.initialized = True

    def start_from(
        self, weights: dict[str, torch.Tensor], input_scale: float | None, origin: dict[str, Any]
    ) -> None:
        """Begin from given weights (`--init-from`, `saestream import`) instead of a fresh
        initialisation: the four tensors and the `scalar` constant are taken as they are, the
        optimiser state and the counters stay fresh, and `origin` (a JSON-safe description of
        where the weights came from) is recorded in every snapshot's cfg.json. A decoder whose
        rows are not unit-norm is renormalised by the first training step, like any."""
        if self.sae_cfg.input_normalization == "scalar" and input_scale is None:
            raise ValueError("scalar input normalisation needs its input_scale")
        params = dict(self.sae.named_parameters())
        weights = self._local(weights)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
            if self.ema is not None:
                for t, p in zip(self.ema, params.values(), strict=True):
                    t.copy_(p)
        if self.sae_cfg.input_normalization == "scalar":
            self.sae.input_scale = input_scale
        self.origin = origin

    # -- training --------------------------------------------------------------------------------

    def dead_mask(self) -> torch.Tensor:
        """bool [n_latents]: latents that have not fired in the last `dead_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> Losses:
        """The SAE's forward on a batch of raw activations and the loss arithmetic.

        Under data parallelism `x` is this rank's part of the global batch; every normaliser
        spans the global batch (one all-reduce of the token count and the AuxK residual's
        sums), so the losses here are this rank's shares and sum to the global ones.

        :param dead_mask: bool [n_latents] of dead latents for AuxK (None = no AuxK).
        """
        cfg = self.cfg
        out = self.sae(x, dead_mask, k_aux=cfg.k_aux, dense=not cfg.sparse,
                       autocast_bf16=cfg.autocast_bf16, map_back=False)
        xn, x_hat = out.normalized_x, out.normalized_x_hat
        # The statistics in float64, from detached values (`_loss_stats`); the main loss from
        # them (`_ResidualLoss`), the others by one pass each way (`_SquaredDistance`).
        with torch.no_grad():
            # e: the residual AuxK reconstructs; its sums and xn's in float64
            e, e_sum, sse, xn_sum, xn_sq = _loss_stats(xn, x_hat)
            stats = torch.cat([e_sum.new_full((1,), e.shape[0]), e_sum, sse.view(1)])
            xn_sums = torch.cat([xn_sum, xn_sq.view(1)])
            sst = xn_sums[-1] - xn_sums[:-1].pow(2).sum() / xn.shape[0]
        self.dp.sum_([stats])
        n = stats[0]
        scale = (n * (xn.shape[1] * self.mse_scale)).to(xn.dtype)  # global tokens × d_in × c
        main = _ResidualLoss.apply(x_hat, e, sse, scale)
        total = main
        zero = xn.new_zeros(())
        multi = zero
        if out.multi_topk_x_hat is not None:
            multi = _SquaredDistance.apply(out.multi_topk_x_hat, xn, scale)
            total = total + multi / 8
        auxk = zero
        if out.auxk_recon is not None:
            # Dead latents reconstruct the residual; neither side holds b_dec (x − x̂ has it
            # removed, and the aux reconstruction is decoded without it). The normaliser is
            # the residual's squared deviation from its mean over the global batch.
            den = stats[-1] - stats[1:-1].pow(2).sum() / n
            # A residual (nearly) the same on every token — one token, a constant batch — has
            # no spread to normalise by: AuxK sits the step out (an infinite normaliser makes
            # its value and gradient 0) instead of dividing by zero, which would put NaN in
            # every weight through a loss that nan_to_num had made look finite.
            den = torch.where(den > 1e-6 * stats[-1], den, torch.full_like(den, math.inf))
            den = den.to(xn.dtype)
            auxk = _SquaredDistance.apply(out.auxk_recon, e, den)
            auxk = torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
            total = total + cfg.auxk_coef * auxk
        with torch.no_grad():
            active = out.latent_acts > 0
            l0 = active.sum().float() / active.shape[0]
            # Per-latent counts; ids of inactive slots go to a trash bin past the end.
            n_latents = self.sae_cfg.n_latents
            kept = out.latent_indices.masked_fill(~active, n_latents).view(-1)
            fired = torch.bincount(kept, minlength=n_latents + 1)[:n_latents]
        return Losses(total, main, auxk, multi, sse, sst, l0, fired, xn_sums)

    def train_step(self, x: torch.Tensor) -> StepMetrics:
        """One optimiser step on a batch of raw activations [batch, d_in] (any float dtype or
        device). Initialises from this batch on first use. Under data parallelism `x` is this
        rank's part of the global batch, and the step, the counters and the returned metrics
        are the global batch's."""
        x = self._check_input(x)
        if not self.initialized:  # its constants (mse_scale, input_scale, b_dec) last the run
            finite, n_batch = self._finite(x.pow(2).sum(), x.shape[0])
            if not finite:
                return self._skipped(n_batch)
            self.initialize(x)
        sae = self.sae
        self.optimizer.zero_grad(set_to_none=True)
        out = self.losses(x, self.dead_mask() if self.cfg.k_aux else None)
        out.total.backward()
        # Checked after backward, so that an accelerator has the backward queued behind the
        # forward while the host waits for the verdict; nothing has been changed yet.
        finite, n_batch = self._finite(out.total, x.shape[0])
        if not finite:  # one bad batch must not turn every weight into NaN for good
            self.optimizer.zero_grad(set_to_none=True)
            return self._skipped(n_batch)
        with torch.no_grad():
            self.dp.sum_grads_(list(sae.parameters()))
            if not self._step_decoder_fused():
                _project_decoder_grad(sae.W_dec)
                if self.cfg.grad_clip is not None and self.shard is not None:
                    sharding.clip_grad_norm_(sae, self.cfg.grad_clip)  # type: ignore[arg-type]
                elif self.cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
                self.optimizer.step()
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if self.ema is not None:
                torch._foreach_lerp_(
                    self.ema, [p.detach() for p in sae.parameters()], 1 - self.cfg.ema_decay
                )
            # The global batch's figures: one all-reduce (the identity in one process).
            fired = out.fired
            head = torch.stack([out.total.detach(), out.auxk.detach(), out.multi_topk.detach(),
                                out.sse, out.l0 * x.shape[0], out.l0.new_tensor(x.shape[0])])
            sums = torch.cat([head.double(), out.xn_sums, fired.double()])
            self.dp.sum_([sums])
            d = self.sae_cfg.d_in or x.shape[1]
            n_t = sums[5]
            sst_t = sums[6 + d] - sums[6:6 + d].pow(2).sum() / n_t
            fired = sums[7 + d:].round().long() if self.dp.size > 1 else fired
            self.tokens_since_fired += n_t.long()
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
            self.fired_tokens += fired
            dead_fraction = self.dead_mask().double().mean()
            # One device->host transfer for all the numbers.
            total, auxk, multi, sse, active, n_f, sst, dead = torch.cat(
                [sums[:6], sst_t.view(1), dead_fraction.view(1)]).tolist()
        n = int(n_f)
        self.counted_tokens += n
        self.step += 1
        self.tokens_seen += n
        return StepMetrics(
            loss=total,
            normalized_mse=sse / sst if sst > 0 else float("nan"),
            dead_fraction=dead,
            l0=active / n,
            auxk_loss=auxk,
            multi_topk_loss=multi,
            sse=sse,
            sst=sst,
            tokens=n,
        )

    def _skipped(self, tokens: int) -> StepMetrics:
        self.skipped_steps += 1
        nan = float("nan")
        dead = float(self.dead_mask().double().mean())
        return StepMetrics(nan, nan, dead, nan, nan, nan, nan, nan, tokens, skipped=True)

    def _finite(self, value: torch.Tensor, rows: int) -> tuple[bool, int]:
        """Whether `value` (the loss; before initialisation, the first batch's sum of
        squares) is finite on every data-parallel rank (they must agree, or the ranks that
        step would wait for the others' gradients for ever), and the global batch's token
        count: one small all-reduce (none in one process) and one read of two numbers."""
        check = torch.stack([(~torch.isfinite(value.detach())).to(torch.float64),
                             torch.tensor(float(rows), dtype=torch.float64, device=value.device)])
        self.dp.sum_([check])
        bad, n = check.tolist()
        return bad == 0, int(n)

    def _step_decoder_fused(self) -> bool:
        """The optimiser step with the decoder's projection, Adam update and renormalisation
        in one pass over its rows (`cpu_kernels.decoder_adam_`; CPU, C kernels built), the
        other parameters by the optimiser; False, with nothing done, where that kernel does
        not apply. The decoder's Adam state stays in the optimiser, as torch keeps it, so
        snapshots are the same either way. Afterwards `W_dec.grad` holds the gradient as
        backward left it (torch's path leaves it projected); optimiser step hooks see it None.

        Not used with gradient clipping (its norm is the projected gradient's), nor under
        data parallelism: each rank steps its own copy of the weights, and a rank without
        the kernel (no compiler, SAESTREAM_NATIVE=0) or built for another CPU would round
        differently from the others, and the copies drift apart."""
        W = self.sae.W_dec
        grad = W.grad
        if grad is None or self.cfg.grad_clip is not None or self.dp.size > 1:
            return False
        if not cpu_kernels.enabled() or W.device.type != "cpu":
            return False
        group = self.optimizer.param_groups[0]
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            return False  # the kernel is plain Adam, as `_adam` makes it
        state = self.optimizer.state[W]
        if not state:  # as torch.optim.Adam starts a parameter's state
            state["step"] = torch.zeros((), dtype=torch.float32, device=W.device)
            state["exp_avg"] = torch.zeros_like(W, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(W, memory_format=torch.preserve_format)
        step = float(state["step"]) + 1
        if not cpu_kernels.decoder_adam_(
            W.detach(), grad, state["exp_avg"], state["exp_avg_sq"],
            lr=float(group["lr"]), betas=group["betas"], eps=float(group["eps"]), step=step,
        ):  # fmt: skip
            return False
        state["step"].fill_(step)
        W.grad = None  # the optimiser steps the other parameters only
        self.optimizer.step()
        W.grad = grad
        return True

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
            "fired_tokens": self.fired_tokens.cpu(),
            "counted_tokens": self.counted_tokens,
            "generator": self.generator.get_state(),
        }
        if self.ema is not None:
            # The safetensors file holds the EMA weights; the raw ones live here.
            state["params"] = {n: p.detach().cpu() for n, p in self.sae.named_parameters()}
        return state

    def unsharded(self, dst: int = 0) -> Trainer | None:
        """A one-process Trainer holding this sharded trainer's whole state (weights, EMA,
        Adam moments, counters), on shard rank `dst` (None on the others), to snapshot it in
        the usual layout. Collective over the shard group; `self` when not sharded."""
        if self.shard is None:
            return self
        shard = self.shard
        names = [n for n, _ in self.sae.named_parameters()]
        weights = sharding.gather_tensors(
            dict(zip(names, (t.detach() for t in (self.ema or self.sae.parameters())),
                     strict=True)), shard, dst)
        state = self.state_dict()
        raw = state.pop("params", None)
        if raw is not None:
            state["params"] = sharding.gather_tensors(raw, shard, dst)
        optim = state["optimizer"]
        moments = {}
        for i, live in optim["state"].items():
            entry = dict(live)  # state_dict() shares these dicts with the live optimiser
            for key in ("exp_avg", "exp_avg_sq"):
                t = sharding.gather_tensors({names[i]: live[key]}, shard, dst)
                if t is not None:
                    entry[key] = t[names[i]]
            moments[i] = entry
        state["optimizer"] = {**optim, "state": moments}
        if weights is None:
            return None
        full = Trainer(self.sae_cfg, self.cfg, name=self.name, hook=self.hook, model=self.model,
                       device=self.device)
        full.load_state_dict(weights, state)
        full.origin = self.origin
        return full

    def _local(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole-SAE tensors -> this rank's rows of them (as they are when not sharded)."""
        return full if self.shard is None else sharding.shard_tensors(full, self.shard)

    def load_state_dict(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Inverse of (`export_weights`, `state_dict`). On a sharded trainer the per-latent
        tensors (weights, Adam moments, raw weights) are this rank's rows already:
        `checkpoint.load_trainer` reads only those, from a snapshot of any shard count.
        ValueError, with nothing changed, for a state no trainer saves (`_check_state`)."""
        self._check_state(state)
        params = dict(self.sae.named_parameters())
        raw = state.get("params", weights) if self.ema is not None else weights
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(raw[n])
            if self.ema is not None:
                for t, n in zip(self.ema, params, strict=True):
                    t.copy_(weights[n])
        implementation = [{k: g.get(k) for k in ("fused", "foreach")}
                          for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, impl in zip(self.optimizer.param_groups, implementation, strict=True):
            group.update(impl)  # the Adam kernel this machine has, not the saver's
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.initialized = bool(state["initialized"])
        self.mse_scale = float(state["mse_scale"])
        self.sae.input_scale = None if state["input_scale"] is None else float(state["input_scale"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device, torch.int64)
        # Snapshots from before the firing counters start counting anew.
        if "fired_tokens" in state:
            self.fired_tokens = state["fired_tokens"].to(self.device, torch.int64)
            self.counted_tokens = int(state["counted_tokens"])
        self.generator.set_state(state["generator"])

    def _check_state(self, state: Any) -> None:
        """ValueError for a trainer state that would load but break training: counters of
        the wrong shape fail the first step, a negative step fails the metrics, a zero or
        NaN loss constant (or Adam setting) skips or poisons every step for good."""
        if not isinstance(state, dict):
            raise ValueError("trainer state is not a map")
        counters = ["step", "tokens_seen"] + (["counted_tokens"] if "fired_tokens" in state
                                              else [])
        for key in counters:
            value = state.get(key)
            if type(value) is not int or value < 0:
                raise ValueError(f"trainer state's {key} {value!r:.60} is not a whole "
                                 "number >= 0")
        if type(state.get("initialized")) is not bool:
            raise ValueError("trainer state's initialized is not true or false")
        self._positive(state.get("mse_scale"), "mse_scale")
        scale = state.get("input_scale")
        if scale is not None or (state["initialized"]
                                 and self.sae_cfg.input_normalization == "scalar"):
            self._positive(scale, "input_scale")
        for key in ("tokens_since_fired", "fired_tokens"):
            if key == "fired_tokens" and key not in state:
                continue  # a snapshot from before the firing counters
            t = state.get(key)
            want = (self.sae_cfg.n_latents,)
            if not torch.is_tensor(t) or t.dtype != torch.int64 or tuple(t.shape) != want:
                got = (f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
                       if torch.is_tensor(t) else type(t).__name__)
                raise ValueError(f"trainer state's {key} is {got}, not int64 {want}")
            if t.numel() and int(t.min()) < 0:
                raise ValueError(f"trainer state's {key} holds negative counts")
        self._check_optimizer_state(state.get("optimizer"))

    def _check_optimizer_state(self, saved: Any) -> None:
        """ValueError unless `saved` is Adam's state as this trainer's optimiser keeps it:
        its settings (betas, eps, ...) are loaded with it, and a moment of the wrong shape,
        a negative second moment or a step that is no count would poison the weights."""
        fresh = self.optimizer.state_dict()["param_groups"]
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
                or not isinstance(saved.get("state"), dict):
            raise ValueError("trainer state's optimizer is not Adam's state")
        groups = saved["param_groups"]
        if len(groups) != len(fresh) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("trainer state's optimizer has other parameter groups")
        for got, want in zip(groups, fresh, strict=True):
            lr = got.get("lr")
            if type(lr) not in (int, float) or not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"trainer state's Adam lr {lr!r:.60} is not a positive number")
            for key, value in want.items():
                if key in ("lr", "fused", "foreach") or key not in got:
                    continue
                if (tuple(got[key]) if isinstance(got[key], list | tuple) else got[key]) != \
                        (tuple(value) if isinstance(value, list | tuple) else value):
                    raise ValueError(f"trainer state's Adam {key} is {got[key]!r:.60}, not "
                                     f"{value!r:.60}")
        params = list(self.sae.parameters())
        for i, entry in saved["state"].items():
            if type(i) is not int or not 0 <= i < len(params) or not isinstance(entry, dict):
                raise ValueError(f"trainer state's Adam state names parameter {i!r:.60}")
            if not entry:
                continue
            step, m, v = (entry.get(k) for k in ("step", "exp_avg", "exp_avg_sq"))
            if not all(torch.is_tensor(t) for t in (step, m, v)):
                raise ValueError(f"trainer state's Adam state of parameter {i} lacks step, "
                                 "exp_avg or exp_avg_sq")
            if step.numel() != 1 or (not step.is_floating_point()
                                     and step.dtype not in (torch.int32, torch.int64)):
                raise ValueError(f"trainer state's Adam step of parameter {i} is no count")
            count = float(step.reshape(()))
            if not (math.isfinite(count) and count >= 0 and count.is_integer()):
                raise ValueError(f"trainer state's Adam step of parameter {i} is {count}")
            shape = tuple(params[i].shape)
            if tuple(m.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(f"trainer state's Adam moments of parameter {i} are not of "
                                 f"shape {shape}")
            if v.numel() and not bool(v.min() >= 0):
                raise ValueError(f"trainer state's Adam exp_avg_sq of parameter {i} holds "
                                 "negative or NaN values")

    @staticmethod
    def _positive(value: Any, key: str) -> None:
        """ValueError unless `value` is a finite number > 0 (a loss or input constant)."""
        if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"trainer state's {key} {value!r:.60} is not a positive number")

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.sae_cfg.d_in:
            raise ValueError(f"expected a [batch, {self.sae_cfg.d_in}] batch, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point activations, got {x.dtype}")
        return x.to(self.device, torch.float32)


class _ResidualLoss(Function):
    """Σ‖x̂ − xn‖² / scale as a function of x̂, from the residual e = xn − x̂ and its sum of
    squares that `_loss_stats` has already computed: no pass over the batch forward, one
    backward (∂x̂ = −2e·g/scale), where `mse_loss` takes one forward and, zero-filling its
    output first, two backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, x_hat: torch.Tensor, e: torch.Tensor, sse: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e, scale)
        return (sse / scale).to(torch.promote_types(x_hat.dtype, e.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        e, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        return e * (g * (-2.0) / scale).to(e.dtype), None, None, None


class _SquaredDistance(Function):
    """Σ‖r − t‖² / den for a reconstruction r and a target t that takes no gradient: the
    difference made once, and kept for backward (∂r = 2(r − t)·g/den)."""

    @staticmethod
    def forward(ctx: FunctionCtx, r: torch.Tensor, t: torch.Tensor,
                den: torch.Tensor) -> torch.Tensor:
        diff = r - t
        ctx.save_for_backward(diff, den)
        ctx.dtype = r.dtype  # type: ignore[attr-defined]
        return (_sq_norm(diff) / den).to(diff.dtype)  # as mse_loss: in the promoted dtype

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        diff, den = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = diff * (g * 2.0 / den).to(diff.dtype)
        return grad.to(ctx.dtype), None, None  # type: ignore[attr-defined]


def _loss_stats(
    xn: torch.Tensor, x_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """e = xn − x̂, and in float64 Σ_b e_b, Σ‖e‖², Σ_b xn_b, Σ‖xn‖²: one C pass on CPU
    (`cpu_kernels.loss_stats`), else torch's seven."""
    got = cpu_kernels.loss_stats(xn, x_hat)
    if got is not None:
        return got
    e = xn - x_hat
    e64, xn64 = e.double(), xn.double()
    return e, e64.sum(dim=0), _sq_norm(e64), xn64.sum(dim=0), _sq_norm(xn64)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Σ t², as one dot product (no squared copy of `t`)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _project_decoder_grad(W_dec: torch.Tensor) -> None:
    """Remove, per latent, the gradient component parallel to its (unit-norm) decoder row.

    On CPU the row dot products run over blocks of about 2^18 elements: one product of the
    whole [n_latents, d] matrices would allocate a temporary as large as W_dec, a pass over
    memory more (and fresh pages from the OS each step once it passes glibc's mmap
    threshold); a block's temporary stays in cache."""
    g = W_dec.grad
    if g is None:
        return
    if g.is_cuda:
        parallel = torch.linalg.vecdot(g, W_dec, dim=1)
    else:
        parallel = g.new_empty(g.shape[0])
        rows = max(1, 2**18 // max(1, g.shape[1]))
        for s in range(0, g.shape[0], rows):
            torch.sum(g[s : s + rows] * W_dec[s : s + rows], dim=1, out=parallel[s : s + rows])
    g.addcmul_(parallel[:, None], W_dec, value=-1.0)


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the paper's betas and eps; the fused kernel where this torch has one (CPU
    fused Adam needs torch >= 2.4), else the multi-tensor one."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)
