"""Producer throughput: the whole producer (forward + chunking + encoding + PUSH to a local PULL
sink) against the bare truncated forward pass of the same model, batch and hook, measured
alternately in one run (the sink is a separate process). Target: producer / bare >= 0.95.
For the tiny model on CPU, also the bare forward beside the producer's sending work, on a
thread of its process and in a process of its own (`sending_contention`), and the producer
with its sending thread cut down to dropping or only encoding the chunks (`sending_parts`).

    python benchmarks/bench_producer.py [--models tiny,smollm2-135m] [--device auto]
        [--rounds N] [--threads N] [--no-contention] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import markdown_table, write_section

from saestream.producer.corpus import open_corpus
from saestream.producer.daemon import ProducerConfig, run_producer
from saestream.producer.hooks import HookedModel
from saestream.producer.models import LoadedModel, load_model
from saestream.producer.sender import Sender

SMOLLM2_ARCHITECTURE = "random:" + str(Path(__file__).with_name("smollm2_135m_config.json"))
"""SmolLM2-135M's architecture with random weights: where the embedded weights are not at hand
(a lent GPU machine, whose files come from a 64 MiB carry), the same forward's cost."""
# model -> (corpus, batch size, batches per measurement on CPU, on GPU, rounds)
SETTINGS = {
    "tiny": ("synthetic", 8, 100, 2000, 8),
    "smollm2-135m": ("wiki-sample", 8, 1, 200, 6),
    SMOLLM2_ARCHITECTURE: ("synthetic", 8, 1, 200, 6),
}
LABELS = {SMOLLM2_ARCHITECTURE: "SmolLM2-135M architecture, random weights"}
SEQ_LEN = 128
HEADER = ["model", "device", "model dtype", "hook", "batch", "tokens/measurement", "rounds",
          "bare forward tok/s (best / median)", "producer tok/s (best / median)",
          "median paired ratio (min-max)", "ratio of bests", "forward share of producer wall",
          "CPU ratio (bare / producer + sink)", "paired ratio >= 0.95"]
"""The columns of `measure`'s row."""


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    t = os.times()
    return t.user + t.system


def bare_forward(lm: LoadedModel, hook: str, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall, CPU) seconds for the truncated forward over `batches` (ids already on the
    device)."""
    hooked = HookedModel(lm.model, [hook])
    try:
        hooked(batches[0])  # warm-up
        sync(lm.device)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for ids in batches:
            hooked(ids)
        sync(lm.device)
        return time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        hooked.remove()


SINK = """
import os, sys, msgpack, zmq
ctx = zmq.Context(); sink = ctx.socket(zmq.PULL); sink.bind("tcp://127.0.0.1:" + sys.argv[1])
want, got, cpu0 = int(sys.argv[2]), 0, None
print("ready", flush=True)
while got < want and sink.poll(60_000):
    if cpu0 is None:
        cpu0 = sum(os.times()[:2])
    header, _payload = sink.recv_multipart(copy=False)
    got += msgpack.unpackb(header.bytes)["n"]
print(got, sum(os.times()[:2]) - (cpu0 or 0.0), flush=True)
"""
"""A PULL sink that only counts rows (no decoding: a consumer's work is not the producer's),
then prints them and its CPU seconds from the first message on (its start-up is no
producer's cost)."""


SENDING_WORK = r'''
import sys, time, torch, zmq
from saestream.common.wire import encode_chunk, load_kernels
def sending_work(port, period, n, d, hook, stop):
    load_kernels()
    ctx = zmq.Context(); sock = ctx.socket(zmq.PUSH); sock.connect(f"tcp://127.0.0.1:{port}")
    acts = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    seq, due = 0, time.perf_counter()
    while not stop():
        sock.send_multipart(encode_chunk(acts, producer="p", run="r", seq=seq, model="m",
                                         hook=hook, source={}, codec="lz4-shuffle"), copy=False)
        seq, due = seq + 1, due + period
        time.sleep(max(0.0, due - time.perf_counter()))
    sock.close(linger=0); ctx.term()
if __name__ == "__main__":
    port, period, n, d, seconds, hook = sys.argv[1:7]
    end = time.monotonic() + float(seconds)
    print("ready", flush=True)
    sending_work(int(port), float(period), int(n), int(d), hook, lambda: time.monotonic() > end)
'''
"""The producer's sending work, one chunk encoded (lz4-shuffle) and PUSHed to a sink every
`period` seconds: run on a thread of the model's process or in a process of its own
(`sending_contention`)."""


def spawn_ready(script: str, *args: object) -> subprocess.Popen:
    """`python -c script args...`, returned once it has printed "ready" (killed otherwise)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"a helper process did not start: {script.splitlines()[1]!r}")
    return proc


def sending_contention(lm: LoadedModel, hook: str, batches: list[torch.Tensor], tokens: int,
                       rounds: int) -> list[object]:
    """The bare forward alone, with the producer's sending work on a thread of this process,
    and with the same work in another process, alternated; the work keeps the producer's
    pace (one chunk of the default size per that many tokens of the forward). Returns the
    table row: a thread costing the forward more than a process, for the same CPU, points at
    the GIL rather than the work's CPU."""
    chunk = ProducerConfig().chunk_tokens
    seconds, _ = bare_forward(lm, hook, batches)
    period = chunk * seconds / tokens
    namespace: dict = {}
    exec(compile(SENDING_WORK, "sending_work", "exec"), namespace)
    times: dict[str, list[float]] = {"alone": [], "thread": [], "process": []}
    sides = ["alone", "thread", "process"]
    for r in range(rounds):
        for side in sides[r % 3:] + sides[: r % 3]:  # the order rotates each round
            times[side].append(forward_beside(side, namespace["sending_work"], lm, hook,
                                              batches, period, chunk))
    ratio = {side: [a / t for a, t in zip(times["alone"], times[side], strict=True)]
             for side in ("thread", "process")}
    print(f"sending contention: {times}", flush=True)

    def spread(values: list[float]) -> str:
        return f"**{statistics.median(values):.3f}** ({min(values):.3f}-{max(values):.3f})"

    per_round = [t / p for t, p in zip(ratio["thread"], ratio["process"], strict=True)]
    return [LABELS.get(lm.name, lm.name), f"{chunk}x{lm.d_model}", f"{period * 1e3:.1f}",
            rounds, f"{tokens / statistics.median(times['alone']):,.0f}",
            spread(ratio["thread"]), spread(ratio["process"]), spread(per_round)]


def forward_beside(side: str, work, lm: LoadedModel, hook: str, batches: list[torch.Tensor],
                   period: float, chunk: int) -> float:
    """Seconds of the bare forward with the sending work on `side` ("alone": none)."""
    port = free_tcp_port()
    procs = [spawn_ready(SINK, port, 2**62)]
    stop, failed = threading.Event(), []

    def on_thread() -> None:
        try:
            work(port, period, chunk, lm.d_model, hook, stop.is_set)
        except BaseException as exc:  # the figure would be the forward alone: say so
            failed.append(exc)
            raise

    thread = threading.Thread(target=on_thread, daemon=True)
    try:
        if side == "thread":
            thread.start()
        elif side == "process":
            procs.append(spawn_ready(SENDING_WORK, port, period, chunk, lm.d_model, 600, hook))
        time.sleep(0.2)  # the work under way before the forward starts
        seconds = bare_forward(lm, hook, batches)[0]
        alive = side != "process" or procs[1].poll() is None
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        for proc in procs:
            proc.kill()
            proc.communicate()
    if failed or not alive:
        raise RuntimeError(f"the sending work on a {side} stopped: {failed or 'exited'}")
    return seconds


def thread_waits() -> int:
    """Voluntary context switches of the calling thread so far: each is a wait, for the GIL
    when nothing else blocks it (the producer's model loop runs on the calling thread)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def whole_producer(
    lm: LoadedModel, corpus, cfg: ProducerConfig, port: int, *, sink: bool = True
) -> tuple[float, float, float, int]:
    """(wall seconds of `run_producer` sending `cfg.max_tokens` to a PULL sink process, seconds
    of it spent in the forward pass according to its own `forward_seconds` histogram, CPU
    seconds of this process (every thread) plus the sink's meanwhile, the model thread's
    waits (`thread_waits`) meanwhile). Without `sink`, for a sending thread that sends
    nothing (`sending_cut`), no sink runs and its CPU counts 0."""
    proc = spawn_ready(SINK, port, cfg.max_tokens) if sink else None
    registry = CollectorRegistry()
    c0, w0, t0 = cpu_seconds(), thread_waits(), time.perf_counter()
    summary = run_producer(cfg, model=lm, corpus=corpus, registry=registry)
    seconds, cpu, waits = time.perf_counter() - t0, cpu_seconds() - c0, thread_waits() - w0
    received, sink_cpu = (proc.communicate(timeout=120)[0].split() if proc is not None
                          else (cfg.max_tokens, 0.0))
    assert summary.complete and int(received) == summary.tokens == cfg.max_tokens
    forward = registry.get_sample_value("saestream_producer_forward_seconds_sum") or 0.0
    return seconds, forward, cpu + float(sink_cpu), waits


CUTS = ("drops", "encodes", "sends")
"""What `sending_cut` lets the producer's sending thread do with each chunk it takes."""


@contextlib.contextmanager
def sending_cut(keep: str):
    """The producer's sending thread doing part of its work on each chunk it takes: "drops"
    (counts it as sent, no encoding), "encodes" (encodes it, sends nothing), "sends" (all of
    it, as the product does). Benchmark-only surgery on `Sender`, undone on exit: what is cut
    is the encoding and the hand-over to the socket (`_push`); the counting stays the
    product's own."""
    if keep not in CUTS:
        raise ValueError(f"keep must be one of {CUTS}, not {keep!r}")
    encode, push = Sender._encode, Sender._push
    if keep != "sends":
        Sender._push = lambda self, frames: True  # type: ignore[method-assign]
    if keep == "drops":
        Sender._encode = lambda self, item, seq: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        Sender._encode, Sender._push = encode, push  # type: ignore[method-assign]


def sending_parts(lm: LoadedModel, corpus, cfg: ProducerConfig, port: int,
                  batches: list[torch.Tensor], hook: str, rounds: int) -> list[list[object]]:
    """The bare forward and the producer with its sending thread cut down (`CUTS`), taking
    turns, the order rotating each round: rows of what each adds."""
    wall: dict[str, list[float]] = {side: [] for side in ("bare", *CUTS)}
    share: dict[str, list[float]] = {side: [] for side in CUTS}
    waits: dict[str, list[float]] = {side: [] for side in ("bare", *CUTS)}
    sides = ["bare", *CUTS]
    n_batches = len(batches)
    for r in range(rounds):
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:
            if side == "bare":
                w0 = thread_waits()
                seconds = bare_forward(lm, hook, batches)[0]
                waits[side].append((thread_waits() - w0) / n_batches)
            else:
                with sending_cut(side):
                    seconds, forward, _, w = whole_producer(lm, corpus, cfg, port,
                                                            sink=side == "sends")
                share[side].append(forward / seconds)
                waits[side].append(w / n_batches)
            wall[side].append(seconds)
    print(f"sending parts: {wall} waits {waits}", flush=True)
    rows = []
    for side in CUTS:
        pairs = [b / s for b, s in zip(wall["bare"], wall[side], strict=True)]
        rows.append([LABELS.get(lm.name, lm.name), side, rounds,
                     f"**{statistics.median(pairs):.3f}** ({min(pairs):.3f}-{max(pairs):.3f})",
                     f"{statistics.median(share[side]):.3f}",
                     f"{statistics.median(waits[side]):.2f}"])
    rows.append([LABELS.get(lm.name, lm.name), "(bare forward)", rounds, "1", "1",
                 f"{statistics.median(waits['bare']):.2f}"])
    return rows


def measure(name: str, device: str, rounds: int | None, contention: bool
            ) -> tuple[list[object], tuple[list[object], list[list[object]]] | None]:
    """(the producer against its bare forward, None or (the sending work's cost to the
    forward by where it runs, the producer with its sending thread cut down)): table rows."""
    corpus_spec, batch, n_cpu, n_gpu, default_rounds = SETTINGS[name]
    rounds = rounds or default_rounds
    lm = load_model(name, device=device)
    n_batches = n_gpu if lm.device.type == "cuda" else n_cpu
    hook = lm.default_hook()
    corpus = open_corpus(corpus_spec, seq_len=SEQ_LEN, vocab_size=lm.vocab_size,
                         encode=lm.encode_text, separator=lm.separator_id)
    contexts = [c for _, c in zip(range(n_batches * batch), corpus.contexts(), strict=False)]
    batches = [torch.from_numpy(np.stack(contexts[i : i + batch])).to(lm.device)
               for i in range(0, len(contexts), batch)]
    tokens = len(contexts) * (SEQ_LEN - 1)  # both sides count the positions sent
    port = free_tcp_port()
    cfg = ProducerConfig(model=name, corpus=corpus_spec, hooks=[hook], batch_size=batch,
                         seq_len=SEQ_LEN, max_tokens=tokens, producer_id="bench",
                         connect=[f"tcp://127.0.0.1:{port}"],
                         control_connect=["off"])  # the sink is no consumer: nothing to ask
    warm = ProducerConfig(**{**cfg.__dict__, "max_tokens": batch * (SEQ_LEN - 1)})
    whole_producer(lm, corpus, warm, port)  # first-call costs (allocator, sockets) not counted
    bare, whole, share, cpu = [], [], [], []
    for r in range(rounds):
        order = ("bare", "producer") if r % 2 == 0 else ("producer", "bare")
        for side in order:  # alternate which goes first, so drifting load biases neither
            if side == "bare":
                seconds, bare_cpu = bare_forward(lm, hook, batches)
                bare.append(tokens / seconds)
            else:
                seconds, forward, whole_cpu, _ = whole_producer(lm, corpus, cfg, port)
                whole.append(tokens / seconds)
                share.append(forward / seconds)
        cpu.append(bare_cpu / whole_cpu)
    pairs = [w / b for w, b in zip(whole, bare, strict=True)]
    paired = statistics.median(pairs)
    best = max(whole) / max(bare)
    print(f"{name}: bare {bare} producer {whole} paired {[round(p, 3) for p in pairs]} "
          f"forward share {share} cpu ratio {cpu}", flush=True)
    row = [
        LABELS.get(name, name), str(lm.device), str(lm.dtype).removeprefix("torch."), hook,
        f"{batch}x{SEQ_LEN}", f"{tokens:,}", rounds,
        f"{max(bare):,.0f} / {statistics.median(bare):,.0f}",
        f"{max(whole):,.0f} / {statistics.median(whole):,.0f}",
        f"**{paired:.3f}** ({min(pairs):.3f}-{max(pairs):.3f})", f"{best:.3f}",
        f"{statistics.median(share):.3f}",
        f"{statistics.median(cpu):.3f}", "yes" if paired >= 0.95 else "**no**",
    ]
    if not contention or name != "tiny" or lm.device.type == "cuda":
        return row, None  # SmolLM2's forward is ~100x the sending work: nothing to see
    return row, (sending_contention(lm, hook, batches, tokens, rounds),
                 sending_parts(lm, corpus, cfg, port, batches, hook, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=0,
                        help="alternating measurements of each side (0 = per-model default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default); 1 leaves a core for the "
                             "sending thread and the sink on small machines")
    parser.add_argument("--no-contention", action="store_true",
                        help="skip measuring what the sending work costs the tiny model's "
                             "bare forward on a thread against in another process, and the "
                             "producer with its sending thread cut down (CPU)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    measured = [measure(name, args.device, args.rounds, not args.no_contention)
                for name in args.models.split(",")]
    rows = [row for row, _ in measured]
    contention = [extra[0] for _, extra in measured if extra is not None]
    parts = [row for _, extra in measured if extra is not None for row in extra[1]]
    load_after = os.getloadavg()[0]
    load = f"load average {load_before:.1f} before, {load_after:.1f} after"
    busy = max(load_before, load_after) > (os.cpu_count() or 1)
    caveat = (" This run had more runnable processes than cores: its paired ratios spread "
              "as widely as the min-max shows, so a yes (or no) in the last column is not "
              "evidence that the target is (or is not) reliably met." if busy else "")
    header = HEADER
    body = (
        markdown_table(header, rows)
        + "\n\nBoth sides run the same model, batch and hook (the default, block "
        "round(2/3 n)) over the same contexts and count the same positions (127 per context: "
        "the first is dropped). *bare* = `HookedModel` forward only, ids already on the "
        "device. *producer* = `run_producer` end to end (corpus, forward, bfloat16 cast, copy "
        "to host, chunking, lz4-shuffle encoding on the sending thread, PUSH) to a PULL sink "
        "in another process, timed from call to return (sockets, pipeline fill and "
        "drain included; `--control-connect off`, as the sink has no control channel to "
        "wait for). The two sides alternate, `rounds` times each, first one then the "
        "other going first. *Median paired ratio* (the target figure) is the median over "
        "rounds of producer/bare for the two runs made next to each other, so load from other "
        "processes, which drifts over seconds, hits both alike; *ratio of bests* compares "
        "each side's fastest run; *forward share* is the producer's own "
        "`forward_seconds` sum over its wall time (1.0 = the model never waited for anything "
        "else), which other processes' load hardly affects; *CPU ratio* is the median over "
        "rounds of the bare forward's CPU seconds over the producer process's (every thread) "
        "plus the sink's from its first message on (the sink only counts rows: no decoding), "
        "i.e. how much CPU per token the producer needs beyond the forward, wherever it runs."
        "\n\n"
        f"Machine {load} ({os.cpu_count()} CPUs): with more runnable processes than cores, "
        "single runs swing by 2x and the ratios by several per cent. What the producer adds "
        "on the model's thread is 1 - forward share: its own work there (corpus, the "
        "bfloat16 cast, chunk cutting, queueing) and waiting for the GIL. The rest of a "
        "shortfall is the forward itself running slower beside the sending thread, which the "
        "table below measures." + caveat
    )
    if contention:
        body += (
            "\n\n### What the sending work costs the forward, by where it runs\n\n"
            + markdown_table(["model", "chunk", "one chunk every (ms)", "rounds",
                              "bare forward alone tok/s (median)",
                              "tok/s with the work on a thread of the model's process / "
                              "alone (min-max)",
                              "tok/s with the work in another process / alone (min-max)",
                              "tok/s with it on a thread / in a process, per round "
                              "(min-max)"], contention)
            + "\n\nThe bare forward above, timed alone, with the producer's sending work "
            "(one chunk of the default size encoded lz4-shuffle and PUSHed to a PULL sink "
            "process, at the pace the forward makes chunks) on a thread of the same process, "
            "and with the same work in a process of its own; the three take turns, the order "
            "rotating each round; ratios are medians of the per-round ratios, min-max in "
            "brackets (1.0 = no cost). The work takes the same CPU either way, so a thread "
            "costing more than a process is consistent with the sending thread taking the "
            "GIL from the model's thread, whose many small torch ops each release and retake "
            "it (other effects of sharing a process, such as the allocator, are not "
            "separated here); the per-round spread says how far one run can be trusted."
        )
    if parts:
        body += (
            "\n\n### The producer with its sending thread cut down\n\n"
            + markdown_table(["model", "sending thread", "rounds",
                              "producer / bare forward, paired (min-max)", "forward share",
                              "model thread's waits per batch"], parts)
            + "\n\nThe producer as above, its sending thread doing part of its work on each "
            "chunk (benchmark-only surgery on `Sender`): *drops* takes it off the queue and "
            "counts it as sent, *encodes* encodes it too and sends nothing (no sink runs), "
            "*sends* is the product. The four (with the bare forward) take turns, the order "
            "rotating each round; ratios are medians of the per-round ratios to the bare "
            "forward. *Waits* are the voluntary context switches of the model loop's thread "
            "per batch (`getrusage(RUSAGE_THREAD)`, 1 torch thread), start-up and drain "
            "included (7-9 a run, about 0.08 a batch here): the bare forward's thread never "
            "waits, so beside a sending thread the rest are waits for the GIL. *drops* is what "
            "no sending thread can beat: the model loop's own work and the queue."
        )
    write_section("bench_producer", "Producer throughput vs bare forward",
                  body, write=not args.no_write)


if __name__ == "__main__":
    main()
