"""One evaluation: every selected metric group for every SAE, over one set of contexts.

The cheap groups (downstream, reconstruction, progressive) share one pass, below. The costlier
groups (ablation, explanations, probes: `--metrics all`) each run after it, per SAE, in their
own modules, since what they need (the top activation of every latent, n-gram forwards, token
labels) is theirs alone.

Forward passes are the cost, so each is done once and shared. Per batch of contexts: one
clean forward (logits kept for the KL, hook outputs captured for the SAEs), one zero-ablated
forward per hook (shared by the SAEs of that hook), one spliced forward per SAE and one per
extra progressive k′. The mean-ablated forward needs the mean over *all* evaluated tokens, so
it runs in a second pass over the contexts, one forward per batch and hook (it needs no clean
logits). Everything runs under `torch.inference_mode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from saestream.consumer.checkpoint import LoadedSAE
from saestream.evaluator.downstream import CleanPredictions, DownstreamSums, ce_sum
from saestream.evaluator.progressive import ProgressiveSums, progressive_ks
from saestream.evaluator.reconstruction import Moments, ReconstructionSums, reconstruct_many, sse
from saestream.evaluator.splice import capture, splice
from saestream.producer.hooks import HookedModel

CHEAP_GROUPS = ("downstream", "reconstruction", "progressive")
"""The groups computed by default: one shared pass, a few forwards per batch."""
GROUPS = (*CHEAP_GROUPS, "ablation", "explanations", "probes")
"""Every metric group `saestream eval` computes, in report order (`--metrics`)."""


class EvalError(ValueError):
    """An SAE that does not fit the model (width mismatch); the message is one line."""


@dataclass
class SAEJob:
    """One SAE to evaluate, at the hook it reads."""

    loaded: LoadedSAE
    hook: str
    downstream: DownstreamSums = field(default_factory=DownstreamSums)
    recon: ReconstructionSums | None = None
    progressive: ProgressiveSums | None = None

    @property
    def k(self) -> int:
        return self.loaded.sae.cfg.k


Progress = Callable[[int, int], None]
"""Called with (forward passes done, forward passes planned)."""


@dataclass
class GroupSettings:
    """What the costlier groups need beyond the evaluated contexts."""

    ablation_latents: int = 64
    """Latents sampled for the ablation sparsity."""
    ablation_positions: int = 16
    """Positions whose logits an ablation's effect is measured on."""
    explanation_latents: int = 64
    """Latents sampled for explanations."""
    train_ids: torch.Tensor | None = None
    """Contexts of the train split the explanations are built on [n, T] (required by them)."""
    prefix_id: int = 0
    """Token placed before an n-gram run alone (the model's separator)."""
    decode: Callable[[int], str] | None = None
    """Token id -> text, for readable explanations."""
    texts: list[str] | None = None
    """Every token id's text, for the probe tasks (required by them)."""
    seed: int = 0
    """Seed of every sample (latents, baseline channels, wildcard replacements)."""


def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    saes: Sequence[tuple[LoadedSAE, str]],
    groups: Sequence[str] = CHEAP_GROUPS,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    settings: GroupSettings | None = None,
) -> dict[str, dict[str, object]]:
    """Evaluate each (SAE, hook) on the contexts `ids` [n_contexts, T] of `model`.

    Returns, per SAE name, one dict per selected group: `progressive` is a list of
    {k, normalized_mse, delta_ce}, the others dicts of fields. Raises EvalError when an
    SAE's d_in is not the hook's width, or a costly group lacks its input in `settings`.
    """
    settings = settings or GroupSettings()
    done = 0

    def shifted(d: int, p: int) -> None:
        if progress is not None:
            progress(done + d, done + p)

    results: dict[str, dict[str, object]] = {s.name: {} for s, _ in saes}
    if set(groups) & set(CHEAP_GROUPS):
        cheap, done = _cheap(model, ids, saes, groups, batch_size, progress)
        for name, out in cheap.items():
            results[name].update(out)
    for group in [g for g in GROUPS if g in groups and g not in CHEAP_GROUPS]:
        for loaded, hook in saes:
            counter = _Counted(shifted)
            results[loaded.name][group] = _costly(group, model, ids, loaded, hook, settings,
                                                  batch_size, counter)
            done += counter.done
    return {name: {g: out[g] for g in GROUPS if g in out} for name, out in results.items()}


class _Counted:
    """A progress callback that remembers how many forwards its group reported."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.done = progress, 0

    def __call__(self, done: int, planned: int) -> None:
        self.done = done
        self.progress(done, planned)


def _costly(group: str, model: nn.Module, ids: torch.Tensor, loaded: LoadedSAE, hook: str,
            settings: GroupSettings, batch_size: int, progress: Progress) -> object:
    """One costly group for one SAE (their modules load only when asked for)."""
    s = settings
    if group == "ablation":
        from saestream.evaluator.ablation import ablation_sparsity

        return ablation_sparsity(model, ids, loaded, hook, latents=s.ablation_latents,
                                 positions=s.ablation_positions, seed=s.seed,
                                 batch_size=batch_size, progress=progress)
    if group == "explanations":
        from saestream.evaluator.explanations import explanations

        if s.train_ids is None:
            raise EvalError("explanations need contexts of the train split")
        try:
            return explanations(model, s.train_ids, ids, loaded, hook,
                                latents=s.explanation_latents, seed=s.seed,
                                batch_size=batch_size, prefix_id=s.prefix_id, decode=s.decode,
                                progress=progress)
        except ValueError as exc:  # a width mismatch
            raise EvalError(str(exc)) from None
    if group == "probes":
        from saestream.evaluator.probes import ProbeError, probe_losses

        if s.texts is None:
            raise EvalError("probes need the tokenizer's text of every token id")
        try:
            return probe_losses(model, ids, loaded, hook, s.texts, batch_size=batch_size,
                                progress=progress)
        except ProbeError as exc:
            raise EvalError(str(exc)) from None
    raise ValueError(f"unknown group {group!r}")


def _cheap(
    model: nn.Module, ids: torch.Tensor, saes: Sequence[tuple[LoadedSAE, str]],
    groups: Sequence[str], batch_size: int, progress: Progress | None,
) -> tuple[dict[str, dict[str, object]], int]:
    """The cheap groups in one shared pass. Returns the results and the forwards run."""
    device = next(model.parameters()).device
    wanted = set(groups)
    full = bool(wanted & {"downstream", "progressive"})
    jobs = [SAEJob(loaded, hook) for loaded, hook in saes]
    for job in jobs:
        cfg = job.loaded.sae.cfg
        if "reconstruction" in wanted or "progressive" in wanted:
            job.recon = ReconstructionSums(cfg.n_latents, int(cfg.d_in or 0), device)
        if "progressive" in wanted:
            job.progressive = ProgressiveSums(progressive_ks(cfg.k, cfg.n_latents))
    hooks = list(dict.fromkeys(job.hook for job in jobs))
    raw: dict[str, Moments] = {}  # per hook: the raw rows' moments (created at batch 1)
    zero_sum = dict.fromkeys(hooks, 0.0)
    mean_sum = dict.fromkeys(hooks, 0.0)
    clean_total, n_pred = 0.0, 0

    batches = list(torch.split(ids, batch_size))
    per_batch = (1 + (len(jobs) if full else 0)
                 + sum(len(j.progressive.ks) - 1 if j.progressive else 0 for j in jobs)
                 + (2 * len(hooks) if "downstream" in wanted else 0))
    planned, done = per_batch * len(batches), 0

    def step(n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, planned)

    truncated = None if full else HookedModel(model, hooks, early_stop=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = batch.to(device)
                clean = None
                if full:
                    with capture(model, hooks) as acts:
                        logits = model(input_ids=batch, use_cache=False).logits
                    clean = CleanPredictions(logits, batch)
                    del logits
                    clean_total += clean.ce_sum
                else:
                    acts = truncated(batch)  # type: ignore[misc]
                step()
                n_pred += batch.shape[0] * (batch.shape[1] - 1)
                flat = {h: _positions(acts[h]) for h in hooks}
                for h in hooks:
                    if h not in raw:
                        raw[h] = Moments(flat[h].shape[1], device)
                    raw[h].add(flat[h])
                    if "downstream" in wanted:
                        zero_sum[h] += _spliced_ce(model, batch, h, lambda a: a.new_zeros(()))
                        step()
                for job in jobs:
                    _evaluate_batch(job, model, batch, flat[job.hook], clean, wanted, step)
            if "downstream" in wanted:  # second pass: the mean is known now
                means = {h: raw[h].mean().float() for h in hooks}
                for batch in batches:
                    batch = batch.to(device)
                    for h in hooks:
                        mean_sum[h] += _spliced_ce(model, batch, h, lambda a, m=means[h]: m)
                        step()
    finally:
        if truncated is not None:
            truncated.remove()

    results: dict[str, dict[str, object]] = {}
    for job in jobs:
        out: dict[str, object] = {}
        if "downstream" in wanted:
            d = job.downstream
            d.n, d.clean = n_pred, clean_total
            d.zero, d.mean = zero_sum[job.hook], mean_sum[job.hook]
            out["downstream"] = d.result()
        if "reconstruction" in wanted and job.recon is not None:
            out["reconstruction"] = job.recon.result(raw[job.hook])
        if job.progressive is not None and job.recon is not None:
            out["progressive"] = job.progressive.result(job.recon.normalized.sst(),
                                                        clean_total, n_pred)
        results[job.loaded.name] = out
    return results, done


def _positions(h: torch.Tensor) -> torch.Tensor:
    """Hook output [batch, T, d] -> the evaluated rows, positions 1..T−1, [batch·(T−1), d]."""
    return h[:, 1:].reshape(-1, h.shape[-1])


def _spliced_logits(
    model: nn.Module, batch: torch.Tensor, hook: str, replacement: Callable
) -> torch.Tensor:
    with splice(model, hook, replacement):
        return model(input_ids=batch, use_cache=False).logits


def _spliced_ce(model: nn.Module, batch: torch.Tensor, hook: str, replacement: Callable) -> float:
    """Σ next-token CE of the batch with `hook`'s positions 1..T−1 replaced."""
    return ce_sum(_spliced_logits(model, batch, hook, replacement), batch[:, 1:])


def _evaluate_batch(
    job: SAEJob, model: nn.Module, batch: torch.Tensor, x: torch.Tensor,
    clean: CleanPredictions | None, wanted: set[str], step: Callable[[], None],
) -> None:
    """Add one batch to `job`'s sums. :param x: the hook's raw rows [batch·(T−1), d]."""
    sae = job.loaded.sae
    if x.shape[1] != sae.cfg.d_in:
        raise EvalError(f"SAE {job.loaded.name} reads d_in {sae.cfg.d_in}, but hook "
                        f"{job.hook} gives {x.shape[1]}")
    shape = (batch.shape[0], batch.shape[1] - 1, x.shape[1])
    ks = job.progressive.ks if job.progressive is not None else [job.k]
    codes = reconstruct_many(sae, x, sorted({*ks, job.k}))
    r = codes[job.k]
    if job.recon is not None:
        job.recon.normalized.add(r.normalized_x)
        job.recon.add(x, r)
    ce_k = None
    if clean is not None:
        logits = _spliced_logits(model, batch, job.hook, lambda a: r.x_hat.view(shape))
        ce_k = ce_sum(logits, clean.targets)
        if "downstream" in wanted:
            job.downstream.spliced += ce_k
            job.downstream.kl += clean.kl_sum(logits)
        del logits
        step()
    if job.progressive is None:
        return
    for k in job.progressive.ks:
        rk = codes[k]
        if k == job.k:
            job.progressive.add(k, sse(rk.normalized_x, rk.normalized_x_hat), ce_k)
            continue
        ce = _spliced_ce(model, batch, job.hook, lambda a, xh=rk.x_hat: xh.view(shape))
        job.progressive.add(k, sse(rk.normalized_x, rk.normalized_x_hat), ce)
        step()
