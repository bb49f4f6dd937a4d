"""The ablation sparsity group of `saestream eval` (Gao et al. 2024, §4.5): the sparsity
measure on Δs whose value is known in closed form, and the ablations on the tiny model checked
against an independent computation (a plain forward hook, the SAE's training forward)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from evalkit import sharpened_tiny, synthetic_ids

from saestream.consumer.checkpoint import load_sae, save_snapshot
from saestream.consumer.sae import SAEConfig
from saestream.consumer.trainer import Trainer, TrainerConfig
from saestream.evaluator.ablation import MaxActivations, ablation_sparsity, sparsity
from saestream.evaluator.engine import EvalError

HOOK = "model.layers.2"
D = 64  # the tiny model's d_model
T = 16
N_CONTEXTS = 6
LATENTS = 24
POSITIONS = 5  # < T: batches are cut short, and windows at a context's end are shorter


# -- the measure ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "v"), [(1, 3), (4, 10), (16, 512), (5, 7)])
def test_a_one_hot_delta_is_one_over_n_v(n, v) -> None:
    for value in (2.5, -1e-3):
        delta = torch.zeros(n, v)
        delta[n // 2, v - 1] = value
        assert sparsity(delta) == pytest.approx(1 / (n * v), rel=1e-12)


def test_a_delta_spread_over_half_the_entries_is_one_half() -> None:
    """Even V: half the row at c, half at 0; the lower median is 0 for c > 0 and c for c < 0,
    either way half the entries are left non-zero and equal in size: exactly 1/2. Odd V: the
    median is whichever value holds the majority, so (V − 1)/2 entries are left: 1/2 − 1/(2V),
    within 1/(2V) of 1/2."""
    g = torch.Generator().manual_seed(0)
    for c in (3.0, -0.2):
        delta = torch.zeros(4, 10)
        for row in delta:
            row[torch.randperm(10, generator=g)[:5]] = c
        assert sparsity(delta) == pytest.approx(0.5, rel=1e-12)
    for nonzero in (5, 6):  # of V = 11: the majority is 0, then c
        delta = torch.zeros(3, 11)
        delta[:, :nonzero] = 1.7
        assert sparsity(delta) == pytest.approx(5 / 11, rel=1e-12)
        assert abs(sparsity(delta) - 0.5) <= 1 / 22 + 1e-12


def test_a_dense_gaussian_delta_is_about_two_over_pi() -> None:
    """For i.i.d. N(0, 1) entries (E|x|)² / E[x²] = 2/π. Over n·V = 8192 entries the ratio's
    sampling error is ~0.005 and the row medians (~N(0, π/2V)) move it by ~1e-3: tolerance
    0.02."""
    delta = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    assert sparsity(delta) == pytest.approx(2 / math.pi, abs=0.02)


def test_sparsity_ignores_scale_and_a_constant_shift_per_row() -> None:
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 33, generator=g, dtype=torch.float64).pow(3)
    s = sparsity(delta)
    assert 0 < s < 1
    assert sparsity(7 * delta) == pytest.approx(s, rel=1e-9)
    assert sparsity(-0.01 * delta) == pytest.approx(s, rel=1e-9)
    shift = torch.randn(6, 1, generator=g, dtype=torch.float64)
    assert sparsity(delta + shift) == pytest.approx(s, rel=1e-9)
    assert math.isnan(sparsity(torch.zeros(3, 5)))
    assert math.isnan(sparsity(torch.arange(3.0)[:, None].expand(3, 5)))  # a shift per row


def test_max_activations_keep_each_latents_first_maximum_over_batches() -> None:
    m = MaxActivations(5)
    # Two contexts of T = 3 (rows = positions 1, 2), k = 2.
    m.add(torch.tensor([[2.0, 1.0], [3.0, 1.0], [3.0, 0.0], [1.0, 0.5]]),
          torch.tensor([[0, 1], [0, 2], [1, 3], [0, 1]]), first_context=0, seq_len=3)
    assert m.value.tolist() == [3.0, 3.0, 1.0, 0.0, 0.0]
    assert m.context.tolist()[:3] == [0, 1, 0] and m.position.tolist()[:3] == [2, 1, 2]
    m.add(torch.tensor([[3.0, 2.0], [4.0, 1.0]]), torch.tensor([[0, 2], [1, 2]]),
          first_context=2, seq_len=3)
    assert m.value.tolist() == [3.0, 4.0, 2.0, 0.0, 0.0]  # a tie keeps the first: latent 0
    assert m.context.tolist()[:3] == [0, 2, 2] and m.position.tolist()[:3] == [2, 2, 1]
    assert m.fired.tolist() == [0, 1, 2]  # latent 3 was kept only at 0: it never fired


# -- the ablations, on the tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return sharpened_tiny()


@pytest.fixture(scope="module")
def ids(lm) -> torch.Tensor:
    return synthetic_ids(lm, N_CONTEXTS, T)


def trained(name: str, norm: str, n_latents: int = 128, k: int = 8) -> Trainer:
    t = Trainer(SAEConfig(d_in=D, n_latents=n_latents, k=k, input_normalization=norm),
                TrainerConfig(), name=name, hook=HOOK, model="tiny")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        t.train_step(torch.randn(256, D, generator=g) * 2 + 0.5)
    return t


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """`ln` and `scalar`: trained a little; `halfdead`: `ln` with the decoder rows of the even
    latents zeroed (they still fire, but contribute nothing); `zero`: nothing ever fires."""
    half = trained("halfdead", "layer_norm")
    zero = trained("zero", "none", n_latents=32, k=4)
    with torch.no_grad():
        half.sae.W_dec[::2] = 0
        for p in zero.sae.parameters():
            p.zero_()
    trainers = {"ln": trained("ln", "layer_norm"), "scalar": trained("scalar", "scalar"),
                "halfdead": half, "zero": zero}
    return save_snapshot(tmp_path_factory.mktemp("ckpt"), 1, trainers)


def run(lm, ids, snapshot, name: str, **kw) -> dict:
    kw = {"latents": LATENTS, "positions": POSITIONS, "batch_size": 5, **kw}
    return ablation_sparsity(lm.model, ids, load_sae(snapshot / name), HOOK, **kw)


@pytest.fixture(scope="module")
def results(lm, ids, snapshot) -> dict[str, dict]:
    return {name: run(lm, ids, snapshot, name) for name in ("ln", "scalar")}


def _hidden(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace(output, new):
    return new if isinstance(output, torch.Tensor) else (new, *output[1:])


def independent(lm, ids, sae) -> tuple[torch.Tensor, object]:
    """The hook's rows [contexts·(T−1), D] (positions 1..T−1) and the SAE's training forward
    on them."""
    block = lm.model.get_submodule(HOOK)
    grabbed = {}
    h = block.register_forward_hook(lambda m, a, o: grabbed.__setitem__("x", _hidden(o)))
    with torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    h.remove()
    x = grabbed["x"][:, 1:].reshape(-1, D)
    return x, sae(x)


@pytest.mark.parametrize("name", ["ln", "scalar"])
def test_fields_are_in_range_and_summarise_the_latents(results, name) -> None:
    r = results[name]
    assert results["ln"]["fired"] > LATENTS  # a sample, not every latent that fired
    n = min(LATENTS, r["fired"])
    assert (r["latents"], r["positions"], r["vocab"]) == (n, POSITIONS, 512)
    per = r["per_latent"]
    ids_ = [e["latent"] for e in per]
    assert ids_ == sorted(set(ids_)) and len(ids_) == n
    for key in ("sparsity", "baseline"):
        vals = torch.tensor([e[key] for e in per], dtype=torch.float64)
        assert bool(((vals > 0) & (vals <= 1)).all())
        stats = r if key == "sparsity" else r["baseline"]
        assert stats["undefined"] == 0
        assert stats["mean"] == pytest.approx(vals.mean().item(), rel=1e-12)
        q = stats["quantiles"]
        assert list(q) == ["p10", "p25", "p50", "p75", "p90"]
        assert list(q.values()) == sorted(q.values())
        assert q["p50"] == pytest.approx(statistics.median(vals.tolist()), rel=1e-12)
    # The latent's own direction is not a random channel's: the two sparsities differ.
    assert sum(abs(e["sparsity"] - e["baseline"]) > 1e-3 for e in per) >= n // 2
    assert all(e["norm"] > 0 and 0 <= e["channel"] < D for e in per)


@pytest.mark.parametrize("name", ["ln", "scalar"])
def test_each_latent_is_ablated_at_its_true_maximum(lm, ids, snapshot, results, name) -> None:
    _, out = independent(lm, ids, load_sae(snapshot / name).sae)
    acts = torch.zeros(out.latent_acts.shape[0], 128).scatter(1, out.latent_indices,
                                                              out.latent_acts)
    best, row = acts.max(dim=0)
    r = results[name]
    assert r["fired"] == int((best > 0).sum())
    for e in r["per_latent"]:
        j = e["latent"]
        assert e["activation"] == pytest.approx(best[j].item(), rel=1e-5)
        assert (e["context"], e["position"]) == (row[j].item() // (T - 1),
                                                 1 + row[j].item() % (T - 1))


def lower_median_sparsity(delta: torch.Tensor) -> float:
    """The measure written out again: the lower median by sorting, norms in float64."""
    d = delta.double()
    d = d - d.sort(dim=1).values[:, (d.shape[1] - 1) // 2, None]
    return (d.abs().sum() ** 2 / d.pow(2).sum() / d.numel()).item()


@pytest.mark.parametrize("name", ["ln", "scalar"])
def test_delta_matches_a_plain_forward_hook(lm, ids, snapshot, results, name) -> None:
    """Reference: x̂ (the SAE's training forward) at positions 1..T−1 of the whole context;
    ablated: the same less value·W_dec[j] mapped to the raw space by hand (× the row's std +
    eps for layer_norm, ÷ input_scale for scalar) at the latent's position; baseline: less
    ‖that‖ along the recorded channel. Δ over positions p .. min(p + 5, T)−1."""
    sae = load_sae(snapshot / name).sae
    x, out = independent(lm, ids, sae)
    x_hat = out.x_hat.view(N_CONTEXTS, T - 1, D)
    block = lm.model.get_submodule(HOOK)

    def logits(fill: torch.Tensor, c: int) -> torch.Tensor:
        def hook(module, args, output):
            o = _hidden(output).clone()
            o[:, 1:] = fill
            return _replace(output, o)

        handle = block.register_forward_hook(hook)
        with torch.no_grad():
            got = lm.model(input_ids=ids[c:c + 1], use_cache=False).logits[0]
        handle.remove()
        return got

    per = results[name]["per_latent"]
    checked = [per[0], per[-1], max(per, key=lambda e: e["position"])]
    for e in checked:
        j, c, p = e["latent"], e["context"], e["position"]
        xr = x[c * (T - 1) + p - 1]
        if name == "ln":
            scale = (xr - xr.mean()).pow(2).sum().div(D - 1).sqrt()  # back: std, no eps
        else:
            scale = 1 / sae.input_scale
        contrib = e["activation"] * sae.W_dec[j] * scale
        assert e["norm"] == pytest.approx(contrib.norm().item(), rel=1e-4)
        ablated, base = x_hat[c].clone(), x_hat[c].clone()
        ablated[p - 1] -= contrib
        base[p - 1, e["channel"]] -= contrib.norm()
        ref = logits(x_hat[c], c)
        window = slice(p, min(p + POSITIONS, T))
        assert window.stop - window.start == min(POSITIONS, T - p)
        d_abl = logits(ablated, c)[window] - ref[window]
        d_base = logits(base, c)[window] - ref[window]
        assert d_abl.abs().max() > 1e-2  # a real effect, far above rounding
        assert e["sparsity"] == pytest.approx(lower_median_sparsity(d_abl), rel=1e-3)
        assert e["baseline"] == pytest.approx(lower_median_sparsity(d_base), rel=1e-3)
        assert e["sparsity"] != pytest.approx(e["baseline"], rel=1e-3)


def test_a_fixed_seed_gives_the_same_result_and_batching_changes_nothing(
    lm, ids, snapshot, results
) -> None:
    again = run(lm, ids, snapshot, "ln")
    assert again == results["ln"]
    one_by_one = run(lm, ids, snapshot, "ln", batch_size=1)  # 3 rows a forward
    for a, b in zip(one_by_one["per_latent"], results["ln"]["per_latent"], strict=True):
        assert {k: a[k] for k in ("latent", "context", "position", "channel")} == \
            {k: b[k] for k in ("latent", "context", "position", "channel")}
        assert a["sparsity"] == pytest.approx(b["sparsity"], rel=1e-4)
        assert a["baseline"] == pytest.approx(b["baseline"], rel=1e-4)
    other = run(lm, ids, snapshot, "ln", seed=1)
    assert [e["latent"] for e in other["per_latent"]] != \
        [e["latent"] for e in results["ln"]["per_latent"]]


def test_a_latent_that_contributes_nothing_is_undefined_not_a_crash(lm, ids, snapshot) -> None:
    r = run(lm, ids, snapshot, "halfdead", latents=1000, positions=16)
    per = r["per_latent"]
    assert r["latents"] == r["fired"] == len(per) > 0
    dead = [e for e in per if e["latent"] % 2 == 0]
    live = [e for e in per if e["latent"] % 2 == 1]
    assert dead and live
    assert all(e["norm"] == 0 and math.isnan(e["sparsity"]) and math.isnan(e["baseline"])
               for e in dead)
    assert all(0 < e["sparsity"] <= 1 and 0 < e["baseline"] <= 1 for e in live)
    assert r["undefined"] == r["baseline"]["undefined"] == len(dead)
    assert r["mean"] == pytest.approx(sum(e["sparsity"] for e in live) / len(live))


def test_an_sae_that_never_fires_gives_no_latents_and_nan(lm, ids, snapshot) -> None:
    calls = []
    head = lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    seen = []
    try:
        r = run(lm, ids, snapshot, "zero", progress=lambda d, n: seen.append((d, n)))
    finally:
        head.remove()
    assert calls == []  # the truncated pass only
    assert (r["latents"], r["fired"], r["per_latent"], r["undefined"]) == (0, 0, [], 0)
    assert math.isnan(r["mean"]) and math.isnan(r["baseline"]["mean"])
    assert all(math.isnan(v) for v in r["quantiles"].values())
    assert seen[-1] == (2, 2)  # 6 contexts in batches of 5


def test_progress_ends_at_the_planned_count(lm, ids, snapshot) -> None:
    seen = []
    run(lm, ids, snapshot, "ln", progress=lambda d, n: seen.append((d, n)))
    # One call per forward, and one more (done unchanged) when the plan becomes exact: 2
    # truncated forwards, then the ablation forwards.
    done = [d for d, _ in seen]
    assert done == [1, 2, *range(2, len(seen))]
    assert seen[-1][0] == seen[-1][1] == len(seen) - 1


def test_an_sae_of_another_width_is_an_eval_error(lm, ids, tmp_path) -> None:
    t = Trainer(SAEConfig(d_in=32, n_latents=64, k=4), TrainerConfig(), name="narrow",
                hook=HOOK, model="tiny")
    path = save_snapshot(tmp_path, 1, {"narrow": t})
    with pytest.raises(EvalError, match=r"d_in 32, but hook model\.layers\.2 gives 64"):
        ablation_sparsity(lm.model, ids, load_sae(path / "narrow"), HOOK)
