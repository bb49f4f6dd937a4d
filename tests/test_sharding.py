"""Latent sharding (`consumer/sharding.py`) against the one-process SAE, on real gloo process
groups of 2 and 4 ranks: forward outputs, gradients, clipping and Adam steps (the
replicated b_dec staying bit-identical on every rank).

Each rank runs the single-process reference beside its shard (tiny shapes) and asserts; a
failed assertion in any rank fails the test through `torch.multiprocessing.spawn`.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_tcp_port, leave_rank_process

from saestream.consumer.sae import ForwardOutput, SAEConfig, SparseAutoencoder
from saestream.consumer.sharding import (
    LatentShard,
    ShardedSAE,
    clip_grad_norm_,
    gather_parameters,
    gather_rows,
    gather_tensors,
    seeded_normal_rows,
    shard_parameters,
)
from saestream.consumer.trainer import ADAM_BETAS, ADAM_EPS, Trainer, TrainerConfig

CFG = SAEConfig(d_in=32, n_latents=256, k=8, multi_topk=True, input_normalization="layer_norm")
K_AUX = 16
AUXK_COEF = 1 / 32
MSE_SCALE = 0.9
L1_COEF = 1e-2  # a term on latent_acts, whose gradient takes the gather's way back


def _loss(out: ForwardOutput) -> torch.Tensor:
    """The trainer's loss arithmetic (main + Multi-TopK / 8 + auxk_coef · AuxK), plus a small
    penalty on the kept activations."""
    xn = out.normalized_x
    err = out.normalized_x_hat - xn
    total = err.pow(2).mean() / MSE_SCALE
    if out.multi_topk_x_hat is not None:
        total = total + (out.multi_topk_x_hat - xn).pow(2).mean() / MSE_SCALE / 8
    if out.auxk_recon is not None:
        e = -err.detach()
        auxk = (out.auxk_recon - e).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum()
        total = total + AUXK_COEF * torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
    return total + L1_COEF * out.latent_acts.sum() / len(xn)


def _trained_like_sae(seed: int) -> SparseAutoencoder:
    """A seeded SAE whose encoder differs from its decoder and whose biases are not zero."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(CFG, generator=g)
    with torch.no_grad():
        sae.encoder.weight.add_(0.2 * torch.randn(sae.encoder.weight.shape, generator=g))
        sae.encoder.bias.copy_(0.1 * torch.randn(CFG.n_latents, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(CFG.d_in, generator=g))
    return sae


def _dead_masks() -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(7)
    first_shard_only = torch.zeros(CFG.n_latents, dtype=torch.bool)
    first_shard_only[3:13] = True  # 10 dead latents < K_AUX, all on rank 0
    return {
        "random": torch.rand(CFG.n_latents, generator=g) < 0.3,
        "first_shard_only": first_shard_only,
        "none": None,
    }


def _join(rank: int, size: int, port: int) -> LatentShard:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=60),
    )
    return LatentShard.of_group(CFG.n_latents)


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


def _check_sharded_sae(rank: int, size: int, port: int) -> None:
    shard = _join(rank, size, port)
    try:
        _check_forward_and_gradients(shard)
        _check_adam_steps(shard)
        _check_repeated_snapshots(shard)
        dist.barrier()  # as the trainers' finish(): no rank leaves while another still talks
    finally:
        dist.destroy_process_group()
    leave_rank_process()


def _check_forward_and_gradients(shard: LatentShard) -> None:
    fresh = ShardedSAE(CFG, shard, generator=torch.Generator().manual_seed(0))
    reference = SparseAutoencoder(CFG, generator=torch.Generator().manual_seed(0))
    for n, p in fresh.named_parameters():
        q = reference.get_parameter(n)
        assert torch.equal(p, q[shard.lo : shard.hi] if n != "b_dec" else q), n

    full = _trained_like_sae(seed=1)
    sharded = shard_parameters(full, shard)
    x = 3 * torch.randn(64, CFG.d_in, generator=torch.Generator().manual_seed(2)) + 1
    for case, dead in _dead_masks().items():
        full.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
        want = full(x, dead, k_aux=K_AUX)
        got = sharded(x, dead, k_aux=K_AUX)
        for name in ForwardOutput._fields:
            w, g = getattr(want, name), getattr(got, name)
            assert (w is None) == (g is None), (case, name)
            if w is not None:
                _assert_close(g, w, 1e-6, f"{case} {name}")
        assert torch.equal(got.latent_indices, want.latent_indices), case
        _loss(want).backward()
        _loss(got).backward()
        grads = gather_tensors({n: p.grad for n, p in sharded.named_parameters()}, shard)
        assert grads is not None
        for n, p in full.named_parameters():
            _assert_close(grads[n], p.grad, 1e-5, f"{case} grad {n}")

    on_root = gather_parameters(sharded, dst=0)
    assert (on_root is None) == (shard.rank != 0)
    if on_root is not None:
        for n, p in full.named_parameters():
            assert torch.equal(on_root[n], p), n


def _adam(params: list[torch.nn.Parameter]) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-3, betas=ADAM_BETAS, eps=ADAM_EPS)


def _step(
    sae: torch.nn.Module, opt: torch.optim.Adam, x: torch.Tensor, dead: torch.Tensor
) -> None:
    """The trainer's step: loss, backward, decoder-gradient projection, clipping, Adam, unit
    decoder rows."""
    opt.zero_grad(set_to_none=True)
    _loss(sae(x, dead, k_aux=K_AUX)).backward()
    with torch.no_grad():
        W, g = sae.W_dec, sae.W_dec.grad
        g.addcmul_(torch.linalg.vecdot(g, W, dim=1)[:, None], W, value=-1.0)
        if isinstance(sae, ShardedSAE):
            clip_grad_norm_(sae, 0.05)
        else:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 0.05)
        opt.step()
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _check_adam_steps(shard: LatentShard) -> None:
    full = _trained_like_sae(seed=1)
    sharded = shard_parameters(full, shard)
    opt_full, opt_sharded = _adam(list(full.parameters())), _adam(list(sharded.parameters()))
    g = torch.Generator().manual_seed(5)
    dead = _dead_masks()["random"]
    for step in range(3):
        x = 3 * torch.randn(64, CFG.d_in, generator=g) + 1
        _step(full, opt_full, x, dead)
        _step(sharded, opt_sharded, x, dead)
        params = gather_parameters(sharded)
        assert params is not None
        for n, p in full.named_parameters():
            _assert_close(params[n], p.detach(), 1e-5, f"step {step} {n}")
        replicas = gather_rows(sharded.b_dec.detach()[None], shard)
        assert replicas is not None and (replicas == replicas[0]).all(), "b_dec drifted"
    for moment in ("exp_avg", "exp_avg_sq"):
        local = {n: opt_sharded.state[p][moment] for n, p in sharded.named_parameters()}
        gathered = gather_tensors(local, shard)
        assert gathered is not None
        for n, p in full.named_parameters():
            _assert_close(gathered[n], opt_full.state[p][moment], 1e-5, f"Adam {moment} {n}")


def _check_repeated_snapshots(shard: LatentShard) -> None:
    """Gathering the whole state for a snapshot leaves the live, sharded optimiser as it was,
    however often it is done (a sharded consumer snapshots periodically)."""
    t = Trainer(CFG, TrainerConfig(k_aux=K_AUX, dead_tokens=64), name="s", hook="h",
                shard=shard)
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        t.train_step(3 * torch.randn(64, CFG.d_in, generator=g))
        whole = t.unsharded()
        for p in t.sae.parameters():  # the live moments: still this rank's rows
            for moment in ("exp_avg", "exp_avg_sq"):
                assert t.optimizer.state[p][moment].shape == p.shape
        if shard.rank == 0:
            assert whole is not None
            for p in whole.sae.parameters():
                for moment in ("exp_avg", "exp_avg_sq"):
                    assert whole.optimizer.state[p][moment].shape == p.shape


@pytest.mark.parametrize("shards", [2])
@pytest.mark.timeout(180)
def test_sharded_sae_matches_one_process_outputs_gradients_and_adam_steps(shards: int) -> None:
    mp.spawn(_check_sharded_sae, args=(shards, free_tcp_port()), nprocs=shards)


def test_latents_not_divisible_by_shards_is_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        LatentShard(rank=0, size=3, n_latents=256)
    shard = LatentShard(rank=3, size=4, n_latents=256)
    assert (shard.lo, shard.hi, shard.n_local) == (192, 256, 64)


@pytest.mark.parametrize(("n", "d"), [(256, 33), (250, 3), (7, 2)])
def test_shard_initialisation_continues_the_seeded_stream(n: int, d: int) -> None:
    want = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    for size in (1, 2, 5, 7):
        if n % size:
            continue
        for r in range(size):
            lo, hi = r * n // size, (r + 1) * n // size
            for chunk in (16, 100, 1 << 24):
                got = seeded_normal_rows(n, d, lo, hi, torch.Generator().manual_seed(1), chunk)
                assert torch.equal(got, want[lo:hi]), (size, r, chunk)
