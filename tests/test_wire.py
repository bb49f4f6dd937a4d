"""The wire format: bit-exact round trips for every dtype and codec, and what decode rejects."""

from __future__ import annotations

import ctypes
import os
import platform
import shlex
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from unittest import mock

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saestream.common import wire
from saestream.common.wire import (
    CODECS,
    DTYPES,
    HEADER_FIELDS,
    WIRE_VERSION,
    Chunk,
    DecodeLimits,
    WireError,
    decode_chunk,
    encode_chunk,
    shuffle_bytes,
    unshuffle_bytes,
)

META = dict(producer="p0", run="run-1", seq=3, model="tiny", hook="model.layers.1",
            source={"corpus": "synthetic", "offsets": [0, 12]})


def frames_for(acts: torch.Tensor, **kw) -> list[bytes]:
    return encode_chunk(acts, **{**META, **kw})


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_is_bit_exact(codec: str, dtype: str, regrouping: str) -> None:
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


# --- property-based round trips -------------------------------------------------------------

_BITS = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00),
         "float32": (np.uint32, 0x7F800000)}


def finite_random_bits(dtype: str, n: int, d: int, seed: int, pattern: str) -> torch.Tensor:
    """Random bit patterns of `dtype`; inf/NaN patterns lose their top exponent bit (finite)."""
    udtype, exp = _BITS[dtype]
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, np.iinfo(udtype).max, size=(n, d), dtype=udtype, endpoint=True)
    if pattern == "repetitive":  # few distinct values: lz4 finds matches
        bits = rng.choice(bits.reshape(-1)[:3], size=(n, d))
    elif pattern == "activations":  # a realistic spread
        bits = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32) * 4)
        return bits.to(DTYPES[dtype])
    top_exponent_bit = udtype(exp & ~(exp >> 1))
    bits = np.where((bits & exp) == exp, bits & ~top_exponent_bit, bits).astype(udtype)
    signed = torch.from_numpy(bits.view(np.int16 if udtype is np.uint16 else np.int32).copy())
    return signed.view(DTYPES[dtype])


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    codec=st.sampled_from(CODECS),
    n=st.integers(1, 40),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    pattern=st.sampled_from(["random", "repetitive", "activations"]),
)
def test_round_trip_property(dtype: str, codec: str, n: int, d: int, seed: int,
                             pattern: str) -> None:
    acts = finite_random_bits(dtype, n, d, seed, pattern)
    assert bool(torch.isfinite(acts).all())
    chunk = decode_chunk(encode_chunk(acts, **META, codec=codec), expect_d=d,
                         expect_hook={META["hook"]})
    assert chunk.acts.shape == (n, d) and chunk.acts.dtype == acts.dtype
    assert torch.equal(chunk.acts.view(torch.uint8), acts.view(torch.uint8))


@settings(max_examples=60, deadline=None)
@given(
    producer=st.text(min_size=1, max_size=40),
    run=st.text(min_size=1, max_size=40),
    seq=st.integers(0, 2**63 - 1),
    hook=st.text(min_size=1, max_size=40),
    # any keys but the positions, whose rules (all three, end - start = n) another test has
    source=st.dictionaries(st.text(max_size=10).filter(lambda k: k not in wire.POSITION_KEYS),
                           st.integers(-(2**31), 2**31) | st.text(max_size=10)
                           | st.lists(st.integers(0, 10**12), max_size=4), max_size=4),
    ts=st.floats(allow_nan=False, allow_infinity=False),
)
def test_header_round_trip_property(producer, run, seq, hook, source, ts) -> None:
    acts = torch.ones(2, 3, dtype=torch.bfloat16)
    frames = encode_chunk(acts, producer=producer, run=run, seq=seq, model="m", hook=hook,
                          source=source, ts=ts)
    chunk = decode_chunk(frames)
    assert (chunk.producer, chunk.run, chunk.seq, chunk.hook) == (producer, run, seq, hook)
    assert chunk.source == source and chunk.ts == ts
    assert chunk.wire_nbytes == len(frames[0]) + len(frames[1])


@settings(max_examples=60, deadline=None)
@given(itemsize=st.sampled_from([2, 4]), m=st.integers(1, 300), seed=st.integers(0, 1000))
def test_shuffle_matches_the_design_definition(itemsize: int, m: int, seed: int) -> None:
    raw = np.random.default_rng(seed).integers(0, 256, m * itemsize, dtype=np.uint8)
    expected = raw.reshape(m, itemsize).T.reshape(-1)  # ARCHITECTURE.md: byte j of i -> j*m + i
    shuffled = shuffle_bytes(raw, itemsize)
    assert np.array_equal(shuffled, expected)
    assert np.array_equal(unshuffle_bytes(shuffled, itemsize).view(np.uint8), raw)


TOP_BYTES = [0x00, 0x7E, 0x7F, 0x80, 0xFE, 0xFF, 0x7C, 0xFC, 0x7B, 0xFB]


@settings(max_examples=200, deadline=None)
@given(
    itemsize=st.sampled_from([2, 4]),
    m=st.one_of(st.integers(1, 3000), st.sampled_from([8191, 8192, 8193, 3 * 8192 + 35]),
                st.integers(8193, 40000)),  # across the kernels' 8192-element crc blocks
    seed=st.integers(0, 2**32 - 1),
    top=st.lists(st.sampled_from(TOP_BYTES), max_size=3),
)
def test_c_regrouping_equals_numpys(itemsize: int, m: int, seed: int, top: list[int]) -> None:
    """The C kernels give numpy's bytes both ways, and the same top-plane verdict on
    finiteness for every wire dtype of that width, edge bytes included (each exponent
    pattern of the most significant byte, at random places: first, last, in between)."""
    assert wire._KERNELS.load() is not None, "the wire kernels did not build (is cc installed?)"
    rng = np.random.default_rng(seed)
    # random bytes whose top bytes avoid the exponent edge, then the chosen edge bytes
    raw = rng.integers(0, 256, m * itemsize, dtype=np.uint8)
    raw[itemsize - 1 :: itemsize] &= 0x3F
    for byte in top:
        raw[int(rng.integers(0, m)) * itemsize + itemsize - 1] = byte
    c_shuffled, c_crc = wire._shuffle(raw, itemsize, crc=True)
    assert np.array_equal(shuffle_bytes(raw, itemsize), c_shuffled)
    cases = [(d, crc) for d, size in wire.ITEMSIZE.items() if size == itemsize
             for crc in (False, True)]
    c_back = [wire._unshuffle(bytes(c_shuffled), itemsize, d, crc=crc) for d, crc in cases]
    with mock.patch.dict(os.environ, {"SAESTREAM_NATIVE": "0"}):  # numpy, in a test body
        assert wire._KERNELS.load() is None
        np_shuffled, np_crc = wire._shuffle(raw, itemsize, crc=True)
        np_back = [wire._unshuffle(bytes(np_shuffled), itemsize, d, crc=crc)
                   for d, crc in cases]
    assert np.array_equal(c_shuffled, np_shuffled)
    fast = wire._KERNELS.load().has_fast_crc
    assert np_crc is None and c_crc == (zlib.crc32(raw) if fast else None)
    for (c_words, c_finite, c_sum), (np_words, np_finite, np_sum), (d, crc) in zip(
            c_back, np_back, cases, strict=True):
        assert c_words.dtype == np_words.dtype == np.dtype(f"<u{itemsize}")
        assert np.array_equal(c_words.view(np.uint8), raw)
        assert np.array_equal(np_words.view(np.uint8), raw)
        assert c_finite == np_finite, (d, [hex(b) for b in top])
        assert np_sum is None and c_sum == (zlib.crc32(raw) if crc and fast else None)


def test_chunks_larger_than_a_crc_block_carry_zlibs_checksum(regrouping: str) -> None:
    """Encode's header checksum is zlib.crc32 of the raw bytes, and decode accepts it and
    rejects a changed byte, on chunks spanning many of the kernels' 8192-element blocks (a
    fold that lost a block's place would pass a round trip but break every other peer)."""
    for dtype in ("bfloat16", "float32"):
        acts = torch.randn(3 * 8192 + 35, 7).to(DTYPES[dtype])
        frames = encode_chunk(acts, producer="p", run="r", seq=0, model="m", hook="h",
                              source={}, codec="lz4-shuffle")
        raw = wire._words(acts, dtype).tobytes()
        header = msgpack.unpackb(frames[0])
        assert header["checksum"] == zlib.crc32(raw)
        assert torch.equal(decode_chunk(frames).acts, acts)
        header["checksum"] ^= 1
        with pytest.raises(WireError) as err:
            decode_chunk([msgpack.packb(header), frames[1]])
        assert err.value.reason == "checksum"


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 5000), offset=st.integers(0, 15), start=st.integers(0, 2**32 - 1),
       seed=st.integers(0, 2**32 - 1))
def test_the_kernels_crc32_is_zlibs(n: int, offset: int, start: int, seed: int) -> None:
    """The carry-less-multiply crc32 (and the bit-by-bit one of builds without PCLMULQDQ)
    is zlib.crc32 at every length and alignment, from any running value."""
    lib = wire._KERNELS.load()
    assert lib is not None, "the wire kernels did not build (is cc installed?)"
    buf = np.random.default_rng(seed).integers(0, 256, n + offset, dtype=np.uint8)[offset:]
    assert lib.crc32_update(start, wire._address(buf), n) == zlib.crc32(buf, start)
    assert wire.crc32(buf) == zlib.crc32(buf)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_a_build_without_pclmulqdq_keeps_zlibs_crc32(tmp_path) -> None:
    """Built for a CPU without carry-less multiplies, the kernels say so (wire.py then uses
    zlib.crc32), and their own crc32 entry points still give zlib's value."""
    out = tmp_path / "plain.so"
    cc = shlex.split(os.environ.get("CC") or "cc")  # as common/native.py runs it
    if not shutil.which(cc[0]):
        pytest.skip(f"no C compiler {cc[0]!r}")
    subprocess.run([*cc, "-O2", "-mno-pclmul", "-fPIC", "-shared", "-o", str(out),
                    str(Path(wire.__file__).with_name("wire_kernels.c"))],
                   check=True, capture_output=True)
    lib = wire._bind_kernels(ctypes.CDLL(str(out)))
    assert not lib.has_fast_crc
    raw = np.random.default_rng(5).integers(0, 256, 3 * 8192 * 2 + 70, dtype=np.uint8)
    assert lib.crc32_update(0, wire._address(raw), raw.size) == zlib.crc32(raw)
    planes, folded = np.empty_like(raw), ctypes.c_uint32(9)
    lib.shuffle_2_crc(wire._address(raw), wire._address(planes), raw.size // 2,
                      ctypes.byref(folded))
    assert folded.value == zlib.crc32(raw, 9)
    assert np.array_equal(planes, raw.reshape(-1, 2).T.reshape(-1))


def test_without_a_compiler_numpy_regroups_with_one_warning(tmp_path) -> None:
    """No C compiler: lz4-shuffle still encodes and decodes (numpy), after one warning."""
    code = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from saestream.common import wire
        acts = torch.randn(64, 33).bfloat16()
        for _ in range(3):
            frames = wire.encode_chunk(acts, producer="p", run="r", seq=0, model="m",
                                       hook="h", source={})
            assert torch.equal(wire.decode_chunk(frames).acts, acts)
        print("numpy" if wire._KERNELS.load() is None else "C")
    """)
    env = {**os.environ, "CC": "/bin/false", "SAESTREAM_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy"
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "falling back to numpy" in warnings[0], proc.stderr


@pytest.mark.parametrize("bad", ["partial element", "not bytes", "2-D", "strided"])
def test_regrouping_rejects_what_is_not_whole_elements(bad: str, regrouping: str) -> None:
    """Both paths refuse the same inputs, so neither leaves bytes out or reads past them."""
    raw = np.arange(24, dtype=np.uint8)
    arg = {"partial element": raw[:7], "not bytes": raw.view(np.uint16), "2-D": raw.reshape(4, 6),
           "strided": raw[::2]}[bad]
    with pytest.raises(ValueError):
        shuffle_bytes(arg, 2)
    if bad == "partial element":
        with pytest.raises(ValueError):
            unshuffle_bytes(bytes(arg), 2)
        with pytest.raises(ValueError):
            unshuffle_bytes(bytes(raw[:10]), 4)
    assert unshuffle_bytes(b"", 2).size == 0 and wire._unshuffle(b"", 4, "float32")[1]
    assert wire._unshuffle(b"", 2, "bfloat16", crc=True)[2] is None  # the caller's zlib: 0


def test_a_library_that_cannot_be_built_is_one_warning_not_an_error(tmp_path, caplog) -> None:
    """Whatever goes wrong while building (here: the source is gone) is the numpy path and
    one warning, never an exception in the encode or decode that asked, and no retry."""
    from saestream.common import native

    def bind(lib):
        return lib

    lib = native.NativeLibrary(tmp_path / "gone.c", [["-O2", "-shared"]], bind, what="test kernels",
                               fallback="numpy")
    with caplog.at_level("WARNING"):
        assert lib.load() is None and lib.load() is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "numpy" in warnings[0].getMessage()


def test_encode_rejects_invalid_arguments() -> None:
    x = torch.zeros(2, 2)
    for bad in ({"codec": "zstd"}, {"dtype": "int8"}, {"seq": -1}, {"seq": True},
                {"producer": ""}, {"hook": "h" * 1025}, {"source": [1]},
                {"source": {"pad": "x" * 70_000}}, {"ts": float("nan")}):
        with pytest.raises(ValueError):
            encode_chunk(x, **{**META, **bad})
    for acts in (torch.zeros(4), torch.zeros(0, 3), torch.zeros(2, 2, dtype=torch.int32)):
        with pytest.raises(ValueError):
            encode_chunk(acts, **META)


def test_encode_accepts_non_contiguous_and_gradient_tensors() -> None:
    base = torch.randn(6, 10, requires_grad=True)
    acts = base.t()[::2]  # [5, 6], strided
    chunk = decode_chunk(encode_chunk(acts, **META))
    assert torch.equal(chunk.acts, acts.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("form", ["contiguous", "strided", "grad", "other dtype"])
def test_encode_gives_the_same_bytes_on_its_short_path_as_on_its_long_one(dtype, form) -> None:
    """A contiguous CPU tensor of the wire dtype skips the tensor calls that make others
    so (`_words`): the same message as from a copy taken the long way."""
    base = torch.randn(12, 7, generator=torch.Generator().manual_seed(2)).to(dtype)
    acts = {"contiguous": base, "strided": base.t().contiguous().t(),
            "grad": base.clone().requires_grad_(),
            "other dtype": base.double()}[form]
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    frames = encode_chunk(acts, **META, dtype=name, ts=1.0)
    strided = base.t().contiguous().t()  # the long way
    assert frames == encode_chunk(strided, **META, dtype=name, ts=1.0)
    assert torch.equal(decode_chunk(frames).acts, base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_accepts_cuda_tensors() -> None:
    acts = torch.randn(16, 8, device="cuda")
    chunk = decode_chunk(encode_chunk(acts, **META, dtype="bfloat16"))
    assert torch.equal(chunk.acts, acts.to(torch.bfloat16).cpu())
