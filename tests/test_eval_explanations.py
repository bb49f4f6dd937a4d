"""The explanations group (Gao et al. 2024, §4.4): patterns built from top-activating contexts,
scored by precision and recall. Checked on planted latents whose firing rule is known, so
every explanation and every count has an independent answer: on the tiny model's embeddings
and layer 0, and on a toy "model" whose hooked output is the one-hot of the last three
tokens (unigram, bigram and skip-gram latents)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saestream.consumer.checkpoint import LoadedSAE
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.evaluator.explanations import (
    TopOccurrences,
    covers,
    explanations,
    pattern_matches,
    prune,
    render,
)
from saestream.producer.hooks import HookedModel
from saestream.producer.models import load_model

E = ord("e")
ALPHABET = torch.tensor([ord(c) for c in "abcdefghij"])


def hand_sae(rows: list[torch.Tensor], biases: list[float], d: int, n_latents: int = 8,
             k: int = 2) -> LoadedSAE:
    """Latent j reads rows[j] with bias biases[j]; the others have no weights and bias −1,
    so they never fire."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n_latents, k=k,
                                      input_normalization="none"))
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.bias.fill_(-1.0)
        sae.b_dec.zero_()
        for j, (row, bias) in enumerate(zip(rows, biases, strict=True)):
            sae.encoder.weight[j] = row
            sae.encoder.bias[j] = bias
    return LoadedSAE("hand", Path("."), sae.eval(), {})


def only(result: dict, latent: int) -> dict:
    return next(e for e in result["per_latent"] if e["latent"] == latent)


# -- pure functions ---------------------------------------------------------------------------


def test_a_pattern_with_a_wildcard_matches_exactly_where_it_ends() -> None:
    ids = torch.tensor([[5, 0, 7, 5, 5, 7, 7], [7, 5, 7, 0, 5, 1, 7]])
    want = torch.tensor([[0, 0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(pattern_matches(ids, (5, None, 7)), want)
    assert torch.equal(pattern_matches(ids, (7,)), ids == 7)
    assert not pattern_matches(ids, (5,) * 8).any()  # longer than the context


def test_prune_drops_leading_wildcards_and_covered_patterns() -> None:
    assert covers((1, None, 3), (1, 2, 3)) and covers((3,), (1, None, 3))
    assert not covers((1, 2, 3), (1, None, 3)) and not covers((1, 3), (3,))
    got = prune([(None, 3), (3,), (1, 3), (1, None, 3), (2, 4), (None, None, 2, 4), (9, 2, 4)])
    assert got == [(3,), (2, 4)]
    assert render((104, None, 105), chr) == "'h' * 'i'"


def test_top_occurrences_keep_the_highest_per_latent_across_batches() -> None:
    top = TopOccurrences(n_latents=3, top=2)
    # contexts of T = 3, k = 1: position 0 never counts, a value 0 is not firing
    top.add(torch.tensor([[[9.0], [1.0], [2.0]]]), torch.tensor([[[0], [0], [1]]]), first=0)
    top.add(torch.tensor([[[5.0], [3.0], [1.0]], [[0.0], [0.0], [3.0]]]),
            torch.tensor([[[0], [0], [0]], [[1], [1], [0]]]), first=3)
    assert top.value.tolist() == [[3.0, 3.0], [2.0, 0.0], [0.0, 0.0]]
    assert top.where.tolist() == [[4, 8], [2, -1], [-1, -1]]  # the tie keeps 4 before 8


# -- a toy model: the hooked output is one-hot(x_p), one-hot(x_{p−1}), one-hot(x_{p−2}) -------

V = 16
PREFIX = 15  # never in the data
TRAIN_ONLY = 12  # appears only in the train contexts


class OneHots(nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, T] -> [b, T, 3V]; before the context start the one-hots are 0."""
        oh = F.one_hot(ids, V).float()
        return torch.cat([oh, F.pad(oh, (0, 0, 1, 0))[:, :-1], F.pad(oh, (0, 0, 2, 0))[:, :-2]],
                         dim=-1)


class ToyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = OneHots()
        self.unused = nn.Parameter(torch.zeros(1))  # where the device is read from

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.features(input_ids)


def slot(token: int, back: int = 0) -> torch.Tensor:
    """The encoder row reading "token at position p − back"."""
    row = torch.zeros(3 * V)
    row[back * V + token] = 1.0
    return row


# latent: (encoder row, bias); activations are 0.5 where the rule holds
UNIGRAM, BIGRAM, SKIPGRAM, DEAD, TRAIN_ONLY_LATENT, STRONG_WEAK, NOT_AFTER = range(7)
TOY_LATENTS = [
    (slot(3), -0.5),                               # token 3
    (slot(5) + slot(4, 1), -1.5),                  # 4 then 5
    (slot(7) + slot(6, 2), -1.5),                  # 6, anything, 7
    (torch.zeros(3 * V), -1.0),                    # never
    (slot(TRAIN_ONLY), -0.5),                      # a token the eval split lacks
    (slot(8) + 0.3 * slot(9), -0.2),               # 8 (0.8), and 9 more weakly (0.1)
    (slot(2) - slot(1, 1), -0.5),                  # 2, unless after 1
]


@pytest.fixture(scope="module")
def toy_ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 10, (24, 32), generator=g)
    train[::3, 5] = TRAIN_ONLY
    return train, torch.randint(0, 10, (24, 32), generator=g)


@pytest.fixture(scope="module")
def toy_result(toy_ids) -> dict:
    train, ev = toy_ids
    sae = hand_sae([r for r, _ in TOY_LATENTS], [b for _, b in TOY_LATENTS], 3 * V)
    return explanations(ToyLM(), train, ev, sae, "features", top=4, batch_size=5,
                        prefix_id=PREFIX)


def test_unigram_bigram_and_skipgram_latents_are_explained_exactly(toy_ids, toy_result) -> None:
    def rules(ids: torch.Tensor) -> dict[int, tuple[list, torch.Tensor]]:
        """Per latent: its explanation and where it fires, positions 1..T−1."""
        cur, prev, prev2 = ids[:, 1:], ids[:, :-1], F.pad(ids, (2, 0), value=-1)[:, 1:-2]
        return {UNIGRAM: ([[3]], cur == 3),
                BIGRAM: ([[4, 5]], (prev == 4) & (cur == 5)),
                SKIPGRAM: ([[6, None, 7]], (prev2 == 6) & (cur == 7))}

    train, ev = toy_ids
    on_train = rules(train)
    for latent, (patterns, fires) in rules(ev).items():
        e = only(toy_result, latent)
        n = int(fires.sum())
        assert n > 0  # the rule happens on the eval split: the test is not vacuous
        assert e["patterns"] == patterns
        assert (e["fires"], e["predicted"], e["true_positives"]) == (n, n, n)
        assert (e["precision"], e["recall"], e["f1"]) == (1.0, 1.0, 1.0)
        occurrences = min(4, int(on_train[latent][1].sum()))  # top = 4
        assert e["occurrences"] == e["explained_occurrences"] == occurrences > 0


def test_an_imperfect_explanation_has_the_independently_counted_precision_and_recall(
    toy_ids, toy_result
) -> None:
    _, ev = toy_ids
    cur, prev = ev[:, 1:], ev[:, :-1]
    # fires on 8 and 9, but the top 4 contexts are all 8s: the explanation misses the 9s
    e = only(toy_result, STRONG_WEAK)
    n8, n9 = int((cur == 8).sum()), int((cur == 9).sum())
    assert e["patterns"] == [[8]]
    assert (e["fires"], e["predicted"], e["true_positives"]) == (n8 + n9, n8, n8)
    assert e["precision"] == 1.0 and e["recall"] == pytest.approx(n8 / (n8 + n9))
    assert 0 < e["recall"] < 1
    # fires on 2 except after 1, but 2 alone (after the prefix) fires: the explanation is 2
    e = only(toy_result, NOT_AFTER)
    n2, tp = int((cur == 2).sum()), int(((cur == 2) & (prev != 1)).sum())
    assert e["patterns"] == [[2]]
    assert (e["fires"], e["predicted"], e["true_positives"]) == (tp, n2, tp)
    assert e["precision"] == pytest.approx(tp / n2) and 0 < e["precision"] < 1
    assert e["recall"] == 1.0
    assert e["f1"] == pytest.approx(2 * tp / (tp + n2))


def test_latents_that_never_fire_are_left_out_or_nan(toy_ids, toy_result) -> None:
    r = toy_result
    assert r["alive_latents"] == 6 and r["latents"] == 6
    assert DEAD not in [e["latent"] for e in r["per_latent"]]
    e = only(r, TRAIN_ONLY_LATENT)  # explained on train, never fires nor predicted on eval
    assert e["patterns"] == [[TRAIN_ONLY]] and e["fires"] == e["predicted"] == 0
    assert all(math.isnan(e[f]) for f in ("precision", "recall", "f1"))
    # means over the latents where defined; the F1 fraction over the five with an F1
    defined = [x for x in r["per_latent"] if x["latent"] != TRAIN_ONLY_LATENT]
    assert r["precision_mean"] == pytest.approx(sum(x["precision"] for x in defined) / 5)
    assert r["recall_mean"] == pytest.approx(sum(x["recall"] for x in defined) / 5)
    assert r["f1_ge_0_5_fraction"] == pytest.approx(
        sum(x["f1"] >= 0.5 for x in defined) / 5)

    train, ev = toy_ids
    dead = hand_sae([], [], 3 * V)
    out = explanations(ToyLM(), train, ev, dead, "features", prefix_id=PREFIX)
    assert (out["latents"], out["alive_latents"], out["per_latent"]) == (0, 0, [])
    assert math.isnan(out["precision_mean"]) and math.isnan(out["f1_ge_0_5_fraction"])


def test_the_latent_sample_is_seeded_and_progress_reaches_the_plan(toy_ids) -> None:
    train, ev = toy_ids
    sae = hand_sae([r for r, _ in TOY_LATENTS], [b for _, b in TOY_LATENTS], 3 * V)
    def run(seed: int) -> list[int]:
        calls.clear()
        r = explanations(ToyLM(), train, ev, sae, "features", latents=3, top=2, seed=seed,
                         prefix_id=PREFIX, progress=lambda d, p: calls.append((d, p)))
        return [e["latent"] for e in r["per_latent"]]

    calls: list[tuple[int, int]] = []
    picked = run(1)
    assert len(picked) == 3 and picked == sorted(set(picked)) and DEAD not in picked
    assert run(1) == picked
    done, planned = calls[-1]
    assert done == planned and [d for d, _ in calls] == sorted(d for d, _ in calls)


# -- the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def letters() -> tuple[torch.Tensor, torch.Tensor]:
    """Train and eval contexts of the bytes a..j, so every letter recurs."""
    g = torch.Generator().manual_seed(0)
    return (ALPHABET[torch.randint(0, 10, (24, 32), generator=g)],
            ALPHABET[torch.randint(0, 10, (12, 32), generator=g)])


def test_a_latent_planted_on_one_token_gets_precision_and_recall_1(tiny, letters) -> None:
    """Latent 0 reads the embedding of 'e' with a bias of half its squared norm: at the
    embedding hook it fires on 'e' and nowhere else."""
    train, ev = letters
    emb = tiny.model.model.embed_tokens.weight.detach()
    sq = float(emb[E] @ emb[E])
    sae = hand_sae([emb[E] / sq], [-0.5], tiny.d_model)
    hooked = HookedModel(tiny.model, ["model.embed_tokens"])
    try:
        x = hooked(ev)["model.embed_tokens"][:, 1:].reshape(-1, tiny.d_model)
    finally:
        hooked.remove()
    values, indices = sae.sae.encode(x)
    fires = ((indices == 0) & (values > 0)).any(dim=1)
    assert torch.equal(fires, ev[:, 1:].reshape(-1) == E)  # independently: exactly the 'e's
    assert not ((indices != 0) & (values > 0)).any()

    r = explanations(tiny.model, train, ev, sae, "model.embed_tokens",
                     prefix_id=tiny.separator_id, decode=lambda i: chr(i))
    assert r["latents"] == r["alive_latents"] == 1
    e = only(r, 0)
    assert e["patterns"] == [[E]] and e["explanation"] == ["'e'"]
    n = int(fires.sum())
    assert n > 0 and (e["fires"], e["predicted"], e["true_positives"]) == (n, n, n)
    assert (e["precision"], e["recall"], e["f1"]) == (1.0, 1.0, 1.0)
    assert (r["precision_mean"], r["recall_mean"], r["f1_ge_0_5_fraction"]) == (1.0, 1.0, 1.0)


def test_a_context_dependent_latent_is_scored_by_an_independent_count(tiny, letters) -> None:
    """At layer 0 the projection on the embedding of 'd' varies with the context; with the
    median as threshold the latent fires on about half the 'd's. Whatever patterns the
    explanation finds, their matches (by a plain loop) and the firing (by a plain forward)
    give its precision and recall."""
    train, ev = letters
    d = ord("d")
    emb = tiny.model.model.embed_tokens.weight.detach()
    u = emb[d] / emb[d].norm()
    with torch.no_grad():
        states = tiny.model(input_ids=train, output_hidden_states=True).hidden_states[1]
    threshold = float((states[:, 1:][train[:, 1:] == d] @ u).median())
    sae = hand_sae([u], [-threshold], tiny.d_model, k=1)

    r = explanations(tiny.model, train, ev, sae, "model.layers.0", top=8,
                     prefix_id=tiny.separator_id)
    e = only(r, 0)
    with torch.no_grad():
        x = tiny.model(input_ids=ev, output_hidden_states=True).hidden_states[1]
    fires = (x @ u - threshold > 0)[:, 1:]
    rows = ev.tolist()
    predicted = torch.tensor([[any(
        len(p) <= t + 1 and all(tok is None or tok == row[t - len(p) + 1 + i]
                                for i, tok in enumerate(p))
        for p in e["patterns"]) for t in range(1, ev.shape[1])] for row in rows])
    tp = int((fires & predicted).sum())
    assert (e["fires"], e["predicted"], e["true_positives"]) == (
        int(fires.sum()), int(predicted.sum()), tp)
    assert e["precision"] == pytest.approx(tp / int(predicted.sum()))
    assert e["recall"] == pytest.approx(tp / int(fires.sum()))
    assert 0 < e["precision"] < 1 and 0 < e["recall"] < 1  # neither trivially 0 nor 1
    assert any(len(p) > 1 for p in e["patterns"])  # n-grams, not only the token itself
