"""Latent sharding on torch.distributed (`--latent-shards R`): the rows of the encoder and of
the decoder split across the R ranks of a process group, like tensor parallelism (with data
parallelism, how Gao et al. 2024 trained their 16M-latent SAE).

Rank r holds the latents [lo, hi) = [r·n/R, (r+1)·n/R) (`LatentShard`): those rows of
`encoder.weight`, `encoder.bias` and `W_dec`; `b_dec` is replicated. One forward
(`ShardedSAE.forward`, the same `ForwardOutput` as `SparseAutoencoder.forward`, latent ids
global):

1. normalise x (replicated) and compute the local pre-activations and the local top-k_top
   (k_top = 4k with Multi-TopK), and the local top-k_aux among the dead latents it holds;
2. one all_gather of those candidates (value and global id, 8 bytes each);
3. every rank picks the same global top-k_top and top-k_aux from the R·(k_top + k_aux)
   candidates of each token;
4. each rank decodes the chosen latents it holds (zero weight for the others), and one
   all_reduce SUM adds the partial reconstructions (top-k, top-4k and AuxK in one message);
   b_dec is added after it, once.

The backward is exact and needs one collective, of d_in numbers. It rests on one
requirement: every rank of the shard group computes the same loss from the same batch (the
outputs of steps 2-4 are replicated, so their gradients are too). Then
- the all_reduce's backward is the identity: the gradient of each partial reconstruction
  is the gradient of the sum, which every rank already holds;
- the all_gather's backward keeps this rank's slice: the gradient of a candidate is
  complete on the rank that holds the latent (only there is it decoded; the replicated
  uses, such as `latent_acts`, are computed there too), so nothing is summed;
- `b_dec` enters the reconstruction once after the all_reduce (its gradient there is
  complete on every rank) and each rank's encoder as x − b_dec, a use per shard whose
  gradients are summed by an all_reduce in the backward (`_SumGradient`): so b_dec.grad
  equals the single-process gradient on every rank, not R times it nor a part of it.

Ties. The global choice sorts the candidates, laid out in ascending latent id, by value with
a stable sort: among equal pre-activations the lower latent id wins, on every rank alike.
The single-process `topk` promises no order among equal values, so the two may keep
different ids where pre-activations tie exactly at the k-th place (the values kept are the
same); so may a shard whose own top-k_top boundary falls inside a run of more than k_top
equal values. Real pre-activations tie with probability ~0.

Cost per rank and forward, B tokens, R shards: the encoder matmul over n/R latents; the
candidates, R·(k_top + k_aux)·B·8 bytes gathered (and sorted) on every rank; the decode
and the encoder backward over the same B·(k_top + k_aux) entries as one process (most
with zero weight), negligible while k ≪ n/R.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from saestream.consumer.sae import ForwardOutput, SAEConfig, SparseAutoencoder
from saestream.consumer.sparse_ops import sparse_decode, topk_encode

SHARDED_PARAMS = ("encoder.weight", "encoder.bias", "W_dec")
"""Parameters split by latent (their first dimension); the others (`b_dec`) are replicated."""
INIT_CHUNK_ELEMENTS = 1 << 24
"""Random numbers drawn per call when generating a shard's initial decoder (bounds memory)."""
_NORMAL_BLOCK = 16
# torch's CPU normal generator transforms uniforms in blocks of 16 and redraws the last 16
# of a tensor whose size is not a multiple of 16: chunks of whole blocks continue one stream.


@dataclass(frozen=True)
class LatentShard:
    """Rank `rank` of `size` in `group` holds the latents [lo, hi) of `n_latents`."""

    rank: int
    """This process's rank in `group` (0 ≤ rank < size)."""
    size: int
    """Number of latent shards R."""
    n_latents: int
    """Latents of the whole SAE; divisible by `size`."""
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    """The R ranks sharing one SAE (None = the default group)."""

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"need 0 <= rank < size, got rank {self.rank} of {self.size}")
        if self.n_latents % self.size:
            raise ValueError(
                f"n_latents ({self.n_latents}) must be divisible by the number of latent "
                f"shards ({self.size})"
            )
        if self.n_latents >= 2**31:  # ids travel as int32
            raise ValueError(f"latent sharding supports n_latents < 2^31, got {self.n_latents}")

    @classmethod
    def of_group(cls, n_latents: int, group: dist.ProcessGroup | None = None) -> LatentShard:
        """This process's shard in `group` (torch.distributed must be initialised)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), n_latents, group)

    @property
    def n_local(self) -> int:
        """Latents on this rank."""
        return self.n_latents // self.size

    @property
    def lo(self) -> int:
        return self.rank * self.n_local

    @property
    def hi(self) -> int:
        return self.lo + self.n_local


class ShardedSAE(nn.Module):
    """This rank's part of a `SparseAutoencoder`: `encoder.weight` [n_local, d_in],
    `encoder.bias` [n_local], `W_dec` [n_local, d_in] (the latents shard.lo ... shard.hi − 1),
    `b_dec` [d_in] (replicated). Same parameter names as the full SAE, so per-row code
    (decoder renormalisation, gradient projection, Adam, EMA) runs on it unchanged.
    A freshly initialised one holds exactly the matching slice of
    `SparseAutoencoder(cfg, generator=...)` for a generator in the same state."""

    # The replicated part is the full SAE's own code (it reads only cfg and input_scale).
    normalize = SparseAutoencoder.normalize
    set_input_scale = SparseAutoencoder.set_input_scale
    denormalize = staticmethod(SparseAutoencoder.denormalize)

    def __init__(
        self,
        cfg: SAEConfig,
        shard: LatentShard,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        if cfg.d_in is None:
            raise ValueError("an SAE needs d_in")
        if shard.n_latents != cfg.n_latents:
            raise ValueError(f"shard of {shard.n_latents} latents for an SAE of {cfg.n_latents}")
        self.cfg = cfg
        self.shard = shard
        self.encoder = nn.Linear(cfg.d_in, shard.n_local, device=device)
        self.W_dec = nn.Parameter(torch.empty(shard.n_local, cfg.d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        self.input_scale: float | None = None
        if self.W_dec.is_meta:
            return
        with torch.no_grad():
            w = seeded_normal_rows(cfg.n_latents, cfg.d_in, shard.lo, shard.hi, generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()

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
        """`SparseAutoencoder.forward` over the shard group: the same arguments (`dead_mask`
        over all n_latents, as every rank's trainer keeps it) and the same outputs, replicated
        on every rank, latent ids global. Collective: every rank of the group calls it with
        the same x. `latent_acts` carry gradients, like the reconstructions."""
        if dense:
            raise ValueError("latent sharding runs the sparse path only (dense=False)")
        shard, cfg = self.shard, self.cfg
        xn, stats = self.normalize(x.to(self.W_dec.dtype))
        k = cfg.k
        k_top = 4 * k if cfg.multi_topk else k
        k_aux = 0 if dead_mask is None else min(k_aux, int(dead_mask.sum()))
        dead = dead_mask[shard.lo : shard.hi].nonzero().squeeze(1) if k_aux else None
        k_aux_local = 0 if dead is None else min(k_aux, int(dead.numel()))
        amp: Any = contextlib.nullcontext()
        if autocast_bf16 and xn.is_cuda:
            amp = torch.autocast("cuda", dtype=torch.bfloat16)
        with amp:
            pre, idx, pre_aux, aux_pos = topk_encode(
                xn,
                self.encoder.weight,
                self.encoder.bias,
                _SumGradient.apply(self.b_dec, shard),
                min(k_top, shard.n_local),
                dead if k_aux_local else None,
                k_aux_local,
            )
        aux_ids = dead[aux_pos] if k_aux_local else aux_pos
        top_values, top_ids = _candidates(pre, idx + shard.lo, k_top)
        aux_values, aux_ids = _candidates(pre_aux, aux_ids + shard.lo, k_aux)
        all_values, all_ids = _GatherCandidates.apply(
            torch.cat([top_values, aux_values], dim=1), torch.cat([top_ids, aux_ids], dim=1), shard
        )
        vals, idx = _choose(all_values[:, :, :k_top], all_ids[:, :, :k_top], k_top)
        vals = F.relu(vals)
        partials = [self._decode_owned(vals[:, :k], idx[:, :k])]
        if k_top > k:
            partials.append(self._decode_owned(vals, idx))
        if k_aux:
            aux_vals, aux_idx = _choose(all_values[:, :, k_top:], all_ids[:, :, k_top:], k_aux)
            partials.append(self._decode_owned(F.relu(aux_vals), aux_idx))
        sums = _SumPartials.apply(shard, *partials)
        x_hat = sums[0] + self.b_dec
        return ForwardOutput(
            x_hat=self.denormalize(x_hat, stats) if map_back else None,
            latent_acts=vals[:, :k],
            latent_indices=idx[:, :k],
            normalized_x=xn,
            normalized_x_hat=x_hat,
            multi_topk_x_hat=sums[1] + self.b_dec if k_top > k else None,
            auxk_recon=sums[-1] if k_aux else None,
        )

    def _decode_owned(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] W_dec[ids[:, j]] over the entries whose latent this rank holds."""
        local = ids - self.shard.lo
        owned = (local >= 0) & (local < self.shard.n_local)
        return sparse_decode(
            torch.where(owned, values, 0.0), torch.where(owned, local, 0), self.W_dec
        )


def _candidates(
    values: torch.Tensor, ids: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's candidates in ascending latent id (so that the stable sort of `_choose` prefers
    the lower id), padded to `width` with (−inf, −1), which are never chosen."""
    ids, order = ids.sort(dim=1)
    values = values.float().gather(1, order)
    missing = width - values.shape[1]
    if missing:
        values = F.pad(values, (0, missing), value=float("-inf"))
        ids = F.pad(ids, (0, missing), value=-1)
    return values, ids


def _choose(
    values: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of the gathered candidates [batch, R, w] (rank-major, so ascending id),
    sorted by value; among equal values the lower id first."""
    values, ids = values.flatten(1), ids.flatten(1)
    pos = values.detach().sort(dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, pos), ids.gather(1, pos)


class _GatherCandidates(Function):
    """(values float32 [batch, w], ids int64 [batch, w]) -> every rank's, [batch, R, w] each,
    in one all_gather (values bit-cast to int32 beside the int32 ids). Backward: this rank's
    slice of the gradient (complete there: see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, values: torch.Tensor, ids: torch.Tensor, shard: LatentShard
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.rank = shard.rank  # type: ignore[attr-defined]
        if shard.size == 1:
            out = torch.stack([values.view(torch.int32), ids.to(torch.int32)])[None]
        else:
            message = torch.stack([values.view(torch.int32), ids.to(torch.int32)])
            out = _all_gather(message, shard).view(shard.size, *message.shape)
        all_values = out[:, 0].view(torch.float32).permute(1, 0, 2).contiguous()
        all_ids = out[:, 1].permute(1, 0, 2).to(torch.int64)
        ctx.mark_non_differentiable(all_ids)
        return all_values, all_ids

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_values: torch.Tensor, _g_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        return g_values[:, ctx.rank], None, None  # type: ignore[attr-defined]


class _SumPartials(Function):
    """Partial reconstructions [batch, d] -> their sums over the ranks, in one all_reduce.
    Backward: the identity (the loss, hence the gradient of each sum, is replicated)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, shard: LatentShard, *partials: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        flat = torch.stack(partials)
        if shard.size > 1:
            dist.all_reduce(flat, group=shard.group)
        return tuple(flat.unbind())

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return (None, *grads)


class _SumGradient(Function):
    """A replicated tensor used differently on each rank: identity forward, backward the
    all_reduce SUM of the ranks' gradients (Megatron's "copy to tensor-parallel region")."""

    @staticmethod
    def forward(ctx: FunctionCtx, t: torch.Tensor, shard: LatentShard) -> torch.Tensor:  # type: ignore[override]
        ctx.shard = shard  # type: ignore[attr-defined]
        return t.view_as(t)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        shard: LatentShard = ctx.shard  # type: ignore[attr-defined]
        if shard.size > 1:
            g = g.contiguous().clone()
            dist.all_reduce(g, group=shard.group)
        return g, None


def _all_gather(t: torch.Tensor, shard: LatentShard) -> torch.Tensor:
    """The ranks' tensors `t` (equal shapes), concatenated along dimension 0 in rank order:
    one all_gather (`all_gather_single`, called `all_gather_into_tensor` before torch 2.13)."""
    out = t.new_empty(shard.size * t.shape[0], *t.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=shard.group)
    return out


# -- initialisation, sharding and gathering of the weights -------------------------------------


def seeded_normal_rows(
    n: int,
    d: int,
    lo: int,
    hi: int,
    generator: torch.Generator | None,
    chunk_elements: int = INIT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Rows [lo, hi) of `torch.randn(n, d, generator=generator)` (CPU), without holding more
    than about `chunk_elements` of the others: the stream is drawn in chunks of whole
    16-number blocks, up to the end of the slice, or to the end of the tensor when the slice
    reaches its last 16 numbers (which torch draws separately). Advances `generator` as far.
    """
    size = n * d
    block_rows = _NORMAL_BLOCK // math.gcd(d, _NORMAL_BLOCK)
    step = max(block_rows, chunk_elements // d // block_rows * block_rows)
    stop = n if size % _NORMAL_BLOCK and hi * d > size - _NORMAL_BLOCK else hi
    parts = []
    start = 0
    while start < stop:
        end = min(start + step, n)
        if (n - end) * d < _NORMAL_BLOCK:  # the tensor's last numbers: one call to the end
            end = n
        rows = torch.randn(end - start, d, generator=generator)
        if end > lo and start < hi:
            parts.append(rows[max(lo - start, 0) : hi - start].clone())
        start = end
    return torch.cat(parts)


def shard_tensors(full: Mapping[str, torch.Tensor], shard: LatentShard) -> dict[str, torch.Tensor]:
    """The full SAE's tensors (name -> tensor) -> this rank's: `SHARDED_PARAMS` sliced to
    [lo, hi), the others as they are (views, no copy)."""
    return {n: t[shard.lo : shard.hi] if n in SHARDED_PARAMS else t for n, t in full.items()}


def shard_parameters(sae: SparseAutoencoder, shard: LatentShard) -> ShardedSAE:
    """This rank's part of a full SAE (weights copied, `input_scale` kept), on its device."""
    device = sae.W_dec.device
    sharded = ShardedSAE(sae.cfg, shard, device="meta").to_empty(device=device)
    with torch.no_grad():
        for n, t in shard_tensors(dict(sae.named_parameters()), shard).items():
            sharded.get_parameter(n).copy_(t)
    sharded.input_scale = sae.input_scale
    return sharded


def gather_rows(t: torch.Tensor, shard: LatentShard, dst: int | None = None) -> torch.Tensor | None:
    """The ranks' row blocks of one sharded tensor, concatenated in rank order: on every rank
    (dst None, one all_gather) or on group rank `dst` only (None elsewhere, one gather).
    Collective: every rank of the group calls it."""
    if shard.size == 1:
        return t
    t = t.contiguous()
    if dst is None:
        return _all_gather(t, shard)
    parts = [torch.empty_like(t) for _ in range(shard.size)] if shard.rank == dst else None
    root = dst if shard.group is None else dist.get_global_rank(shard.group, dst)
    dist.gather(t, parts, dst=root, group=shard.group)
    return None if parts is None else torch.cat(parts)


def gather_parameters(
    sharded: ShardedSAE, dst: int | None = None
) -> dict[str, torch.Tensor] | None:
    """The full SAE's four tensors (name -> tensor, on the parameters' device), gathered from
    the shards: on every rank (dst None) or on group rank `dst` only (None elsewhere).
    Collective: one all_gather or gather per sharded parameter."""
    return gather_tensors(
        {n: p.detach() for n, p in sharded.named_parameters()}, sharded.shard, dst
    )


def gather_tensors(
    local: Mapping[str, torch.Tensor], shard: LatentShard, dst: int | None = None
) -> dict[str, torch.Tensor] | None:
    """Inverse of `shard_tensors` (see `gather_rows` for `dst`)."""
    full = {}
    for n, t in local.items():
        full[n] = gather_rows(t, shard, dst) if n in SHARDED_PARAMS else t
    return full if dst is None or shard.rank == dst else None


def clip_grad_norm_(sharded: ShardedSAE, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole SAE: the norm of all gradients, the
    sharded ones summed over the ranks (one all_reduce of a scalar), b_dec's counted once.
    Returns the total norm."""
    shard = sharded.shard
    sharded_grads = _grads(p for n, p in sharded.named_parameters() if n in SHARDED_PARAMS)
    replicated = _grads(p for n, p in sharded.named_parameters() if n not in SHARDED_PARAMS)
    sq = torch.zeros((), device=sharded.W_dec.device)
    for g in sharded_grads:
        sq += g.float().pow(2).sum()
    if shard.size > 1:
        dist.all_reduce(sq, group=shard.group)
    for g in replicated:
        sq += g.float().pow(2).sum()
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(sharded_grads + replicated, coef)
    return norm


def _grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]
