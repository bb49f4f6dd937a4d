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
