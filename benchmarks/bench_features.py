"""Feature browser cost: `saestream features`' stages for a 16k-latent SAE over 200k tokens,
the size of what it writes, and how quickly headless Chromium opens it from disk.

The SAE is untrained (random, layer_norm): what the browser costs depends on its shape and
the tokens, not on what it learned. The default hook is SmolLM2's embedding output (a
residual stream, so every stage runs, logit effects included) so that the language model's
forward, measured by bench_producer.py, does not drown the browser's own cost; pass
`--hook model.layers.20` to include it.

    python benchmarks/bench_features.py [--model smollm2-135m] [--hook model.embed_tokens]
        [--latents 16384] [--k 32] [--tokens 200000] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _report import markdown_table, write_section

from saestream.common.devices import resolve_device, set_threads
from saestream.consumer.checkpoint import LoadedSAE
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.evaluator.browser import build_browser
from saestream.evaluator.data import eval_ids, load_eval_model
from saestream.evaluator.features_cli import token_texts_of


def size(paths: list[Path]) -> str:
    n = sum(p.stat().st_size for p in paths)
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def browser_timings(entry: Path, profile: Path) -> dict[str, float]:
    """Seconds until Chromium shows: the index (first page of rows), the table sorted by max,
    a token search's latents, a latent's page (its contexts)."""
    from chromium import Chromium

    out: dict[str, float] = {}
    with Chromium(profile) as chrome:
        t0 = time.perf_counter()
        page = chrome.open(entry.as_uri())
        page.wait_for("document.querySelectorAll('#table tbody tr').length === 100", 120)
        out["index"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        page.click("th[data-sort='max']")
        page.wait_for("document.querySelector('th[data-sort=\"max\"]').textContent.includes('▼')")
        out["sort"] = time.perf_counter() - t0
        page.evaluate("document.querySelector('#search').focus()")
        t0 = time.perf_counter()
        page.type_text("the")
        page.wait_for("!!document.querySelector('#tokenhits li')", 60)
        out["token search"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        page.click("#tokenhits li a")
        page.wait_for("document.querySelectorAll('.ctx').length > 0", 60)
        out["latent page"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="model.embed_tokens")
    ap.add_argument("--corpus", default="wiki-sample")
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    set_threads()
    lm = load_eval_model(args.model, str(device), [args.hook], seq_len=128, hook_given=True)
    ids = eval_ids(lm, args.corpus, split="all", seq_len=128, contexts=None, tokens=args.tokens)
    texts = token_texts_of(lm)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=lm.d_model, n_latents=args.latents, k=args.k,
                                      input_normalization="layer_norm"), device=device)
    loaded = LoadedSAE("bench", Path("."), sae.eval().requires_grad_(False), {})
    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        t0 = time.perf_counter()
        built = build_browser(work / "browser", lm, ids, [(loaded, args.hook)],
                              label="bench", texts=texts,
                              about={"model": args.model, "corpus": args.corpus})
        total = time.perf_counter() - t0
        d = built.build / "bench"
        bundles = sorted((d / "latents").glob("*.js"), key=lambda p: p.stat().st_size)
        files = [["index.js (summary, every latent's figures)", size([d / "index.js"])],
                 ["vocab.js (text of the ids shown)", size([built.build / "vocab.js"])],
                 ["tokens.js (the contexts' ids)", size([built.build / "tokens.js"])],
                 ["fires_on.js (token → latents)", size([d / "fires_on.js"])],
                 [f"latents/*.js ({len(bundles)} files of 64 pages)", size(bundles)],
                 ["largest latents/*.js", size(bundles[-1:])]]
        shown = browser_timings(built.entry, work / "profile")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = int(ids.shape[0] * (ids.shape[1] - 1))
    s = built.seconds
    rows = [[args.model, args.hook, str(device), f"{lm.d_model}x{args.latents}, k {args.k}",
             f"{tokens:,}", f"{s['encode']:.1f}", f"{s['latents']:.1f}", f"{s['decoder']:.1f}",
             f"{s['write']:.1f}", f"**{total:.1f}**", f"{built.files}",
             f"**{built.bytes / 1e6:.1f} MB**"]]
    opened = [[k, f"{v:.2f}"] for k, v in shown.items()]
    body = (
        markdown_table(["model", "hook", "device", "SAE", "tokens", "encode s", "latents s",
                        "decoder s", "write s", "total s", "files", "size"], rows)
        + "\n\n*encode* = the model's forward to the hook and the SAE's top-k over every "
        "token (the codes are kept: 8 bytes per kept latent); *latents* = per-latent "
        "statistics, examples and their windows, the pages; *decoder* = nearest latents by "
        "decoder cosine and the logit effects through the final norm and unembedding; "
        "*write* = the build's files, renamed into place. The language model's forward beyond "
        "the hook is not included (`--hook` moves it): SmolLM2 to block 20 runs ~510 tok/s "
        "per CPU thread (bench_producer.py), about 200 s more per 200k tokens on this "
        "machine's 2 cores.\n\n"
        + markdown_table(["file", "size"], files)
        + "\n\nOpened from disk (`file://`) in headless Chromium, seconds until it shows:\n\n"
        + markdown_table(["view", "seconds"], opened)
        + "\n\n*index* = navigation to the first 100 rows of the table (index.js and vocab.js "
        "parsed); *sort* = the whole table re-sorted by max activation; *token search* = "
        "typing `the` until the latents firing on it are listed (fires_on.js loaded); "
        "*latent page* = a click until its contexts are drawn (one latents/*.js and tokens.js "
        "loaded)."
    )
    scale = (f"{args.latents // 1024}k" if args.latents % 1024 == 0 else f"{args.latents:,}",
             f"{args.tokens // 1000}k" if args.tokens % 1000 == 0 else f"{args.tokens:,}")
    write_section("bench_features", f"Feature browser: {scale[0]} latents over {scale[1]} tokens "
                  "(bench_features.py)", body)


if __name__ == "__main__":
    main()
