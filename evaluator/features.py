"""What the feature browser shows about each latent, computed from one pass over held-out text.

The model runs once over the contexts (a truncated forward to the deepest hook, shared by
every SAE), each SAE encodes its hook's output, and the top-k code of every evaluated token
is kept: values and ids, [tokens, k] (8 bytes per kept latent: 51 MB for 200k tokens at
k = 32). Everything per latent then comes from those codes in a few sorts, so the figures are
exact, not sampled: firing count, maximum and mean activation, the activation histogram, the
top-activating occurrences, occurrences spread over the quantiles of its firing activations,
and the tokens it fires on. As in `saestream eval`, position 0 of a context is never encoded
(no SAE trained on it) and "fires" means among the top k with a value > 0.

Two figures come from the decoder alone: the latents whose decoder rows are nearest by
cosine, and the output tokens a decoder direction promotes and suppresses, read through the
model's final norm (its gain; the division by the norm is a positive scale per token that
changes no ranking) and its unembedding. The latter only where the hook is a residual stream
(the embedding output or a block's output), since only there is that path the one to the
logits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from saestream.consumer.checkpoint import LoadedSAE
from saestream.evaluator.reconstruction import Moments, ReconstructionSums, reconstruct
from saestream.producer.hooks import HookedModel

Progress = Callable[[int, int], None]
"""Called with (forward passes done, forward passes planned)."""

FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.final_layernorm", "model.decoder.final_layer_norm")
"""Where causal LMs keep the norm before the unembedding (Llama/SmolLM2, GPT-2, Pythia, ...)."""


class FeatureError(ValueError):
    """Inputs the browser cannot be built from (a width mismatch, nothing fired); one line."""


@dataclass(frozen=True)
class FeatureSettings:
    """How much of each latent the browser shows."""

    top: int = 16
    """Top-activating occurrences per latent."""
    bands: int = 5
    """Quantile bands of a latent's firing activations that examples are drawn from (the top
    fifth, the next fifth, ... with 5)."""
    per_band: int = 3
    """Examples per band, evenly spaced in rank within it."""
    before: int = 16
    """Tokens shown before the activating one (fewer at a context's start)."""
    after: int = 6
    """Tokens shown after it."""
    bins: int = 24
    """Bins of the activation histogram, over (0, the latent's maximum]."""
    neighbours: int = 8
    """Nearest latents by decoder cosine."""
    logit_tokens: int = 10
    """Output tokens listed as promoted, and as suppressed."""
    token_latents: int = 10
    """Latents kept per token id for "which latents fire on this token"."""
    top_tokens: int = 3
    """Per latent, the token ids it fires on most often (shown, and matched by the filter)."""


class Codes(NamedTuple):
    """One SAE's top-k code of every evaluated token; row r is context r // (T−1),
    position r % (T−1) + 1."""

    values: torch.Tensor
    """[tokens, k] float32, ReLU applied (0 = not firing)."""
    indices: torch.Tensor
    """[tokens, k] int32 latent ids."""
    reconstruction: dict[str, object]
    """`saestream eval`'s reconstruction group on the same tokens (normalized MSE, ...)."""


def encode_contexts(
    model: nn.Module, ids: torch.Tensor, saes: Sequence[tuple[LoadedSAE, str]], *,
    batch_size: int = 16, progress: Progress | None = None,
) -> dict[str, Codes]:
    """Run `model` over the contexts `ids` [n, T] (one truncated forward per batch, shared by
    every SAE) and keep each (SAE, hook)'s code of positions 1..T−1. Raises FeatureError when
    an SAE's d_in is not its hook's width."""
    device = next(model.parameters()).device
    hooks = list(dict.fromkeys(h for _, h in saes))
    hooked = HookedModel(model, hooks, early_stop=True)
    values: dict[str, list[torch.Tensor]] = {s.name: [] for s, _ in saes}
    indices: dict[str, list[torch.Tensor]] = {s.name: [] for s, _ in saes}
    sums = {s.name: ReconstructionSums(s.sae.cfg.n_latents, int(s.sae.cfg.d_in or 0), device)
            for s, _ in saes}
    raw: dict[str, Moments] = {}
    batches = torch.split(ids, batch_size)
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                acts = hooked(batch.to(device))
                for h in hooks:
                    x = acts[h][:, 1:].reshape(-1, acts[h].shape[-1])
                    raw.setdefault(h, Moments(x.shape[1], device)).add(x)
                    acts[h] = x
                for s, h in saes:
                    x = acts[h]
                    if x.shape[1] != s.sae.cfg.d_in:
                        raise FeatureError(f"SAE {s.name} reads d_in {s.sae.cfg.d_in}, but "
                                           f"hook {h} gives {x.shape[1]}")
                    r = reconstruct(s.sae, x, s.sae.cfg.k)
                    sums[s.name].normalized.add(r.normalized_x)
                    sums[s.name].add(x, r)
                    values[s.name].append(r.values.float().cpu())
                    if not bool(torch.isfinite(values[s.name][-1]).all()):
                        raise FeatureError(non_finite(s.name, h, x))
                    indices[s.name].append(r.indices.to(torch.int32).cpu())
                if progress is not None:
                    progress(i + 1, len(batches))
    finally:
        hooked.remove()
    return {s.name: Codes(torch.cat(values[s.name]), torch.cat(indices[s.name]),
                          sums[s.name].result(raw[h])) for s, h in saes}


def non_finite(name: str, hook: str, x: torch.Tensor) -> str:
    """The one line refusing an SAE whose code holds NaN or inf, saying where it came from."""
    where = (f"hook {hook} gives non-finite values" if not bool(torch.isfinite(x).all())
             else "its weights or normalisation make them so")
    return f"SAE {name}: non-finite activations (NaN or inf) on the tokens seen ({where})"


def check_finite_weights(sae: LoadedSAE) -> None:
    """FeatureError unless every weight of the SAE is finite (a NaN or inf in them would
    become the browser's figures)."""
    bad = [n for n, t in sae.sae.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    scale = sae.sae.input_scale
    if scale is not None and not math.isfinite(scale):
        bad.append("input_scale")
    if bad:
        raise FeatureError(f"SAE {sae.name}: non-finite weights (NaN or inf) in "
                           f"{', '.join(bad)} of {sae.directory}")


@dataclass
class LatentStats:
    """Per-latent figures over the evaluated tokens, for every latent of the SAE."""

    count: torch.Tensor
    """[n] tokens the latent fired on."""
    max: torch.Tensor
    """[n] highest activation (0 if it never fired)."""
    mean: torch.Tensor
    """[n] mean activation over the tokens it fired on (0 if it never fired)."""
    histogram: torch.Tensor
    """[n, bins] firing activations counted in equal bins over (0, max]."""
    top_rows: torch.Tensor
    """[n, top] code rows of the highest activations, highest first (−1 = none)."""
    band_rows: torch.Tensor
    """[n, bands, per_band] code rows drawn from each quantile band (−1 = none)."""
    band_edges: torch.Tensor
    """[n, bands, 2] lowest and highest activation of each band (0 where empty)."""
    top_tokens: torch.Tensor
    """[n, top_tokens] token ids the latent fires on most often (−1 = none)."""
    top_token_counts: torch.Tensor
    """[n, top_tokens] how often it fires on each."""
    token_occurrences: torch.Tensor
    """[vocab] evaluated tokens of each id."""
    token_latents: torch.Tensor
    """[vocab, token_latents] the latents firing most often on each token id (−1 = none)."""
    token_latent_counts: torch.Tensor
    """[vocab, token_latents] how often each fires on it."""

    @property
    def dead(self) -> torch.Tensor:
        """Ids of the latents that never fired."""
        return (self.count == 0).nonzero().squeeze(1)


def latent_stats(codes: Codes, token_ids: torch.Tensor, n_latents: int, vocab_size: int,
                 settings: FeatureSettings) -> LatentStats:
    """Every per-latent figure from the codes. :param token_ids: the token id of each code row
    [tokens] (the evaluated positions of the contexts, flattened)."""
    s = settings
    if not bool(torch.isfinite(codes.values).all()):
        raise FeatureError("non-finite activations (NaN or inf) in the codes")
    fire = codes.values > 0
    rows = torch.arange(codes.values.shape[0]).unsqueeze(1).expand_as(fire)[fire]
    lat = codes.indices[fire].long()
    val = codes.values[fire]
    count = torch.bincount(lat, minlength=n_latents)
    total = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, lat, val.double())
    mean = (total / count.clamp(min=1)).float()
    order = val.argsort(descending=True, stable=True)
    order = order[lat[order].argsort(stable=True)]  # by latent, then activation descending
    lat, val, rows = lat[order], val[order], rows[order]
    start = count.cumsum(0) - count
    vmax = torch.zeros(n_latents)
    alive = count > 0
    vmax[alive] = val[start[alive]]

    scaled = (val / vmax[lat] * s.bins).long().clamp(max=s.bins - 1)
    histogram = torch.bincount(lat * s.bins + scaled, minlength=n_latents * s.bins)
    top_rows = _pick(rows, start, count, torch.arange(s.top).expand(n_latents, -1))

    # band b holds ranks [c·b/B, c·(b+1)/B); its examples sit evenly spaced inside it
    c = count.double().view(-1, 1, 1)
    b = torch.arange(s.bands, dtype=torch.float64).view(1, -1, 1)
    j = torch.arange(s.per_band, dtype=torch.float64).view(1, 1, -1)
    lo, hi = (c * b / s.bands).ceil().long(), (c * (b + 1) / s.bands).ceil().long()
    ranks = (c * (b + (j + 0.5) / s.per_band) / s.bands).floor().long()
    repeat = torch.cat([torch.zeros_like(ranks[..., :1], dtype=torch.bool),
                        ranks[..., 1:] == ranks[..., :-1]], dim=-1)  # a band of fewer rows
    ranks = torch.where((ranks >= lo) & (ranks < hi) & ~repeat, ranks, -1)
    band_rows = _pick(rows, start, count, ranks.flatten(1)).view(n_latents, s.bands, s.per_band)
    edges = torch.stack([hi.squeeze(2) - 1, lo.squeeze(2)], dim=2)  # lowest value = last rank
    band_edges = _pick(val, start, count, torch.where(hi > lo, edges, -1).flatten(1), fill=0.0)

    tokens = token_ids[rows]
    occurrences = torch.bincount(token_ids, minlength=vocab_size)
    pair, pair_count = torch.unique(tokens * n_latents + lat, return_counts=True)
    pair_tok, pair_lat = pair // n_latents, pair % n_latents
    top_tokens, top_token_counts = _top_per_group(pair_lat, pair_tok, pair_count, n_latents,
                                                  s.top_tokens)
    token_latents, token_latent_counts = _top_per_group(pair_tok, pair_lat, pair_count,
                                                        vocab_size, s.token_latents)
    return LatentStats(count, vmax, mean, histogram.view(n_latents, s.bins), top_rows,
                       band_rows, band_edges.view(n_latents, s.bands, 2), top_tokens,
                       top_token_counts, occurrences, token_latents, token_latent_counts)


def _pick(sorted_values: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
          ranks: torch.Tensor, fill: float | int = -1) -> torch.Tensor:
    """sorted_values[start[i] + ranks[i, j]] where 0 <= ranks[i, j] < count[i], else fill."""
    ok = (ranks >= 0) & (ranks < count.unsqueeze(1))
    where = (start.unsqueeze(1) + ranks.clamp(min=0)).clamp(max=max(len(sorted_values) - 1, 0))
    if len(sorted_values) == 0:
        return torch.full(ranks.shape, fill, dtype=sorted_values.dtype)
    return torch.where(ok, sorted_values[where], torch.tensor(fill, dtype=sorted_values.dtype))


def _top_per_group(group: torch.Tensor, item: torch.Tensor, weight: torch.Tensor, groups: int,
                   top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group id 0..groups−1, the `top` items of highest weight ([groups, top], −1/0 pad)."""
    order = weight.argsort(descending=True, stable=True)
    order = order[group[order].argsort(stable=True)]
    group, item, weight = group[order], item[order], weight[order]
    count = torch.bincount(group, minlength=groups)
    start = count.cumsum(0) - count
    ranks = torch.arange(top).expand(groups, -1)
    return _pick(item, start, count, ranks), _pick(weight, start, count, ranks, fill=0)


Example = tuple[int, int, list[tuple[int, float]]]
"""(context, position, [(position, activation), ...]): an occurrence and the latent's nonzero
activations on the window shown around it, positions ascending."""


def example_activations(codes: Codes, rows: torch.Tensor, latents: torch.Tensor, seq_len: int,
                        settings: FeatureSettings) -> list[list[Example]]:
    """For each latent i, its examples: the code rows `rows[i]` ([m, e], −1 = none) as
    Examples, windows `before`..`after` tokens around each, inside its context."""
    per_ctx = seq_len - 1
    offsets = torch.arange(-settings.before, settings.after + 1)
    # every firing as one sorted key row·n + latent, so a window's activations are lookups
    fire = codes.values > 0
    n = int(codes.indices.max()) + 1 if codes.indices.numel() else 1
    keys = (torch.arange(len(fire)).unsqueeze(1) * n + codes.indices)[fire]
    keys, order = keys.sort()
    vals = codes.values[fire][order]
    if not len(keys):  # nothing fired; a sentinel no query equals keeps the lookups simple
        keys, vals = torch.tensor([-1]), torch.zeros(1)
    out: list[list[Example]] = []
    for lo in range(0, len(latents), 1024):
        r, lats = rows[lo:lo + 1024], latents[lo:lo + 1024]
        ctx, pos = r.div(per_ctx, rounding_mode="floor"), r % per_ctx + 1
        window = pos.unsqueeze(2) + offsets  # positions [m, e, w]
        inside = (r.unsqueeze(2) >= 0) & (window >= 1) & (window < seq_len)
        query = (ctx.unsqueeze(2) * per_ctx + window - 1) * n + lats.view(-1, 1, 1)
        at = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
        act = torch.where(inside & (keys[at] == query), vals[at], 0.0)
        nonzero = act != 0
        ends = nonzero.sum(dim=2).flatten().cumsum(0).tolist()  # per example, row-major
        pairs = list(zip(window[nonzero].tolist(), act[nonzero].tolist(), strict=True))
        rl, cl, pl = r.flatten().tolist(), ctx.flatten().tolist(), pos.flatten().tolist()
        e = r.shape[1]
        for i in range(len(lats)):
            out.append([(cl[x], pl[x], pairs[ends[x - 1] if x else 0:ends[x]])
                        for x in range(i * e, (i + 1) * e) if rl[x] >= 0])
    return out


def nearest_latents(sae: LoadedSAE, latents: torch.Tensor, top: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` other latents whose decoder rows are nearest to each latent's by cosine:
    (ids [m, top], cosines [m, top])."""
    w = sae.sae.W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    top = min(top, w.shape[0] - 1)
    ids, cos = [], []
    with torch.inference_mode():
        for chunk in torch.split(latents.to(w.device), 1024):
            sim = w[chunk] @ w.T
            sim[torch.arange(len(chunk)), chunk] = float("-inf")
            c, i = sim.topk(top, dim=1)
            ids.append(i.cpu())
            cos.append(c.cpu())
    return torch.cat(ids), torch.cat(cos)


def residual_hook(model: nn.Module, hook: str, block_prefix: str) -> bool:
    """Whether `hook`'s output is the residual stream: the token embedding or a whole block."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and model.get_submodule(hook) is emb:
        return True
    return re.fullmatch(rf"{re.escape(block_prefix)}\.\d+", hook) is not None


def logit_effects(model: nn.Module, sae: LoadedSAE, latents: torch.Tensor, top: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The output tokens each latent's decoder direction promotes and suppresses most:
    (promoted ids, their logit weights, suppressed ids, their weights), each [m, top]; None
    when the model has no unembedding to read.

    A decoder row is a direction of the SAE's input space; every input normalisation maps
    it back to the raw space by a positive scale, so the direction is the row itself. Through
    a final RMSNorm it is multiplied by the gain, through a LayerNorm centred first.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        return None
    unembed = head.weight.detach().float()
    d = sae.sae.W_dec.detach().float().to(unembed.device)
    norm = _final_norm(model)
    gain = getattr(norm, "weight", None) if norm is not None else None
    out: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.inference_mode():
        for chunk in torch.split(latents.to(unembed.device), 512):
            x = d[chunk]
            if isinstance(norm, nn.LayerNorm):
                x = x - x.mean(dim=1, keepdim=True)
            if isinstance(gain, torch.Tensor):
                x = x * gain.detach().float()
            logits = x @ unembed.T
            hi, hi_i = logits.topk(top, dim=1)
            lo, lo_i = logits.topk(top, dim=1, largest=False)
            for bucket, t in zip(out, (hi_i, hi, lo_i, lo), strict=True):
                bucket.append(t.cpu())
    promoted, promoted_v, suppressed, suppressed_v = (torch.cat(b) for b in out)
    return promoted, promoted_v, suppressed, suppressed_v


def _final_norm(model: nn.Module) -> nn.Module | None:
    for name in FINAL_NORMS:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return None


class LatentChoice(NamedTuple):
    """What `--latents` asks for."""

    kind: str
    """`all`, `top` (the `count` most frequent) or `list` (`ids`)."""
    count: int = 0
    ids: tuple[int, ...] = ()


def parse_latents(spec: str, n_latents: int) -> LatentChoice:
    """`all`, `N` (the N most frequent) or `I,J,...` (those ids; `I,` for one). Raises
    FeatureError naming the problem."""
    text = spec.strip()
    if text == "all":
        return LatentChoice("all")
    if "," not in text:
        if not text.isdigit() or int(text) < 1:
            raise FeatureError(f"--latents {spec!r}: use all, a count N (the N most frequent) "
                               "or a comma-separated list of ids (7, for one)")
        return LatentChoice("top", count=int(text))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise FeatureError(f"--latents {spec!r}: a list holds latent ids separated by commas")
    ids = tuple(sorted({int(p) for p in parts}))
    if ids[-1] >= n_latents:
        raise FeatureError(f"--latents: latent {ids[-1]} does not exist (the SAE has "
                           f"{n_latents} latents, 0..{n_latents - 1})")
    return LatentChoice("list", ids=ids)


def choose_latents(spec: str, stats: LatentStats) -> tuple[torch.Tensor, str]:
    """The latents `--latents` names, in id order, and a phrase saying which they are.
    Raises FeatureError for a bad `spec`."""
    n = len(stats.count)
    choice = parse_latents(spec, n)
    if choice.kind == "all":
        return torch.arange(n), "all latents"
    if choice.kind == "top":
        alive = (stats.count > 0).nonzero().squeeze(1)
        order = stats.count[alive].argsort(descending=True, stable=True)
        chosen = alive[order[:choice.count]].sort().values
        return chosen, f"the {len(chosen)} most frequent latents"
    return torch.tensor(choice.ids, dtype=torch.int64), "the latents asked for"
