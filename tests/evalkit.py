"""Inputs shared by the evaluation tests: the tiny model with a sharpened LM head and
held-out synthetic contexts."""

from __future__ import annotations

import torch

from saestream.producer.corpus import open_corpus
from saestream.producer.models import LoadedModel, load_model


def sharpened_tiny() -> LoadedModel:
    """The tiny model with its LM head scaled ×40, so the loss depends strongly on the
    residual stream (a random model's near-uniform predictions barely do) and splicing or
    ablating moves the logits by far more than rounding does."""
    loaded = load_model("tiny", device="cpu")
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(40.0)
    return loaded


def synthetic_ids(lm: LoadedModel, contexts: int, seq_len: int) -> torch.Tensor:
    """The first `contexts` contexts [contexts, seq_len] of `synthetic:200`'s eval split."""
    corpus = open_corpus("synthetic:200", seq_len=seq_len, vocab_size=lm.vocab_size,
                         encode=None, separator=0, split="eval")
    rows = [torch.from_numpy(c) for _, c in zip(range(contexts), corpus.contexts(),
                                                 strict=False)]
    return torch.stack(rows)
