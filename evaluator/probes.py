"""Probe loss (Gao et al. 2024, §4.3): does the SAE have single latents for simple features of
the text? If the features a person would name are each carried by one latent, a 1-D logistic
probe on that latent predicts them; the probe's cross-entropy is the measure.

The tasks are token-level binary labels computed from the evaluated text itself (`TASKS`), so
no labelled data set is needed. For each task, a 1-D logistic probe p = σ(a·z + b) is fitted on
every single latent and, as the baseline, on every single residual channel of the hook; the
probe with the lowest loss on the fit part of the tokens is chosen and its cross-entropy on the
held-out part is reported (choosing on the fit part keeps the reported loss honest: a choice
among thousands of candidates on the held-out tokens would flatter it).

Thousands of 1-D fits are cheap when done together: a damped Newton's method on all candidates
at once, over their values held as (candidate, token, value) entries with zeros implicit, so a
latent costs only the tokens it fires on (plus a closed form for the tokens it does not).
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saestream.consumer.checkpoint import LoadedSAE
from saestream.evaluator.reconstruction import reconstruct
from saestream.producer.hooks import HookedModel
from saestream.producer.models import ByteTokenizer

TASKS: dict[str, str] = {
    "digit": "the token, leading and trailing whitespace removed, is one or more ASCII digits",
    "capitalized": "the token's first non-whitespace character is an upper-case letter",
    "in_parentheses": "a character of the token lies inside parentheses: after an unclosed '(' "
                      "(nesting counted, an unmatched ')' ignored); the parentheses themselves "
                      "are outside, except inside an outer pair",
    "in_quotes": "a character of the token lies between double quotes: a straight '\"' opens "
                 "or closes (alternately), '“' opens, '”' closes; the quotes themselves are "
                 "outside; a newline closes an open quote",
    "punctuation": "the token, whitespace removed, is non-empty and all Unicode punctuation "
                   "(categories P*: . , ; : ! ? ' \" ( ) - and the like; not $ + = < >)",
    "sentence_start": "the token holds the first letter or digit of a sentence: the first after "
                      "one of . ! ? followed by whitespace (quotes and brackets may come before "
                      "or after the whitespace), or after a document separator",
    "year": "a character of the token is in a run of exactly four ASCII digits (no digit "
            "before or after it) whose value is 1000 to 2099",
    "word_start": "the token's first non-whitespace character is a letter or digit that comes "
                  "right after whitespace or a document separator (in the token or before it)",
    "newline": "the token contains a newline",
    "whitespace": "the token is non-empty and only whitespace",
}
"""The probe tasks, name -> definition, in report order. Every document separator (and any
token without surface text, e.g. a special token) is a document boundary: it resets the
parentheses and quotes, and what follows starts a sentence. The start of a context is not a
boundary (a context usually starts mid-document), so state is tracked from there."""

PROBE_L2 = 1e-4
"""L2 penalty λ·a²/2 on the probe weight, the feature standardised (mean 0, variance 1 over
the fit tokens); the intercept is free. It keeps a perfectly separating feature's weight finite
(its loss then converges to ~1e-3 rather than running off to 0 with a → ∞)."""
HELDOUT_DIVISOR = 5
"""The last max(1, ⌊n_contexts / 5⌋) contexts are held out; the probes are fitted on the
others (the first contexts, in corpus order)."""
BLOCK_ENTRIES = 1 << 20
"""Candidate values processed at once by the fitter (bounds its memory at ~100 MB)."""
NEWTON_STEPS = 100
HALVINGS = 40


class ProbeError(ValueError):
    """The probes group cannot run (no tokenizer, too few contexts); the message is one line."""


# -- token texts and task labels ---------------------------------------------------------------


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Each id's surface text, for ids 0..vocab_size−1; "" for separators and special tokens
    (a document boundary to the tasks) and ids the tokenizer does not know.

    The byte tokenizer gives ASCII bytes as characters and other bytes as U+FFFD. A Hugging
    Face tokenizer decodes each id alone (byte-level BPE markers become spaces and newlines;
    a partial UTF-8 character becomes U+FFFD); a SentencePiece '▁' that `decode` drops from
    a lone token is put back as its leading space.
    """
    if tokenizer is None:
        raise ProbeError("the probes group needs the model's tokenizer (token texts), and "
                         "this model has none")
    if isinstance(tokenizer, ByteTokenizer):
        return [chr(i) if i < 128 else "\ufffd" if i < 256 else "" for i in range(vocab_size)]
    n = min(vocab_size, len(tokenizer))
    ids = list(range(n))
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for i, text, piece in zip(ids, texts, pieces, strict=True):
        if i in special:
            text = ""
        elif isinstance(piece, str) and piece.startswith("\u2581") and not text[:1].isspace():
            text = " " + text
        out.append(text)
    return out + [""] * (vocab_size - n)


_DIGITS = frozenset("0123456789")
_QUOTES_BRACKETS = frozenset("\"'“”‘’()[]{}")
"""May come between a sentence's end mark and its whitespace, or between the whitespace and
the next sentence's first letter, without breaking the sentence start ('"No." (Then…')."""


def labels(tokens: Sequence[str]) -> dict[str, np.ndarray]:
    """The task labels of one context, given its tokens' texts (`token_texts`; "" = boundary).

    :return: task -> bool [len(tokens)], for every task of `TASKS`.
    """
    chars: list[str | None] = []  # the context's characters, None for a boundary
    owner: list[int] = []  # the token each character belongs to
    for i, text in enumerate(tokens):
        for ch in text or [None]:
            chars.append(ch)
            owner.append(i)
    per_char = {"in_parentheses": _in_parentheses(chars), "in_quotes": _in_quotes(chars),
                "sentence_start": _sentence_starts(chars), "year": _years(chars)}
    out: dict[str, np.ndarray] = {}
    idx = np.asarray(owner, dtype=np.int64)
    for name, marks in per_char.items():
        hit = np.zeros(len(tokens), dtype=bool)
        hit[idx[np.asarray(marks, dtype=bool)]] = True
        out[name] = hit
    word = np.zeros(len(tokens), dtype=bool)
    prev: str | None = ""  # the character before the token ("" = the context's start)
    for i, text in enumerate(tokens):
        before, rest = prev, text.lstrip()
        if len(rest) < len(text):
            before = text[len(text) - len(rest) - 1]
        word[i] = bool(rest) and rest[0].isalnum() and (before is None or before.isspace())
        prev = text[-1] if text else None
    out["word_start"] = word
    stripped = [t.strip() for t in tokens]
    out["digit"] = np.array([bool(s) and set(s) <= _DIGITS for s in stripped])
    out["capitalized"] = np.array([bool(s) and s[0].isupper() for s in stripped])
    out["punctuation"] = np.array(
        [bool(s) and all(unicodedata.category(c).startswith("P") for c in s) for s in stripped])
    out["newline"] = np.array(["\n" in t for t in tokens])
    out["whitespace"] = np.array([bool(t) and t.isspace() for t in tokens])
    return {name: out[name].astype(bool) for name in TASKS}


def _in_parentheses(chars: Sequence[str | None]) -> list[bool]:
    depth, marks = 0, []
    for ch in chars:
        if ch is None:
            depth = 0
        elif ch == ")" and depth > 0:
            depth -= 1
        marks.append(depth > 0)
        if ch == "(":
            depth += 1
    return marks


def _in_quotes(chars: Sequence[str | None]) -> list[bool]:
    inside, marks = False, []
    for ch in chars:
        if ch is None or ch == "\n" or ch == "”" or (ch == '"' and inside):
            inside, mark = False, False
        elif ch in ('"', "“"):
            inside, mark = True, False
        else:
            mark = inside
        marks.append(mark)
    return marks


def _sentence_starts(chars: Sequence[str | None]) -> list[bool]:
    ended, spaced, marks = False, False, []  # after . ! ?; and whitespace since
    for ch in chars:
        mark = False
        if ch is None:
            ended, spaced = True, True
        elif ch in ".!?":
            ended, spaced = True, False
        elif ch.isspace():
            spaced = ended
        elif ch.isalnum():
            mark = ended and spaced
            ended, spaced = False, False
        elif ch not in _QUOTES_BRACKETS:
            ended, spaced = False, False
        marks.append(mark)
    return marks


def _years(chars: Sequence[str | None]) -> list[bool]:
    marks = [False] * len(chars)
    i = 0
    while i < len(chars):
        j = i
        while j < len(chars) and chars[j] is not None and chars[j] in _DIGITS:
            j += 1
        if j - i == 4 and 1000 <= int("".join(chars[i:j])) <= 2099:  # type: ignore[arg-type]
            marks[i:j] = [True] * 4
        i = max(j, i + 1)
    return marks


# -- 1-D logistic probes, many at once -------------------------------------------------------


class Features:
    """Candidate features on n tokens: a dense [n, d] matrix (column j = candidate j) or
    sparse entries (token, candidate, value) with every other value 0 (float64 inside)."""

    def __init__(self, n_tokens: int, n_candidates: int, *, dense: torch.Tensor | None = None,
                 token: torch.Tensor | None = None, candidate: torch.Tensor | None = None,
                 value: torch.Tensor | None = None) -> None:
        self.n, self.size, self.dense = n_tokens, n_candidates, dense
        if dense is None:
            assert token is not None and candidate is not None and value is not None
            order = torch.argsort(candidate, stable=True)
            self.token, self.candidate = token[order], candidate[order]
            self.value = value[order].double()

    @classmethod
    def from_topk(cls, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> Features:
        """The SAE's latents from its top-k code: values/indices [n, k]; a latent is 0 on the
        tokens where it is not among the top k or its value is not positive."""
        keep = values > 0
        token = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
        return cls(values.shape[0], n_latents, token=token[keep], candidate=indices[keep],
                   value=values[keep])

    def tokens(self, lo: int, hi: int) -> Features:
        """The same candidates on tokens lo..hi−1."""
        if self.dense is not None:
            return Features(hi - lo, self.size, dense=self.dense[lo:hi])
        keep = (self.token >= lo) & (self.token < hi)
        return Features(hi - lo, self.size, token=self.token[keep] - lo,
                        candidate=self.candidate[keep], value=self.value[keep])

    def blocks(self) -> Iterator[_Block]:
        """Consecutive candidate ranges of at most ~BLOCK_ENTRIES values each."""
        if self.dense is not None:
            step = max(1, BLOCK_ENTRIES // max(self.n, 1))
            for j in range(0, self.size, step):
                cols = self.dense[:, j:j + step]
                yield _Block(j, cols.shape[1], self.n, cols.t().double(), None, None)
            return
        starts = torch.searchsorted(self.candidate,
                                    torch.arange(self.size + 1, device=self.candidate.device))
        bounds = starts.tolist()
        j = 0
        while j < self.size:
            end = min(self.size, max(j + 1, bisect_right(bounds, bounds[j] + BLOCK_ENTRIES) - 1))
            lo, hi = bounds[j], bounds[end]
            yield _Block(j, end - j, self.n, self.value[lo:hi], self.candidate[lo:hi] - j,
                         self.token[lo:hi])
            j = end


class _Block(NamedTuple):
    """Candidates start..start+size−1 on n tokens. Dense: `value` [size, n]. Sparse: `value`,
    `candidate` (local, 0..size−1), `token` [E]; zeros implicit."""

    start: int
    size: int
    n: int
    value: torch.Tensor
    candidate: torch.Tensor | None
    token: torch.Tensor | None

    def per_entry(self, v: torch.Tensor) -> torch.Tensor:
        """A per-candidate [size] tensor, broadcast to `value`'s entries."""
        return v[:, None] if self.candidate is None else v[self.candidate]

    def reduce(self, stats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-entry tensors (`value`'s shape) -> their per-candidate sums [size, len(stats)]."""
        if self.candidate is None:
            return torch.stack([v.sum(dim=1) for v in stats], dim=-1)
        out = stats[0].new_zeros(self.size, len(stats))
        return out.index_add_(0, self.candidate, torch.stack(list(stats), dim=-1))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation per candidate over the n tokens ([size] each; 1 where
        the deviation is 0, so a constant feature standardises to 0)."""
        ones = torch.ones_like(self.value)
        s = self.reduce([ones, self.value])
        n0 = self.n - s[:, 0]  # implicit zeros
        mean = s[:, 1] / self.n
        dev = self.reduce([(self.value - self.per_entry(mean)).pow(2)])[:, 0]
        std = ((dev + n0 * mean.pow(2)) / self.n).sqrt()
        return mean, torch.where(std > 0, std, torch.ones_like(std))

    def sums(self, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor) -> torch.Tensor:
        """Per candidate, over the tokens, with z the standardised feature and p = σ(a·z + b):
        Σ CE, Σ (p − y), Σ (p − y)·z, Σ w, Σ w·z, Σ w·z² (w = p(1 − p)), as [size, 6].

        :param y: float64 labels [n].
        """
        z = (self.value - self.per_entry(mean)) / self.per_entry(std)
        yy = y.expand_as(z) if self.token is None else y[self.token]
        explicit = self.reduce([torch.ones_like(z), yy])
        # Implicit zeros: n0 tokens of one value u, pos0 of them positive, in closed form.
        n0, pos0 = self.n - explicit[:, 0], float(y.sum()) - explicit[:, 1]
        u = -mean / std
        t = a * u + b
        p = torch.sigmoid(t)
        r, w = n0 * p - pos0, n0 * p * (1 - p)
        ce0 = pos0 * F.softplus(-t) + (n0 - pos0) * F.softplus(t)
        return (self.reduce(_stats(z, yy, self.per_entry(a), self.per_entry(b)))
                + torch.stack([ce0, r, r * u, w, w * u, w * u * u], dim=-1))


def _stats(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor
           ) -> list[torch.Tensor]:
    """Per entry: CE, p − y, (p − y)·z, w, w·z, w·z² for p = σ(a·z + b), w = p(1 − p)."""
    t = a * z + b
    p = torch.sigmoid(t)
    r, w = p - y, p * (1 - p)
    wz = w * z
    return [F.softplus(t) - y * t, r, r * z, w, wz, wz * z]


class Probes(NamedTuple):
    """One fitted probe per candidate, p = σ(weight·(x − mean)/std + bias): [candidates] each."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    fit_loss: torch.Tensor
    """Mean CE on the fit tokens (nats; the L2 penalty not included)."""


def fit_probes(features: Features, y: torch.Tensor, l2: float = PROBE_L2) -> Probes:
    """Fit p = σ(a·z + b) for every candidate alone: z its standardised value, minimising the
    mean CE on the tokens + l2·a²/2, by Newton's method with step halving from a = 0 and
    b = logit(positive fraction). :param y: labels [n] (bool or 0/1)."""
    y = y.double()
    prior = float(y.mean()) if features.n else 0.5
    b0 = float(np.log(max(prior, 1e-12) / max(1 - prior, 1e-12)))
    out: list[tuple[torch.Tensor, ...]] = []
    for block in features.blocks():
        mean, std = block.moments()
        a = torch.zeros_like(mean)
        b = torch.full_like(mean, b0)
        a, b, s = _newton(lambda a_, b_, blk=block, m=mean, sd=std: blk.sums(y, m, sd, a_, b_),
                          a, b, block.n, l2)
        out.append((a, b, mean, std, s[:, 0] / max(block.n, 1)))
    if not out:
        empty = torch.zeros(0, dtype=torch.float64)
        return Probes(empty, empty, empty, empty, empty)
    return Probes(*(torch.cat(parts) for parts in zip(*out, strict=True)))


def _newton(sums: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor,
            b: torch.Tensor, n: int, l2: float) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Minimise (Σ CE)/n + l2·a²/2 for all candidates; returns a, b and the final sums."""
    n = max(n, 1)
    s = sums(a, b)

    def objective(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return s[:, 0] / n + 0.5 * l2 * a * a

    obj = objective(s, a)
    active = torch.ones_like(a, dtype=torch.bool)
    for _ in range(NEWTON_STEPS):
        g_b, g_a = s[:, 1] / n, s[:, 2] / n + l2 * a
        # (a tiny ridge on b keeps a saturated probe's Hessian invertible)
        h_bb, h_ab, h_aa = s[:, 3] / n + 1e-12, s[:, 4] / n, s[:, 5] / n + l2
        det = h_aa * h_bb - h_ab * h_ab
        da, db = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        active &= (g_a * da + g_b * db) > 1e-18  # the Newton decrement: ~2× the gap left
        if not bool(active.any()):
            break
        step = active.double()
        for _ in range(HALVINGS):
            a_try, b_try = a - step * da, b - step * db
            s_try = sums(a_try, b_try)
            obj_try = objective(s_try, a_try)
            ok = (step > 0) & (obj_try <= obj + 1e-13)  # a rise within rounding is no rise
            a, b = torch.where(ok, a_try, a), torch.where(ok, b_try, b)
            s, obj = torch.where(ok[:, None], s_try, s), torch.where(ok, obj_try, obj)
            step = torch.where(ok, torch.zeros_like(step), step / 2)
            if not bool((step > 0).any()):
                break
        active &= step == 0  # a line search that never succeeded: converged to rounding
    return a, b, s


def probe_loss(probes: Probes, features: Features, y: torch.Tensor) -> torch.Tensor:
    """Each candidate's probe's mean CE (nats) on `features`' tokens with labels y [n]:
    [candidates] float64."""
    y = y.double()
    out = []
    for block in features.blocks():
        sl = slice(block.start, block.start + block.size)
        s = block.sums(y, probes.mean[sl], probes.std[sl], probes.weight[sl], probes.bias[sl])
        out.append(s[:, 0] / max(block.n, 1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def constant_loss(fit: torch.Tensor, heldout: torch.Tensor) -> float:
    """CE on the held-out labels of the best constant predictor of the fit labels."""
    p = float(fit.double().mean())
    q = float(heldout.double().mean())
    if p in (0.0, 1.0):
        return 0.0 if q == p else float("inf")
    return -(q * np.log(p) + (1 - q) * np.log(1 - p))


# -- the metric group --------------------------------------------------------------------------


class ProbeSums:
    """What the probes group keeps of the evaluated tokens (positions 1..T−1 of each context):
    their task labels, the SAE's positive top-k latents (12 bytes each) and the hook's raw
    rows (4·d_in bytes per token), on the rows' device; the fits run in `result`."""

    def __init__(self, texts: Sequence[str], n_latents: int) -> None:
        self.texts = list(texts)
        self.n_latents = n_latents
        self.context_tokens: list[int] = []  # evaluated tokens per context
        self.labels: list[dict[str, np.ndarray]] = []
        self.rows: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
            indices: torch.Tensor) -> None:
        """:param ids: the batch's contexts [b, T]; x: the hook's rows at positions 1..T−1
        [b·(T−1), d]; values/indices: the SAE's top-k code of x [b·(T−1), k]."""
        rows = ids.cpu().tolist()
        top = max(max(r) for r in rows)
        if top >= len(self.texts):
            raise ProbeError(f"token id {top} has no text (the tokenizer knows "
                             f"{len(self.texts)} ids)")
        for row in rows:
            self.labels.append({k: v[1:] for k, v in labels([self.texts[i] for i in row])
                                .items()})
            self.context_tokens.append(len(row) - 1)
        self.rows.append(x.float())
        self.values.append(values.float())
        self.indices.append(indices)

    def result(self) -> dict[str, Any]:
        """{tokens_fit, tokens_heldout, tasks: {task: {positive_fraction, sae_loss,
        sae_latent, baseline_loss, baseline_channel, constant_loss}}, sae_loss_mean,
        baseline_loss_mean, constant_loss_mean, tasks_scored}. Losses are mean CE in nats on
        the held-out tokens; a task without a positive and a negative token in both parts is
        NaN (latent and channel None) and left out of the means."""
        n_ctx = len(self.context_tokens)
        if n_ctx < 2:
            raise ProbeError(f"the probes group needs at least 2 contexts (a fit part and a "
                             f"held-out part), got {n_ctx}")
        n_fit = sum(self.context_tokens[: n_ctx - max(1, n_ctx // HELDOUT_DIVISOR)])
        n = sum(self.context_tokens)
        x = torch.cat(self.rows)
        device = x.device
        sae = Features.from_topk(torch.cat(self.values), torch.cat(self.indices), self.n_latents)
        base = Features(n, x.shape[1], dense=x)
        parts = {"sae": (sae.tokens(0, n_fit), sae.tokens(n_fit, n)),
                 "baseline": (base.tokens(0, n_fit), base.tokens(n_fit, n))}
        tasks: dict[str, dict[str, Any]] = {}
        for task in TASKS:
            y = torch.from_numpy(np.concatenate([lab[task] for lab in self.labels])).to(device)
            tasks[task] = _task_result(y, n_fit, parts)
        scored = [t for t in tasks.values() if t["sae_latent"] is not None]

        def mean(key: str) -> float:
            return float(np.mean([t[key] for t in scored])) if scored else float("nan")

        return {"tokens_fit": n_fit, "tokens_heldout": n - n_fit, "tasks": tasks,
                "sae_loss_mean": mean("sae_loss"), "baseline_loss_mean": mean("baseline_loss"),
                "constant_loss_mean": mean("constant_loss"), "tasks_scored": len(scored)}


def _task_result(y: torch.Tensor, n_fit: int,
                 parts: dict[str, tuple[Features, Features]]) -> dict[str, Any]:
    """One task's fields; `parts` maps sae/baseline to (fit, held-out) features."""
    y_fit, y_held = y[:n_fit], y[n_fit:]
    out: dict[str, Any] = {"positive_fraction": float(y.double().mean())}
    scorable = all(0 < int(v.sum()) < v.numel() for v in (y_fit, y_held))
    for kind, name in (("sae", "sae_latent"), ("baseline", "baseline_channel")):
        out[f"{kind}_loss"], out[name] = float("nan"), None
        if scorable:
            fit, held = parts[kind]
            probes = fit_probes(fit, y_fit)
            best = int(torch.argmin(probes.fit_loss))  # ties: the lowest id
            out[f"{kind}_loss"] = float(probe_loss(probes, held, y_held)[best])
            out[name] = best
    out["constant_loss"] = constant_loss(y_fit, y_held) if scorable else float("nan")
    return {k: out[k] for k in ("positive_fraction", "sae_loss", "sae_latent",
                                "baseline_loss", "baseline_channel", "constant_loss")}


def probe_losses(
    model: nn.Module, ids: torch.Tensor, loaded: LoadedSAE, hook: str, texts: list[str], *,
    batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The probes group for one SAE on the contexts `ids` [n_contexts, T], with a truncated
    forward of its own (`texts` from `token_texts`). Raises ProbeError. See
    `ProbeSums.result` for the fields."""
    sae = loaded.sae
    device = next(model.parameters()).device
    sums = ProbeSums(texts, sae.cfg.n_latents)
    batches = list(torch.split(ids, batch_size))
    hooked = HookedModel(model, [hook], early_stop=True)
    try:
        with torch.inference_mode():
            for done, batch in enumerate(batches, 1):
                h = hooked(batch.to(device))[hook]
                x = h[:, 1:].reshape(-1, h.shape[-1])
                if x.shape[1] != sae.cfg.d_in:
                    raise ProbeError(f"SAE {loaded.name} reads d_in {sae.cfg.d_in}, but hook "
                                     f"{hook} gives {x.shape[1]}")
                r = reconstruct(sae, x, sae.cfg.k)
                sums.add(batch, x, r.values, r.indices)
                if progress is not None:
                    progress(done, len(batches))
    finally:
        hooked.remove()
    return sums.result()
