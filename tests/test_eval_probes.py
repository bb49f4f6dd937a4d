"""`saestream eval`'s probes group (probe loss, Gao et al. 2024 §4.3): the task labels on
hand-written token sequences, the batched 1-D logistic fitter against closed forms and an
independent optimiser, the fit/held-out selection rule, and a latent planted to fire exactly on
a task, found with a probe loss near 0."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from saestream.consumer.checkpoint import LoadedSAE
from saestream.consumer.sae import SAEConfig, SparseAutoencoder
from saestream.evaluator import probes as probes_module
from saestream.evaluator.probes import (
    TASKS,
    Features,
    ProbeError,
    ProbeSums,
    constant_loss,
    fit_probes,
    labels,
    probe_loss,
    probe_losses,
    token_texts,
)
from saestream.evaluator.reconstruction import reconstruct
from saestream.producer.models import ByteTokenizer, load_model


def marked(tokens: list[str], task: str) -> list[int]:
    return [int(i) for i in np.flatnonzero(labels(tokens)[task])]


# -- task labels ---------------------------------------------------------------------------------


def test_there_are_at_least_eight_tasks_each_a_bool_per_token() -> None:
    assert len(TASKS) >= 8
    out = labels(["Hello", " (", "world", ")", ""])
    assert list(out) == list(TASKS)
    assert all(v.dtype == bool and v.shape == (5,) for v in out.values())


def test_digit_capitalized_punctuation_newline_whitespace() -> None:
    assert marked(["7", " 42", "4a", " ", "", "٣", "x"], "digit") == [0, 1]
    assert marked(["The", " cat", " Paris", "'s", " É", "1", ""], "capitalized") == [0, 2, 4]
    assert marked([".", " ,", "?!", " $", "a.", "(", " ", "—", "+"], "punctuation") == \
        [0, 1, 2, 5, 7]
    assert marked(["a", "\n", " b\n", "c"], "newline") == [1, 2]
    assert marked(["a", " ", "\n\n", " b", ""], "whitespace") == [1, 2]


def test_parentheses_nest_and_exclude_their_own_delimiters() -> None:
    tokens = ["a", " (", "b", " (", "c", ")", " d", ")", " e"]
    # The inner pair lies inside the outer one; the outer pair itself does not.
    assert marked(tokens, "in_parentheses") == [2, 3, 4, 5, 6]
    assert marked([")", "x", "(", "y", " z"], "in_parentheses") == [3, 4]  # ")" unmatched
    assert marked(["(", "x", "", "y"], "in_parentheses") == [1]  # a boundary closes


def test_quotes_straight_curly_and_closed_by_a_newline() -> None:
    assert marked(["He", " said", ' "', "hi", " there", '"', " ok"], "in_quotes") == [3, 4]
    assert marked(["“", "a", "”", "b", '"', "c"], "in_quotes") == [1, 5]
    assert marked(['"', "a", "\n", "b"], "in_quotes") == [1]
    assert marked(['"', "Yes", '."', " no"], "in_quotes") == [1, 2]  # its "." is inside


def test_years_are_runs_of_exactly_four_digits_from_1000_to_2099() -> None:
    tokens = ["In", " 19", "99", ",", " 20", "25", " and", " 123", "45", " 2100", " 999",
              " 1850s", " 0999"]
    assert marked(tokens, "year") == [1, 2, 4, 5, 11]
    assert marked(["19", "", "99"], "year") == []  # a boundary splits the run
    assert marked(list("in 1999."), "year") == [3, 4, 5, 6]


def test_sentence_starts_follow_an_end_mark_and_whitespace_or_a_boundary() -> None:
    tokens = ["Hi", ".", " The", " cat", " sat", '!"', " (", "Then", " 3", ".", "14", " is",
              "?", "", "new", "\n", "\n", "Yes"]
    # Not the context's start (mid-document), not "14" after "3.", not after a bare newline.
    assert marked(tokens, "sentence_start") == [2, 7, 14]


def test_word_starts_follow_whitespace_or_a_boundary() -> None:
    tokens = ["Hi", " there", ",", "friend", " (", "x", ")", " ", "y", "'s", "", "z", "\n",
              "w", " 42"]
    assert marked(tokens, "word_start") == [1, 8, 11, 13, 14]


# -- token texts -------------------------------------------------------------------------------


def test_byte_tokenizer_texts_and_labels_of_encoded_text() -> None:
    texts = token_texts(ByteTokenizer(), 512)
    assert len(texts) == 512 and texts[65] == "A" and texts[10] == "\n"
    assert texts[200] == "\ufffd" and texts[256] == "" and texts[511] == ""
    ids = ByteTokenizer().encode('He (was) "born" in 1999.')
    lab = labels([texts[i] for i in ids])
    assert [i for i in range(len(ids)) if lab["year"][i]] == [19, 20, 21, 22]
    assert [i for i in range(len(ids)) if lab["in_parentheses"][i]] == [4, 5, 6]
    assert [i for i in range(len(ids)) if lab["in_quotes"][i]] == [10, 11, 12, 13]


def test_no_tokenizer_is_a_probe_error() -> None:
    with pytest.raises(ProbeError, match="needs the model's tokenizer") as err:
        token_texts(None, 10)
    assert "\n" not in str(err.value)


def _hf_tokenizer(metaspace: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["Hello world (in 1999), he said.\nThe end. Hello again world"] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if metaspace:  # SentencePiece style: "▁" marks a leading space
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                      show_progress=False)
    else:  # byte-level BPE (GPT-2, SmolLM2): "Ġ" a space, "Ċ" a newline
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("metaspace", [False, True])
def test_hugging_face_token_texts_keep_spaces_and_drop_special_tokens(metaspace) -> None:
    hf = _hf_tokenizer(metaspace)
    texts = token_texts(hf, len(hf) + 5)
    assert len(texts) == len(hf) + 5 and texts[-1] == ""
    assert texts[hf.eos_token_id] == "" and texts[hf.unk_token_id] == ""
    ids = hf("Hello world\nThe end", add_special_tokens=False)["input_ids"]
    joined = "".join(texts[i] for i in ids)
    assert joined == (" Hello" if metaspace else "Hello") + " world\nThe end"
    assert " world" in [texts[i] for i in ids]


# -- the 1-D logistic fitter -----------------------------------------------------------------------


def _conditional_entropy(z: torch.Tensor, y: torch.Tensor) -> float:
    """H(y | z) in nats for a binary z: the best any probe on z can do on these tokens."""
    h = 0.0
    for v in (0.0, 1.0):
        sel = y[z == v].double()
        q = float(sel.mean())
        h -= sel.numel() / y.numel() * (q * math.log(q) + (1 - q) * math.log(1 - q))
    return h


def _binary_data(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(n, generator=g) < 0.3).float()
    y = torch.rand(n, generator=g) < torch.where(z > 0, 0.8, 0.1)
    return z, y


def test_a_binary_feature_reaches_the_conditional_entropy() -> None:
    z, y = _binary_data()
    f = Features(len(y), 2, dense=torch.stack([z, torch.full_like(z, 3.0)], dim=1))
    probes = fit_probes(f, y, l2=0.0)
    assert probes.fit_loss[0].item() == pytest.approx(_conditional_entropy(z, y), abs=1e-9)
    # A constant feature is the constant predictor: the entropy of y, weight 0.
    q = float(y.double().mean())
    assert probes.fit_loss[1].item() == pytest.approx(-q * math.log(q) - (1 - q) * math.log(1 - q),
                                                      abs=1e-12)
    assert probes.weight[1].item() == 0.0
    # The default L2 penalty barely moves a feature that does not separate.
    assert fit_probes(f, y).fit_loss[0].item() == pytest.approx(
        _conditional_entropy(z, y), abs=1e-4)


def test_a_continuous_feature_matches_an_independent_optimiser() -> None:
    g = torch.Generator().manual_seed(1)
    n, l2 = 3000, 1e-2
    x = torch.randn(n, generator=g) * 5 + 2
    y = torch.rand(n, generator=g) < torch.sigmoid(1.5 * (x - 3) / 5)
    probes = fit_probes(Features(n, 1, dense=x[:, None]), y, l2=l2)
    # Reference: LBFGS on the same penalised objective, the feature standardised by hand.
    xd = x.double()
    zs = (xd - xd.mean()) / xd.std(unbiased=False)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def objective(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            w[0] * zs + w[1], y.double()) + l2 / 2 * w[0] ** 2

    def closure():
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = w.detach()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(a * zs + b, y.double())
    assert probes.weight[0].item() == pytest.approx(a.item(), rel=1e-6)
    assert probes.bias[0].item() == pytest.approx(b.item(), rel=1e-6, abs=1e-9)
    assert probes.fit_loss[0].item() == pytest.approx(ce.item(), rel=1e-7)
    # And autograd's gradient of the objective vanishes at the fitted probe.
    ours = torch.tensor([probes.weight[0].item(), probes.bias[0].item()], dtype=torch.float64,
                        requires_grad=True)
    objective(ours).backward()
    assert ours.grad.abs().max().item() < 1e-10


def test_sparse_latents_give_the_dense_answer(monkeypatch) -> None:
    """The implicit zeros of a top-k code (closed form) against the same values, dense."""
    g = torch.Generator().manual_seed(2)
    n, n_latents, k = 600, 12, 3
    values = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.8)
    indices = torch.stack([torch.randperm(n_latents, generator=g)[:k] for _ in range(n)])
    dense = torch.zeros(n, n_latents).scatter(1, indices, values)
    y = torch.rand(n, generator=g) < 0.2 + 0.6 * (dense[:, 4] > 0)
    sparse_f, dense_f = Features.from_topk(values, indices, n_latents), Features(
        n, n_latents, dense=dense)
    ps, pd = fit_probes(sparse_f, y), fit_probes(dense_f, y)
    for got, want in zip(ps, pd, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    held_s, held_d = sparse_f.tokens(400, n), dense_f.tokens(400, n)
    torch.testing.assert_close(probe_loss(ps, held_s, y[400:]), probe_loss(pd, held_d, y[400:]),
                               rtol=1e-9, atol=1e-12)
    assert int(torch.argmin(ps.fit_loss)) == 4
    # The same in blocks of a few candidates (bounded memory) as in one block.
    monkeypatch.setattr(probes_module, "BLOCK_ENTRIES", 300)
    assert len(list(sparse_f.blocks())) > 3 and len(list(dense_f.blocks())) == n_latents
    for f, want in ((sparse_f, ps), (dense_f, pd)):
        for got, ref in zip(fit_probes(f, y), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_a_separating_feature_converges_to_a_loss_near_zero() -> None:
    _, y = _binary_data(seed=3)
    probes = fit_probes(Features(len(y), 1, dense=y.float()[:, None] * 7 - 2), y)
    assert math.isfinite(probes.weight[0].item())
    assert 0 < probes.fit_loss[0].item() < 0.005


def test_the_constant_loss_is_the_cross_entropy_of_the_fit_prior() -> None:
    fit, held = torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 0, 0])
    assert constant_loss(fit, held) == pytest.approx(-(0.5 * math.log(0.25)
                                                       + 0.5 * math.log(0.75)))


# -- the group: split, selection, fields -------------------------------------------------------


def test_probes_are_chosen_on_the_fit_contexts_and_scored_on_the_last_fifth() -> None:
    """Channel 0 is the label in the fit contexts and its opposite in the held-out ones: it is
    still the chosen channel (by fit loss), and its held-out loss is what is reported."""
    texts = ["a", "7", "b", "c"]  # id 1 is the digit
    g = torch.Generator().manual_seed(4)
    n_ctx, T = 10, 9
    ids = torch.randint(0, 4, (n_ctx, T), generator=g)
    y = (ids[:, 1:] == 1).reshape(-1).float()
    n = y.numel()
    held = torch.arange(n) >= 8 * (T - 1)  # the last 10 // 5 = 2 contexts
    x = torch.stack([torch.where(held, 1 - y, y), y + torch.randn(n, generator=g),
                     torch.randn(n, generator=g)], dim=1)
    values = torch.stack([y * 2 + torch.rand(n, generator=g), torch.rand(n, generator=g)], 1)
    indices = torch.tensor([[3, 0]]).expand(n, 2)
    sums = ProbeSums(texts, n_latents=5)
    sums.add(ids[:6], x[: 6 * (T - 1)], values[: 6 * (T - 1)], indices[: 6 * (T - 1)])
    sums.add(ids[6:], x[6 * (T - 1):], values[6 * (T - 1):], indices[6 * (T - 1):])
    out = sums.result()
    assert (out["tokens_fit"], out["tokens_heldout"]) == (64, 16)
    digit = out["tasks"]["digit"]
    assert digit["baseline_channel"] == 0 and digit["sae_latent"] == 3
    yb = y.bool()
    ref = probe_loss(fit_probes(Features(64, 3, dense=x[:64]), yb[:64]),
                     Features(16, 3, dense=x[64:]), yb[64:])
    assert digit["baseline_loss"] == pytest.approx(ref[0].item(), rel=1e-9)
    assert digit["baseline_loss"] > 2 * digit["constant_loss"] > 0  # the anti-correlated part
    assert digit["sae_loss"] < 0.01
    assert digit["constant_loss"] == pytest.approx(constant_loss(yb[:64], yb[64:]))
    assert digit["positive_fraction"] == pytest.approx(float(y.mean()))
    # Tasks without positives (no capital in this text) are NaN and left out of the means.
    cap = out["tasks"]["capitalized"]
    assert cap["sae_latent"] is None and math.isnan(cap["sae_loss"])
    scored = [t for t in out["tasks"].values() if t["sae_latent"] is not None]
    assert out["tasks_scored"] == len(scored) >= 1
    assert out["sae_loss_mean"] == pytest.approx(np.mean([t["sae_loss"] for t in scored]))
    assert out["baseline_loss_mean"] == pytest.approx(
        np.mean([t["baseline_loss"] for t in scored]))


def test_one_context_or_an_id_without_text_is_a_probe_error() -> None:
    sums = ProbeSums(["a", "b"], n_latents=2)
    x, v, i = torch.zeros(3, 2), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int64)
    sums.add(torch.tensor([[0, 1, 0, 1]]), x, v, i)
    with pytest.raises(ProbeError, match="at least 2 contexts"):
        sums.result()
    with pytest.raises(ProbeError, match="token id 5 has no text"):
        sums.add(torch.tensor([[0, 1, 5, 1]]), x, v, i)


# -- a latent planted to fire exactly on digits --------------------------------------------------

DIGITS = list(range(48, 58))
LATENT = 5


@pytest.fixture(scope="module")
def planted():
    """The tiny model with its digit bytes' embeddings moved along a random direction v (too
    little for any single channel to tell them apart), and an SAE on `model.embed_tokens`
    whose latent 5 reads v with a threshold between the digits and the rest."""
    lm = load_model("tiny", device="cpu")
    emb = lm.model.get_submodule("model.embed_tokens").weight
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    with torch.no_grad():
        emb[DIGITS] += 0.15 * v
    proj = emb[:256] @ v
    is_digit = torch.zeros(256, dtype=torch.bool)
    is_digit[DIGITS] = True
    assert proj[is_digit].min() > proj[~is_digit].max()
    sae = SparseAutoencoder(SAEConfig(d_in=emb.shape[1], n_latents=16, k=4,
                                      input_normalization="none"),
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.encoder.weight.mul_(0.1)
        sae.encoder.weight[LATENT] = 10 * v
        sae.encoder.bias.zero_()
        sae.encoder.bias[LATENT] = -5 * (proj[is_digit].min() + proj[~is_digit].max())
        sae.b_dec.zero_()
    r = reconstruct(sae, emb[:256].detach(), 4)
    fires = ((r.indices == LATENT) & (r.values > 0)).any(dim=1)
    assert torch.equal(fires, is_digit)  # latent 5 is exactly "the token is a digit"
    return lm, LoadedSAE("planted", Path("."), sae.eval(), {})


def _text_ids(lm, n_contexts: int, T: int) -> torch.Tensor:
    rng = random.Random(0)
    words = ["the", "river", "army", "King", "station", "over", "Paris", "green"]
    parts = []
    while sum(len(p) for p in parts) < n_contexts * T:
        w = rng.sample(words, 3)
        parts.append(f"In {rng.randint(1000, 2099)} the {w[0]} ({rng.randint(0, 99)} {w[1]}) "
                     f'said "{w[2]}." ')
    return torch.tensor(lm.encode_text("".join(parts))[: n_contexts * T]).view(n_contexts, T)


def test_a_latent_equal_to_a_task_gets_a_probe_loss_near_zero(planted) -> None:
    lm, loaded = planted
    ids = _text_ids(lm, 12, 64)
    calls = []
    out = probe_losses(lm.model, ids, loaded, "model.embed_tokens",
                       token_texts(lm.tokenizer, lm.vocab_size), batch_size=5,
                       progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert (out["tokens_fit"], out["tokens_heldout"]) == (10 * 63, 2 * 63)
    digit = out["tasks"]["digit"]
    assert digit["sae_latent"] == LATENT
    assert digit["sae_loss"] < 0.01
    assert digit["constant_loss"] > 0.3
    assert digit["baseline_loss"] > 10 * digit["sae_loss"]  # no single channel separates
    assert set(digit) == {"positive_fraction", "sae_loss", "sae_latent", "baseline_loss",
                          "baseline_channel", "constant_loss"}
    assert math.isnan(out["tasks"]["newline"]["sae_loss"])  # the text has no newline
    assert out["tasks_scored"] == len(TASKS) - 1
    for task in out["tasks"].values():
        if task["sae_latent"] is not None:
            assert 0 <= task["sae_loss"] and 0 <= task["baseline_loss"]


def test_an_sae_of_another_width_is_a_probe_error(planted) -> None:
    lm, _ = planted
    narrow = SparseAutoencoder(SAEConfig(d_in=32, n_latents=8, k=2, input_normalization="none"))
    with pytest.raises(ProbeError, match=r"d_in 32, but hook model\.layers\.1 gives 64"):
        probe_losses(lm.model, _text_ids(lm, 2, 16), LoadedSAE("n", Path("."), narrow, {}),
                     "model.layers.1", token_texts(lm.tokenizer, lm.vocab_size))
