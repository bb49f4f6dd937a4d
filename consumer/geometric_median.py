"""Geometric median by Weiszfeld's iterations: the initial `b_dec` of the SAE (Gao et al. 2024)."""

from __future__ import annotations

import torch


def geometric_median(
    points: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-10
) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to `points`.

    :param points: shape [n, d], any float dtype and device.
    :return: shape [d], in `points`' dtype and device.

    Weiszfeld: y <- Σ w_i p_i / Σ w_i with w_i = 1 / ‖p_i − y‖, started at the mean. Distances
    are clamped at `eps` so an iterate that lands on a data point does not divide by zero.
    Computed in float64: the weights span many orders of magnitude near convergence.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n, d] matrix, got {tuple(points.shape)}")
    p = points.to(torch.float64)
    y = p.mean(dim=0)
    scale = max(float(p.abs().max()), 1.0)
    for _ in range(max_iter):
        w = 1.0 / torch.linalg.vector_norm(p - y, dim=1).clamp_min(eps)
        y_next = (w[:, None] * p).sum(dim=0) / w.sum()
        step = float(torch.linalg.vector_norm(y_next - y))
        y = y_next
        if step <= tol * scale:
            break
    return y.to(points.dtype)
