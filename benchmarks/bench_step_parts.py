"""Where one SAE training step's time goes: each compiled kernel and each product the step
cannot do without, timed alone on the step's own tensors, against the encoder matmul.

`bench_sae_step` measures the whole step against one dense encoder matmul (b). This script
splits the rest: each part is timed on its second call in a row, its data as warm in the
caches as a loop over it leaves them (warmer than in a step, where other work comes between:
an optimistic figure), so (b + parts)/b is at most what the step as built could reach with
all of Python, autograd and the small torch ops gone. Each part and (b) alternate in every
repetition (A B A B, one pair per part per repetition); a part's share is the median of its
per-pair ratios to (b).

    python benchmarks/bench_step_parts.py [--reps 21] [--shape small|large ...]

One torch thread (the CPU work of the step); fp32; 1 % of the latents dead, as
bench_sae_step's first rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section
from bench_sae_step import make_trainer, set_dead

from saestream.consumer import cpu_kernels
from saestream.consumer.heap import keep_freed_memory

SHAPES = {"small": (256, 4096, 32, 1024), "large": (768, 16384, 32, 4096)}
TARGETS = {"small": 1.6, "large": 1.3}


def parts_of(d_in: int, n_latents: int, k: int, batch: int) -> dict[str, object]:
    """The timed callables: the step, the matmul, and each part on the step's tensors."""
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    t = make_trainer(d_in, n_latents, k, True, x)
    n_dead = round(0.01 * n_latents)
    for _ in range(3):  # Adam state, kernels built, buffers warm
        set_dead(t, n_dead)
        t.train_step(x)
    sae = t.sae
    W_enc = sae.encoder.weight.detach()
    b_enc = sae.encoder.bias.detach()
    W_dec = sae.W_dec.detach()
    b_dec = sae.b_dec.detach()
    xn, _, _ = cpu_kernels.layer_norm(x, 1e-5)
    xc = xn - b_dec
    pre = torch.mm(xc, W_enc.t())
    dead = torch.arange(n_latents - n_dead, n_latents)
    aux_out = torch.empty(n_dead, batch).t()
    vals, idx = cpu_kernels.topk_rows(pre, k, bias=b_enc)
    vals = vals.relu()
    pattern = cpu_kernels.csr_pattern(idx, n_latents)
    g = torch.randn(batch, d_in)
    gv = torch.randn(batch, k)
    Z, G = torch.randn(n_dead, batch).t(), torch.randn(n_dead, batch).t()
    W_s = W_dec[-n_dead:].clone()
    g_lat = torch.randn(n_latents)
    M, V = torch.zeros_like(W_dec), torch.zeros_like(W_dec)
    W_copy, G_dec = W_dec.clone(), torch.randn_like(W_dec)
    enc_params = [torch.nn.Parameter(p.detach().clone()) for p in (W_enc, b_enc, b_dec)]
    for p in enc_params:
        p.grad = torch.randn_like(p)
    enc_adam = torch.optim.Adam(enc_params, lr=1e-4, fused=True)
    enc_adam.step()
    step_no = [1.0]

    def step() -> None:
        set_dead(t, n_dead)
        t.train_step(x)

    def decoder_adam() -> None:
        step_no[0] += 1
        cpu_kernels.decoder_adam_(W_copy, G_dec, M, V, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                  step=step_no[0])

    def auxk_products() -> None:
        Z @ W_s
        Z.t() @ g
        (W_s @ g.t()).t()
        G.t() @ xc

    return {
        "step": step,
        "matmul": lambda: torch.mm(x, W_enc.t()),
        "parts": {
            "layer norm (C)": lambda: cpu_kernels.layer_norm(x, 1e-5),
            "top-k + bias + AuxK gather (C)": lambda: cpu_kernels.topk_rows(
                pre, k, bias=b_enc, gather=(dead, aux_out)),
            "decode: embedding_bag": lambda: F.embedding_bag(idx, W_dec, per_sample_weights=vals,
                                                             mode="sum"),
            "CSR pattern (C)": lambda: cpu_kernels.csr_pattern(idx, n_latents),
            "∂W_dec and ∂v, one walk (C)": lambda: cpu_kernels.csr_backward(pattern, vals, g,
                                                                           W_dec),
            "∂W_enc (C)": lambda: cpu_kernels.csr_backward(pattern, gv, xc, None),
            "∂b_dec = −g_lat W_enc": lambda: g_lat @ W_enc,
            "AuxK's four dense products": auxk_products,
            "decoder update: projection, Adam, renorm (C)": decoder_adam,
            "encoder and biases: torch's fused Adam": enc_adam.step,
        },
        "n_dead": n_dead,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape: str, reps: int) -> tuple[list[list[object]], str]:
    d_in, n_latents, k, batch = SHAPES[shape]
    bench = parts_of(d_in, n_latents, k, batch)
    parts: dict = bench["parts"]  # type: ignore[assignment]
    step, matmul = bench["step"], bench["matmul"]
    ratios: dict[str, list[float]] = {name: [] for name in ["step", *parts]}
    secs: dict[str, list[float]] = {name: [] for name in ["matmul", "step", *parts]}
    for r in range(reps):
        for name, fn in [("step", step), *parts.items()]:
            pair = [("matmul", matmul), (name, fn)]
            if r % 2:
                pair.reverse()
            got = {}
            for n, f in pair:
                if n != "matmul":
                    f()  # the timed call finds its data where this one left it
                got[n] = timed(f)
            secs["matmul"].append(got["matmul"])
            secs[name].append(got[name])
            ratios[name].append(got[name] / got["matmul"])
    med = {n: statistics.median(v) for n, v in secs.items()}
    share = {n: statistics.median(v) for n, v in ratios.items()}
    rows: list[list[object]] = [["encoder matmul (b)", f"{med['matmul'] * 1e3:.2f}", "1.000"]]
    rows += [[name, f"{med[name] * 1e3:.2f}", f"{share[name]:.3f}"] for name in parts]
    total = sum(share[name] for name in parts)
    rows.append(["**the parts together**", f"{sum(med[n] for n in parts) * 1e3:.2f}",
                 f"**{total:.3f}**"])
    rows.append(["whole step (a)", f"{med['step'] * 1e3:.2f}", f"**{share['step']:.3f}**"])
    target = TARGETS[shape]
    label = f"{d_in}×{n_latents}, k={k}, batch {batch}, {bench['n_dead']} dead"
    verdict = (
        f"{label}: (b + parts)/b = **{1 + total:.2f}**, the step {share['step']:.2f}, target "
        f"{target}: the kernels and products alone leave {target - 1 - total:+.2f} of (b) for "
        f"everything else (Python, autograd, the small ops); the step spends "
        f"{share['step'] - 1 - total:.2f} of (b) there.")
    print(verdict, flush=True)
    return rows, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21, help="pairs per part")
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES),
                    help="repeatable; default small")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kept = keep_freed_memory()
    if cpu_kernels.load() is None:
        sys.exit("the C kernels are not built here: nothing to split")
    sections = []
    for shape in args.shape or ["small"]:
        rows, verdict = measure(shape, args.reps if shape == "small" else max(3, args.reps // 4))
        sections.append(verdict + "\n\n" + markdown_table(
            ["part", "ms (median)", "÷ matmul (median of pairs)"], rows))
    body = (
        "Each part timed alone on the step's tensors (after three training steps), one torch "
        "thread, fp32, on its second call in a row (its data as warm as a loop leaves it: "
        "warmer than in a step, so the parts' sum is optimistic), alternating with the encoder "
        "matmul (b) in every repetition; a part's figure is the median of its per-pair ratios "
        "to (b), the whole step's likewise (also its second call). The parts are the compiled "
        "kernels the sparse step calls and the products it cannot skip; what the whole step "
        "spends beyond (b) and them is Python, autograd and the small torch ops between them "
        "(and the parts' own cache misses in the step). "
        + ("Freed memory is kept for reuse, as the consumer does. " if kept else "")
        + "\n\n" + "\n\n".join(sections))
    write_section("bench_step_parts", "Where the SAE step's time goes (bench_step_parts)",
                  body, write=not args.no_write)


if __name__ == "__main__":
    main()
