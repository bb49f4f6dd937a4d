"""The TopK SAE model on its own: init, TopK, normalisation, decode; the geometric median."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

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
