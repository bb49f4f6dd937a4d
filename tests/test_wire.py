"""The wire format: bit-exact round trips for every dtype and codec, and what decode rejects."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from common.wire import (
    CODECS,
    DTYPES,
    HEADER_FIELDS,
    WIRE_VERSION,
    Chunk,
    DecodeLimits,
    WireError,
    decode_chunk,
    encode_chunk,
)

META = dict(producer="p0", run="run-1", seq=3, model="tiny", hook="model.layers.1",
            source={"corpus": "synthetic", "offsets": [0, 12]})


def frames_for(acts: torch.Tensor, **kw) -> list[bytes]:
    return encode_chunk(acts, **{**META, **kw})


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_is_bit_exact(codec: str, dtype: str) -> None:
    acts = (torch.randn(33, 17) * 10).to(DTYPES[dtype])
    chunk = decode_chunk(frames_for(acts, codec=codec))
    assert isinstance(chunk, Chunk)
    assert chunk.acts.dtype == DTYPES[dtype] and chunk.acts.shape == (33, 17)
    assert torch.equal(chunk.acts.view(torch.uint8), acts.view(torch.uint8))
    assert (chunk.producer, chunk.run, chunk.seq) == ("p0", "run-1", 3)
    assert chunk.hook == "model.layers.1"
    assert (chunk.n, chunk.d, chunk.dtype, chunk.codec) == (33, 17, dtype, codec)
    assert chunk.source == META["source"]


def test_header_has_exactly_the_design_keys() -> None:
    header = msgpack.unpackb(frames_for(torch.zeros(2, 3), ts=5.0)[0])
    assert set(header) == set(HEADER_FIELDS)
    assert header["v"] == WIRE_VERSION and header["kind"] == "acts" and header["ts"] == 5.0
    assert header["raw_nbytes"] == 2 * 3 * 4


def test_encode_converts_to_the_requested_wire_dtype() -> None:
    acts = torch.randn(4, 5)
    chunk = decode_chunk(frames_for(acts, dtype="bfloat16"))
    assert torch.equal(chunk.acts, acts.to(torch.bfloat16))


def test_bad_message_raises_wire_error() -> None:
    with pytest.raises(WireError) as err:
        decode_chunk([b"garbage"])
    assert err.value.reason == "frames"
    with pytest.raises(WireError) as err:
        decode_chunk(frames_for(torch.zeros(4, 8)), limits=DecodeLimits(max_n=2))
    assert err.value.reason == "size"


def test_zmq_frames_decode_without_copy() -> None:
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        acts = torch.randn(64, 32)
        a.send_multipart(frames_for(acts, codec="raw"))
        frames = b.recv_multipart(copy=False)
        chunk = decode_chunk(frames)
        assert torch.equal(chunk.acts, acts)
        payload = np.frombuffer(frames[1].buffer, np.uint8)
        assert chunk.acts.data_ptr() == payload.ctypes.data
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
