"""Evaluation cost: `saestream eval`'s default groups (downstream, reconstruction, progressive)
against the bare model forwards they cannot avoid, measured alternately in one run on the same
tokens. Target: evaluation / forwards <= 1.15.

The floor per batch of contexts is the forwards the groups need, run bare (no hooks, no
softmax): 1 clean + 1 zero-ablated + 1 mean-ablated + 1 spliced + 4 progressive k' != k.

    python benchmarks/bench_eval.py [--models smollm2-135m,tiny] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import markdown_table, write_section

from saestream.common.devices import resolve_device
from saestream.consumer.checkpoint import LoadedSAE
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.evaluator.data import eval_ids
from saestream.evaluator.engine import CHEAP_GROUPS as GROUPS
from saestream.evaluator.engine import evaluate
from saestream.evaluator.progressive import progressive_ks
from saestream.producer.models import load_model

# model -> (corpus, hook, contexts, batch size, SAE latents, k, rounds on CPU)
SETTINGS = {
    "smollm2-135m": ("wiki-sample", "model.layers.20", 8, 8, 4096, 32, 5),
    "tiny": ("synthetic", "model.layers.4", 64, 8, 4096, 32, 7),
}
SEQ_LEN = 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_sae(d: int, latents: int, k: int, device: torch.device, hook: str) -> LoadedSAE:
    """An untrained layer_norm SAE: evaluation costs do not depend on what it learned."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=latents, k=k,
                                      input_normalization="layer_norm"), device=device)
    return LoadedSAE("bench", Path("."), sae.eval().requires_grad_(False), {"hook": hook})


def forwards_per_batch(k: int, latents: int) -> int:
    """Clean, zero, mean, spliced at k, spliced at each other progressive k'."""
    return 4 + len(progressive_ks(k, latents)) - 1


def bare(model: torch.nn.Module, batches: list[torch.Tensor], n: int, device) -> float:
    """Seconds for `n` plain forwards (to the logits) of every batch."""
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            for _ in range(n):
                model(input_ids=ids, use_cache=False)
    sync(device)
    return time.perf_counter() - t0


def whole(model, ids, sae, hook, batch_size, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    evaluate(model, ids, [(sae, hook)], GROUPS, batch_size=batch_size)
    sync(device)
    return time.perf_counter() - t0


def measure(name: str, device: torch.device) -> list[object]:
    corpus, hook, contexts, batch_size, latents, k, rounds = SETTINGS[name]
    lm = load_model(name, device=str(device))
    ids = eval_ids(lm, corpus, split="eval", seq_len=SEQ_LEN, contexts=contexts, tokens=None)
    sae = random_sae(lm.d_model, latents, k, device, hook)
    batches = [b.to(device) for b in torch.split(ids, batch_size)]
    n = forwards_per_batch(k, latents)
    whole(lm.model, ids, sae, hook, batch_size, device)  # warm-up
    bare(lm.model, batches[:1], 1, device)
    floor_s, eval_s, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            a = bare(lm.model, batches, n, device)
            b = whole(lm.model, ids, sae, hook, batch_size, device)
        else:
            b = whole(lm.model, ids, sae, hook, batch_size, device)
            a = bare(lm.model, batches, n, device)
        floor_s.append(a)
        eval_s.append(b)
        ratios.append(b / a)
        print(f"{name} round {r}: forwards {a:.2f}s, evaluation {b:.2f}s, ratio {b / a:.3f}",
              flush=True)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    ratio = statistics.median(ratios)
    return [
        name, device.type, hook, f"{lm.d_model}x{latents}, k {k}",
        f"{ids.shape[0]}x{ids.shape[1]}", n, rounds,
        f"{tokens / min(eval_s):,.0f}", f"{tokens * n / min(floor_s):,.0f}",
        f"**{ratio:.3f}**", f"{min(eval_s) / min(floor_s):.3f}",
        "yes" if ratio <= 1.15 else "**no**",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [measure(m, device) for m in args.models.split(",")]
    header = ["model", "device", "hook", "SAE", "contexts x T", "forwards per batch", "rounds",
              "evaluated tok/s (best)", "bare forward tok/s (best)",
              "median paired ratio", "ratio of bests", "ratio <= 1.15"]
    body = markdown_table(header, rows) + """

*Evaluation* = `evaluate()` with the default groups (downstream, reconstruction,
progressive) for one SAE, model resident, ids on the CPU. *Forwards* = that many plain
`model(input_ids)` calls per batch (to the logits; no hooks, no softmax, no SAE) on the same
batches: the floor. The two alternate, first one then the other going first; the median
paired ratio is the target figure (load drift hits both sides of a pair alike).
"""
    write_section("bench_eval", "Evaluation cost vs bare forwards (bench_eval.py)", body)


if __name__ == "__main__":
    main()
