"""Progressive codes (Gao et al. 2024, §5.3): the same SAE read at other sparsities k′ at
inference time. A TopK SAE whose reconstruction keeps improving beyond its trained k (and
degrades gracefully below it) has learned a progressive code."""

from __future__ import annotations

from dataclasses import dataclass, field


def progressive_ks(k: int, n_latents: int) -> list[int]:
    """k′ ∈ {k/4, k/2, k, 2k, 4k}: halves rounded down and at least 1, each capped at
    `n_latents`, duplicates (from the cap) dropped, ascending."""
    wanted = (k // 4, k // 2, k, 2 * k, 4 * k)
    return sorted({min(max(1, v), n_latents) for v in wanted})


@dataclass
class ProgressiveSums:
    """Per k′: Σ‖x − x̂‖² in the normalised space and Σ of spliced cross-entropies."""

    ks: list[int]
    sse: dict[int, float] = field(default_factory=dict)
    ce: dict[int, float] = field(default_factory=dict)

    def add(self, k: int, sse: float, ce: float | None) -> None:
        self.sse[k] = self.sse.get(k, 0.0) + sse
        if ce is not None:
            self.ce[k] = self.ce.get(k, 0.0) + ce

    def result(self, sst: float, ce_clean_sum: float, n_predictions: int) -> list[dict]:
        """One entry per k′: {k, normalized_mse, delta_ce}."""
        n = max(n_predictions, 1)
        return [
            {
                "k": k,
                "normalized_mse": self.sse.get(k, 0.0) / sst if sst > 0 else float("nan"),
                "delta_ce": (self.ce[k] - ce_clean_sum) / n if k in self.ce else None,
            }
            for k in self.ks
        ]
