"""The trainer: each technique of Gao et al. on its own, the sparse path against the dense
reference, and a learning test on data with a known dictionary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saestream.consumer.sae import SAEConfig
from saestream.consumer.sparse_ops import use_compact
from saestream.consumer.trainer import ADAM_EPS, Trainer, TrainerConfig, default_lr

D_IN, LATENTS, K = 24, 96, 4


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every test sees the same random data


def make_trainer(sparse: bool = True, sae_kw: dict | None = None, **kw) -> Trainer:
    sae = dict(d_in=D_IN, n_latents=LATENTS, k=K)
    sae.update(sae_kw or {})
    return Trainer(SAEConfig(**sae), TrainerConfig(sparse=sparse, **kw), name="t", hook="h")


def batch(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 2 + 0.5


def mark_dead(trainer: Trainer, dead: torch.Tensor) -> None:
    trainer.tokens_since_fired.zero_()
    trainer.tokens_since_fired[dead] = trainer.cfg.dead_tokens


def as_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(LATENTS, dtype=torch.bool)
    mask[ids] = True
    return mask


def reference(trainer: Trainer, xn: torch.Tensor, dead: np.ndarray | None) -> dict[str, float]:
    """The losses recomputed in float64 numpy from the trainer's current weights."""
    sae, k = trainer.sae, trainer.sae_cfg.k
    W_enc, b_enc, W_dec, b_dec = (
        t.detach().double().numpy()
        for t in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec)
    )
    x = xn.double().numpy()
    pre = (x - b_dec) @ W_enc.T + b_enc

    def recon(kk: int) -> np.ndarray:
        idx = np.argsort(-pre, axis=1)[:, :kk]
        z = np.zeros_like(pre)
        np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
        return z @ W_dec + b_dec

    x_hat = recon(k)
    c = trainer.mse_scale
    out = {
        "main": ((x_hat - x) ** 2).mean() / c,
        "nmse": ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "multi": ((recon(4 * k) - x) ** 2).mean() / c,
        "auxk": 0.0,
    }
    if dead is not None and len(dead):
        k_aux = min(trainer.cfg.k_aux, len(dead))
        masked = np.full_like(pre, -np.inf)
        masked[:, dead] = pre[:, dead]
        idx = np.argsort(-masked, axis=1)[:, :k_aux]
        z = np.zeros_like(pre)
        np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
        e = x - x_hat
        out["auxk"] = ((z @ W_dec - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return out


# -- sparse fast path == dense reference ------------------------------------------------------

CASES = [  # (multi_topk, n_dead, k_aux, input_normalization)
    (False, 0, 16, "layer_norm"),
    (False, 20, 16, "layer_norm"),  # AuxK over few dead latents: compact (dense-over-dead) kernels
    (False, 60, 4, "none"),  # many dead, small k_aux: CSR kernels
    (True, 20, 16, "scalar"),
    (True, 60, 4, "layer_norm"),
]


@pytest.mark.parametrize("native", ["C kernel", "torch ops"])
@pytest.mark.parametrize("multi_topk,n_dead,k_aux,norm", CASES)
def test_sparse_path_matches_dense_path_losses_and_gradients(
    multi_topk, n_dead, k_aux, norm, native, monkeypatch
):
    """With the CPU top-k kernel (bias added as it ranks) and without it (torch ops)."""
    from saestream.consumer import cpu_kernels

    if native == "torch ops":
        monkeypatch.setenv("SAESTREAM_NATIVE", "0")
    assert (cpu_kernels.load() is not None) == (native == "C kernel")
    sae_kw = dict(multi_topk=multi_topk, input_normalization=norm)
    fast = make_trainer(True, sae_kw, k_aux=k_aux, dead_tokens=50)
    ref = make_trainer(False, sae_kw, k_aux=k_aux, dead_tokens=50)
    x = batch(64)
    fast.initialize(x)
    ref.initialize(x)
    with torch.no_grad():  # non-trivial biases, so every term matters
        for t in (fast, ref):
            t.sae.encoder.bias.copy_(torch.linspace(-0.2, 0.2, LATENTS))
    dead = torch.arange(LATENTS - n_dead, LATENTS)
    if n_dead:
        assert use_compact(64 * k_aux, 64, n_dead) == (n_dead == 20)
    lf = fast.losses(x, as_mask(dead) if n_dead else None)
    lr = ref.losses(x, as_mask(dead) if n_dead else None)
    with torch.no_grad():  # both rank the latents on bit-identical pre-activations
        kept_f = fast.sae(x).latent_indices.sort(dim=1).values
        kept_r = ref.sae(x, dense=True).latent_indices.sort(dim=1).values
    assert torch.equal(kept_f, kept_r)
    lf.total.backward()
    lr.total.backward()
    for name in ("total", "main", "auxk", "multi_topk", "sse", "sst", "l0"):
        a, b = float(getattr(lf, name).detach()), float(getattr(lr, name).detach())
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7), name
    assert (float(lf.auxk.detach()) > 0) == bool(n_dead)
    assert (float(lf.multi_topk.detach()) > 0) == multi_topk
    pf, pr = dict(fast.sae.named_parameters()), dict(ref.sae.named_parameters())
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        gf, gr = pf[name].grad, pr[name].grad
        rel = float((gf - gr).norm() / gr.norm())
        assert rel < 1e-4, (name, rel)


@pytest.mark.parametrize("sparse", [True, False])
def test_losses_match_numpy_reference(sparse):
    t = make_trainer(sparse, dict(multi_topk=True), k_aux=8, dead_tokens=10)
    x = batch(64)
    t.initialize(x)
    dead = np.arange(50, 80)
    mark_dead(t, torch.from_numpy(dead))
    xn, _ = t.sae.normalize(x)
    ref = reference(t, xn, dead)
    out = t.losses(x, as_mask(torch.from_numpy(dead)))
    assert float(out.main.detach()) == pytest.approx(ref["main"], rel=1e-5)
    assert float(out.multi_topk.detach()) == pytest.approx(ref["multi"], rel=1e-5)
    assert float(out.auxk.detach()) == pytest.approx(ref["auxk"], rel=1e-5)
    # Multi-TopK: L(k) + L(4k)/8; AuxK weighted 1/32.
    expected = ref["main"] + ref["multi"] / 8 + ref["auxk"] / 32
    assert float(out.total.detach()) == pytest.approx(expected, rel=1e-5)


# -- metrics ------------------------------------------------------------------------------------


def test_step_metrics_normalized_mse_and_l0_match_numpy_reference():
    t = make_trainer()
    x = batch(128, seed=3)
    t.initialize(x)
    xn, _ = t.sae.normalize(x)
    ref = reference(t, xn, None)  # weights before the step
    m = t.train_step(x)
    assert m.normalized_mse == pytest.approx(ref["nmse"], rel=1e-5)
    assert m.sse / m.sst == pytest.approx(m.normalized_mse)
    assert m.l0 == K
    assert m.tokens == 128 and t.tokens_seen == 128 and t.step == 1
    assert m.auxk_loss == 0.0 and m.multi_topk_loss == 0.0 and m.dead_fraction == 0.0
    assert m.loss == pytest.approx(ref["main"], rel=1e-5)


def test_main_loss_constant_is_mse_of_predicting_the_first_sample_mean():
    t = make_trainer(sae_kw=dict(input_normalization="none"))
    x0 = batch(256, seed=1)
    t.train_step(x0)
    expected = float(((x0 - x0.mean(0)) ** 2).mean())
    assert t.mse_scale == pytest.approx(expected, rel=1e-6)
    t.train_step(batch(64, seed=2) * 10)  # a later, very different batch changes nothing
    assert t.mse_scale == pytest.approx(expected, rel=1e-6)


def test_b_dec_starts_at_the_geometric_median_of_the_first_sample():
    t = make_trainer(sae_kw=dict(input_normalization="none"))
    x = batch(200)
    t.initialize(x)
    b = t.sae.b_dec.detach().double()
    cost = lambda y: float((x.double() - y).norm(dim=1).sum())  # noqa: E731
    assert cost(b) < cost(x.double().mean(0))
    for _ in range(20):  # no nearby point does better
        assert cost(b) <= cost(b + 1e-3 * torch.randn(D_IN, dtype=torch.float64)) + 1e-9
    t.initialize(batch(200, seed=9))  # idempotent
    assert torch.equal(t.sae.b_dec.detach().double(), b)


# -- decoder constraints -----------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False])
def test_decoder_rows_have_unit_norm_after_each_step(sparse):
    t = make_trainer(sparse, lr=0.05)
    for i in range(3):
        t.train_step(batch(64, seed=i))
        torch.testing.assert_close(t.sae.W_dec.norm(dim=1), torch.ones(LATENTS))


def test_decoder_gradient_is_orthogonal_to_its_row_when_adam_steps(monkeypatch):
    # torch's path (the C kernel does the same in one pass: the next test equates them)
    monkeypatch.setattr(Trainer, "_step_decoder_fused", lambda self: False)
    t = make_trainer()
    seen = []

    def check(opt, args, kwargs):
        W, g = t.sae.W_dec.detach(), t.sae.W_dec.grad
        seen.append((float((g * W).sum(dim=1).abs().max()), float(g.norm())))

    t.optimizer.register_step_pre_hook(check)
    t.train_step(batch(64))
    ((parallel, norm),) = seen
    assert norm > 1e-3 and parallel < 1e-6 * norm


@pytest.mark.parametrize("ema", [None, 0.9])
def test_one_pass_decoder_update_equals_torchs_projection_adam_and_renormalisation(
    monkeypatch, ema
):
    """The C kernel's decoder step (projection, Adam, renormalisation in one pass over the
    rows) against torch's three steps: the same weights, moments and step count over several
    steps, and the same optimiser state layout (snapshots read either way)."""
    from saestream.consumer import cpu_kernels

    assert cpu_kernels.load() is not None, "the C kernels did not build (is cc installed?)"
    fused, plain = make_trainer(ema_decay=ema), make_trainer(ema_decay=ema)
    calls = []
    real = Trainer._step_decoder_fused

    def step_decoder(self):
        if self is plain:
            return False
        calls.append(real(self))
        return calls[-1]

    monkeypatch.setattr(Trainer, "_step_decoder_fused", step_decoder)
    for i in range(6):
        x = batch(64, seed=i)
        mark_dead(fused, torch.arange(10)), mark_dead(plain, torch.arange(10))  # AuxK too
        a, b = fused.train_step(x), plain.train_step(x)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
    assert calls == [True] * 6
    for (name, p), q in zip(fused.sae.named_parameters(), plain.sae.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        s, r = fused.optimizer.state[p], plain.optimizer.state[q]
        assert s.keys() == r.keys() and float(s["step"]) == float(r["step"]) == 6
        assert s["step"].dtype == r["step"].dtype
        torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=1e-3, atol=1e-8)
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-3, atol=1e-12)
    norms = fused.sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    if ema is not None:
        for e, f in zip(fused.ema, plain.ema, strict=True):
            torch.testing.assert_close(e, f, rtol=1e-4, atol=1e-6)


def test_a_state_saved_on_torchs_decoder_path_resumes_on_the_kernels_and_back(monkeypatch):
    """Snapshots hold the same optimiser state either way: three steps on one path, saved
    and loaded into a fresh trainer, three more on the other, equal the six on one path."""
    real = Trainer._step_decoder_fused
    for first, then in ((False, True), (True, False)):
        runs = []
        for switch in (True, False):
            use = {"fused": first}
            monkeypatch.setattr(
                Trainer, "_step_decoder_fused", lambda self, use=use: use["fused"] and real(self)
            )
            t = make_trainer()
            for i in range(3):
                t.train_step(batch(64, seed=i))
            if switch:
                resumed = make_trainer()
                resumed.load_state_dict(t.export_weights(), t.state_dict())
                t, use["fused"] = resumed, then
            for i in range(3, 6):
                t.train_step(batch(64, seed=i))
            runs.append(t)
        a, b = runs
        for p, q in zip(a.sae.parameters(), b.sae.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
            assert float(a.optimizer.state[p]["step"]) == float(b.optimizer.state[q]["step"]) == 6


def test_data_parallel_trainers_step_the_decoder_with_torch(monkeypatch):
    """Under data parallelism every rank must round alike: torch's path, whatever is built."""
    from types import SimpleNamespace

    t = make_trainer()
    t.train_step(batch(64))
    t.sae(batch(64))[0].sum().backward()
    assert t._step_decoder_fused()  # one process: the kernel
    t.sae(batch(64))[0].sum().backward()
    t.dp = SimpleNamespace(size=2)
    assert not t._step_decoder_fused()


def test_gradient_norm_is_clipped():
    t = make_trainer(grad_clip=1e-3)
    norms = []
    t.optimizer.register_step_pre_hook(
        lambda *a: norms.append(
            float(torch.cat([p.grad.flatten() for p in t.sae.parameters()]).norm())
        )
    )
    t.train_step(batch(64))
    assert norms[0] == pytest.approx(1e-3, rel=1e-4)


# -- dead latents and AuxK ------------------------------------------------------------------------


def test_auxk_is_zero_and_skipped_when_nothing_is_dead():
    t = make_trainer()
    m = t.train_step(batch(64))
    assert m.auxk_loss == 0.0 and m.dead_fraction == 0.0


@pytest.mark.parametrize("sparse", [True, False])
def test_auxk_gradient_reaches_only_dead_latents(sparse):
    t = make_trainer(sparse, k_aux=8, dead_tokens=10)
    x = batch(64)
    t.initialize(x)
    dead = torch.tensor([3, 17, 40, 41, 42, 90])
    mark_dead(t, dead)
    out = t.losses(x, as_mask(dead))
    assert float(out.auxk.detach()) > 0
    out.auxk.backward()  # the AuxK term alone
    for g in (t.sae.W_dec.grad, t.sae.encoder.weight.grad):
        touched = set(g.abs().sum(dim=1).nonzero().flatten().tolist())
        assert touched and touched <= set(dead.tolist())


def test_latent_counters_reset_on_firing_and_mark_dead_after_dead_tokens():
    t = make_trainer(dead_tokens=100, k_aux=4)
    t.initialize(batch(64))
    with torch.no_grad():
        t.sae.encoder.bias[7] = -1e4  # latent 7 can never be in the top k with value > 0
    m1 = t.train_step(batch(64, seed=1))
    assert t.tokens_since_fired[7] == 64 and m1.auxk_loss == 0.0
    fired = t.tokens_since_fired == 0
    assert fired.sum() > 0 and not fired[7]
    m2 = t.train_step(batch(64, seed=2))
    assert t.tokens_since_fired[7] == 128
    assert bool(t.dead_mask()[7]) and m2.dead_fraction >= 1 / LATENTS
    assert m2.dead_fraction == pytest.approx(float(t.dead_mask().float().mean()))
    m3 = t.train_step(batch(64, seed=3))  # now AuxK runs
    assert m3.auxk_loss > 0


# -- optimiser and options ----------------------------------------------------------------------


def test_adam_hyperparameters_and_default_learning_rate():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)
    t = make_trainer()
    group = t.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(2e-4 / math.sqrt(LATENTS / 2**14))
    assert group["betas"] == (0.9, 0.999) and group["eps"] == ADAM_EPS == 6.25e-10
    assert make_trainer(lr=1e-3).optimizer.param_groups[0]["lr"] == 1e-3


def test_ema_weights_are_what_gets_exported():
    t = make_trainer(ema_decay=0.5, lr=0.01)
    t.initialize(batch(64))
    ema = {n: p.detach().clone() for n, p in t.sae.named_parameters()}
    for i in range(3):
        t.train_step(batch(64, seed=i))
        for n, p in t.sae.named_parameters():
            ema[n] = 0.5 * ema[n] + 0.5 * p.detach()
    exported = t.export_weights()
    for n, p in t.sae.named_parameters():
        torch.testing.assert_close(exported[n], ema[n])
        assert not torch.equal(exported[n], p.detach())


def test_train_step_takes_half_precision_input_and_rejects_bad_shapes():
    t = make_trainer()
    m = t.train_step(batch(64).to(torch.bfloat16))
    assert math.isfinite(m.loss)
    with pytest.raises(ValueError):
        t.train_step(torch.randn(8, D_IN + 1))
    with pytest.raises(ValueError):
        t.train_step(torch.randn(0, D_IN))


# -- learning -----------------------------------------------------------------------------------


def test_learns_a_known_sparse_dictionary():
    """Tokens are sums of 3 of 48 known unit features with weights in [0.5, 1.5]; an SAE with
    64 latents, k=3, recovers most features (cosine ≥ 0.9 to some decoder row)."""
    d, n_feat, k = 32, 48, 3
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)

    def sample(n: int) -> torch.Tensor:
        idx = torch.rand(n, n_feat, generator=g).argsort(dim=1)[:, :k]
        coef = torch.rand(n, k, generator=g) + 0.5
        return torch.einsum("nk,nkd->nd", coef, feats[idx])

    t = Trainer(
        SAEConfig(d_in=d, n_latents=64, k=k, input_normalization="none"),
        TrainerConfig(lr=3e-3, dead_tokens=20_000, k_aux=32, seed=0),
        name="t",
        hook="h",
    )
    window = []
    for _ in range(1000):
        window.append(t.train_step(sample(512)))
    last = window[-50:]
    nmse = sum(m.sse for m in last) / sum(m.sst for m in last)
    cos = (feats @ t.sae.W_dec.detach().T).max(dim=1).values
    recovered = float((cos >= 0.9).float().mean())
    assert recovered >= 0.85, (recovered, cos)
    assert nmse < 0.1
    assert last[-1].dead_fraction <= 0.3
    assert last[-1].l0 == k


@pytest.mark.parametrize("ties", [False, True])
def test_two_stage_topk_returns_the_same_values_as_torch_topk(ties: bool) -> None:
    from saestream.consumer.sparse_ops import topk_rows

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 4096, generator=g)
    if ties:  # many exactly equal values: indices may differ, values may not
        pre = (pre * 4).round() / 4
    values, indices = topk_rows(pre, 32)
    ref_values, _ = pre.topk(32, dim=1, sorted=True)
    assert torch.equal(values, ref_values)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row)) == 32 for row in indices.tolist())  # distinct latents per token


@pytest.mark.parametrize("multi_topk", [False, True])
def test_the_loss_nodes_equal_mse_loss_in_value_and_gradient(multi_topk) -> None:
    """`losses` builds its terms from the statistics it has (`_ResidualLoss`) and one
    difference each (`_SquaredDistance`): the values and every gradient are mse_loss's."""
    import torch.nn.functional as F

    t = make_trainer(True, dict(multi_topk=multi_topk), k_aux=8, dead_tokens=50)
    x = batch(64)
    t.initialize(x)
    dead = as_mask(torch.arange(LATENTS - 20, LATENTS))
    got = t.losses(x, dead)
    got.total.backward()
    grads = {n: p.grad.clone() for n, p in t.sae.named_parameters()}
    t.optimizer.zero_grad(set_to_none=True)
    out = t.sae(x, dead, k_aux=8)
    xn, x_hat = out.normalized_x, out.normalized_x_hat
    scale = x.shape[0] * D_IN * t.mse_scale
    main = F.mse_loss(x_hat, xn, reduction="sum") / scale
    e = (xn - x_hat).detach()
    den = ((e.double() - e.double().mean(dim=0)).pow(2).sum()).float()
    auxk = F.mse_loss(out.auxk_recon, e, reduction="sum") / den
    total = main + t.cfg.auxk_coef * auxk
    if multi_topk:
        multi = F.mse_loss(out.multi_topk_x_hat, xn, reduction="sum") / scale
        total = total + multi / 8
        assert float(got.multi_topk.detach()) == pytest.approx(float(multi.detach()), rel=1e-5)
    assert float(got.main.detach()) == pytest.approx(float(main.detach()), rel=1e-5)
    assert float(got.auxk.detach()) == pytest.approx(float(auxk.detach()), rel=1e-5)
    assert float(auxk.detach()) > 0
    total.backward()
    for n, p in t.sae.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_a_bf16_reconstructions_loss_is_float32_as_mse_loss_makes_it() -> None:
    """Under CUDA autocast AuxK's reconstruction is bf16: its loss stays in the promoted
    dtype, not rounded to bf16, and its gradient comes back in bf16."""
    import torch.nn.functional as F

    from saestream.consumer.trainer import _SquaredDistance

    r = torch.randn(32, 8).bfloat16().requires_grad_()
    t = torch.randn(32, 8)
    den = torch.tensor(3.0)
    got = _SquaredDistance.apply(r, t, den)
    want = F.mse_loss(r, t, reduction="sum") / den
    assert got.dtype == want.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    got.backward()
    assert r.grad is not None and r.grad.dtype == torch.bfloat16
