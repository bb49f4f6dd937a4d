"""The device-side byte regrouping and the staged copy to the host give the CPU path's wire
bytes, bit for bit. The CUDA cases run wherever a GPU is (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saestream.common.wire import encode_chunk, regroup_bytes, shuffle_bytes
from saestream.producer.sender import Outgoing, Progress
from saestream.producer.staging import to_host

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def frames(acts: torch.Tensor, **kw: object) -> list[bytes]:
    return encode_chunk(acts, producer="p", run="r", seq=7, model="m", hook="h",
                        source={"corpus": "c"}, codec="lz4-shuffle", ts=1.5, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regroup_bytes_is_shuffle_bytes(dtype: torch.dtype) -> None:
    acts = (torch.randn(37, 19, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    acts = acts[:, 1:]  # not contiguous: regrouped as the wire's row-major bytes
    raw = acts.contiguous().view(-1).view(torch.uint8).numpy()
    want = shuffle_bytes(raw, acts.element_size())
    assert np.array_equal(regroup_bytes(acts).numpy(), want)
    assert frames(acts, regrouped=regroup_bytes(acts)) == frames(acts)


def test_regrouped_bytes_of_another_length_are_refused() -> None:
    acts = torch.ones(4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="regrouped"):
        frames(acts, regrouped=torch.zeros(5, dtype=torch.uint8))


def test_cpu_chunks_are_not_staged() -> None:
    item = Outgoing("h", torch.ones(2, 3), {}, Progress(0, 2))
    assert to_host(item, "lz4-shuffle") is item


@cuda
@pytest.mark.parametrize("codec", ["lz4-shuffle", "lz4", "raw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_staging_gives_the_cpu_path_bytes(dtype: torch.dtype, codec: str) -> None:
    acts = (torch.randn(2048, 576, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    staged = to_host(Outgoing("h", acts.cuda(), {}, None), codec)
    assert staged.ready is not None and staged.acts.is_pinned()
    assert (staged.regrouped is not None) == (codec == "lz4-shuffle")
    staged.ready.synchronize()
    kw = dict(producer="p", run="r", seq=0, model="m", hook="h", source={}, codec=codec, ts=1.0)
    assert encode_chunk(staged.acts, regrouped=staged.regrouped, **kw) == encode_chunk(acts, **kw)
