"""Every reject reason, from a crafted bad message each; garbage never raises anything else."""

from __future__ import annotations

import math
import tracemalloc
import zlib

import lz4.frame
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saestream.common.wire import (
    HEADER_FIELDS,
    REJECT_REASON_HELP,
    REJECT_REASONS,
    DecodeLimits,
    WireError,
    decode_chunk,
    encode_chunk,
)

META = dict(producer="p0", run="r", seq=0, model="tiny", hook="model.layers.1",
            source={"corpus": "synthetic"})


def good(codec: str = "lz4-shuffle", dtype: str = "float32", n: int = 8, d: int = 4,
         acts: torch.Tensor | None = None) -> list[bytes]:
    acts = torch.randn(n, d) if acts is None else acts
    return encode_chunk(acts, **META, codec=codec, dtype=dtype)


def header_of(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[0])


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = header_of(frames)
    for key, value in changes.items():
        if value is _DROP:
            del header[key]
        else:
            header[key] = value
    return [msgpack.packb(header, use_bin_type=True), frames[1]]


_DROP = object()


def reason(frames, **kw) -> str:
    with pytest.raises(WireError) as err:
        decode_chunk(frames, **kw)
    assert err.value.reason in REJECT_REASONS
    assert str(err.value).startswith(err.value.reason + ":")
    return err.value.reason


def test_every_reason_is_documented() -> None:
    assert set(REJECT_REASON_HELP) == set(REJECT_REASONS)
    assert {"frames", "header", "version", "field", "size", "codec", "checksum", "nonfinite",
            "hook", "dim"} <= set(REJECT_REASONS)


# --- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [[], [b"x"], [b"a", b"b", b"c"], "ab", None, 5,
                                    {"a": b"", "b": b""}, [b"", 12], ["header", b"payload"]])
def test_reject_frames(frames) -> None:
    assert reason(frames) == "frames"


def test_reject_frames_of_a_valid_message_plus_one() -> None:
    assert reason([*good(), b""]) == "frames"


# --- header ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [b"", b"\xc1", b"\x91", msgpack.packb([1, 2]), msgpack.packb(7),
                                  msgpack.packb("v"), b"\xdf\xff\xff\xff\xff",
                                  msgpack.packb({1: 2}), b"\x91" * 5000 + b"\xc0"])
def test_reject_header(head: bytes) -> None:
    assert reason([head, b"payload"]) == "header"


def test_reject_header_too_large() -> None:
    frames = with_header(good(), source={"pad": "x" * 70_000})
    assert reason(frames) == "header"
    assert decode_chunk(frames, limits=DecodeLimits(max_header_nbytes=1 << 20)).n == 8


# --- version --------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [0, 2, -1, "1", 1.0, True, None, _DROP])
def test_reject_version(v) -> None:
    assert reason(with_header(good(), v=v)) == "version"


# --- field ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [k for k in HEADER_FIELDS if k != "v"])
def test_reject_missing_field(key: str) -> None:
    assert reason(with_header(good(), **{key: _DROP})) == "field"


BAD_FIELDS = [
    ("kind", "grads"), ("kind", None), ("kind", ["acts"]),
    ("producer", ""), ("producer", b"p0"), ("producer", 3), ("producer", "x" * 2000),
    ("run", None), ("model", ["tiny"]), ("hook", ""), ("hook", {"a": 1}),
    ("seq", -1), ("seq", True), ("seq", 1.0), ("seq", "0"),
    ("n", True), ("n", 8.0), ("n", 0), ("n", -8), ("d", "4"), ("d", 0),
    ("raw_nbytes", 128.0), ("raw_nbytes", None),
    ("checksum", -1), ("checksum", 1 << 32), ("checksum", "abc"), ("checksum", False),
    ("source", [1, 2]), ("source", "corpus"), ("source", None),
    # source reaches JSON files and logs: flat, bounded, JSON-safe values only
    ("source", {"corpus": b"bytes"}), ("source", {"a": {"b": 1}}), ("source", {"a": [[1]]}),
    ("source", {"a": [b"x"]}), ("source", {"a": math.nan}), ("source", {"a": -math.inf}),
    ("source", {f"k{i}": i for i in range(65)}), ("source", {"k" * 257: 1}),
    ("source", {"a": list(range(257))}),
    ("source", {"epoch": 0, "start": 0}), ("source", {"epoch": 0, "start": 5, "end": 9}),
    ("source", {"epoch": 0, "start": -8, "end": 0}), ("source", {"epoch": "0", "start": 0,
                                                                  "end": 8}),
    ("ts", "now"), ("ts", None), ("ts", math.nan), ("ts", math.inf), ("ts", True),
    ("dtype", "int8"), ("dtype", "float64"), ("dtype", ["bfloat16"]), ("dtype", 16),
]


@pytest.mark.parametrize(("key", "value"), BAD_FIELDS)
def test_reject_bad_field(key: str, value) -> None:
    assert reason(with_header(good(), **{key: value})) == "field"


def test_source_with_positions_matching_n_is_accepted() -> None:
    frames = with_header(good(n=8), source={"corpus": "c", "epoch": 2, "start": 40, "end": 48,
                                            "tags": ["a", 1, None, 2.5, True]})
    assert decode_chunk(frames).source["end"] == 48


def test_reject_unknown_field() -> None:
    assert reason(with_header(good(), extra=1)) == "field"


def test_reject_source_with_non_str_keys() -> None:
    header = header_of(good())
    header["source"] = {1: "x"}
    frames = [msgpack.packb(header), good()[1]]
    assert reason(frames) == "header"  # msgpack itself refuses non-str map keys


# --- size -----------------------------------------------------------------------------------


def test_reject_size_beyond_caps() -> None:
    frames = good(n=8, d=4)
    assert reason(frames, limits=DecodeLimits(max_n=7)) == "size"
    assert reason(frames, limits=DecodeLimits(max_d=3)) == "size"
    assert reason(frames, limits=DecodeLimits(max_raw_nbytes=8 * 4 * 4 - 1)) == "size"
    assert decode_chunk(frames, limits=DecodeLimits(max_n=8, max_d=4, max_raw_nbytes=128)).n == 8


def test_reject_size_huge_n_before_allocating() -> None:
    frames = with_header(good(), n=1 << 40, raw_nbytes=(1 << 40) * 4 * 4)
    assert reason(frames) == "size"


@pytest.mark.parametrize("codec", ["raw", "lz4", "lz4-shuffle"])
def test_reject_size_raw_nbytes_not_n_d_itemsize(codec: str) -> None:
    frames = good(codec=codec)
    assert reason(with_header(frames, raw_nbytes=8 * 4 * 4 + 4)) == "size"
    assert reason(with_header(frames, raw_nbytes=8 * 4 * 2)) == "size"


def test_reject_size_raw_payload_of_wrong_length() -> None:
    header, payload = good(codec="raw")
    assert reason([header, payload[:-4]]) == "size"
    assert reason([header, payload + b"\0\0\0\0"]) == "size"


def test_reject_size_lz4_payload_decoding_short() -> None:
    header, _ = good(codec="lz4")
    assert reason([header, lz4.frame.compress(b"\0" * 64)]) == "size"


def _bomb(nbytes: int) -> bytes:
    """An LZ4 frame of `nbytes` zeros, built without holding them in memory."""
    comp = lz4.frame.LZ4FrameCompressor()
    parts = [comp.begin()]
    block = bytes(1 << 20)
    for _ in range(nbytes // len(block)):
        parts.append(comp.compress(block))
    parts.append(comp.flush())
    return b"".join(parts)


@pytest.mark.parametrize("codec", ["lz4", "lz4-shuffle"])
def test_reject_size_decompression_bomb_with_bounded_memory(codec: str) -> None:
    bomb = _bomb(256 << 20)  # 256 MiB of zeros in ~1 MiB
    assert len(bomb) < 2 << 20
    header = msgpack.packb({**header_of(good(codec=codec, n=32, d=64)),
                            "checksum": zlib.crc32(bytes(32 * 64 * 4))})
    tracemalloc.start()
    try:
        assert reason([header, bomb]) == "size"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the output is capped at raw_nbytes (8 KiB), nothing near 256 MiB


# --- codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["zstd", "LZ4", "", None, 1, ["lz4"]])
def test_reject_unknown_codec(codec) -> None:
    assert reason(with_header(good(), codec=codec)) == "codec"


@pytest.mark.parametrize("codec", ["lz4", "lz4-shuffle"])
def test_reject_codec_corrupt_truncated_or_trailing_lz4(codec: str) -> None:
    header, payload = good(codec=codec, n=64, d=32)
    assert reason([header, b"not an lz4 frame at all"]) == "codec"
    assert reason([header, b""]) == "codec"
    assert reason([header, payload[: len(payload) // 2]]) == "codec"
    assert reason([header, payload[:-1]]) == "codec"
    assert reason([header, payload + b"\x00"]) == "codec"
    assert reason([header, payload + payload]) == "codec"
    corrupt = bytearray(payload)
    corrupt[4] ^= 0xFF  # frame descriptor flags
    assert reason([header, bytes(corrupt)]) == "codec"


# --- checksum -------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "lz4", "lz4-shuffle"])
def test_reject_checksum(codec: str) -> None:
    frames = good(codec=codec)
    checksum = header_of(frames)["checksum"]
    assert reason(with_header(frames, checksum=checksum ^ 1)) == "checksum"


def test_reject_checksum_flipped_payload_bit() -> None:
    header, payload = good(codec="raw")
    flipped = bytearray(payload)
    flipped[0] ^= 0x01  # lowest mantissa bit: still finite
    assert reason([header, bytes(flipped)]) == "checksum"


# --- nonfinite ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "lz4", "lz4-shuffle"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_reject_nonfinite(codec: str, dtype: str, bad: float, regrouping: str) -> None:
    acts = torch.randn(35_000, 4)  # more than one block of the finiteness check
    acts[34_999, 3] = bad
    assert reason(good(codec=codec, dtype=dtype, acts=acts)) == "nonfinite"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_largest_finite_values_and_subnormals_are_accepted(dtype: str, regrouping: str
                                                            ) -> None:
    info = torch.finfo(getattr(torch, dtype))
    acts = torch.tensor([[info.max, -info.max, info.tiny / 4, -0.0]], dtype=getattr(torch, dtype))
    assert torch.equal(decode_chunk(good(dtype=dtype, acts=acts)).acts, acts)


_VIEWS = {"bfloat16": (np.int16, torch.bfloat16), "float16": (np.int16, torch.float16),
          "float32": (np.int32, torch.float32)}
NONFINITE_BITS = {  # inf, -inf, quiet NaN, signalling NaN, NaN with every bit set
    "bfloat16": [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF],
    "float16": [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF],
    "float32": [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF],
}
ALMOST_BITS = {  # finite, one step from the patterns above (the top binade, ± the largest)
    "bfloat16": [0x7F7F, 0xFF7F, 0x7F00, 0xFF00, 0x7F01, 0x7EFF, 0x7E80],
    "float16": [0x7BFF, 0xFBFF, 0x7800, 0xF800, 0x7B00, 0x3C00],
    "float32": [0x7F7FFFFF, 0xFF7FFFFF, 0x7F000000, 0xFF000000, 0x7F7F0000, 0x7EFFFFFF],
}


def with_bits(dtype: str, at: list[int], bits: list[int], n: int = 300, d: int = 7
              ) -> torch.Tensor:
    """Random finite [n, d] activations of `dtype` whose flat elements `at` hold `bits`."""
    signed, tdtype = _VIEWS[dtype]
    acts = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(tdtype)
    words = acts.view(torch.int32 if signed is np.int32 else torch.int16).numpy().reshape(-1)
    words[at] = np.array(bits, dtype=signed.__name__.replace("int", "uint")).view(signed)
    return acts


@pytest.mark.parametrize("codec", ["raw", "lz4", "lz4-shuffle"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_reject_nonfinite_bit_patterns_anywhere(codec: str, dtype: str, where: str,
                                                 regrouping: str) -> None:
    n, d = 300, 7
    at = {"first": 0, "middle": n * d // 2 + 1, "last": n * d - 1}[where]
    for bits in NONFINITE_BITS[dtype]:
        acts = with_bits(dtype, [at], [bits], n, d)
        assert reason(good(codec=codec, dtype=dtype, acts=acts)) == "nonfinite", hex(bits)


@pytest.mark.parametrize("codec", ["raw", "lz4", "lz4-shuffle"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_almost_nonfinite_bit_patterns_are_accepted(codec: str, dtype: str,
                                                    regrouping: str) -> None:
    n, d = 300, 7
    bits = ALMOST_BITS[dtype]
    cases = [([at], [b]) for b in bits for at in (0, n * d // 2 + 1, n * d - 1)]
    cases.append((list(range(n * d)), [bits[i % len(bits)] for i in range(n * d)]))  # all
    for at, values in cases:
        acts = with_bits(dtype, at, values, n, d)
        assert torch.equal(decode_chunk(good(codec=codec, dtype=dtype, acts=acts)).acts, acts)


# --- hook and dim ---------------------------------------------------------------------------


def test_reject_hook_not_expected() -> None:
    frames = good()
    assert reason(frames, expect_hook={"model.layers.2"}) == "hook"
    assert reason(frames, expect_d={"model.layers.2": 4}) == "hook"
    assert decode_chunk(frames, expect_hook=["model.layers.1"]).hook == "model.layers.1"


def test_reject_dim_not_expected() -> None:
    frames = good(d=4)
    assert reason(frames, expect_d=5) == "dim"
    assert reason(frames, expect_d={"model.layers.1": 8}) == "dim"
    hooks = {"model.layers.1"}
    assert decode_chunk(frames, expect_d={"model.layers.1": 4}, expect_hook=hooks).d == 4
    assert decode_chunk(frames, expect_d=4).d == 4


# --- garbage --------------------------------------------------------------------------------


def only_wire_errors(frames, **kw) -> None:
    try:
        decode_chunk(frames, **kw)
    except WireError as err:
        assert err.reason in REJECT_REASONS


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_random_garbage_raises_only_wire_error(frames: list[bytes]) -> None:
    only_wire_errors(frames)


@FUZZ
@given(st.sampled_from(["raw", "lz4", "lz4-shuffle"]), st.data())
def test_truncated_and_mutated_messages_raise_only_wire_error(codec: str, data) -> None:
    acts = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    frames = good(codec=codec, dtype="bfloat16", acts=acts)
    which = data.draw(st.integers(0, 1))
    frame = bytearray(frames[which])
    action = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    pos = data.draw(st.integers(0, max(0, len(frame) - 1)))
    if action == "truncate":
        del frame[pos:]
    elif action == "flip" and frame:
        frame[pos] ^= data.draw(st.integers(1, 255))
    else:
        frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    frames[which] = bytes(frame)
    only_wire_errors(frames, limits=DecodeLimits(max_n=64, max_d=64))


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children,
                                                                        max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(HEADER_FIELDS), json_like), st.binary(max_size=64))
def test_random_headers_raise_only_wire_error(changes: dict, payload: bytes) -> None:
    frames = good(n=2, d=2, acts=torch.ones(2, 2))
    header = {**header_of(frames), **changes}
    only_wire_errors([msgpack.packb(header), payload])
    only_wire_errors([msgpack.packb(header), frames[1]])


def test_numpy_and_memoryview_frames_are_accepted() -> None:
    header, payload = good(codec="raw")
    chunk = decode_chunk([memoryview(header), np.frombuffer(payload, np.float32)])
    assert chunk.acts.shape == (8, 4)
