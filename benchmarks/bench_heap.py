"""What keeping freed memory for reuse (consumer/heap.py) buys the CPU training step.

The same trainer step in fresh processes, one with glibc's malloc as it is
(SAESTREAM_KEEP_FREED_MEMORY=0) and one as the consumer and `saestream train` configure it,
alternating (A B A B), at 768 × 16384 latents, batch 4096, 1 % of the latents dead. Per
process: the median step time after two warm-up steps, the minor page faults per step, the
resident size after the last step. The paired ratio is the median over pairs of kept / default.

    python benchmarks/bench_heap.py [--pairs 3] [--steps 5] [--threads 1 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section

D_IN, N_LATENTS, K, BATCH = 768, 16384, 32, 4096

WORKER = """
import json, resource, statistics, sys, time, torch
from saestream.consumer.heap import keep_freed_memory
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig
kept = keep_freed_memory()
d, n, k, batch, threads, steps = (int(a) for a in sys.argv[1:7])
torch.set_num_threads(threads)
torch.manual_seed(0)
x = torch.randn(batch, d)
t = Trainer(SAEConfig(d_in=d, n_latents=n, k=k), TrainerConfig(dead_tokens=1_000_000),
            name="bench", hook="bench")
t.initialize(x)
times, faults = [], []
for i in range(steps + 2):
    t.tokens_since_fired.zero_()
    t.tokens_since_fired[-(n // 100):] = 1_000_000
    f0, s = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    t.train_step(x)
    if i >= 2:
        times.append(time.perf_counter() - s)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
print(json.dumps({"kept": kept, "step": statistics.median(times),
                  "faults": statistics.median(faults), "rss": rss}))
"""


def run(threads: int, steps: int, keep: bool) -> dict:
    env = {**os.environ, "SAESTREAM_KEEP_FREED_MEMORY": "1" if keep else "0"}
    args = [str(v) for v in (D_IN, N_LATENTS, K, BATCH, threads, steps)]
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True,
                         env=env, timeout=900, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    if result["kept"] != keep:
        raise SystemExit("bench_heap: this malloc cannot be configured (not glibc?)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, action="append")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for threads in args.threads or [1, 2]:
        default, kept = [], []
        for p in range(args.pairs):  # A B, then B A: drifting load biases neither side
            for keep in ((False, True) if p % 2 == 0 else (True, False)):
                (kept if keep else default).append(run(threads, args.steps, keep))
        ratios = [k["step"] / d["step"] for d, k in zip(default, kept, strict=True)]

        def med(side: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in side)

        rows.append([
            threads,
            f"{med(default, 'step') * 1e3:,.0f}", f"{med(kept, 'step') * 1e3:,.0f}",
            f"**{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f})",
            f"{med(default, 'faults'):,.0f}", f"{med(kept, 'faults'):,.0f}",
            f"{med(default, 'rss') / 2**20:,.0f}", f"{med(kept, 'rss') / 2**20:,.0f}",
        ])
        print(rows[-1], flush=True)
    body = (
        f"Step: {D_IN}×{N_LATENTS}, k={K}, batch {BATCH}, 1 % of the latents dead, fp32 on CPU; "
        f"{args.pairs} pairs of fresh processes, {args.steps} timed steps each after 2 "
        f"warm-up steps; load average {load:.1f} when the run began.\n\n"
        + markdown_table(
            ["threads", "step ms, malloc as it is", "step ms, freed memory kept",
             "kept / as it is (median of pairs, min-max)", "page faults / step, as it is",
             "page faults / step, kept", "resident MiB, as it is", "resident MiB, kept"],
            rows)
        + "\n\n\"As it is\" = `SAESTREAM_KEEP_FREED_MEMORY=0`; \"kept\" = what the consumer and "
        "`saestream train` do (`consumer/heap.py`). The resident size is read after the last "
        "step: as it is, the step's large tensors are given back between steps and mapped "
        "again in the next; kept, they stay (the step's peak, plus holes freed blocks leave; "
        "the consumer releases them after each snapshot)."
    )
    write_section("bench_heap", "Freed memory kept for reuse (bench_heap.py)",
                  body, write=not args.no_write)


if __name__ == "__main__":
    main()
