"""Chunks that pass every wire check and still could wreck training: finite values too large
for the loss's float32 squares, dtypes mixed on one hook, a refused message that would set its
hook, an idle hook at --resume, and a producer id shared by two live senders. Real consumer
processes, real sockets, real snapshots."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_consumer import CHUNK, HOOK, Consumer, Sender, chunk_frames, latest, sparse_acts

from saestream.common.wire import encode_chunk
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig
from saestream.tools.status import value


@pytest.fixture
def start_consumer(tmp_path: Path):
    started: list[Consumer] = []

    def start(*args: str, ckpt: Path | None = None) -> Consumer:
        started.append(Consumer(tmp_path, *args, ckpt=ckpt))
        return started[-1]

    yield start
    for c in started:
        c.close()


@pytest.fixture
def sender_for():
    senders: list[Sender] = []

    def make(c: Consumer) -> Sender:
        senders.append(Sender(c.endpoint))
        return senders[-1]

    yield make
    for s in senders:
        s.close()


def frames_of(acts: torch.Tensor, seq: int, *, dtype: str, producer: str = "p1",
              run: str = "r1", hook: str = HOOK) -> list[bytes]:
    return encode_chunk(acts, producer=producer, run=run, seq=seq, model="synthetic",
                        hook=hook, source={"corpus": "test", "offset": seq * CHUNK},
                        dtype=dtype)


def all_finite(snapshot_sae: str) -> dict[str, bool]:
    return {k: bool(torch.isfinite(v).all()) for k, v in load_file(snapshot_sae).items()}


def test_a_step_whose_loss_is_not_finite_is_skipped_and_the_sae_left_as_it_was() -> None:
    t = Trainer(SAEConfig(d_in=16, n_latents=64, k=4, input_normalization="none"),
                TrainerConfig(), name="s", hook="h")
    x = torch.randn(64, 16)
    t.train_step(x)
    before = {k: v.clone() for k, v in t.sae.state_dict().items()}
    adam = {i: {k: v.clone() for k, v in s.items()}
            for i, s in t.optimizer.state_dict()["state"].items()}
    counters = (t.tokens_since_fired.clone(), t.fired_tokens.clone())
    step, tokens = t.step, t.tokens_seen
    bad = x.clone()
    bad[3, 5] = 1e30  # finite in float32; its square is not
    m = t.train_step(bad)
    assert m.skipped and m.tokens == 64 and t.skipped_steps == 1
    assert (t.step, t.tokens_seen) == (step, tokens)
    for k, v in t.sae.state_dict().items():
        assert torch.equal(v, before[k]), k
    for i, s in t.optimizer.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, adam[i][k]), (i, k)
    assert torch.equal(t.tokens_since_fired, counters[0])
    assert torch.equal(t.fired_tokens, counters[1])
    assert all(p.grad is None for p in t.sae.parameters())  # the bad gradients not kept
    m = t.train_step(x)
    assert not m.skipped and t.step == step + 1
    assert all(bool(torch.isfinite(p).all()) for p in t.sae.parameters())


def test_a_batch_whose_residual_has_no_spread_leaves_auxk_out_not_nan_in_the_weights() -> None:
    """One token (or any batch whose residual is the same on every token) makes AuxK's
    normaliser 0: the step trains without AuxK rather than putting NaN in every weight."""
    t = Trainer(SAEConfig(d_in=16, n_latents=256, k=2), TrainerConfig(k_aux=8, dead_tokens=1),
                name="s", hook="h")
    t.train_step(torch.randn(16, 16))
    assert bool(t.dead_mask().any())  # AuxK has dead latents to use
    for _ in range(3):
        m = t.train_step(torch.randn(1, 16))
        assert not m.skipped and m.auxk_loss == 0.0
    assert all(bool(torch.isfinite(p).all()) for p in t.sae.parameters())


def test_a_first_batch_that_would_set_the_runs_constants_from_huge_values_is_skipped() -> None:
    """The first batch sets constants that last the run (the loss's scale, `scalar`'s c,
    b_dec's start): from a 1e30 value they would have silenced the loss for good."""
    for norm in ("none", "scalar"):
        t = Trainer(SAEConfig(d_in=16, n_latents=64, k=4, input_normalization=norm),
                    TrainerConfig(), name="s", hook="h")
        x = torch.randn(64, 16)
        bad = x.clone()
        bad[0, 0] = 1e30
        assert t.train_step(bad).skipped and not t.initialized
        first = t.train_step(x)
        assert not first.skipped and t.initialized and 0 < t.mse_scale < float("inf")
        later = [t.train_step(x).loss for _ in range(20)]
        assert later[-1] < first.loss  # the loss still trains


def test_a_huge_finite_value_costs_one_step_not_the_run(start_consumer, sender_for) -> None:
    c = start_consumer("--sae", "latents=256,k=8,input_normalization=none")
    s = sender_for(c)
    s.send_chunks(16)
    c.wait_for("training", lambda: c.steps() >= 2)
    # the skip counters are there at 0 before any skip: the dashboard's panel and the
    # alert's increase() see a series from the start
    m = c.metrics()
    assert m is not None
    for name in ("saestream_skipped_steps_total", "saestream_skipped_tokens_total"):
        assert value(m, name, hook=HOOK, sae=HOOK) == 0, name
    huge = sparse_acts(CHUNK, torch.Generator().manual_seed(99))
    huge[7, 3] = 1e30
    assert s.send(chunk_frames(16, acts=huge))
    # The shuffle buffer draws the poisoned token at a random step, and stops drawing below
    # its minimum fill: feed it until that step comes (each step leaves the token behind with
    # probability ~0.9, so 200 chunks leave it undrawn with odds ~1e-9).
    seq = 17
    while c.value("saestream_skipped_steps_total") != 1 and seq < 217:
        s.send_chunks(4, seq0=seq, seed=seq)
        seq += 4
        c.wait_for("the buffer drained", lambda: c.value("saestream_buffer_tokens") < 3072)
    c.wait_for("the poisoned step skipped",
               lambda: c.value("saestream_skipped_steps_total") == 1)
    steps = c.steps()
    s.send_chunks(16, seq0=seq, seed=2)
    c.wait_for("training after it", lambda: c.steps() > steps)
    assert c.value("saestream_skipped_tokens_total") == 256  # one --batch-size batch
    loss = c.value("saestream_loss")
    assert loss == loss  # not NaN
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0
    assert all(all_finite(str(latest(c.ckpt) / HOOK / "sae.safetensors")).values())
    assert "skipped a step of 256 tokens" in c.log()


def test_a_chunk_narrowed_past_its_buffers_dtype_is_dropped(start_consumer, sender_for) -> None:
    """The hook's buffer takes its first chunk's dtype (float16 here); later chunks are
    converted to it, and one whose values float16 cannot hold is a counted `nonfinite` drop,
    not a buffer of inf."""
    c = start_consumer("--min-fill", "1")
    s = sender_for(c)
    gen = torch.Generator().manual_seed(0)
    assert s.send(frames_of(sparse_acts(CHUNK, gen), 0, dtype="float16"))
    c.wait_for("the hook set", lambda: c.value("saestream_received_messages_total") == 1)
    for seq, dtype in enumerate(("bfloat16", "float32"), start=1):
        big = sparse_acts(CHUNK, gen)
        big[5, 1] = 1e5  # finite in bfloat16 and float32, inf in float16
        assert s.send(frames_of(big, seq, dtype=dtype))
    c.wait_for("both dropped",
               lambda: c.value("saestream_rejected_messages_total", reason="nonfinite") == 2)
    assert s.send(frames_of(sparse_acts(CHUNK, gen), 3, dtype="bfloat16"))  # fits: converted
    c.wait_for("accepted", lambda: c.value("saestream_received_messages_total") == 2)
    assert c.value("saestream_buffer_tokens", hook=HOOK) == 2 * CHUNK
    assert "values beyond the range of float16" in c.log()
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0


def test_a_message_the_ledger_refuses_does_not_set_its_hook(start_consumer, sender_for) -> None:
    c = start_consumer("--hook", "h2", "--max-producers", "1", "--sae", "latents=256,k=8")
    s = sender_for(c)
    assert s.send(chunk_frames(0, producer="L"))
    c.wait_for("L known", lambda: c.value("saestream_received_messages_total") == 1)
    rogue = frames_of(torch.randn(CHUNK, 96), 0, dtype="float16", producer="R", hook="h2")
    assert s.send(rogue)
    c.wait_for("R refused",
               lambda: c.value("saestream_rejected_messages_total", reason="producers") == 1)
    assert s.send(chunk_frames(1, producer="L", hook="h2"))
    c.wait_for("L's h2 chunk taken", lambda: c.value("saestream_received_messages_total") == 2)
    assert c.value("saestream_rejected_messages_total", reason="dim") == 0
    assert "hook h2: d_in=64 dtype=float32" in c.log()
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0


def test_resume_with_a_hook_that_had_not_trained_yet(start_consumer, sender_for) -> None:
    args = ("--hook", "h2", "--sae", "name=s,latents=256,k=8")
    c = start_consumer(*args)
    s = sender_for(c)
    s.send_chunks(16)
    c.wait_for("training on the first hook", lambda: c.steps() >= 2)
    c.signal(signal.SIGTERM)
    assert c.wait_exit() == 0
    s.close()
    again = start_consumer(*args, "--resume", ckpt=c.ckpt)
    s2 = sender_for(again)
    again.wait_for("resumed", lambda: "resumed from" in again.log())
    for seq in range(16):
        assert s2.send(chunk_frames(seq, producer="p2", hook="h2"))
    again.wait_for("the second hook training",
                   lambda: again.value("saestream_train_steps_total", sae="s-h2") >= 1)
    again.signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    assert {p.name for p in latest(c.ckpt).iterdir() if p.is_dir()} >= {"s-model.layers.1",
                                                                          "s-h2"}


def test_two_live_senders_on_one_producer_id_log_restarts_at_a_bounded_rate(
    start_consumer, sender_for
) -> None:
    c = start_consumer("--min-fill", "1", "--buffer-tokens", "65536")
    s = sender_for(c)
    for seq in range(60):
        assert s.send(chunk_frames(seq // 2, run=f"r{seq % 2}"))
    c.wait_for("all taken", lambda: c.value("saestream_received_messages_total") == 60)
    assert c.value("saestream_producer_restarts_total", producer="p1") == 59
    assert c.log().count("restarted") <= 3


def test_train_skips_a_step_and_says_so(tmp_path) -> None:
    x = torch.randn(4096, 32).numpy()
    x[100, 7] = 1e30
    np.save(tmp_path / "acts.npy", x)
    r = run_cli(["train", "--input", str(tmp_path / "acts.npy"), "--hook", "h",
                 "--out", str(tmp_path / "out"),
                 "--latents", "128", "--k", "4", "--batch-size", "512",
                 "--input-normalization", "none"])
    assert r.returncode == 0, r.stderr
    assert "skipped, its loss not finite" in r.stderr and "skipped 1" in r.stdout
    saved = next((tmp_path / "out").rglob("sae.safetensors"))
    assert all(all_finite(str(saved)).values())
