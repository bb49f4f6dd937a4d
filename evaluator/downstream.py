"""The downstream loss (Gao et al. 2024, §4.1): how much worse the language model predicts the
next token when the SAE's reconstruction replaces the activations it was trained on.

Everything here is sums over predictions, so batches can be added up and the means taken once
at the end. A context of T tokens gives T−1 predictions (positions 0..T−2 predicting 1..T−1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class CleanPredictions:
    """The clean forward's next-token distributions for one batch, computed once and reused by
    every spliced forward of that batch (for the KL)."""

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """:param logits: [batch, T, vocab] of the unmodified model. :param ids: [batch, T]."""
        self.targets = ids[:, 1:]
        self.logprobs = next_token_logprobs(logits)
        self.probs = self.logprobs.exp()
        self.ce_sum = ce_sum(self.logprobs, self.targets)

    def kl_sum(self, logprobs: torch.Tensor) -> float:
        """Σ over predictions of KL(p_clean ‖ p) for log-probabilities [batch, T−1, vocab]."""
        return float(torch.sum(self.probs * (self.logprobs - logprobs), dtype=torch.float64))


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[batch, T, vocab] logits -> float32 log-probabilities of positions 0..T−2,
    [batch, T−1, vocab] (the last position predicts nothing that is scored)."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def ce_sum(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ of next-token cross-entropies: logprobs [batch, T−1, vocab], targets [batch, T−1]."""
    picked = logprobs.gather(-1, targets.unsqueeze(-1).to(logprobs.device))
    return -float(picked.sum(dtype=torch.float64))


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
