"""The downstream loss (Gao et al. 2024, §4.1): how much worse the language model predicts the
next token when the SAE's reconstruction replaces the activations it was trained on.

Everything here is sums over predictions, so batches can be added up and the means taken once
at the end. A context of T tokens gives T−1 predictions (positions 0..T−2 predicting 1..T−1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class CleanPredictions:
    """The clean forward's next-token distributions for one batch, computed once and reused by
    every spliced forward of that batch (for the KL).

    Nothing of vocabulary size is written per spliced forward: with z the logits, lse their
    log-sum-exp and p the clean probabilities, KL(p ‖ p_s) = (p·z − lse) − (p·z_s − lse_s)
    per prediction, so a spliced forward costs one log-sum-exp and one dot product with p over
    its logits (a log-softmax would write and read the whole [batch, T, vocab] again).
    """

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """:param logits: [batch, T, vocab] of the unmodified model. :param ids: [batch, T]."""
        z = scored(logits)
        self.targets = ids[:, 1:].to(z.device)
        lse = torch.logsumexp(z, dim=-1)
        self.probs = torch.exp(z - lse.unsqueeze(-1))
        self._plogp = _dot(self.probs, z) - lse  # Σ_v p log p per prediction
        self.ce_sum = _ce_sum(z, lse, self.targets)

    def kl_sum(self, logits: torch.Tensor) -> float:
        """Σ over predictions of KL(p_clean ‖ p) for another forward's logits [batch, T, vocab]."""
        z = scored(logits)
        return float((self._plogp - (_dot(self.probs, z) - torch.logsumexp(z, dim=-1)))
                     .sum(dtype=torch.float64))


def scored(logits: torch.Tensor) -> torch.Tensor:
    """[batch, T, vocab] logits -> float32 logits of positions 0..T−2 (the last position
    predicts nothing that is scored)."""
    return logits[:, :-1].float()


def _dot(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ_v p·z per prediction, [batch, T−1], as one batched matmul (no product tensor)."""
    b, t, v = z.shape
    return torch.bmm(p.reshape(b * t, 1, v), z.reshape(b * t, v, 1)).view(b, t)


def _ce_sum(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> float:
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float((lse - picked).sum(dtype=torch.float64))


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ of next-token cross-entropies: logits [batch, T, vocab], targets [batch, T−1]."""
    z = scored(logits)
    return _ce_sum(z, torch.logsumexp(z, dim=-1), targets.to(z.device))


@dataclass
class DownstreamSums:
    """Sums over the predictions of every context evaluated, for one SAE."""

    n: int = 0
    """Predictions counted: contexts × (T − 1)."""
    clean: float = 0.0
    spliced: float = 0.0
    zero: float = 0.0
    mean: float = 0.0
    kl: float = 0.0

    def result(self) -> dict[str, float]:
        """The downstream group's fields (means per prediction)."""
        n = max(self.n, 1)
        clean, spliced, zero, mean = (v / n for v in (self.clean, self.spliced, self.zero,
                                                       self.mean))
        return {
            "ce_clean": clean,
            "ce_spliced": spliced,
            "delta_ce": spliced - clean,
            "ce_zero": zero,
            "ce_mean": mean,
            "loss_recovered": loss_recovered(clean, spliced, zero),
            "kl": self.kl / n,
        }


def loss_recovered(clean: float, spliced: float, zero: float) -> float:
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 when splicing costs nothing, 0 when
    it is as bad as zeroing the activations; NaN when zeroing costs nothing either."""
    gap = zero - clean
    return (zero - spliced) / gap if gap != 0 else math.nan
