"""Sparsity of ablation effects (Gao et al. 2024, §4.5): how many next-token logits a latent
moves when it is removed. A latent whose removal changes a few logits over the next few
positions has a sparse, interpretable downstream effect; one that shifts everything a little
does not.

For a sample of latents, each at the occurrence where it fires highest (context c, position
p): the reference forward splices the SAE's reconstruction into the hook at positions 1..T−1;
the ablated forward splices the same reconstruction less that latent's raw-space contribution
at position p only. Δ = ablated − reference logits at positions p .. min(p + `positions`, T)−1
(the logits at p predict token p+1, so these are the next `positions` predictions the latent
can affect) and every vocabulary entry, [n, V]. Each row's median over V is subtracted (a
constant shift of the logits changes no probability) and

    sparsity = (‖Δ‖₁ / ‖Δ‖₂)² / (n·V)  ∈ (0, 1],

the "effective number of logits affected" as a fraction: 1/(n·V) for one logit, 1 for all
moved equally. The paper's baseline subtracts, instead, a vector of the same norm along one
random residual channel.

Cost: one truncated forward per batch of contexts (to find each latent's maximum) and then
one forward per row of: a reference per context holding a chosen occurrence, plus an ablated
and a baseline row per latent. A context's rows share one forward batch, so the reference and
its ablations see the same shapes and their logits differ only by the ablation; each batch is
cut after its last needed position (the model is causal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from saestream.consumer.checkpoint import LoadedSAE
from saestream.consumer.sae import NormStats, SparseAutoencoder
from saestream.evaluator.splice import splice
from saestream.producer.hooks import HookedModel

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
"""Reported as `p10` .. `p90` of the per-latent sparsities."""


def sparsity(delta: torch.Tensor) -> float:
    """(‖Δ‖₁ / ‖Δ‖₂)² / (n·V) of logit changes Δ [n, V] after subtracting each row's median
    over V (the lower median for even V). In (0, 1]; NaN when Δ is 0 after the subtraction
    (nothing changed, or only by a constant per row)."""
    d = delta.double()
    d = d - d.median(dim=-1, keepdim=True).values
    l1, l2sq = float(d.abs().sum()), float(d.pow(2).sum())
    return l1 * l1 / l2sq / d.numel() if l2sq > 0 else math.nan


class MaxActivations:
    """Per latent: its highest activation over the contexts added and where it occurred
    (context, position); the first occurrence wins ties."""

    def __init__(self, n_latents: int, device: torch.device | str = "cpu") -> None:
        self.value = torch.zeros(n_latents, device=device)
        self.context = torch.full((n_latents,), -1, dtype=torch.int64, device=device)
        self.position = torch.full((n_latents,), -1, dtype=torch.int64, device=device)

    def add(self, values: torch.Tensor, indices: torch.Tensor, first_context: int,
            seq_len: int) -> None:
        """:param values: kept latents' values [rows, k] and `indices` their ids, for the rows
        of contexts first_context, first_context+1, … at positions 1..seq_len−1 (row-major,
        as `engine._positions` flattens them)."""
        best = torch.zeros_like(self.value).scatter_reduce(0, indices.flatten(),
                                                           values.flatten().float(), "amax")
        better = best > self.value
        hit = (values > 0) & better[indices] & (values == best[indices])
        row, col = hit.nonzero(as_tuple=True)
        first = torch.full_like(self.context, values.shape[0])
        first.scatter_reduce_(0, indices[row, col], row, "amin")
        lat = better.nonzero().squeeze(1)
        self.value[lat] = best[lat]
        self.context[lat] = first_context + first[lat] // (seq_len - 1)
        self.position[lat] = 1 + first[lat] % (seq_len - 1)

    @property
    def fired(self) -> torch.Tensor:
        """Ids of the latents that fired at least once [n_fired]."""
        return (self.value > 0).nonzero().squeeze(1)


@dataclass
class Occurrence:
    """One sampled latent at its highest activation, and what its ablation did."""

    latent: int
    activation: float
    context: int
    position: int
    channel: int
    """The residual channel of the baseline."""
    norm: float = math.nan
    """‖the latent's raw-space contribution‖ at that position: what both ablations remove."""
    sparsity: float = math.nan
    baseline: float = math.nan


Progress = Callable[[int, int], None]
"""Called with (forward passes done, forward passes planned), as `engine.Progress`."""


def ablation_sparsity(
    model: nn.Module, ids: torch.Tensor, loaded: LoadedSAE, hook: str, *, latents: int = 64,
    positions: int = 16, seed: int = 0, batch_size: int = 8, progress: Progress | None = None,
) -> dict[str, object]:
    """The ablation sparsity of `loaded` at `hook`, on the contexts `ids` [n_contexts, T].

    Finds each latent's maximum (one truncated forward per batch), samples up to `latents`
    of those that fired (torch.Generator seeded with `seed`, which also picks the baseline
    channels) and ablates them (`ablate`). Returns the fields of `result`.
    """
    device = next(model.parameters()).device
    sae = loaded.sae
    n_batches = math.ceil(ids.shape[0] / batch_size)
    per_forward = max(batch_size, 3) // 3  # latents per ablation forward, one per context
    planned = n_batches + math.ceil(min(latents, sae.cfg.n_latents) / per_forward)
    maxima = MaxActivations(sae.cfg.n_latents, device)
    truncated = HookedModel(model, [hook], early_stop=True)
    try:
        with torch.inference_mode():
            for b, batch in enumerate(torch.split(ids, batch_size)):
                h = truncated(batch.to(device))[hook]
                x = h[:, 1:].reshape(-1, h.shape[-1])
                if x.shape[1] != sae.cfg.d_in:
                    from saestream.evaluator.engine import EvalError  # engine imports us

                    raise EvalError(f"SAE {loaded.name} reads d_in {sae.cfg.d_in}, but hook "
                                    f"{hook} gives {x.shape[1]}")
                values, indices = sae.encode(sae.normalize(x.to(sae.W_dec.dtype))[0])
                maxima.add(values, indices, b * batch_size, ids.shape[1])
                if progress is not None:
                    progress(b + 1, planned)
    finally:
        truncated.remove()
    chosen = choose(maxima, latents, sae.cfg.d_in, seed)

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(n_batches + done, n_batches + total)

    ablate(model, ids, sae, hook, chosen, positions=positions, batch_size=batch_size,
           progress=step)
    return result(chosen, positions, vocab=_vocab(model), fired=int(maxima.fired.numel()))


def choose(maxima: MaxActivations, latents: int, d_in: int, seed: int) -> list[Occurrence]:
    """Up to `latents` of the latents that fired, uniformly without replacement, ascending by
    id, each with a random baseline channel in [0, d_in); deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    fired = maxima.fired.cpu()
    picked = fired[torch.randperm(fired.numel(), generator=g)[:latents]].sort().values
    channels = torch.randint(d_in, (picked.numel(),), generator=g)
    value, ctx, pos = (t.cpu() for t in (maxima.value, maxima.context, maxima.position))
    return [Occurrence(int(j), float(value[j]), int(ctx[j]), int(pos[j]), int(c))
            for j, c in zip(picked, channels, strict=True)]


def ablate(
    model: nn.Module, ids: torch.Tensor, sae: SparseAutoencoder, hook: str,
    chosen: list[Occurrence], *, positions: int = 16, batch_size: int = 8,
    progress: Progress | None = None,
) -> None:
    """Fill each occurrence's `norm`, `sparsity` and `baseline` (NaN where Δ is 0).

    :param ids: the contexts [n_contexts, T] that `Occurrence.context` indexes.
    """
    device = next(model.parameters()).device
    batches = _pack(chosen, max(batch_size, 3))
    if progress is not None:
        progress(0, len(batches))
    with torch.inference_mode():
        for done, groups in enumerate(batches, 1):
            _ablate_batch(model, ids, sae, hook, groups, positions, device)
            if progress is not None:
                progress(done, len(batches))


def _pack(chosen: list[Occurrence], rows: int) -> list[list[list[Occurrence]]]:
    """Forward batches of at most `rows` rows (≥ 3), each a list of groups: occurrences in one
    context, costing 1 + 2·len(group) rows (a reference, an ablated and a baseline row each).
    A context's occurrences are split only when they do not fit one batch."""
    by_context: dict[int, list[Occurrence]] = {}
    for o in sorted(chosen, key=lambda o: (o.context, o.position, o.latent)):
        by_context.setdefault(o.context, []).append(o)
    per_group = (rows - 1) // 2
    batches: list[list[list[Occurrence]]] = []
    used = rows
    for occ in by_context.values():
        for i in range(0, len(occ), per_group):
            group = occ[i:i + per_group]
            if used + 1 + 2 * len(group) > rows:
                batches.append([])
                used = 0
            batches[-1].append(group)
            used += 1 + 2 * len(group)
    return batches


def _ablate_batch(
    model: nn.Module, ids: torch.Tensor, sae: SparseAutoencoder, hook: str,
    groups: list[list[Occurrence]], positions: int, device: torch.device,
) -> None:
    """One forward: per group a reference row, then per occurrence an ablated row and a
    baseline row (all of the group's context), cut after the last position any Δ needs."""
    seq_len = ids.shape[1]
    occ = [o for g in groups for o in g]
    length = max(min(o.position + positions, seq_len) for o in occ)
    refs: list[int] = []  # per group: its reference row
    owner: list[int] = []  # per occurrence: its group
    row: list[int] = []  # per occurrence: its ablated row (its baseline row is the next)
    for gi, g in enumerate(groups):
        refs.append(len(refs) + len(row) * 2)
        owner += [gi] * len(g)
        row += [refs[-1] + 1 + 2 * i for i in range(len(g))]
    rows = len(refs) + 2 * len(row)
    ctx = torch.tensor([g[0].context for g in groups], dtype=torch.int64)
    own = torch.tensor(owner, device=device)
    pos = torch.tensor([o.position for o in occ], device=device)
    lat = torch.tensor([o.latent for o in occ], device=device)
    chan = torch.tensor([o.channel for o in occ], device=device)
    abl = torch.tensor(row, device=device)
    row_group = torch.zeros(rows, dtype=torch.int64)
    for gi, start in enumerate(refs):
        row_group[start:start + 1 + 2 * len(groups[gi])] = gi
    batch = ids[ctx[row_group], :length].to(device)
    ref_rows = torch.tensor(refs, device=device)
    norms = torch.empty(len(occ), device=device)

    def replacement(h: torch.Tensor) -> torch.Tensor:
        """h [rows, length, d] -> the reconstruction of each row's context [rows, length−1, d],
        less the latent's contribution (ablated rows) or a same-norm vector along one channel
        (baseline rows) at that row's position."""
        x = h[ref_rows, 1:]
        d = x.shape[-1]
        xn, stats = sae.normalize(x.reshape(-1, d).to(sae.W_dec.dtype))
        values, indices = sae.encode(xn)
        x_hat = sae.denormalize(sae.decode(values, indices), stats).view(len(groups), -1, d)
        flat = own * (length - 1) + pos - 1
        value = (values[flat] * (indices[flat] == lat[:, None])).sum(dim=1)
        contrib = _linear_part(sae, value[:, None] * sae.W_dec[lat], stats, flat)
        norms.copy_(contrib.norm(dim=1))
        out = x_hat[row_group.to(device)]
        out[abl, pos - 1] -= contrib
        out[abl + 1, pos - 1, chan] -= norms
        return out

    with splice(model, hook, replacement):
        logits = model(input_ids=batch, use_cache=False).logits
    for i, o in enumerate(occ):
        window = slice(o.position, min(o.position + positions, seq_len))
        ref = logits[refs[owner[i]], window]
        o.norm = float(norms[i])
        o.sparsity = sparsity(logits[row[i], window] - ref)
        o.baseline = sparsity(logits[row[i] + 1, window] - ref)


def _linear_part(sae: SparseAutoencoder, v: torch.Tensor, stats: NormStats,
                 rows: torch.Tensor) -> torch.Tensor:
    """`denormalize` without its shift, for vectors v [m, d] of the SAE's space at the given
    rows of the batch `stats` describes: what they add to the raw-space reconstruction."""
    scale = stats.scale[rows] if isinstance(stats.scale, torch.Tensor) else stats.scale
    return sae.denormalize(v, NormStats(None, scale))


def _vocab(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else None


def summary(values: list[float]) -> dict[str, object]:
    """{mean, quantiles {p10 .. p90}, undefined}: over the finite values; `undefined` counts the
    NaN ones (a Δ of 0). Stats are NaN when no value is finite."""
    t = torch.tensor(values, dtype=torch.float64)
    t = t[t.isfinite()]
    qs = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist() \
        if t.numel() else [math.nan] * len(QUANTILES)
    return {
        "mean": float(t.mean()) if t.numel() else math.nan,
        "quantiles": {f"p{round(100 * q)}": v for q, v in zip(QUANTILES, qs, strict=True)},
        "undefined": len(values) - int(t.numel()),
    }


def result(chosen: list[Occurrence], positions: int, *, vocab: int | None,
           fired: int) -> dict[str, object]:
    """The group's fields: the settings, the ablations' `summary`, the baseline's under
    `baseline`, and one record per latent."""
    return {
        "latents": len(chosen),
        "fired": fired,
        "positions": positions,
        "vocab": vocab,
        **summary([o.sparsity for o in chosen]),
        "baseline": summary([o.baseline for o in chosen]),
        "per_latent": [
            {"latent": o.latent, "activation": o.activation, "context": o.context,
             "position": o.position, "norm": o.norm, "sparsity": o.sparsity,
             "baseline": o.baseline, "channel": o.channel}
            for o in chosen
        ],
    }
