"""Data parallelism on torch.distributed: what a trainer must sum or gather over its ranks so
that one step on a global batch split across them equals one single-process step on that
batch (up to floating-point reduction order).

Ranks are started by `torchrun` (gloo on CPU, NCCL on CUDA). Within a step the trainer sums
the gradients and the handful of batch statistics whose normalisers span the global batch
(token count, the AuxK denominator, the metrics' sums, the fired-latent counts), and
gathers the first batch once for the initialisation. `SINGLE` is the one-process case:
every operation is the identity, so the trainer has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


class DataParallel:
    """Collectives over the data-parallel ranks of `group` (None = the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled and dist.is_available() and dist.is_initialized()
        self.group = group
        self.size = dist.get_world_size(group) if self.enabled else 1
        self.rank = dist.get_rank(group) if self.enabled else 0

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce SUM of `tensors` in place, as one flat message (one collective)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
            offset += n

    def sum_grads_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks (local losses are already divided by
        the global token count, so the sum is the global gradient)."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def finish(self) -> None:
        """Wait for every rank (e.g. for rank 0's snapshot), then leave the process group."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' row blocks [n_r, d], concatenated in rank order (n_r may differ)."""
        if self.size == 1:
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n, group=self.group)
        most = int(max(int(c) for c in counts))
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


SINGLE = DataParallel(enabled=False)
"""One process: every collective is the identity."""


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (or any launcher setting its variables) started
    as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> DataParallel:
    """Join the process group torchrun described in the environment (NCCL for CUDA devices,
    gloo otherwise) and return the data-parallel view of it; SINGLE outside torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataParallel()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_slice(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous part of `n` rows: sizes differ by at most one, earlier ranks
    take the extra rows, and the parts in rank order are the whole."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))
