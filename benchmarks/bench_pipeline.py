"""Trained tokens/s of producers → consumer against the slower of its two halves.

In one run, with one configuration:
  (a) producers alone: P `saestream producer` processes push to a sink in this process that
      decodes and validates every chunk (what the consumer's receiver does) and drops it;
  (b) trainer alone: the consumer's Trainer on activations held in memory (a sample kept
      from (a)), batches copied to the device each step as the consumer does;
  (c) the pipeline: the same P producers into a real `saestream consumer` process; its
      trained tokens/s read from its /metrics.
Steady-state rates: (a) from the first to the last message, (b) after warm-up steps, (c)
from the first trained batch (buffer at its low-water mark) to --max-tokens.
Target (issue 5): c ≥ 0.9 × min(a, b).

    python benchmarks/bench_pipeline.py [--model tiny] [--producers 2] [--tokens 200000] ...
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section

from saestream.common.transport import pull_socket
from saestream.common.wire import decode_chunk
from saestream.tools.demo import DEFAULT_HOOKS
from saestream.tools.status import by_name, fetch_samples, value


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "SAESTREAM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def start_producers(args: argparse.Namespace, endpoint: str, tokens: int | None, logdir: Path,
                    tag: str) -> list[subprocess.Popen]:
    """P producers; `tokens` None = endless (stopped with SIGTERM)."""
    # With --max-tokens, wait for the sink to take everything; endless ones stop at once.
    limit = ["--linger", "1"] if tokens is None else [
        "--max-tokens", str(tokens), "--linger", str(args.timeout)]
    procs = []
    for i in range(args.producers):
        log = open(logdir / f"{tag}-producer-{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "saestream", "producer", "--model", args.model,
             "--corpus", args.corpus, "--hook", args.hook, "--connect", endpoint,
             "--producer-id", f"bench-{i}", "--shard", f"{i}/{args.producers}",
             *limit, "--chunk-tokens", str(args.chunk_tokens),
             "--batch-size", str(args.producer_batch), "--seq-len", str(args.seq_len),
             "--threads", str(args.producer_threads), "--device", args.producer_device,
             "--wire-dtype", args.wire_dtype, "--epochs", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(args.producer_threads),
        ))
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def bench_producers(args: argparse.Namespace, logdir: Path) -> tuple[float, torch.Tensor]:
    """(a): tokens/s into a decoding sink, and a sample of the activations for (b)."""
    ctx = zmq.Context()
    port = free_port()
    sock = pull_socket(ctx, f"tcp://127.0.0.1:{port}")
    total = args.producers * args.tokens
    procs = start_producers(args, f"tcp://127.0.0.1:{port}", args.tokens, logdir, "sink")
    sample: list[torch.Tensor] = []
    kept = received = 0
    t_first = t_last = 0.0
    first_n = 0
    deadline = time.monotonic() + args.timeout
    try:
        while received < total and time.monotonic() < deadline:
            if not sock.poll(1000):
                if all(p.poll() is not None for p in procs):
                    break
                continue
            chunk = decode_chunk(sock.recv_multipart(copy=False))
            now = time.perf_counter()
            if not received:
                t_first, first_n = now, chunk.n
            received += chunk.n
            t_last = now
            if kept < args.sample_tokens:
                sample.append(chunk.acts.clone())
                kept += chunk.n
    finally:
        stop_all(procs)
        sock.close(linger=0)
        ctx.term()
    if received < total:
        raise SystemExit(f"sink got {received} of {total} tokens; see {logdir}")
    rate = (received - first_n) / (t_last - t_first)
    return rate, torch.cat(sample)


def bench_trainer(args: argparse.Namespace, sample: torch.Tensor, latents: int) -> float:
    """(b): tokens/s of the Trainer alone on in-memory batches."""
    from saestream.consumer.sae import SAEConfig
    from saestream.consumer.trainer import Trainer, TrainerConfig

    torch.set_num_threads(args.trainer_threads)
    device = torch.device(args.device)
    trainer = Trainer(SAEConfig(d_in=sample.shape[1], n_latents=latents, k=args.k),
                      TrainerConfig(), name="bench", hook=args.hook, device=device)
    gen = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        idx = torch.randint(sample.shape[0], (args.batch_size,), generator=gen)
        return sample.index_select(0, idx)

    for _ in range(args.warmup_steps):
        trainer.train_step(batch().to(device))
    batches = [batch() for _ in range(min(args.trainer_steps, 16))]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.trainer_steps):
        trainer.train_step(batches[i % len(batches)].to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.trainer_steps * args.batch_size / (time.perf_counter() - t0)


def bench_pipeline(args: argparse.Namespace, logdir: Path, latents: int) -> tuple[float, dict]:
    """(c): trained tokens/s of producers → a real consumer process."""
    port, mport = free_port(), free_port()
    # Endless producers, stopped once the consumer reaches --max-tokens: the consumer is fed
    # for the whole measured window, which never includes a tail where producers are done.
    max_tokens = args.producers * args.tokens
    log = open(logdir / "consumer.log", "w")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "saestream", "consumer", "--bind", f"tcp://127.0.0.1:{port}",
         "--hook", args.hook, "--sae", f"name=bench,latents={latents},k={args.k}",
         "--batch-size", str(args.batch_size), "--buffer-tokens", str(args.buffer_tokens),
         "--min-fill", str(args.min_fill), "--max-tokens", str(max_tokens),
         "--checkpoint-dir", str(logdir / "ckpt"), "--metrics-port", str(mport),
         "--device", args.device, "--log-every", "10"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(args.trainer_threads),
    )
    procs: list[subprocess.Popen] = []
    points: list[tuple[float, float]] = []
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:  # wait for /metrics before the producers start
            try:
                fetch_samples(str(mport), timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        procs = start_producers(args, f"tcp://127.0.0.1:{port}", None, logdir, "pipe")
        while consumer.poll() is None and time.monotonic() < deadline:
            try:
                s = by_name(fetch_samples(str(mport), timeout=2))
            except OSError:
                time.sleep(0.1)
                continue
            trained = value(s, "saestream_trained_tokens_total") or 0.0
            if trained > 0 and (not points or trained > points[-1][1]):
                points.append((time.perf_counter(), trained))
            if points and time.perf_counter() - points[-1][0] > 60:
                print("(c) stalled: nothing trained for 60 s", flush=True)
                break
            time.sleep(0.25)
        final = s
    finally:
        stop_all(procs)
        if consumer.poll() is None:
            consumer.send_signal(signal.SIGTERM)
        consumer.wait(120)
        log.close()
    if len(points) < 3:
        raise SystemExit(f"pipeline produced too few measurements; see {logdir}")
    (t0, n0), (t1, n1) = points[0], points[-1]
    n_obs = value(final, "saestream_train_step_seconds_count") or 0
    step_s = (value(final, "saestream_train_step_seconds_sum") or 0) / max(n_obs, 1)
    return (n1 - n0) / (t1 - t0), {"trained": n1, "mean_step_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--corpus", default="synthetic")
    ap.add_argument("--hook", default=None)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens per producer")
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--producer-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--producer-threads", type=int, default=1)
    ap.add_argument("--producer-device", default="cpu")
    ap.add_argument("--wire-dtype", default="bfloat16")
    ap.add_argument("--latents", type=int, nargs="+", default=[4096, 16384],
                    help="SAE widths; (b) and (c) run once per width")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--buffer-tokens", type=int, default=32768)
    ap.add_argument("--min-fill", type=float, default=0.5)
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trainer-steps", type=int, default=100)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--sample-tokens", type=int, default=65536)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--logdir", type=Path, default=Path("/tmp/saestream-bench-pipeline"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    args.hook = args.hook or DEFAULT_HOOKS.get(args.model, "model.layers.4")
    args.logdir.mkdir(parents=True, exist_ok=True)

    rate_a, sample = bench_producers(args, args.logdir)
    print(f"(a) producers -> sink: {rate_a:,.0f} tokens/s (d_in {sample.shape[1]})", flush=True)
    rows = []
    notes = []
    for latents in args.latents:
        rate_b = bench_trainer(args, sample, latents)
        print(f"(b) latents {latents}: trainer alone {rate_b:,.0f} tokens/s", flush=True)
        rate_c, info = bench_pipeline(args, args.logdir, latents)
        print(f"(c) latents {latents}: pipeline {rate_c:,.0f} trained tokens/s", flush=True)
        bound = min(rate_a, rate_b)
        ratio = rate_c / bound
        shared = 1 / (1 / rate_a + 1 / rate_b)
        rows.append([
            f"latents {latents}, k {args.k}", f"{rate_a:,.0f}", f"{rate_b:,.0f}", f"{bound:,.0f}",
            f"{rate_c:,.0f}", f"**{ratio:.2f}** ({'met' if ratio >= 0.9 else 'MISSED'})",
            f"{shared:,.0f} ({rate_c / shared:.2f})",
        ])
        notes.append(f"latents {latents}: consumer mean step {info['mean_step_s'] * 1000:.1f} ms "
                     f"in (c) vs {args.batch_size / rate_b * 1000:.1f} ms alone in (b)")

    config = (
        f"{args.producers} × `saestream producer --model {args.model} --corpus {args.corpus} "
        f"--hook {args.hook} --chunk-tokens {args.chunk_tokens} --batch-size "
        f"{args.producer_batch} --seq-len {args.seq_len} --threads {args.producer_threads} "
        f"--device {args.producer_device} --wire-dtype {args.wire_dtype}` "
        f"({args.tokens:,} tokens each); consumer `--sae latents=L,k={args.k} "
        f"--batch-size {args.batch_size} --buffer-tokens {args.buffer_tokens} --min-fill "
        f"{args.min_fill} --device {args.device}` with {args.trainer_threads} torch thread(s) "
        f"(the trainer in (b) too); d_in {sample.shape[1]}; {os.cpu_count()} CPU cores"
    )
    table = markdown_table(
        ["SAE", "(a) producers → sink (one run)", "(b) trainer alone", "bound min(a, b)",
         "(c) pipeline, trained", "(c) / bound, target ≥ 0.9",
         "shared-CPU bound 1/(1/a + 1/b) (c / it)"],
        rows,
    )
    body = (
        f"Configuration: {config}. Tokens/s throughout.\n\n{table}\n\n"
        + "; ".join(notes) + ". (a) and (b) each have the machine to themselves; in (c) the "
        "producers and the trainer run at once, so on a CPU-only machine the pipeline competes "
        "with itself for the same cores (and here with other jobs on the machine). When both "
        "halves need the same cores, the best possible rate is 1/(1/a + 1/b), not min(a, b): "
        "the last column compares (c) with that, i.e. isolates the pipeline's own overhead "
        "(receiving, validation, buffering) from the competition for cores."
    )
    write_section("bench_pipeline", "Pipeline: producers → consumer (bench_pipeline.py)",
                  body, write=not args.no_write)


if __name__ == "__main__":
    main()
