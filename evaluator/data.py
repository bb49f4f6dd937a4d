"""The token ids an evaluation scores: the first contexts of a corpus's split, in order.

The same corpora and the same deterministic train/eval split as the producer
(`producer/corpus.py`), so `--split eval` (the default) scores text no SAE was trained on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from saestream.producer.corpus import CorpusError, open_corpus
from saestream.producer.hooks import HookError, validate_hooks
from saestream.producer.models import LoadedModel, ModelError, load_model


def load_eval_model(
    name: str, device: str, hooks: list[str], *, seq_len: int, hook_given: bool
) -> LoadedModel:
    """Load model `name` and check that it has every hook (none: no check yet) and takes
    `seq_len` positions.

    Raises ModelError or HookError with a one-line message (the hook error lists the model's
    blocks, and suggests --hook when the hooks came from the SAEs' cfg.json).
    """
    lm = load_model(name, device=device)
    try:
        if hooks:
            validate_hooks(lm.model, hooks)
    except HookError as exc:
        last = f"{lm.block_prefix}.{lm.n_layers - 1}"
        hint = "" if hook_given else " (pass --hook)"
        raise HookError(f"{exc}{hint}; its blocks are {lm.block_prefix}.0 .. {last}") from None
    if lm.max_positions is not None and seq_len > lm.max_positions:
        raise ModelError(f"--seq-len {seq_len}: model {name} takes at most "
                         f"{lm.max_positions} positions")
    return lm


def contexts_wanted(seq_len: int, contexts: int | None, tokens: int | None) -> int:
    """`--contexts N`, or enough contexts for `--tokens N` evaluated positions (each context of
    T tokens contributes T − 1: position 0 is never spliced)."""
    if contexts is not None:
        return contexts
    assert tokens is not None
    return math.ceil(tokens / (seq_len - 1))


def eval_ids(
    lm: LoadedModel, corpus: str, *, split: str, seq_len: int, contexts: int | None,
    tokens: int | None,
) -> torch.Tensor:
    """The evaluated contexts as int64 ids [n_contexts, T] (on the CPU).

    T is `seq_len`, except for 2-D `.npy` corpora whose rows bring their own length. Contexts
    holding an id outside the model's vocabulary are skipped, as the producer skips them.
    Fewer contexts than asked is fine (the JSON records how many); none is a CorpusError.
    """
    corp = open_corpus(
        corpus, seq_len=seq_len, vocab_size=lm.vocab_size,
        encode=lm.encode_text if lm.tokenizer is not None else None,
        separator=lm.separator_id, split=split,
    )
    if corp.seq_len < 2:
        raise CorpusError(f"corpus {corpus}: contexts of {corp.seq_len} token(s); need 2")
    if lm.max_positions is not None and corp.seq_len > lm.max_positions:  # a 2-D .npy's own
        raise CorpusError(f"corpus {corpus}: contexts of {corp.seq_len} tokens, but model "
                          f"{lm.name} takes at most {lm.max_positions} positions")
    n = contexts_wanted(corp.seq_len, contexts, tokens)
    rows: list[np.ndarray] = []
    for ctx in corp.contexts():
        if len(rows) == n:
            break
        if int(ctx.min()) < 0 or int(ctx.max()) >= lm.vocab_size:
            continue
        rows.append(ctx)
    if not rows:
        raise CorpusError(f"corpus {corpus}: no context of {corp.seq_len} tokens in the "
                          f"{split} split")
    return torch.from_numpy(np.stack(rows).astype(np.int64))
