"""The CPU top-k kernel alone: against its floor, and with AuxK's gather fused into it.

In one run, interleaved (A B A B ...), medians of the per-repetition ratios of:
  read     one pure read of the pre-activation matrix (`amax`): the floor of any top-k;
  topk     `cpu_kernels.topk_rows` with the encoder bias (the step's top-k);
  fused    the same, also gathering AuxK's dead columns (+ bias) as it ranks each row,
           into the column-major block AuxK takes when it keeps every dead latent;
  separate the top-k, then those columns by `index_select`, the bias added, made
           column-major: what the step did before the gather moved into the kernel.
fp32, CPU, the bench_sae_step shapes and dead fractions.

    python benchmarks/bench_topk.py [--reps 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section

from saestream.consumer import cpu_kernels

SHAPES = [(4096, 16384), (1024, 4096)]  # batch × n_latents, as bench_sae_step
K = 32


def bench(batch: int, n: int, dead_frac: float, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    pre, bias = torch.randn(batch, n, generator=g), torch.randn(n, generator=g)
    n_dead = round(dead_frac * n)
    dead = torch.sort(torch.randperm(n, generator=g)[:n_dead]).values
    out = torch.empty(n_dead, batch).t()

    def read() -> None:
        pre.amax()

    def topk() -> None:
        cpu_kernels.topk_rows(pre, K, bias=bias)

    def fused() -> None:
        cpu_kernels.topk_rows(pre, K, bias=bias, gather=(dead, out))

    def separate() -> None:
        cpu_kernels.topk_rows(pre, K, bias=bias)
        cols = pre.index_select(1, dead)
        cols += bias.index_select(0, dead)
        cols.t().contiguous().t()

    fns = {"read": read, "topk": topk, "fused": fused, "separate": separate}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    for num, den in (("topk", "read"), ("fused", "separate")):
        med[f"{num}/{den}"] = statistics.median(
            t / u for t, u in zip(times[num], times[den], strict=True))
    med["n_dead"] = n_dead
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.load() is None:
        sys.exit("bench_topk: the C kernels did not build (is cc installed?)")
    load = os.getloadavg()[0]
    rows = []
    for batch, n in SHAPES:
        for frac in (0.01, 0.05):
            m = bench(batch, n, frac, args.reps)
            rows.append([f"{batch}×{n}, k={K}", f"{m['n_dead']} ({frac:.0%})",
                         f"{m['read']:.2f}", f"{m['topk']:.2f}", f"**{m['topk/read']:.2f}**",
                         f"{m['fused']:.2f}", f"{m['separate']:.2f}",
                         f"**{m['fused/separate']:.3f}**"])
            print(rows[-1], flush=True)
    table = markdown_table(
        ["matrix", "dead columns", "read ms", "top-k ms", "top-k / read",
         "top-k + gather fused ms", "top-k, then gather ms", "fused / separate"], rows)
    text = (f"{args.threads} torch thread(s); load average {load:.1f} when it began.\n\n"
            f"{table}\n\nMedians of {args.reps} interleaved repetitions; ratios are medians "
            "of the per-repetition ratios. "
            "*read* = one pure read of the matrix (`amax`), the floor; *top-k* = the C kernel "
            "with the encoder bias; *fused* = the same gathering AuxK's dead columns (+ bias) "
            "into a column-major block as it ranks each row; *then gather* = the top-k, then "
            "`index_select` of those columns, the bias added, made column-major (the step "
            "before the gather moved into the kernel).")
    write_section("bench_topk", "CPU top-k kernel and the fused AuxK gather", text)


if __name__ == "__main__":
    main()
