"""Explanations with precision and recall (Gao et al. 2024, §4.4, after N2G, Foote et al.
2023): can a latent's firing be predicted from a few short token patterns? A latent that is
a clean "detector" gets patterns that predict it well; a latent that fires for reasons no
n-gram captures does not.

Building, on the train split, for a sample of latents (those that fire there at all): each
latent's `top` highest activations (context, position p). For each such occurrence, the
shortest n-gram ending at the activating token (n ≤ 4; it may start at position 0) that alone
still gives at least half of the original activation; an occurrence with no such n-gram gives
no pattern. Then each non-final token of that n-gram is replaced, one at a time, by each of a
few fixed replacement ids (distinct ids drawn from the train tokens): it becomes a wildcard
when every replacement keeps at least `WILDCARD_FRACTION` of the n-gram's own activation. The
activating token itself is never a wildcard (as in N2G). Leading wildcards are dropped (on
the scored positions p ≥ 1 there is always a token before), and a pattern whose matches
another pattern's matches include is dropped (the predictions are their union).

"Alone" means: the model sees [prefix, n-gram] (the prefix is one fixed token, the
separator) and the activation is read at the last position. Position 0 is never read, neither
here nor on the corpus: the SAE never trained on it (its norm is an outlier).

Scoring, on the eval split, positions 1..T−1: "fires" = the latent is among the SAE's top k
with a value > 0; "predicted" = one of its patterns matches the tokens ending there (earlier
tokens of the context, position 0 included, may be part of the match). precision =
P(fires | predicted), recall = P(predicted | fires), F1 = 2TP / (#fires + #predicted); each is
NaN where undefined (never predicted, never fires, neither) and the means skip NaN.

Cost: one truncated forward per batch of train contexts and of eval contexts, plus the short
[prefix, n-gram] forwards: at most latents · top · (4 + 3 · replacements) rows, deduplicated
(latents that fire on the same n-gram share its row) and batched by length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from saestream.consumer.checkpoint import LoadedSAE
from saestream.consumer.sae import SparseAutoencoder
from saestream.producer.hooks import HookedModel

MAX_N = 4
"""Longest n-gram an explanation is built from."""
HALF = 0.5
"""An n-gram explains an occurrence when alone it gives ≥ this fraction of the activation."""
WILDCARD_FRACTION = 0.8
"""A token becomes a wildcard when every replacement keeps ≥ this fraction of the n-gram's
activation alone."""

Pattern = tuple[int | None, ...]
"""Token ids ending at the activating token; None is a wildcard (matches any token)."""
Progress = Callable[[int, int], None]
"""Called with (forward passes done, forward passes planned); planned grows as the n-gram
forwards become known."""


class _Encoder:
    """The SAE's top-k code of the hook's output, from truncated forwards; counts them."""

    def __init__(self, model: nn.Module, hook: str, sae: SparseAutoencoder,
                 progress: Progress | None) -> None:
        self.hooked = HookedModel(model, [hook], early_stop=True)
        self.hook, self.sae, self.k = hook, sae, sae.cfg.k
        self.device = next(model.parameters()).device
        self.progress = progress
        self.done = self.planned = 0

    def __call__(self, ids: torch.Tensor, last: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """:param ids: [b, T]. :return: values and latent ids of the top k, [b, T, k] (or
        [b, 1, k] with `last`: the last position only); a value 0 is not firing."""
        h = self.hooked(ids.to(self.device))[self.hook]
        if last:
            h = h[:, -1:]
        if h.shape[-1] != self.sae.cfg.d_in:
            raise ValueError(f"the SAE reads d_in {self.sae.cfg.d_in}, but hook {self.hook} "
                             f"gives {h.shape[-1]}")
        xn, _ = self.sae.normalize(h.reshape(-1, h.shape[-1]).to(self.sae.W_dec.dtype))
        values, indices = self.sae.encode(xn, self.k)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.planned)
        return values.view(*h.shape[:2], -1), indices.view(*h.shape[:2], -1)

    def close(self) -> None:
        self.hooked.remove()


class TopOccurrences:
    """Per latent, the `top` highest activations seen and where: flat index c·T + p into the
    contexts [n, T] (−1 = empty slot). Ties keep the earlier occurrence."""

    def __init__(self, n_latents: int, top: int, device: torch.device | str = "cpu") -> None:
        self.top = top
        self.value = torch.zeros(n_latents, top, device=device)
        self.where = torch.full((n_latents, top), -1, dtype=torch.int64, device=device)

    def add(self, values: torch.Tensor, indices: torch.Tensor, first: int) -> None:
        """:param values: the top k's values [b, T, k] and `indices` their latent ids, for the
        contexts whose flat indices start at `first`; position 0 is skipped."""
        b, t, k = values.shape
        flat = first + torch.arange(b * t, device=values.device).view(b, t, 1).expand(b, t, k)
        new = values > 0
        new[:, 0] = False
        old = self.where >= 0
        lat = torch.cat([old.nonzero()[:, 0], indices[new]])
        val = torch.cat([self.value[old], values[new].to(self.value.dtype)])
        pos = torch.cat([self.where[old], flat[new]])
        order = val.argsort(descending=True, stable=True)
        order = order[lat[order].argsort(stable=True)]  # by latent, then value descending
        lat, val, pos = lat[order], val[order], pos[order]
        rank = torch.arange(len(lat), device=lat.device) - torch.searchsorted(lat, lat)
        keep = rank < self.top
        self.value.zero_()
        self.where.fill_(-1)
        self.value[lat[keep], rank[keep]] = val[keep]
        self.where[lat[keep], rank[keep]] = pos[keep]


def pattern_matches(ids: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Where `pattern` matches the tokens ending at each position: bool [b, T] for ids
    [b, T] (False where the pattern does not fit before the position)."""
    b, t = ids.shape
    n = len(pattern)
    out = torch.zeros(b, t, dtype=torch.bool, device=ids.device)
    if n > t:
        return out
    ok = torch.ones(b, t - n + 1, dtype=torch.bool, device=ids.device)
    for i, tok in enumerate(pattern):
        if tok is not None:
            ok &= ids[:, i:i + t - n + 1] == tok
    out[:, n - 1:] = ok
    return out


def covers(a: Pattern, b: Pattern) -> bool:
    """Whether every match of `b` is a match of `a` (aligned at the activating token)."""
    return len(a) <= len(b) and all(x is None or x == y
                                    for x, y in zip(reversed(a), reversed(b), strict=False))


def prune(patterns: Iterable[Pattern]) -> list[Pattern]:
    """The distinct patterns, without leading wildcards and without those another covers;
    sorted (shortest first) so the explanation is deterministic."""
    distinct = {_strip(p) for p in patterns}
    kept = [p for p in distinct if not any(q != p and covers(q, p) for q in distinct)]
    return sorted(kept, key=lambda p: (len(p), [-1 if x is None else x for x in p]))


def _strip(p: Pattern) -> Pattern:
    while len(p) > 1 and p[0] is None:
        p = p[1:]
    return p


def replacement_ids(ids: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """`count` distinct token ids drawn from `ids` (so by frequency), deterministic."""
    flat = ids.flatten()
    out: dict[int, None] = {}
    for tok in flat[torch.randperm(flat.numel(), generator=generator)].tolist():
        if len(out) == count:
            break
        out[tok] = None
    return list(out)


def _alone(enc: _Encoder, seqs: torch.Tensor, latents: torch.Tensor, prefix_id: int,
           tokens: int) -> torch.Tensor:
    """Activation of latents[i] at the end of [prefix, seqs[i]] alone, [r] for seqs [r, n];
    identical rows share a forward, of about `tokens` tokens."""
    if seqs.shape[0] == 0:
        return torch.zeros(0)
    unique, inverse = torch.unique(seqs, dim=0, return_inverse=True)
    unique = torch.cat([torch.full_like(unique[:, :1], prefix_id), unique], dim=1)
    chunks = torch.split(unique, max(1, tokens // unique.shape[1]))
    enc.planned += len(chunks)
    codes = [enc(chunk, last=True) for chunk in chunks]
    values = torch.cat([v[:, 0] for v, _ in codes]).cpu()[inverse]
    indices = torch.cat([i[:, 0] for _, i in codes]).cpu()[inverse]
    return (values * (indices == latents[:, None])).sum(dim=1).float()


def _ngrams(ids: torch.Tensor, context: torch.Tensor, position: torch.Tensor,
            n: int) -> torch.Tensor:
    """The n tokens ending at each (context, position), [o, n]."""
    return ids[context[:, None], position[:, None] + torch.arange(1 - n, 1)]


def build(enc: _Encoder, ids: torch.Tensor, latent: torch.Tensor, value: torch.Tensor,
          where: torch.Tensor, replacements: list[int], prefix_id: int,
          tokens: int) -> list[Pattern | None]:
    """One pattern per occurrence (None: no n-gram of ≤ MAX_N tokens gives half of it).

    :param ids: the train contexts [n, T]; `latent`, `value`, `where` [o]: each occurrence's
        latent, activation and flat index c·T + p.
    """
    t = ids.shape[1]
    context, position = where // t, where % t
    chosen = torch.zeros_like(position)  # n of the shortest n-gram found, 0 = none yet
    alone = torch.zeros_like(value)
    for n in range(1, MAX_N + 1):
        todo = ((chosen == 0) & (position + 1 >= n)).nonzero().squeeze(1)
        got = _alone(enc, _ngrams(ids, context[todo], position[todo], n), latent[todo],
                     prefix_id, tokens)
        ok = got >= HALF * value[todo]
        chosen[todo[ok]] = n
        alone[todo[ok]] = got[ok]
    patterns: list[Pattern | None] = [None] * len(latent)
    for n in range(1, MAX_N + 1):
        sel = (chosen == n).nonzero().squeeze(1)
        grams = _ngrams(ids, context[sel], position[sel], n)
        wild = _wildcards(enc, grams, latent[sel], alone[sel], replacements, prefix_id, tokens)
        for j, o in enumerate(sel.tolist()):
            toks, wilds = grams[j].tolist(), wild[j].tolist()
            patterns[o] = tuple(None if w else x for x, w in zip(toks, wilds, strict=True))
    return patterns


def _wildcards(enc: _Encoder, grams: torch.Tensor, latent: torch.Tensor, alone: torch.Tensor,
               replacements: list[int], prefix_id: int, tokens: int) -> torch.Tensor:
    """bool [o, n]: which tokens of the n-grams [o, n] are wildcards (never the last)."""
    o, n = grams.shape
    wild = torch.zeros(o, n, dtype=torch.bool)
    if n == 1 or o == 0 or not replacements:
        return wild
    r = len(replacements)
    seqs = grams.expand(n - 1, r, o, n).clone()  # [slot, replacement, occurrence, token]
    repl = torch.tensor(replacements, dtype=grams.dtype)
    for slot in range(n - 1):
        seqs[slot, :, :, slot] = repl[:, None]
    got = _alone(enc, seqs.reshape(-1, n), latent.repeat((n - 1) * r), prefix_id, tokens)
    kept = got.view(n - 1, r, o).amin(dim=1) >= WILDCARD_FRACTION * alone
    wild[:, :-1] = kept.t()
    return wild


def score(enc: _Encoder, ids: torch.Tensor, latents: torch.Tensor,
          patterns: list[list[Pattern]], batch_size: int) -> torch.Tensor:
    """Counts on contexts ids [n, T], positions 1..T−1: [m, 3] = (true positives, fires,
    predicted) per latent of `latents` [m], whose patterns are `patterns[j]`."""
    n_latents = enc.sae.cfg.n_latents
    m = len(latents)
    column = torch.full((n_latents,), m, dtype=torch.int64)  # latent id -> column (m: other)
    column[latents] = torch.arange(m)
    column = column.to(enc.device)
    counts = torch.zeros(m, 3, dtype=torch.int64)
    for batch in torch.split(ids, batch_size):
        values, indices = enc(batch)
        acts = values.new_zeros(*values.shape[:2], m + 1).scatter_add_(
            -1, column[indices], values)
        fires = (acts[:, 1:, :m] > 0).cpu()
        cache: dict[Pattern, torch.Tensor] = {}
        predicted = torch.zeros_like(fires)
        for j, pats in enumerate(patterns):
            for p in pats:
                if p not in cache:
                    cache[p] = pattern_matches(batch, p)[:, 1:]
                predicted[..., j] |= cache[p]
        counts[:, 0] += (fires & predicted).sum(dim=(0, 1))
        counts[:, 1] += fires.sum(dim=(0, 1))
        counts[:, 2] += predicted.sum(dim=(0, 1))
    return counts


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def _mean(xs: list[float]) -> float:
    defined = [x for x in xs if not math.isnan(x)]
    return sum(defined) / len(defined) if defined else math.nan


def render(pattern: Pattern, decode: Callable[[int], str]) -> str:
    """A pattern for a person: each token's text quoted, a wildcard as `*`."""
    return " ".join("*" if t is None else repr(decode(t)) for t in pattern)


def explanations(
    model: nn.Module, train_ids: torch.Tensor, eval_ids: torch.Tensor, loaded: LoadedSAE,
    hook: str, *, latents: int = 64, top: int = 16, seed: int = 0, batch_size: int = 8,
    prefix_id: int = 0, replacements: int = 4, decode: Callable[[int], str] | None = None,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Build explanations for a sample of `latents` latents of `loaded` (at `hook` of `model`)
    on `train_ids` [n, T] and score them on `eval_ids` [n', T'] (see the module docstring).

    :param top: top-activating occurrences per latent an explanation is built from.
    :param seed: picks the latents (among those that fire on the train contexts) and the
        `replacements` ids tried for wildcards.
    :param prefix_id: the token before an n-gram run alone (the model's separator).
    :param decode: token id -> text; adds a readable `explanation` per latent.
    :return: {latents, alive_latents, precision_mean, recall_mean, f1_ge_0_5_fraction,
        per_latent: [{latent, patterns, (explanation), occurrences, explained_occurrences,
        precision, recall, f1, fires, predicted, true_positives}]}.
    """
    sae = loaded.sae
    enc = _Encoder(model, hook, sae, progress)
    g = torch.Generator().manual_seed(seed)
    train_ids, eval_ids = train_ids.cpu(), eval_ids.cpu()
    tokens = batch_size * train_ids.shape[1]  # per n-gram forward: as a batch of contexts
    try:
        with torch.inference_mode():
            train_batches = torch.split(train_ids, batch_size)
            enc.planned += len(train_batches) + math.ceil(eval_ids.shape[0] / batch_size)
            best = TopOccurrences(sae.cfg.n_latents, top, enc.device)
            for i, batch in enumerate(train_batches):
                values, indices = enc(batch)
                best.add(values, indices, i * batch_size * train_ids.shape[1])
            value, where = best.value.cpu(), best.where.cpu()
            alive = (where[:, 0] >= 0).nonzero().squeeze(1)
            chosen = alive[torch.randperm(len(alive), generator=g)[:latents]].sort().values
            used = where[chosen] >= 0  # [m, top]
            occ_latent = chosen[:, None].expand_as(used)[used]
            found = build(enc, train_ids, occ_latent, value[chosen][used], where[chosen][used],
                          replacement_ids(train_ids, replacements, g), prefix_id, tokens)
            per_occ = iter(found)
            raw = [[next(per_occ) for _ in range(int(u.sum()))] for u in used]
            patterns = [prune(p for p in ps if p is not None) for ps in raw]
            counts = score(enc, eval_ids, chosen, patterns, batch_size)
    finally:
        enc.close()

    per_latent = []
    for j, lat in enumerate(chosen.tolist()):
        tp, fires, predicted = counts[j].tolist()
        entry: dict[str, object] = {"latent": lat, "patterns": [list(p) for p in patterns[j]]}
        if decode is not None:
            entry["explanation"] = [render(p, decode) for p in patterns[j]]
        entry.update({
            "occurrences": len(raw[j]),
            "explained_occurrences": sum(p is not None for p in raw[j]),
            "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, fires),
            "f1": _ratio(2 * tp, fires + predicted),
            "fires": fires,
            "predicted": predicted,
            "true_positives": tp,
        })
        per_latent.append(entry)
    f1s = [e["f1"] for e in per_latent if not math.isnan(e["f1"])]  # type: ignore[arg-type]
    return {
        "latents": len(per_latent),
        "alive_latents": len(alive),
        "precision_mean": _mean([e["precision"] for e in per_latent]),  # type: ignore[misc]
        "recall_mean": _mean([e["recall"] for e in per_latent]),  # type: ignore[misc]
        "f1_ge_0_5_fraction": (sum(f >= 0.5 for f in f1s) / len(f1s)) if f1s else math.nan,
        "per_latent": per_latent,
    }
