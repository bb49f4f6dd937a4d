"""One evaluation pass: every selected metric group for every SAE, over one set of contexts.

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
from saestream.evaluator.downstream import next_token_logprobs as logprobs_of
from saestream.evaluator.progressive import ProgressiveSums, progressive_ks
from saestream.evaluator.reconstruction import Moments, ReconstructionSums, reconstruct, sse
from saestream.evaluator.splice import capture, splice
from saestream.producer.hooks import HookedModel

GROUPS = ("downstream", "reconstruction", "progressive")
"""The metric groups `saestream eval` computes, in report order (`--metrics`)."""


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


def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    saes: Sequence[tuple[LoadedSAE, str]],
    groups: Sequence[str] = GROUPS,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, dict[str, object]]:
    """Evaluate each (SAE, hook) on the contexts `ids` [n_contexts, T] of `model`.

    Returns, per SAE name, one dict per selected group: `downstream` and `reconstruction`
    (dicts of fields) and `progressive` (a list of {k, normalized_mse, delta_ce}).
    Raises EvalError when an SAE's d_in is not the hook's width.
    """
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
    return results


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
    return ce_sum(logprobs_of(_spliced_logits(model, batch, hook, replacement)), batch[:, 1:])


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
    r = reconstruct(sae, x, job.k)
    if job.recon is not None:
        job.recon.normalized.add(r.normalized_x)
        job.recon.add(x, r)
    ce_k = None
    if clean is not None:
        lp = logprobs_of(_spliced_logits(model, batch, job.hook, lambda a: r.x_hat.view(shape)))
        ce_k = ce_sum(lp, clean.targets)
        if "downstream" in wanted:
            job.downstream.spliced += ce_k
            job.downstream.kl += clean.kl_sum(lp)
        del lp
        step()
    if job.progressive is None:
        return
    for k in job.progressive.ks:
        if k == job.k:
            job.progressive.add(k, sse(r.normalized_x, r.normalized_x_hat), ce_k)
            continue
        rk = reconstruct(sae, x, k)
        ce = _spliced_ce(model, batch, job.hook, lambda a, xh=rk.x_hat: xh.view(shape))
        job.progressive.add(k, sse(rk.normalized_x, rk.normalized_x_hat), ce)
        step()
