"""The TopK SAE model on its own: init, TopK, normalisation, decode; the geometric median."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from saestream.consumer import cpu_kernels
from saestream.consumer.geometric_median import geometric_median
from saestream.consumer.sae import SAEConfig, SparseAutoencoder


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every test sees the same random data


def make_sae(**kw) -> SparseAutoencoder:
    cfg = dict(d_in=16, n_latents=64, k=4)
    cfg.update(kw)
    return SparseAutoencoder(SAEConfig(**cfg), generator=torch.Generator().manual_seed(0))


def test_encoder_is_decoder_transpose_at_init_with_unit_rows_and_zero_biases():
    sae = make_sae()
    assert sae.encoder.weight.shape == (64, 16) and sae.W_dec.shape == (64, 16)
    assert torch.equal(sae.encoder.weight, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert not sae.encoder.bias.any() and not sae.b_dec.any()


def test_topk_keeps_exactly_k_distinct_latents_per_token():
    sae = make_sae()
    x = torch.randn(200, 16)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (200, 4)
    assert all(len(set(row.tolist())) == 4 for row in indices)
    assert (values >= 0).all()
    # L0 == k: with encoder = decoderᵀ the top 4 of 64 projections are positive here.
    assert int((values > 0).sum(dim=1).min()) == 4
    pre = sae.encode_pre_act(x)
    torch.testing.assert_close(values, pre.topk(4, dim=1).values.relu())


def test_decode_is_sparse_matmul_plus_bias():
    sae = make_sae()
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(50, 16)
    values, indices = sae.encode(x)
    z = torch.zeros(50, 64).scatter(1, indices, values)
    torch.testing.assert_close(sae.decode(values, indices), z @ sae.W_dec + sae.b_dec)


def test_layer_norm_normalisation_matches_definition_and_maps_back():
    sae = make_sae(input_normalization="layer_norm")
    x = torch.randn(30, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5 + 3
    xn, stats = sae.normalize(x)
    mu, std = x.numpy().mean(1, keepdims=True), x.numpy().std(1, ddof=1, keepdims=True)
    ref = (x.numpy() - mu) / (std + 1e-5)
    np.testing.assert_allclose(xn.numpy(), ref, rtol=1e-10, atol=1e-12)
    # The way back multiplies by the std without the epsilon (OpenAI's LN, SAELens' layer_norm)
    np.testing.assert_allclose(sae.denormalize(xn, stats).numpy(), ref * std + mu, rtol=1e-12)
    torch.testing.assert_close(sae.denormalize(xn, stats), x, rtol=1e-5, atol=1e-5)


def test_scalar_normalisation_constant_gives_mean_squared_norm_d_in():
    sae = make_sae(input_normalization="scalar")
    x = torch.randn(1000, 16) * 7
    sae.set_input_scale(x)
    xn, stats = sae.normalize(x)
    assert float(xn.pow(2).sum(dim=1).mean()) == pytest.approx(16, rel=1e-4)
    torch.testing.assert_close(sae.denormalize(xn, stats), x)


def test_forward_reconstructs_in_the_raw_space():
    sae = make_sae()
    x = torch.randn(20, 16) * 4 + 2
    out = sae(x)
    xn, stats = sae.normalize(x)
    values, indices = sae.encode(xn)
    torch.testing.assert_close(out.x_hat, sae.denormalize(sae.decode(values, indices), stats))
    torch.testing.assert_close(out.latent_indices, indices)
    bare = sae(x, map_back=False)  # training's forward: the normalised space only
    assert bare.x_hat is None
    assert torch.equal(bare.normalized_x_hat, out.normalized_x_hat)
    assert torch.equal(bare.normalized_x, out.normalized_x)


def test_layer_norm_takes_the_same_values_with_and_without_the_c_kernel(monkeypatch):
    sae = make_sae()
    x = torch.randn(50, 16) * 3 + 1
    xn, stats = sae.normalize(x)
    monkeypatch.setattr(cpu_kernels, "layer_norm", lambda x, eps: None)
    rn, rstats = sae.normalize(x)
    torch.testing.assert_close(xn, rn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.shift, rstats.shift, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.scale, rstats.scale, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(sae.denormalize(xn, stats), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [dict(k=0), dict(k=65), dict(multi_topk=True, k=17), dict(input_normalization="batch_norm")],
)
def test_impossible_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        make_sae(**bad)


def _sum_dist(points: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(points - y, axis=1).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_median_matches_brute_force_minimiser(seed):
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((25, 3)) * [1, 3, 0.5]
    points[:5] += 10  # outliers pull the mean, not the median
    gm = geometric_median(torch.from_numpy(points)).numpy()
    best = min(
        (
            minimize(
                lambda y: _sum_dist(points, y),
                x0,
                method="Nelder-Mead",
                options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000),
            )
            for x0 in points[:8]
        ),
        key=lambda r: r.fun,
    )
    assert _sum_dist(points, gm) <= best.fun + 1e-7
    np.testing.assert_allclose(gm, best.x, atol=1e-4)
    assert _sum_dist(points, gm) < _sum_dist(points, points.mean(0))


def test_geometric_median_on_a_grid_in_2d():
    rng = np.random.default_rng(5)
    points = rng.uniform(-1, 1, (9, 2))
    gm = geometric_median(torch.from_numpy(points)).numpy()
    g = np.linspace(-1, 1, 801)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    cost = np.linalg.norm(grid[:, None, :] - points[None], axis=2).sum(1)
    assert np.linalg.norm(gm - grid[cost.argmin()]) <= 2 * (g[1] - g[0])
    assert _sum_dist(points, gm) <= cost.min() + 1e-9


def test_geometric_median_when_a_data_point_is_the_median():
    # Majority at one point: the median is that point, and no division by zero happens.
    points = torch.tensor([[1.0, 1.0]] * 5 + [[4.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    gm = geometric_median(points)
    assert torch.isfinite(gm).all()
    torch.testing.assert_close(gm, torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)


# -- the sparse path's kernels (consumer/sparse_ops.py) ---------------------------------------


def _topk_cases() -> dict[str, tuple[torch.Tensor, int]]:
    """Inputs for `topk_rows` that stress its threshold, compaction and fallback."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    special = randn(12, 4096)
    special[0, 5] = float("nan")  # NaN rows take torch's top-k (NaN ranks first)
    special[1] = float("-inf")
    special[2, :100] = float("inf")
    special[3, ::2] = float("-inf")
    special[4] = float("-inf")
    special[4, 7] = 1.0  # fewer than k finite values
    special[5] = 3.0  # every element tied: every group is a candidate
    special[6, 1000:1100] = 2.5  # a plateau across the k-th value
    special[7] = -randn(4096).abs()
    special[7, 3], special[7, 9] = -0.0, 0.0
    special[8] = randn(4096) * 1e38
    tail = randn(8, 4100)  # n % 8: four columns in no group
    tail[:, 4096:] += 10.0
    return {
        "gaussian": (randn(64, 4096), 32),
        "ties": ((randn(64, 4096) * 4).round() / 4, 32),
        "special": (special, 32),
        "n % 8 != 0": (randn(16, 4100), 32),
        "tail holds the top": (tail, 32),
        "n = 16 k, the smallest fast width": (randn(32, 512), 32),
        "n < 16 k (torch's top-k)": (randn(32, 500), 32),
        "multi-topk 4k": (randn(32, 4096), 128),
        "k = 1": (randn(32, 4096), 1),
        "empty batch": (randn(0, 4096), 32),
        "column biases": (randn(64, 4096) + 3 * randn(4096).clamp(min=0), 32),
    }


@pytest.fixture(params=["C kernel", "torch ops"])
def topk_path(request, monkeypatch) -> str:
    """Both CPU top-k paths: the compiled kernel, and the torch ops that run without it."""
    from saestream.consumer import cpu_kernels

    if request.param == "C kernel":
        assert cpu_kernels.load() is not None, "the C kernel did not build (is cc installed?)"
    else:
        monkeypatch.setenv("SAESTREAM_NATIVE", "0")
        assert cpu_kernels.load() is None
    return request.param


@pytest.mark.parametrize("case", list(_topk_cases()))
def test_topk_rows_returns_torch_topk_values(case: str, topk_path: str) -> None:
    from saestream.consumer.sparse_ops import topk_rows

    pre, k = _topk_cases()[case]
    values, indices = topk_rows(pre, k)
    ref = pre.topk(k, dim=1, sorted=True).values
    assert values.shape == indices.shape == (pre.shape[0], k)
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values, ref, rtol=0, atol=0, equal_nan=True)  # exact, sorted
    torch.testing.assert_close(pre.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row)) == k for row in indices.tolist())  # distinct latents per row


def _decode_inputs() -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor]:
    from saestream.consumer.sparse_ops import DecodeTerm

    W = torch.randn(96, 8, requires_grad=True)
    ids = torch.randn(20, 96).topk(6, dim=1).indices
    dead = torch.arange(80, 96)
    all_dead = torch.arange(16).expand(20, 16)  # AuxK keeping every dead latent
    some_dead = torch.randn(20, 16).topk(12, dim=1).indices
    vals = [torch.randn(20, w, requires_grad=True) for w in (6, 3, 16, 12, 2)]
    terms = [
        DecodeTerm(vals[0], ids),
        DecodeTerm(vals[1], ids[:, :3]),
        DecodeTerm(vals[2], all_dead, support=dead),  # dense over the support
        DecodeTerm(vals[3], some_dead, support=dead),  # dense over it, with a scatter
        DecodeTerm(vals[4], some_dead[:, :2], support=dead),  # sparse: 2 of 16 per row
    ]
    return W, terms, torch.stack([t.sum() for t in vals]), dead


def test_decode_of_several_terms_matches_dense_products() -> None:
    from saestream.consumer.sparse_ops import decode

    W, terms, _, dead = _decode_inputs()
    outs = decode(W, terms)
    weights = torch.randn(len(outs), 20, 8)
    (sum((o * w).sum() for o, w in zip(outs, weights, strict=True))).backward()
    got = [W.grad.clone()] + [t.values.grad.clone() for t in terms]
    W.grad = None
    for t in terms:
        t.values.grad = None
    ref_outs = []
    for t in terms:
        ids = t.indices if t.support is None else dead[t.indices]
        z = torch.zeros(20, 96).scatter(1, ids, t.values)
        ref_outs.append(z @ W)
    for o, r in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(o, r)
    (sum((o * w).sum() for o, w in zip(ref_outs, weights, strict=True))).backward()
    want = [W.grad] + [t.values.grad for t in terms]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_one_latent_pattern_serves_both_backward_passes(monkeypatch) -> None:
    """The kept ids are sorted into a CSR pattern once per step, not once per backward."""
    import saestream.consumer.sparse_ops as ops

    sorts = []  # each build tries the C counting sort first, then torch's argsort
    csr, argsort = ops.cpu_kernels.csr_pattern, torch.argsort
    monkeypatch.setattr(ops.cpu_kernels, "csr_pattern", lambda *a: sorts.append(1) or csr(*a))
    monkeypatch.setattr(
        ops.torch, "argsort", lambda *a, **kw: sorts.append(0) or argsort(*a, **kw)
    )
    for multi_topk, expected in ((False, 1), (True, 2)):  # with 4k: top k and top 4k
        sae = make_sae(n_latents=256, k=4, multi_topk=multi_topk)
        out = sae(torch.randn(32, 16), torch.arange(256) >= 240, k_aux=8)
        sorts.clear()
        loss = out.normalized_x_hat.square().sum() + out.auxk_recon.square().sum()
        if out.multi_topk_x_hat is not None:
            loss = loss + out.multi_topk_x_hat.square().sum()
        loss.backward()
        assert sum(sorts) == expected
        assert len(sorts) == expected * (1 if ops.cpu_kernels.load() else 2)


def test_pre_activation_buffer_is_reused_across_batch_sizes() -> None:
    """TopKEncode's CPU buffer outlives a step; a smaller batch views part of it, a larger one
    replaces it: the results stay those of a fresh matmul."""
    from saestream.consumer.sparse_ops import topk_encode

    W, b = torch.randn(512, 16), torch.randn(512)
    for batch in (40, 7, 90, 40):
        x = torch.randn(batch, 16)
        values, *_ = topk_encode(x, W, b, torch.zeros(16), 5)
        torch.testing.assert_close(values, (x @ W.t() + b).topk(5, dim=1).values)


@pytest.mark.parametrize("shift", [-3.0, 0.0, 3.0])  # few, some, all rows over k_aux positives
def test_auxk_after_relu_keeps_every_dead_latent_with_the_same_values_and_gradients(shift):
    """With `aux_relu`, TopKEncode skips the AuxK top-k where AuxK is dense over the dead
    latents: a row's values outside its top k_aux become 0, which the ReLU then ignores."""
    from saestream.consumer.sparse_ops import topk_encode

    dead = torch.arange(54, 64)
    x, weights = torch.randn(40, 16), torch.randn(40, 10)
    results = []
    for aux_relu in (False, True):
        W = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
        b = torch.zeros(64)
        b[dead] = shift
        _, _, aux, local = topk_encode(x, W, b, torch.zeros(16), 4, dead, 6, aux_relu=aux_relu)
        assert local.shape[1] == (10 if aux_relu else 6)
        Z = torch.zeros(40, 10).scatter(1, local, aux.relu())  # dense over the dead latents
        (Z * weights).sum().backward()
        results.append((Z.detach(), W.grad))
    (Z_ref, g_ref), (Z_new, g_new) = results
    torch.testing.assert_close(Z_new, Z_ref, rtol=0, atol=0)
    torch.testing.assert_close(g_new, g_ref)


@pytest.mark.parametrize("n_dead,k_aux,aux_relu", [
    (10, 6, True),  # dense over the dead latents (`use_compact`): every one kept
    (10, 10, True),  # every dead latent kept: no selection
    (300, 4, True),  # a top-k among many dead latents
    (10, 6, False),  # no ReLU after: a top-k
])
def test_auxk_columns_gathered_by_the_top_k_kernel_equal_torchs_gather(n_dead, k_aux, aux_relu,
                                                                       monkeypatch) -> None:
    """The C top-k gathers AuxK's dead columns as it ranks each row; without it, torch's
    index_select: the same values bit for bit, the same gradients, and column-major where
    AuxK keeps every dead latent (as `_Decode` wants them)."""
    from saestream.consumer import cpu_kernels
    from saestream.consumer.sparse_ops import topk_encode

    g = torch.Generator().manual_seed(n_dead + k_aux)
    x, W0 = torch.randn(64, 16, generator=g), torch.randn(512, 16, generator=g)
    b = torch.randn(512, generator=g)
    dead = torch.sort(torch.randperm(512, generator=g)[:n_dead]).values
    weights, results = None, []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu_kernels, "topk_rows", lambda *a, **kw: None)
        W = W0.clone().requires_grad_()
        _, _, aux, local = topk_encode(x, W, b, torch.zeros(16), 8, dead, k_aux, aux_relu=aux_relu)
        weights = torch.randn(aux.shape, generator=g) if weights is None else weights
        (aux * weights).sum().backward()
        results.append((aux.detach(), local, W.grad, aux.stride()))
    (aux_c, local_c, grad_c, stride_c), (aux_t, local_t, grad_t, stride_t) = results
    torch.testing.assert_close(aux_c, aux_t, rtol=0, atol=0)
    assert torch.equal(local_c, local_t) and stride_c == stride_t
    if aux_relu and local_c.stride(0) == 0:
        assert stride_c == (1, 64)  # column-major
    torch.testing.assert_close(grad_c, grad_t, rtol=0, atol=0)
