"""What torch.distributed costs an SAE training step: collectives' share of the step, bytes
moved per step, and the memory a snapshot of a latent-sharded SAE needs on rank 0.

One run, 768 × 16384, k = 32, batch 4096, fp32 on CPU, gloo over loopback TCP; interleaved
repetitions (the order of the variants rotates), medians, of `Trainer.train_step` in:
  single  one process, 2 torch threads, the whole batch (and, for reference, 1 thread);
  DP      2 processes × 1 thread, data parallel: each rank steps on half the batch, then the
          gradients, the batch statistics and the fired counts are all-reduced;
  R = 2   2 processes × 1 thread, `--latent-shards 2`: each rank holds half the latents and
          steps on the whole batch (top-k candidates all-gathered, partial reconstructions
          all-reduced, b_dec's gradient all-reduced in the backward).
Each variant with no dead latent (AuxK idle) and with 5 % dead (AuxK at k_aux = 512).

Collective time is the time spent inside the torch.distributed calls the step makes (they are
wrapped in the ranks), so it includes waiting for the slower rank; the same calls replayed on
their own, each after a barrier, give the transfer alone. Bytes are counted from the tensors
passed: an all-reduce's buffer, an all-gather's gathered output. The counted bytes are checked
against the formulas `step_bytes` states (used for the sizing table).

    python benchmarks/bench_distributed.py [--reps 7] [--quick] [--no-write]
    python benchmarks/bench_distributed.py --sizing     # the on-paper table only, no run

`--quick` is a smoke run (256 × 4096, batch 1024, printed, not written).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, write_section

from saestream.consumer.distributed import SINGLE, DataParallel, rank_slice
from saestream.consumer.sae import SAEConfig
from saestream.consumer.sharding import LatentShard
from saestream.consumer.trainer import Trainer, TrainerConfig

DEAD_TOKENS = 1_000_000
K_AUX = 512  # TrainerConfig's default
RANKS = 2
VARIANTS = ("single", "single, 1 thread", "DP", "R = 2")
SINGLE_THREADS = {"single": RANKS, "single, 1 thread": 1}
GiB = float(1 << 30)
MiB = float(1 << 20)

# ------------------------------------------------------------------ formulas (the sizing)


class Collective(NamedTuple):
    op: str
    """all_reduce or all_gather."""
    group: int
    """Ranks taking part."""
    nbytes: int
    """Message bytes: an all-reduce's buffer, an all-gather's gathered output."""

    @property
    def ring_sent(self) -> float:
        """Bytes each rank sends with a bandwidth-optimal ring: 2(g−1)/g of an all-reduce's
        buffer, (g−1)/g of an all-gather's output."""
        g = self.group
        return (2 if self.op == "all_reduce" else 1) * (g - 1) / g * self.nbytes


def step_bytes(
    d: int, n: int, k: int, b: int, dp: int, shards: int, *, k_aux: int = 0,
    multi_topk: bool = False, grad_clip: bool = False,
) -> dict[str, Collective]:
    """The collectives of one `Trainer.train_step` on every rank, as the code issues them
    (consumer/trainer.py, consumer/distributed.py, consumer/sharding.py).

    :param b: tokens per shard group and step (the global batch / dp).
    :param k_aux: AuxK's width this step, min(TrainerConfig.k_aux, dead latents); 0 = idle.
    """
    out: dict[str, Collective] = {}
    if shards > 1:
        k_top = 4 * k if multi_topk else k
        # _GatherCandidates: [2, b, k_top + k_aux] int32 (value bits, id) from each shard.
        out["candidates"] = Collective("all_gather", shards, shards * 2 * b * (k_top + k_aux) * 4)
        # _SumPartials: the top-k, top-4k and AuxK partial reconstructions [b, d] fp32.
        partials = 1 + multi_topk + (k_aux > 0)
        out["partial reconstructions"] = Collective("all_reduce", shards, partials * b * d * 4)
        out["b_dec gradient"] = Collective("all_reduce", shards, d * 4)  # _SumGradient
        if grad_clip:
            out["gradient norm"] = Collective("all_reduce", shards, 4)
    if dp > 1:
        local = n // shards
        # DataParallel.sum_: token count, the residual's sums (d), its squared norm: fp64.
        out["loss statistics"] = Collective("all_reduce", dp, (1 + d + 1) * 8)
        # Trainer._finite: whether the loss is finite everywhere, and the global token count.
        out["finite loss"] = Collective("all_reduce", dp, 2 * 8)
        # DataParallel.sum_grads_: every parameter's gradient, fp32, one flat message.
        out["gradients"] = Collective("all_reduce", dp, (2 * local * d + local + d) * 4)
        # The metrics' sums (6), the inputs' sums (d + 1) and the fired counts (n), fp64.
        out["metrics and fired counts"] = Collective("all_reduce", dp, (6 + d + 1 + n) * 8)
    return out


def memory_per_rank(d: int, n: int, b: int, dp: int, shards: int, *, k: int = 32,
                    k_aux: int = 0, multi_topk: bool = False) -> dict[str, int]:
    """Bytes a rank holds (fp32 parameters, Adam), by what for; the last three only during
    the forward."""
    local = n // shards
    weights = (2 * local * d + local + d) * 4
    width = (4 * k if multi_topk else k) + k_aux
    return {
        "weights": weights,
        "gradients": weights,
        "adam": 2 * weights,  # exp_avg, exp_avg_sq
        "dp buffer": weights if dp > 1 else 0,  # sum_grads_'s flat copy, during the all-reduce
        "counters": 2 * n * 8,  # tokens_since_fired, fired_tokens (int64, every latent)
        "pre-activations": b * local * 4,  # [b, n/R], freed before the backward
        # the gathered candidates unpacked (fp32 values, int64 ids: 12 bytes each), and
        # about as much again while _choose sorts them
        "candidates": 24 * shards * b * width if shards > 1 else 0,
    }


SNAPSHOT_DEVICE_BYTES_PER_ND = 32
"""Rank 0's extra device bytes per n·d while `Trainer.unsharded` gathers a sharded SAE for a
snapshot: the gathered weights (8), the gathered Adam moments (16) and the parameters of the
one-process Trainer they are loaded into (8)."""
SNAPSHOT_HOST_BYTES_PER_ND = 40
"""The same on a CPU rank, where everything is host memory: that Trainer is built on the host
and its random initialisation holds 8 more while it is drawn."""


def sizing_table(n: int, dims: list[int], shard_counts: list[int], b: int) -> str:
    rows = []
    for d in dims:
        for r in shard_counts:
            mem = memory_per_rank(d, n, b, 2, r)
            aux_mem = memory_per_rank(d, n, b, 2, r, k_aux=K_AUX)
            state = mem["weights"] + mem["gradients"] + mem["adam"]
            idle = step_bytes(d, n, 32, b, 1, r)
            aux = step_bytes(d, n, 32, b, 1, r, k_aux=K_AUX)
            dp = step_bytes(d, n, 32, b, 2, r)

            def total(c: dict[str, Collective], ops: tuple[str, ...] = ()) -> float:
                return sum(v.nbytes for key, v in c.items() if not ops or key in ops)

            grads = dp["gradients"].nbytes
            rows.append([
                d, r, f"{n // r:,}",
                f"{state / GiB:.1f}",
                f"{mem['dp buffer'] / GiB:.1f}",
                f"{mem['pre-activations'] / GiB:.1f}",
                "—" if r == 1 else f"{mem['candidates'] / GiB:.2f} / "
                                   f"{aux_mem['candidates'] / GiB:.2f}",
                f"{(state + mem['pre-activations'] + mem['counters']) / GiB:.1f}",
                "—" if r == 1 else f"{idle['candidates'].nbytes / MiB:.0f} / "
                                   f"{aux['candidates'].nbytes / MiB:.0f}",
                "—" if r == 1 else f"{idle['partial reconstructions'].nbytes / MiB:.0f} / "
                                   f"{aux['partial reconstructions'].nbytes / MiB:.0f}",
                f"{grads / GiB:.2f}",
                f"{total(dp, ('metrics and fired counts', 'loss statistics')) / MiB:.0f}",
            ])
    return markdown_table(
        ["d", "R", "latents per rank", "weights + grads + Adam GiB", "+ DP buffer GiB",
         f"pre-activations GiB (b = {b})", "candidates GiB (AuxK idle / k_aux 512)",
         "weights + grads + Adam + pre-activations + counters GiB",
         "candidates all-gather MiB (AuxK idle / k_aux 512)",
         "partials all-reduce MiB (idle / AuxK)", "DP gradient all-reduce GiB",
         "DP metrics + fired counts MiB"],
        rows,
    )


def sizing_body(b: int) -> str:
    n = 1 << 24
    dims, shard_counts = [576, 2048, 4096], [1, 2, 4, 8, 16, 32, 64]
    dev, host = SNAPSHOT_DEVICE_BYTES_PER_ND, SNAPSHOT_HOST_BYTES_PER_ND
    snap_header = ("| d | on the GPU at 16M latents GiB | on a CPU host at 16M latents GiB | "
                   "largest n, 80 GiB GPU | 141 GiB GPU | 1 TiB CPU host |\n"
                   "|---|---|---|---|---|---|")
    snap = "\n".join(
        f"| {d} | {dev * n * d / GiB:,.0f} | {host * n * d / GiB:,.0f} | "
        f"{80 * GiB / (dev * d) / 1e6:.1f} M | {141 * GiB / (dev * d) / 1e6:.1f} M | "
        f"{1024 * GiB / (host * d) / 1e6:.1f} M |"
        for d in dims
    )
    return f"""On paper, from the code (`step_bytes` and `memory_per_rank` in this script; the
measured run's counted bytes match `step_bytes` exactly at its shape, see the section above).
n = 2^24 = {n:,} latents, k = 32, fp32 parameters and Adam, no Multi-TopK, no gradient
clipping, no EMA; **b = {b} tokens per shard group and step** (the global batch is b × the
number of data-parallel ranks P). R = latent shards; a rank's figures do not depend on P
except where marked DP (P > 1). GiB/MiB = 2^30/2^20 bytes.

Per rank and step, with n_r = n/R latents on the rank:

- weights W_r = 4·(2·n_r·d + n_r + d) bytes (encoder and decoder rows, encoder bias, b_dec);
  gradients W_r; Adam 2·W_r; EMA (`ema_decay`) another W_r; under DP the gradient
  all-reduce's flat copy another W_r while it runs.
- pre-activations 4·b·n_r (2·b·n_r under `autocast_bf16` on CUDA), freed before the
  backward; while latents are dead AuxK also takes their columns, 4·b·(dead latents on the
  rank), and the CPU top-k 4·b·n_r/8. With sharding, the gathered candidates: 12 bytes each
  unpacked (fp32 value, int64 id), R·b·(k_top + k_aux) of them, and about as much again
  while they are sorted: ~24·R·b·(k_top + k_aux), which grows with R (from reading the
  code, not measured).
- counters 16·n on every rank whatever R (`tokens_since_fired`, `fired_tokens`, int64), and
  a few n-sized temporaries per step (fired counts as int64 and fp64).
- sharding (R > 1), over the R ranks of a shard group: the top-k candidates all-gathered,
  8·R·b·(k_top + k_aux) bytes gathered (each rank sends 8·b·(k_top + k_aux)), k_top = k or
  4k with Multi-TopK, k_aux = min(512, dead latents) and 0 while none is dead; the partial
  reconstructions all-reduced, 4·p·b·d with p = 1 + [Multi-TopK] + [AuxK ran]; b_dec's
  gradient all-reduced, 4·d; with `grad_clip` one fp32 scalar.
- data parallel (P > 1), over the P ranks holding the same shard: the gradients W_r; the
  loss statistics 8·(d + 2); whether the loss is finite on every rank, with the token count,
  16; the metrics and fired counts 8·(n + d + 7), all-reduced (fp64:
  exact counts; this one does not shrink with R).
- a bandwidth-optimal ring sends 2(g−1)/g of an all-reduce's buffer and (g−1)/g of an
  all-gather's output per rank, g the group size.

{sizing_table(n, dims, shard_counts, b)}

**Snapshots gather on rank 0.** `Trainer.unsharded` gathers the whole SAE on shard rank 0,
on its device (the GPU under CUDA): the weights (8·n·d bytes), the Adam moments (16·n·d) and
the parameters of a one-process Trainer they are loaded into (8·n·d): {dev}·n·d bytes of
device memory on top of rank 0's own shard. That Trainer is built on the host first (16·n·d
there while its random initialisation is drawn), and writing the snapshot copies the
weights through host memory; on a CPU rank it all adds up in one memory, {host}·n·d at the
peak by this accounting (the section above measures the peak at 768 × 65536, R = 2). At 16M
latents no GPU holds the gathered SAE, at any of these widths. The largest SAE a snapshot
can gather (n·d ≤ memory / {dev} on a GPU, / {host} on a CPU host; rank 0's own shard not
counted):

{snap_header}
{snap}

Beyond that, snapshots are per-rank shard files: with `--snapshot-shards auto` (the default)
rank 0 writes them instead of gathering when the gathered copy (`gather_bytes`: {dev}·n·d on
a GPU, {host}·n·d on a CPU host) would need more than half of its device's free memory;
every rank of the first shard group writes its own rows, and `--resume` reads them on any
shard count (`consumer/shard_files.py`; README, "Several processes: data parallel under
`torchrun`")."""


# ------------------------------------------------------------------ the ranks


class Call(NamedTuple):
    op: str
    nbytes: int
    seconds: float
    replay: tuple[Any, ...] | None
    """What replaying it needs: (function name, shapes, dtype)."""


class Collectives:
    """torch.distributed's collectives wrapped: while `recording`, each call's op, message
    bytes (an all-reduce's buffer, an all-gather's output) and seconds are appended to
    `calls`. The code under test calls them through the module (`dist.all_reduce(...)`), so
    wrapping the module's attributes sees every call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.recording = False
        self.original: dict[str, Callable[..., Any]] = {}
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                     "all_gather_single", "gather"):
            if hasattr(dist, name):
                self.original[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name))

    def _wrap(self, name: str) -> Callable[..., Any]:
        fn = self.original[name]

        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kw)
            seconds = time.perf_counter() - start
            if self.recording:
                self.calls.append(_describe(name, args, seconds))
            return result

        return timed


def _describe(name: str, args: tuple[Any, ...], seconds: float) -> Call:
    if name == "all_reduce":
        t = args[0]
        return Call("all_reduce", t.nbytes, seconds, (name, [tuple(t.shape)], t.dtype))
    if name == "all_gather":  # (list of outputs, input)
        outs, t = args[0], args[1]
        return Call("all_gather", sum(o.nbytes for o in outs), seconds,
                    (name, [tuple(o.shape) for o in outs] + [tuple(t.shape)], t.dtype))
    if name in ("all_gather_into_tensor", "all_gather_single"):  # (output, input)
        out, t = args[0], args[1]
        return Call("all_gather", out.nbytes, seconds,
                    (name, [tuple(out.shape), tuple(t.shape)], t.dtype))
    t = args[0]  # gather: only in snapshots, not replayed
    return Call(name, t.nbytes * dist.get_world_size(), seconds, None)


def _replay(col: Collectives, calls: list[Call]) -> float:
    """The calls again, each after a barrier (so no rank waits for another inside them):
    the seconds spent in them."""
    total = 0.0
    for c in calls:
        assert c.replay is not None
        name, shapes, dtype = c.replay
        tensors = [torch.zeros(s, dtype=dtype) for s in shapes]
        fn = col.original[name]
        dist.barrier()
        start = time.perf_counter()
        if name == "all_reduce":
            fn(tensors[0])
        elif name == "all_gather":
            fn(tensors[:-1], tensors[-1])
        else:
            fn(tensors[0], tensors[1])
        total += time.perf_counter() - start
    return total


def make_trainer(d: int, n: int, k: int, *, dp: DataParallel = SINGLE,
                 shard: LatentShard | None = None) -> Trainer:
    return Trainer(SAEConfig(d_in=d, n_latents=n, k=k),
                   TrainerConfig(dead_tokens=DEAD_TOKENS, k_aux=K_AUX),
                   name="bench", hook="bench", dp=dp, shard=shard)


def set_dead(t: Trainer, n_dead: int) -> None:
    """Mark the last `n_dead` latents dead (not fired for dead_tokens), the rest alive."""
    t.tokens_since_fired.zero_()
    if n_dead:
        t.tokens_since_fired[-n_dead:] = DEAD_TOKENS


def batch(d: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, d, generator=g) * 2 + 0.5


def _rank(rank: int, port: int, shape: tuple[int, int, int, int], conn: Any) -> None:
    """One rank: a data-parallel trainer and a latent-sharded one on the same 2-rank group;
    runs the commands the parent sends until it sends None."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=RANKS)
    col = Collectives()
    d, n, k, b = shape
    x = batch(d, b)
    trainers = {
        "DP": make_trainer(d, n, k, dp=DataParallel()),
        "R = 2": make_trainer(d, n, k, shard=LatentShard.of_group(n)),
    }
    inputs = {"DP": x[rank_slice(b, rank, RANKS)], "R = 2": x}
    for name, t in trainers.items():
        t.initialize(inputs[name])
    last: dict[tuple[str, int], list[Call]] = {}
    try:
        while (cmd := conn.recv()) is not None:
            if cmd[0] == "step":
                _, variant, n_dead = cmd
                t = trainers[variant]
                set_dead(t, n_dead)
                dist.barrier()
                col.calls, col.recording = [], True
                start, cpu = time.perf_counter(), time.process_time()
                m = t.train_step(inputs[variant])
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                col.recording = False
                last[(variant, n_dead)] = col.calls
                conn.send((seconds, col.calls, m.auxk_loss, cpu))
            elif cmd[0] == "replay":
                _, variant, n_dead, reps = cmd
                conn.send([_replay(col, last[(variant, n_dead)]) for _ in range(reps)])
            elif cmd[0] == "snapshot":
                trainers.clear()
                gc.collect()
                conn.send(_snapshot(rank, col, *cmd[1:]))
    finally:
        dist.destroy_process_group()
    # Done: end without the interpreter's teardown, after which gloo aborts now and then
    # under load (SIGABRT) and would fail a run whose figures are all in hand.
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _snapshot(rank: int, col: Collectives, d: int, n: int, k: int, b: int) -> dict[str, float]:
    """A sharded trainer at d × n after one step (so Adam holds its moments), then what the
    consumer and `saestream train` do for a snapshot: `unsharded()` (gathers on rank 0) and
    `save_snapshot`. Rank 0's resident memory is sampled every 2 ms throughout."""
    from saestream.consumer.checkpoint import save_snapshot

    t = make_trainer(d, n, k, shard=LatentShard.of_group(n))
    t.train_step(batch(d, b))
    gc.collect()
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    col.calls, col.recording = [], True
    start = time.perf_counter()
    whole = t.unsharded()
    gathered = time.perf_counter() - start
    col.recording = False
    with tempfile.TemporaryDirectory() as tmp:
        if whole is not None:
            save_snapshot(Path(tmp), whole.step, {"bench": whole})
        written = time.perf_counter() - start
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _rss())
    moments = t.optimizer.state_dict()["state"]
    return {"before": before, "peak": peak[0], "gather_s": gathered, "total_s": written,
            "gathered_bytes": sum(c.nbytes for c in col.calls),
            "replaced": any(s["exp_avg"].shape[0] > t.shard.n_local  # type: ignore[union-attr]
                            for s in moments.values() if s["exp_avg"].ndim == 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the run


def run(shape: tuple[int, int, int, int], dead_fracs: list[float], reps: int,
        snap_shape: tuple[int, int, int, int]) -> tuple[str, bool]:
    d, n, k, b = shape
    load = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    port = free_port()
    pipes, procs = [], []
    for r in range(RANKS):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_rank, args=(r, port, shape, child))
        p.start()
        pipes.append(parent)
        procs.append(p)

    def on_ranks(cmd: tuple) -> list[Any]:
        for c in pipes:
            c.send(cmd)
        return [c.recv() for c in pipes]

    single = make_trainer(d, n, k)
    x = batch(d, b)
    single.initialize(x)
    cases = [(v, round(f * n)) for f in dead_fracs for v in VARIANTS]
    step: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    coll: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    share: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    cpu: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    counted: dict[tuple[str, int], list[Call]] = {}
    auxk_ran: dict[tuple[str, int], bool] = {}
    for rep in range(reps + 1):  # the first round warms up
        order = cases[rep % len(cases):] + cases[: rep % len(cases)]
        for variant, n_dead in order:
            key = (variant, n_dead)
            if variant in SINGLE_THREADS:
                torch.set_num_threads(SINGLE_THREADS[variant])
                set_dead(single, n_dead)
                start, cpu_s = time.perf_counter(), time.process_time()
                m = single.train_step(x)
                seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_s
                coll_s = sh = 0.0
                auxk = m.auxk_loss
            else:
                answers = on_ranks(("step", variant, n_dead))
                seconds = max(a[0] for a in answers)  # the step ends with the slower rank
                per_rank = [sum(c.seconds for c in a[1]) for a in answers]
                coll_s = statistics.mean(per_rank)
                sh = statistics.mean(c / a[0] for c, a in zip(per_rank, answers, strict=True))
                counted[key] = answers[0][1]
                auxk = answers[0][2]
                cpu_s = sum(a[3] for a in answers)
            auxk_ran[key] = auxk > 0
            if rep:
                step[key].append(seconds)
                coll[key].append(coll_s)
                share[key].append(sh)
                cpu[key].append(cpu_s)
        print(f"round {rep}/{reps} done", flush=True)
    replayed = {key: statistics.median(max(t) for t in zip(*on_ranks(("replay", *key, reps)),
                                                             strict=True))
                for key in cases if key[0] not in SINGLE_THREADS}
    snap = on_ranks(("snapshot", *snap_shape))[0]
    for c in pipes:
        c.send(None)
    for r, p in enumerate(procs):
        p.join(60)
        if p.is_alive():  # stuck in the group's teardown, its figures in hand: say so
            print(f"rank {r} did not end within 60 s of its last command: killed", flush=True)
            p.kill()
            p.join()
        elif p.exitcode != 0:  # it failed after answering: its figures cannot be trusted
            raise RuntimeError(f"rank {r} ended with exit code {p.exitcode}")
    del single
    gc.collect()
    torch.set_num_threads(RANKS)  # as at the start (the report names the threads)

    rows = []
    ok = True
    for key in cases:
        variant, n_dead = key
        med = statistics.median(step[key])
        # × single: the median of the ratios within a round (seconds apart, under the same
        # load), steadier than a ratio of medians on a shared machine
        paired = statistics.median(
            a / s for a, s in zip(step[key], step[("single", n_dead)], strict=True))
        work = f"{statistics.median(cpu[key]) * 1e3:.0f}"
        k_aux = min(K_AUX, n_dead)
        ran = "" if auxk_ran[key] == bool(k_aux) else " (AuxK did not run as set!)"
        if variant in SINGLE_THREADS:
            rows.append([variant, f"1 × {SINGLE_THREADS[variant]}",
                         f"{n_dead} ({n_dead / n:.0%}){ran}", f"{med * 1e3:.0f}",
                         f"{paired:.2f}", work, "—", "—", "—", "—", "—", "—"])
            continue
        calls = counted[key]
        formula = step_bytes(d, n, k, b // (RANKS if variant == "DP" else 1),
                             RANKS if variant == "DP" else 1,
                             RANKS if variant != "DP" else 1, k_aux=k_aux)
        by_op = {op: sum(c.nbytes for c in calls if c.op == op)
                 for op in ("all_reduce", "all_gather")}
        want = {op: sum(c.nbytes for c in formula.values() if c.op == op)
                for op in ("all_reduce", "all_gather")}
        match = by_op == want and len(calls) == len(formula)
        ok &= match
        sent = sum(Collective(c.op, RANKS, c.nbytes).ring_sent for c in calls)
        rows.append([
            variant, f"{RANKS} × 1", f"{n_dead} ({n_dead / n:.0%}){ran}",
            f"{med * 1e3:.0f}", f"{paired:.2f}", work,
            f"{statistics.median(coll[key]) * 1e3:.0f}",
            f"**{statistics.median(share[key]):.0%}**",
            f"{replayed[key] * 1e3:.0f}",
            f"{len(calls)}: " + ", ".join(f"{op.replace('_', '-')} {v / MiB:.2f}"
                                           for op, v in by_op.items() if v),
            f"{sent / MiB:.2f}",
            "yes" if match else f"**no** (formula {want})",
        ])
        print(rows[-1], flush=True)
    slow = [n_dead for _, n_dead in cases[::len(VARIANTS)]
            if statistics.median(step[("single", n_dead)])
            > statistics.median(step[("single, 1 thread", n_dead)])]
    caveat = ("" if not slow else
              " Here the 2-thread single step was slower than the 1-thread one (rows with "
              f"{' and '.join(str(x) for x in slow)} dead latents): other jobs held a core at "
              "times, which stalls a 2-thread step at its barriers far more than 1-thread "
              "processes, so × single flatters DP and R = 2 there. CPU time, the collective "
              "shares, the replayed transfers and the bytes depend far less on such load.")
    sd, sn, _, sb = snap_shape
    loads = f"load average {load:.1f} before the run, {os.getloadavg()[0]:.1f} after it"
    extra = snap["peak"] - snap["before"]
    body = (
        f"{d}×{n}, k={k}, batch {b} (global), fp32, CPU, gloo over loopback TCP; medians of "
        f"{reps} interleaved repetitions (one more to warm up; the variants' order rotates "
        "each round). `single` is one process with 2 torch threads (`single, 1 thread` "
        "shows the step's CPU work without a second thread); the others are 2 "
        "processes with 1 torch thread each (gloo's own I/O threads besides). Step = the "
        "slower rank's `Trainer.train_step`, both starting from a barrier. Collectives = "
        "time inside the torch.distributed calls of the step (mean over the ranks), which "
        "includes waiting for the other rank; replayed = the same calls again, each after "
        "a barrier, i.e. the transfer alone. Bytes: an all-reduce's buffer, an "
        "all-gather's gathered output; sent/rank = what a bandwidth-optimal ring sends "
        "per rank (all-reduce: the buffer, all-gather: half the output, at 2 ranks); "
        "formula = the counted bytes equal `step_bytes` (the sizing section's formulas). "
        "× single = the median over rounds of the step's ratio to that round's `single` "
        "step; CPU = process CPU time of the step, summed over the ranks. "
        f"Machine: {loads}.{caveat}\n\n"
        + markdown_table(
            ["variant", "processes × threads", "dead latents", "step ms", "× single",
             "CPU ms", "collectives ms", "collective share", "replayed ms",
             "collectives: count, MiB by op", "sent/rank MiB", "formula"],
            rows,
        )
        + f"\n\nSnapshot of a latent-sharded SAE ({sd}×{sn}, R = 2, after one step of "
        f"{sb}): `Trainer.unsharded()` gathered {snap['gathered_bytes'] / MiB:.0f} MiB on "
        f"rank 0 in {snap['gather_s']:.2f} s; with `save_snapshot` {snap['total_s']:.2f} s. "
        f"Rank 0's resident memory rose by at most {extra / MiB:.0f} MiB above the "
        f"{snap['before'] / MiB:.0f} MiB it held (sampled every 2 ms) = "
        f"**{extra / (sn * sd):.1f} bytes per n·d**. From the code: "
        f"{SNAPSHOT_HOST_BYTES_PER_ND} on a CPU rank (the gathered weights and Adam moments, "
        "24, held while the one-process Trainer is built, 16 of which 8 are transient)"
        + (", less rank 0's own Adam moments (16/R = 8 at R = 2): `unsharded()` replaces "
           "them in the live optimiser's state with the gathered, whole-SAE ones, so they "
           "are freed (and rank 0 keeps the whole-SAE moments afterwards, a defect)."
           if snap["replaced"] else ".")
    )
    return body, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per variant")
    ap.add_argument("--quick", action="store_true",
                    help="small shape, 3 repetitions, printed only (smoke run)")
    ap.add_argument("--dead-fraction", type=float, action="append",
                    help="fraction of latents dead during the steps (repeatable; "
                         "default 0 and 0.05)")
    ap.add_argument("--sizing", action="store_true",
                    help="only the on-paper sizing table (no measurement)")
    ap.add_argument("--batch-per-group", type=int, default=4096,
                    help="tokens per shard group and step assumed by the sizing table")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(RANKS)  # the single process gets the cores the ranks share
    sizing = sizing_body(args.batch_per_group)
    write = not (args.no_write or args.quick)
    if not args.sizing:
        shape = (256, 4096, 32, 1024) if args.quick else (768, 16384, 32, 4096)
        snap_shape = (256, 16384, 32, 256) if args.quick else (768, 65536, 32, 256)
        reps = 3 if args.quick else args.reps
        body, ok = run(shape, args.dead_fraction or [0.0, 0.05], reps, snap_shape)
        if write:
            write_section("bench_distributed", "Distributed training step: collectives "
                          "(bench_distributed.py)", body)
        else:
            print(body)
        if not ok:
            sys.exit("counted bytes differ from step_bytes: fix the formulas")
    if write:
        write_section("bench_distributed_sizing", "Sizing a cluster for 16M latents "
                      "(bench_distributed.py)", sizing)
    else:
        print(sizing)


if __name__ == "__main__":
    main()
