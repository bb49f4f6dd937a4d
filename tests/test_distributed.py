"""Data parallelism: trainer ranks on real gloo process groups (one process per rank, TCP on
127.0.0.1) against one process training on the same global batches. Parameters, Adam state,
counters and metrics must agree after several steps, with AuxK, Multi-TopK and each input
normalisation in play."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_tcp_port, leave_rank_process

from saestream.consumer.distributed import SINGLE, DataParallel, rank_slice
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig

D, N, K, BATCH, STEPS = 24, 192, 6, 96, 4


def batches(poison: bool = False) -> list[torch.Tensor]:
    """With `poison`, the third batch's last row (the last rank's part) holds a value whose
    square is not finite in float32: that step's loss is not finite."""
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(BATCH, D, generator=g) * 3 + 1 for _ in range(STEPS)]
    if poison:
        out[2][-1, 5] = 1e30
    return out


def make(norm: str, multi: bool, dp: DataParallel) -> Trainer:
    # dead_tokens < one batch: latents that miss a step are dead at once, so AuxK runs.
    return Trainer(SAEConfig(d_in=D, n_latents=N, k=K, multi_topk=multi,
                             input_normalization=norm),
                   TrainerConfig(dead_tokens=BATCH // 2, k_aux=32, seed=3),
                   name="s", hook="h", dp=dp)


def run(trainer: Trainer, rank: int, size: int, poison: bool = False) -> dict:
    metrics = []
    for b in batches(poison):
        m = trainer.train_step(b[rank_slice(BATCH, rank, size)])
        metrics.append(m._asdict())
    state = trainer.optimizer.state_dict()["state"]
    return {
        "params": {n: p.detach().clone() for n, p in trainer.sae.named_parameters()},
        "adam": {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()},
        "since": trainer.tokens_since_fired.clone(), "fired": trainer.fired_tokens.clone(),
        "metrics": metrics, "scale": trainer.mse_scale, "input_scale": trainer.sae.input_scale,
        "tokens": trainer.tokens_seen,
    }


def _rank(rank: int, size: int, port: int, case: tuple, queue, poison: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        buf = io.BytesIO()  # bytes, not tensors: shared-memory handles die with the process
        torch.save(run(make(*case, DataParallel()), rank, size, poison), buf)
        queue.put((rank, buf.getvalue()))
        dist.barrier()  # as DataParallel.finish(): no rank leaves while another still talks
    finally:
        dist.destroy_process_group()
    queue.close()
    queue.join_thread()  # the result is in the pipe before the process ends
    leave_rank_process()


def data_parallel(case: tuple, size: int, poison: bool = False) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_tcp_port()
    procs = [ctx.Process(target=_rank, args=(r, size, port, case, queue, poison))
             for r in range(size)]
    for p in procs:
        p.start()
    results = {r: torch.load(io.BytesIO(b), weights_only=False)
               for r, b in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return [results[r] for r in range(size)]


def close(a, b, what: str, tol: float = 2e-5) -> None:
    assert torch.allclose(a, b, rtol=tol, atol=tol), (what, (a - b).abs().max())


@pytest.mark.parametrize(("norm", "multi", "size"), [("layer_norm", False, 2),
                                                     ("scalar", True, 3),
                                                     ("none", False, 2)])
def test_a_data_parallel_step_equals_one_process_on_the_global_batch(norm, multi, size) -> None:
    torch.set_num_threads(1)
    want = run(make(norm, multi, SINGLE), 0, 1)
    got = data_parallel((norm, multi), size)
    assert sum(m["auxk_loss"] > 0 for m in want["metrics"]) >= 2  # AuxK did run
    assert_same(got, want, BATCH * STEPS)


def test_a_batch_poisoned_on_one_rank_is_skipped_by_every_rank_as_by_one_process() -> None:
    """The ranks agree to skip (the rank with finite figures too: stepping alone it would
    wait for the other's gradients for ever), and nothing of the skipped step stays."""
    torch.set_num_threads(1)
    want = run(make("none", False, SINGLE), 0, 1, poison=True)
    assert [m["skipped"] for m in want["metrics"]] == [False, False, True, False]
    got = data_parallel(("none", False), 2, poison=True)
    assert_same(got, want, BATCH * (STEPS - 1))


def assert_same(got: list[dict], want: dict, tokens: int) -> None:
    """Every rank's parameters, Adam state, counters and metrics are one process's."""
    for r, res in enumerate(got):
        for n, p in want["params"].items():
            close(res["params"][n], p, f"rank {r} {n}")
        for i, s in want["adam"].items():
            for k, v in s.items():
                close(res["adam"][i][k].float(), v.float(), f"rank {r} adam {i} {k}")
        assert torch.equal(res["since"], want["since"]) and torch.equal(res["fired"],
                                                                        want["fired"])
        assert res["scale"] == pytest.approx(want["scale"], rel=1e-6)
        assert res["input_scale"] == pytest.approx(want["input_scale"], rel=1e-6) \
            if want["input_scale"] is not None else res["input_scale"] is None
        assert res["tokens"] == want["tokens"] == tokens
        for mg, mw in zip(res["metrics"], want["metrics"], strict=True):
            for key, value in mw.items():
                assert mg[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key


def test_rank_slices_cover_the_batch_in_order() -> None:
    for n, size in [(10, 3), (96, 2), (5, 5), (7, 4)]:
        parts = [rank_slice(n, r, size) for r in range(size)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


@pytest.mark.parametrize(("ranks", "shards"), [(2, 2), (4, 2)])
def test_saestream_train_under_torchrun_equals_one_process(tmp_path, ranks, shards) -> None:
    """The command as a user runs it: `torchrun --nproc-per-node N -m saestream train`
    (data parallel, latent shards, or both as a 2-D mesh) writes the same SAE as
    `saestream train` on the same file, once, from rank 0."""
    import os
    import subprocess
    import sys

    import numpy as np
    from safetensors.torch import load_file

    g = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (g.standard_normal((1024, D)) * 2 + 1).astype(np.float32))
    args = ["train", "--input", str(tmp_path / "acts.npy"), "--hook", "h", "--name", "s",
            "--latents", str(N), "--k", str(K), "--batch-size", "128", "--steps", "6",
            "--dead-tokens", "64", "--k-aux", "32", "--multi-topk", "--grad-clip", "0.5",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "saestream", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(ranks), "-m", "saestream", *args,
                           "--latent-shards", str(shards), "--out", str(tmp_path / "many")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert many.returncode == 0, many.stderr + many.stdout
    assert many.stdout.count("checkpoint: ") == 1
    if ranks // shards > 1:
        assert f"{ranks // shards} data-parallel ranks" in many.stdout
    if shards > 1:
        assert f"{shards} latent shards" in many.stdout
    a = load_file(str(next((tmp_path / "one").glob("step-*/s/sae.safetensors"))))
    b = load_file(str(next((tmp_path / "many").glob("step-*/s/sae.safetensors"))))
    for name, w in a.items():
        close(b[name], w, name)
    assert len(list((tmp_path / "many").glob("step-*"))) == 1
    ta = torch.load(next((tmp_path / "one").glob("step-*/s/trainer.pt")), weights_only=True)
    tb = torch.load(next((tmp_path / "many").glob("step-*/s/trainer.pt")), weights_only=True)
    assert torch.equal(ta["tokens_since_fired"], tb["tokens_since_fired"])
    for i, entry in ta["optimizer"]["state"].items():
        close(tb["optimizer"]["state"][i]["exp_avg_sq"], entry["exp_avg_sq"], f"adam {i}")
    if shards > 1:  # the sharded run's snapshot folder, as it is, in sparsify
        from test_interop import peer

        from saestream.consumer.checkpoint import load_sae

        sparsify = peer("sparsify")
        folder = next((tmp_path / "many").glob("step-*/s"))
        coder = sparsify.SparseCoder.load_from_disk(str(folder), device="cpu")
        sae = load_sae(folder).sae
        x = torch.randn(50, D, generator=torch.Generator().manual_seed(5)) * 2 + 1
        with torch.no_grad():
            xn, stats = sae.normalize(x)  # layer_norm is ours: sparsify normalises nothing
            enc = coder.encode(xn)
            y = sae.denormalize(coder.decode(enc.top_acts, enc.top_indices), stats)
            close(y, sae(x).x_hat, "sparsify's reconstruction", tol=1e-4)


def test_saestream_train_under_torchrun_stops_every_rank_at_one_step_on_sigterm_to_one(
        tmp_path) -> None:
    """SIGTERM to one rank (as the deploy files stop data-parallel jobs: to the ranks, not to
    torchrun): the ranks agree at the next step boundary, rank 0 writes the checkpoint of
    the steps done, and the job exits 0."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((4096, D))
            .astype(np.float32))
    out = tmp_path / "o"
    with subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "-m", "saestream", "train", "--input", str(tmp_path / "acts.npy"), "--hook",
             "h", "--latents", str(N), "--k", str(K), "--batch-size", "128", "--steps",
             "10000000", "--log-interval", "0.2", "--device", "cpu", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # rank 0's first progress line: both ranks are training
            if line.startswith("step "):
                break
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2, children
        ranks = {}
        for pid in children:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK="))
            ranks[rank] = int(pid)
        time.sleep(0.5)
        os.kill(ranks[1], signal.SIGTERM)
        rest, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    snapshot = out / (out / "latest").read_text().strip()
    extra = json.loads((snapshot / "extra.json").read_text())
    steps = int(snapshot.name.removeprefix("step-"))
    assert extra["stop_reason"] == "signal" and 0 < steps < 10_000_000
    assert extra["tokens"] == 128 * steps  # both ranks' parts of every step done
    assert rest.count("checkpoint: ") == 1 and len(list(out.glob("step-*"))) == 1


def test_latent_shards_without_torchrun_is_one_line_and_exit_2(tmp_path) -> None:
    import numpy as np
    from conftest import run_cli

    np.save(tmp_path / "acts.npy", np.ones((64, D), dtype=np.float32))
    r = run_cli(["train", "--input", str(tmp_path / "acts.npy"), "--hook", "h", "--latents",
                 str(N), "--k", str(K), "--latent-shards", "2", "--batch-size", "64",
                 "--out", str(tmp_path / "o"),
                 "--device", "cpu"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "torchrun" in r.stderr


def test_per_rank_shard_files_resume_on_any_shard_count_and_read_whole(tmp_path) -> None:
    """`--snapshot-shards per-rank` (what `auto` picks when rank 0 cannot hold the gathered
    SAE): each shard rank writes its own rows; the snapshot is complete, reads back whole
    (eval, export) equal to one process's SAE, and loads as any rank of any shard count,
    each reading only its rows; a missing shard file makes it incomplete."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from safetensors.torch import load_file

    from saestream.consumer import checkpoint as ckpt
    from saestream.consumer.sharding import LatentShard

    g = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (g.standard_normal((512, D)) * 2 + 1).astype(np.float32))
    args = ["train", "--input", str(tmp_path / "acts.npy"), "--hook", "h", "--name", "s",
            "--latents", str(N), "--k", str(K), "--batch-size", "128", "--steps", "4",
            "--dead-tokens", "64", "--k-aux", "32", "--ema-decay", "0.9", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "saestream", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "saestream", *args,
                           "--latent-shards", "2", "--snapshot-shards", "per-rank",
                           "--out", str(tmp_path / "many")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert many.returncode == 0, many.stderr + many.stdout
    snap = next((tmp_path / "many").glob("step-*"))
    folder = snap / "s"
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json", "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors",
        "trainer.json", "trainer.pt"]
    assert json.loads((folder / "trainer.json").read_text())["shards"] == 2
    ckpt.check_complete(snap)

    ref = ckpt.load_trainer(next((tmp_path / "one").glob("step-*/s")))
    whole = ckpt.load_trainer(folder)  # every shard file, one process
    ref_w, got_w = ref.export_weights(), whole.export_weights()
    for name, w in ref_w.items():
        close(got_w[name], w, name)
    assert torch.equal(whole.tokens_since_fired, ref.tokens_since_fired)
    assert ckpt.load_sae(folder).sae.W_dec.shape == (N, D)
    from conftest import run_cli

    r = run_cli(["export", str(snap), "--format", "sparsify", "--out", str(tmp_path / "x")])
    assert r.returncode == 0, r.stderr  # read whole, written in sparsify's layout
    exported = load_file(str(tmp_path / "x" / "h" / "sae.safetensors"))  # named by hook
    close(exported["W_dec"], got_w["W_dec"], "exported W_dec")
    raw = dict(whole.sae.named_parameters())
    ref_moments = ref.optimizer.state_dict()["state"]
    for size in (2, 4, 3):  # the saved count, one that splits each file, one that straddles
        for rank in range(size):
            part = LatentShard(rank, size, N)
            t = ckpt.load_trainer(folder, shard=lambda n, part=part: part)
            lo, hi = part.lo, part.hi
            for name, p in t.sae.named_parameters():
                rows = slice(None) if name == "b_dec" else slice(lo, hi)
                assert torch.equal(p.detach(), raw[name].detach()[rows]), (size, rank, name)
                assert torch.equal(t.export_weights()[name], got_w[name][rows])
            names = [n for n, _ in t.sae.named_parameters()]
            for i, entry in t.optimizer.state_dict()["state"].items():
                rows = slice(None) if names[i] == "b_dec" else slice(lo, hi)
                close(entry["exp_avg"], ref_moments[i]["exp_avg"][rows], f"{size}/{rank} {i}")

    # A damaged file of another rank is seen by rank 0's load (every header is checked), so
    # a resume moves on to an older snapshot instead of one that some rank cannot read.
    other = folder / "shard-00001-of-00002.safetensors"
    intact = other.read_bytes()
    other.write_bytes(b"\x08" + intact[1:])
    with pytest.raises(ckpt.CheckpointError, match=r"shard-00001-of-00002|header"):
        ckpt.load_trainer(folder, shard=lambda n: LatentShard(0, 2, N))
    other.write_bytes(intact[: len(intact) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_trainer(folder, shard=lambda n: LatentShard(0, 2, N))
    other.unlink()
    with pytest.raises(ckpt.CheckpointError, match="shard-00001-of-00002"):
        ckpt.check_complete(snap)
    for bad in ("0", "-1", "1e400", "100000000", '"2"', "true"):  # a hostile count
        meta = json.loads((folder / "trainer.json").read_text())
        (folder / "trainer.json").write_text(json.dumps(meta)[:-1] + f', "shards": {bad}}}')
        for read in (lambda: ckpt.check_complete(snap), lambda: ckpt.load_trainer(folder),
                     lambda: ckpt.load_sae(folder)):
            with pytest.raises(ckpt.CheckpointError, match="not a count of shard files"):
                read()
    assert load_file(str(next((tmp_path / "one").glob("step-*/s/sae.safetensors"))))


def test_auto_writes_per_rank_files_exactly_when_gathering_would_not_fit() -> None:
    from saestream.consumer.shard_files import (
        GATHER_HEADROOM,
        free_bytes,
        gather_bytes,
        gather_fits,
    )

    cpu = torch.device("cpu")
    small = SAEConfig(d_in=D, n_latents=N, k=K)
    huge = SAEConfig(d_in=4096, n_latents=1 << 24, k=32)  # 16M latents: ~4 TiB to gather
    params = 2 * (1 << 24) * 4096 + (1 << 24) + 4096
    assert gather_bytes(huge, ema=False) == 16 * params  # 32 bytes per latent × d_in
    assert gather_bytes(huge, ema=False, host=True) == 20 * params  # 40 on a CPU host
    assert gather_bytes(huge, ema=True) > gather_bytes(huge, ema=False)
    assert gather_fits([(small, False)], cpu)[0]
    fits, need, free = gather_fits([(small, False), (huge, True)], cpu)
    assert not fits and need == gather_bytes(huge, ema=True, host=True) > GATHER_HEADROOM * free
    assert 0 < free_bytes(cpu) <= os_total_memory()


def os_total_memory() -> int:
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_rank_ends_without_teardown_but_with_its_exit_code_output_and_atexit_handlers(
        tmp_path) -> None:
    """A process that joined a process group leaves through os._exit (the interpreter's
    teardown of torch's C++ state aborted ranks under load, failing finished jobs): its exit
    code, its unflushed output and its atexit handlers are kept all the same."""
    import subprocess
    import sys

    marker, torn_down = tmp_path / "atexit-ran", tmp_path / "torn-down"
    code = (
        "import atexit, sys\n"
        "class Finalised:\n"
        f"    def __del__(self): open({str(torn_down)!r}, 'w').close()\n"
        "kept = Finalised()  # finalised by the interpreter's teardown only\n"
        "from saestream.consumer import distributed\n"
        "distributed._joined.append(True)\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "sys.stdout.write('unflushed output')\n"
        "sys.argv = ['saestream', 'train', '--no-such-flag']\n"
        "from saestream.tools.cli import main\n"
        "main()\n"
        "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "unflushed output"
    assert "no-such-flag" in done.stderr and "Traceback" not in done.stderr
    assert marker.read_text() == "ran"
    assert not torn_down.exists()
