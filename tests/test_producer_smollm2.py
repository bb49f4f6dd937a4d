"""The embedded model: the cached float copy is the GGUF model, and its first position is an
outlier (why the producer drops it by default)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saestream.producer.hooks import HookedModel
from saestream.producer.models import load_model

pytestmark = pytest.mark.slow  # dequantising the GGUF takes ~15-25 s on 2 cores


@pytest.fixture(scope="module")
def cached_and_gguf(smollm2_gguf: tuple, smollm2_cache: Path):
    lm = load_model("smollm2-135m", device="cpu", cache_dir=smollm2_cache)
    return (lm, *smollm2_gguf)


def test_cached_copy_reproduces_the_gguf_model(cached_and_gguf) -> None:
    lm, gguf_model, gguf_tokenizer = cached_and_gguf
    text = "The quick brown fox jumps over the lazy dog. Anarchism is a political philosophy."
    ids = lm.encode_text(text)
    assert ids == gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (lm.n_layers, lm.d_model, lm.default_hook()) == (30, 576, "model.layers.20")
    x = torch.tensor([ids])
    with torch.no_grad():
        want = gguf_model(input_ids=x, use_cache=False).logits
        got = lm.model(input_ids=x, use_cache=False).logits
    assert torch.equal(got, want)
    assert (Path(lm.model.name_or_path) / "model.safetensors").is_file()


def test_first_position_is_an_outlier_at_the_default_hook(cached_and_gguf) -> None:
    lm = cached_and_gguf[0]
    hooked = HookedModel(lm.model, [lm.default_hook()])
    ids = lm.encode_text("Wikipedia is a free online encyclopedia written by volunteers " * 8)
    norms = hooked(torch.tensor([ids[:64]]))[lm.default_hook()][0].norm(dim=-1)
    hooked.remove()
    assert norms[0] > 10 * norms[1:].median()


# -- long documents are tokenised in pieces ------------------------------------------------------


def _hostile_whitespace(n: int) -> str:
    import random

    rng = random.Random(0)
    return "".join(rng.choice(["\n\n\n  word", "\t\tx", "\r\nLine", " \n ", "é日本\n語", "  ",
                               "\n", "'s", " 12345", "!!\n?", " a b", "x\ny"]) for _ in range(n))


def test_pieces_of_a_long_text_tokenise_as_the_whole_text(cached_and_gguf) -> None:
    """SmolLM2's tokenizer (byte-level BPE, GPT-2's word splitting): the ids of the pieces,
    cut where `text_pieces` cuts, are the ids of the whole text."""
    from saestream.producer.corpus import text_pieces, wiki_documents, wiki_sample_path

    lm = cached_and_gguf[0]
    wiki = "\n".join(wiki_documents(wiki_sample_path()))[:200_000]
    for text in (wiki, _hostile_whitespace(4000) + wiki[:30_000]):
        whole = lm.encode_text(text)
        for size in (333, 1000, 5000):
            pieces = list(text_pieces(text, size))
            assert "".join(pieces) == text and len(pieces) > 1
            assert all(size <= len(p) <= 2 * size for p in pieces[:-1])
            assert len(pieces[-1]) <= 2 * size
            assert [i for p in pieces for i in lm.encode_text(p)] == whole, size


def test_a_long_document_costs_the_tokenizer_a_piece_of_memory(smollm2_cache: Path,
                                                                  tmp_path: Path) -> None:
    """One 12 MB .txt file, in a fresh process: tokenised whole, SmolLM2's tokenizer grew the
    process by 1,635 MiB at its peak (5.8 GiB for 45 MB: a 1 GB file could not be read); in
    pieces of 1 MiB, by 178 MiB (both measured here). Every context of the file comes out."""
    import subprocess
    import sys

    text = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n") * 13_000
    (tmp_path / "big.txt").write_text(text)
    script = f"""
from saestream.producer.corpus import open_corpus
from saestream.producer.models import load_model
def status(key):
    return int(next(x for x in open("/proc/self/status") if x.startswith(key)).split()[1])
lm = load_model("smollm2-135m", device="cpu", cache_dir={str(smollm2_cache)!r})
lm.encode_text("warm the tokenizer up")
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (loading the model) forgotten
base = status("VmRSS")
corpus = open_corpus("text:{tmp_path / 'big.txt'}", seq_len=128, vocab_size=lm.vocab_size,
                     encode=lm.encode_text, separator=lm.separator_id)
n = sum(1 for _ in corpus.contexts())
print(n, (status("VmHWM") - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    contexts, grew_mib = int(out[0]), int(out[1])
    # 202 ids a line but the last (its ' \n' ends the text: one id), then the separator
    assert contexts == 13_000 * 202 // 128
    assert grew_mib < 600, f"the process grew {grew_mib} MiB"
