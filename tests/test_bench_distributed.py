"""benchmarks/bench_distributed.py against a real step: the collectives that a data-parallel
and a latent-sharded step issue on 2 gloo ranks, recorded by the benchmark's own wrappers,
equal its formulas (`step_bytes`, which the sizing table and ARCHITECTURE.md rest on). They
had drifted unnoticed when the ranks' all-reduce of a finite loss came in; the benchmark
would then have exited non-zero in `make bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_distributed


def test_the_collectives_of_a_step_are_those_of_the_formulas_with_auxk_idle_and_running(
) -> None:
    threads = torch.get_num_threads()
    try:
        body, ok = bench_distributed.run((64, 512, 8, 128), [0.0, 0.05], 1, (64, 1024, 8, 64))
    finally:
        torch.set_num_threads(threads)
    assert ok, body
    rows = [line for line in body.splitlines() if line.startswith(("| DP", "| R = 2"))]
    assert len(rows) == 4 and all(row.rstrip(" |").endswith("yes") for row in rows), rows
    assert "4: all-reduce" in rows[0]  # loss statistics, finite loss, gradients, metrics
