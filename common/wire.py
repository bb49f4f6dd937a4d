"""The activation wire format, version 1: one chunk of activations = two ZeroMQ frames.

`[header, payload]`: the header is a msgpack map with exactly the keys of `HEADER_FIELDS`;
the payload is the row-major, little-endian `n × d` activations in `dtype`, as is (`raw`),
as one LZ4 frame (`lz4`), or with the bytes first regrouped by significance and then as one
LZ4 frame (`lz4-shuffle`). `checksum` is `zlib.crc32` of the raw bytes. See ARCHITECTURE.md.

`decode_chunk` trusts nothing: every failure is a `WireError` whose `reason` is one of
`REJECT_REASONS`, and no allocation is ever larger than the `raw_nbytes` that the
configured caps on `n` and `d` allow.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.frame
import msgpack
import numpy as np
import torch

from saestream.common import native

log = logging.getLogger(__name__)

WIRE_VERSION = 1
KIND = "acts"

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
# Unsigned integer views of each dtype (little-endian), and the exponent-all-ones pattern
# that marks inf/NaN: a value is non-finite iff (bits & ~sign) >= that pattern.
WORD_DTYPES = {"bfloat16": np.dtype("<u2"), "float16": np.dtype("<u2"), "float32": np.dtype("<u4")}
_SINT = {"bfloat16": np.dtype("<i2"), "float16": np.dtype("<i2"), "float32": np.dtype("<i4")}
_EXP_MASK = {"bfloat16": 0x7F80, "float16": 0x7C00, "float32": 0x7F800000}
_SIGN = {"bfloat16": 0x8000, "float16": 0x8000, "float32": 0x80000000}
# The exponent bits that the most significant byte holds (all of float16's; all but the
# lowest of bfloat16's and float32's): no such byte with them all set proves every value finite.
_TOP_EXP = {"bfloat16": 0x7F, "float16": 0x7C, "float32": 0x7F}

MAX_STR_LEN = 1024
"""Longest producer, run, model and hook name (characters)."""

MAX_SOURCE_KEYS = 64
"""Most entries in a header's `source` map; keys are str of at most MAX_SOURCE_KEY_LEN chars."""
MAX_SOURCE_KEY_LEN = 256
MAX_SOURCE_LIST = 256
"""Longest list value in `source` (of scalars only: provenance is flat)."""
POSITION_KEYS = ("epoch", "start", "end")
"""`source` keys that place a chunk in its producer's stream: rows are positions
[start, end) of epoch `epoch`, so end − start == n. Optional; all three or none."""

CODECS = ("raw", "lz4", "lz4-shuffle")
DEFAULT_CODEC = "lz4-shuffle"

HEADER_FIELDS = (
    "v", "kind", "producer", "run", "seq", "model", "hook",
    "d", "n", "dtype", "codec", "raw_nbytes", "checksum", "source", "ts",
)  # fmt: skip

REJECT_REASONS = (
    "frames",  # not exactly two frames
    "header",  # header frame too large, not msgpack, or not a map
    "version",  # `v` missing or not WIRE_VERSION
    "field",  # a field missing, unknown, of the wrong type or out of range (incl. kind, dtype)
    "size",  # n or d beyond the caps, raw_nbytes != n*d*itemsize, payload of the wrong length
    "codec",  # unknown codec, or a payload that is not one valid LZ4 frame
    "checksum",  # crc32 of the decoded bytes differs from `checksum`
    "nonfinite",  # an inf or NaN among the values
    "hook",  # hook not among those the receiver expects
    "dim",  # d differs from what the receiver expects for that hook
)
REJECT_REASON_HELP = {
    "frames": "the message is not exactly two frames [header, payload]",
    "header": "the header frame is too large, not msgpack, or not a map",
    "version": "`v` is missing or is not a version this build reads",
    "field": "a field is missing, unknown, of the wrong type, or out of range",
    "size": "n or d beyond the receiver's caps, raw_nbytes != n*d*itemsize, "
    "or a payload that decodes to another length",
    "codec": "unknown codec, or a payload that is not exactly one valid LZ4 frame",
    "checksum": "crc32 of the decoded bytes differs from the header's checksum",
    "nonfinite": "the activations contain inf or NaN",
    "hook": "the hook is not one the receiver trains on",
    "dim": "d differs from the receiver's expected width for that hook",
}


def lz4_bound(raw_nbytes: int) -> int:
    """Most bytes one LZ4 frame of `raw_nbytes` can take (incompressible data expands by
    1/255, plus block and frame headers): what a receiver must let through for a chunk."""
    return raw_nbytes + raw_nbytes // 255 + (raw_nbytes >> 20) * 8 + 1024


class WireError(Exception):
    """A message that cannot be accepted; `reason` is one of `REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    """What a receiver is willing to allocate for one message."""

    max_n: int = 1 << 16
    """Most tokens (rows) per chunk."""
    max_d: int = 1 << 15
    """Widest activation (columns) per chunk."""
    max_raw_nbytes: int = 256 << 20
    """Most decoded bytes per chunk (n*d*itemsize); bounds every allocation of a decode."""
    max_header_nbytes: int = 64 << 10
    """Largest header frame, in bytes."""


@dataclass
class Chunk:
    """One decoded, validated chunk."""

    header: dict[str, Any]
    """The validated header, as received."""
    acts: torch.Tensor
    """Activations, shape [n, d], the wire dtype, CPU. A view over the decoded buffer (over the
    received zmq.Frame itself for `raw`): copy out what you keep."""
    wire_nbytes: int
    """Bytes on the wire: header frame + payload frame."""

    @property
    def producer(self) -> str:
        return self.header["producer"]

    @property
    def run(self) -> str:
        return self.header["run"]

    @property
    def seq(self) -> int:
        return self.header["seq"]

    @property
    def model(self) -> str:
        return self.header["model"]

    @property
    def hook(self) -> str:
        return self.header["hook"]

    @property
    def n(self) -> int:
        return self.header["n"]

    @property
    def d(self) -> int:
        return self.header["d"]

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def codec(self) -> str:
        return self.header["codec"]

    @property
    def raw_nbytes(self) -> int:
        return self.header["raw_nbytes"]

    @property
    def source(self) -> dict[str, Any]:
        return self.header["source"]

    @property
    def ts(self) -> float:
        return float(self.header["ts"])


# ---------------------------------------------------------------------------------------------
# byte regrouping ("shuffle") for lz4-shuffle


def _bind_kernels(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, u32p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint32)
    for size in (2, 4):
        getattr(lib, f"shuffle_{size}").argtypes = [p, p, i64]
        getattr(lib, f"shuffle_{size}").restype = None
        getattr(lib, f"unshuffle_{size}").argtypes = [p, p, i64, ctypes.c_int]
        getattr(lib, f"unshuffle_{size}").restype = ctypes.c_int
        getattr(lib, f"shuffle_{size}_crc").argtypes = [p, p, i64, u32p]
        getattr(lib, f"shuffle_{size}_crc").restype = None
        getattr(lib, f"unshuffle_{size}_crc").argtypes = [p, p, i64, ctypes.c_int, u32p]
        getattr(lib, f"unshuffle_{size}_crc").restype = ctypes.c_int
    lib.crc32_update.argtypes = [ctypes.c_uint32, p, i64]
    lib.crc32_update.restype = ctypes.c_uint32
    lib.fast_crc32.argtypes = []
    lib.fast_crc32.restype = ctypes.c_int
    lib.has_fast_crc = bool(lib.fast_crc32())  # PCLMULQDQ in this build
    return lib


# One pass each way in C (`wire_kernels.c`): numpy's regrouping costs the decode about a
# quarter of its LZ4 + crc32 floor for bfloat16, and more than the floor for float32. Where
# the build has PCLMULQDQ the same pass also computes the crc32 (~4.5x zlib's speed, on bytes
# already in L1), and `crc32` uses that fold for the codecs that do not regroup.
_KERNELS = native.NativeLibrary(
    Path(__file__).with_name("wire_kernels.c"),
    (["-O3", "-march=native", "-fPIC", "-shared"], ["-O3", "-fPIC", "-shared"]),
    _bind_kernels,
    what="wire byte kernels",
    fallback="numpy",
)


def _fast_crc() -> ctypes.CDLL | None:
    """The kernels, where they compute crc32 by carry-less multiplies; else None (zlib's)."""
    lib = _KERNELS.load()
    return lib if lib is not None and lib.has_fast_crc else None


def crc32(buf: np.ndarray) -> int:
    """`zlib.crc32(buf)` of an array's bytes: the wire checksum, by the kernels' fold where
    built (~4.5x zlib's speed), so every check of it in the package costs the same."""
    lib = _fast_crc()
    if lib is None or not buf.flags.c_contiguous:
        return zlib.crc32(buf)
    return int(lib.crc32_update(0, _address(buf), buf.nbytes))


def _address(buf: np.ndarray | bytes | bytearray) -> int:
    """The address of a contiguous buffer's first byte (read-only buffers too)."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    return int(arr.ctypes.data)


def load_kernels() -> bool:
    """Build (first time on this machine: about a second) and load the C regrouping now, so
    that producers and consumers do it at start-up rather than inside their first chunk's
    encode or decode, and log which path regroups; True when loaded, False when numpy will."""
    loaded = _KERNELS.load() is not None
    log.info("lz4-shuffle byte regrouping: %s", "C kernels" if loaded else "numpy (no C kernels)")
    return loaded


def _check_planar(buf: np.ndarray, itemsize: int) -> None:
    """ValueError unless `buf` is a 1-D contiguous uint8 array of whole elements: the C and
    numpy paths then agree on everything they accept."""
    if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError("expected a 1-D contiguous uint8 array of bytes")
    if itemsize < 1 or buf.size % itemsize:
        raise ValueError(f"{buf.size} bytes are not whole elements of {itemsize} bytes")


def shuffle_bytes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Regroup bytes by significance: byte j of element i goes to position j*m + i.

    :param raw: the raw bytes (uint8, 1-D, contiguous, length m*itemsize; else ValueError)
    :return: a new uint8 array of the same length
    """
    return _shuffle(raw, itemsize, crc=False)[0]


def _shuffle(raw: np.ndarray, itemsize: int, crc: bool) -> tuple[np.ndarray, int | None]:
    """`shuffle_bytes`, and with `crc` the crc32 of `raw` computed in the same C pass, where
    the kernels fold it (else None: the caller computes it)."""
    _check_planar(raw, itemsize)
    m = raw.size // itemsize
    if itemsize == 1:
        return raw.copy(), None
    out = np.empty(raw.size, np.uint8)
    lib = _KERNELS.load() if itemsize in (2, 4) else None
    if lib is not None and crc and lib.has_fast_crc:
        value = ctypes.c_uint32(0)
        getattr(lib, f"shuffle_{itemsize}_crc")(_address(raw), _address(out), m,
                                                ctypes.byref(value))
        return out, value.value
    if lib is not None:
        getattr(lib, f"shuffle_{itemsize}")(_address(raw), _address(out), m)
        return out, None
    words = raw.view(f"<u{itemsize}")
    tmp = np.empty(m, words.dtype)
    for j in range(itemsize):
        # Shifting whole words then narrowing is ~20x faster than a strided byte transpose.
        np.right_shift(words, 8 * j, out=tmp)
        out[j * m : (j + 1) * m] = tmp  # narrowing cast keeps the low byte
    return out, None


def unshuffle_bytes(shuffled: np.ndarray | bytes | bytearray, itemsize: int) -> np.ndarray:
    """Inverse of `shuffle_bytes`; returns the elements as little-endian unsigned words
    (ValueError unless the input is a contiguous buffer of whole elements)."""
    return _unshuffle(shuffled, itemsize, None)[0]


def _unshuffle(
    shuffled: np.ndarray | bytes | bytearray, itemsize: int, dtype: str | None,
    crc: bool = False,
) -> tuple[np.ndarray, bool, int | None]:
    """`unshuffle_bytes`, and for a wire `dtype` the top plane's finiteness verdict
    (`_top_plane_finite`; False when `dtype` is None): one C pass where it is built; with
    `crc`, the words' crc32 too, in the same pass where the kernels fold it (else None).

    Without it, pairs of planes are joined as `high * 256 + low` into 16-bit words (a
    widening multiply and add run vectorised; strided byte copies or shifts and ors are
    1.5-5x slower), and for 4-byte elements the two halves the same way into 32-bit words.
    """
    planes = np.frombuffer(shuffled, np.uint8)
    _check_planar(planes, itemsize)
    m = planes.size // itemsize
    wdtype = np.dtype(f"<u{itemsize}")
    if m == 0:  # nothing to join, nothing that could be infinite
        return np.empty(0, wdtype), dtype is not None, None
    lib = _KERNELS.load() if itemsize in (2, 4) else None
    if lib is not None:
        out = np.empty(m, wdtype)
        limit = _TOP_EXP[dtype] if dtype is not None else 0
        value = None
        if crc and lib.has_fast_crc:
            folded = ctypes.c_uint32(0)
            finite = getattr(lib, f"unshuffle_{itemsize}_crc")(
                _address(planes), _address(out), m, limit, ctypes.byref(folded))
            value = folded.value
        else:
            finite = getattr(lib, f"unshuffle_{itemsize}")(
                _address(planes), _address(out), m, limit)
        return out, dtype is not None and bool(finite), value
    finite = dtype is not None and _top_plane_finite(planes[planes.size - m :], dtype)
    planes = planes.reshape(itemsize, m)
    if itemsize == 2:
        return _join(planes[0], planes[1], 8, wdtype), finite, None
    if itemsize == 4:
        u2 = np.dtype("<u2")
        low = _join(planes[0], planes[1], 8, u2)
        return _join(low, _join(planes[2], planes[3], 8, u2), 16, wdtype), finite, None
    out = planes[0].astype(wdtype)
    tmp = np.empty(m, wdtype)
    for j in range(1, itemsize):
        np.left_shift(planes[j], 8 * j, out=tmp, dtype=wdtype)
        np.bitwise_or(out, tmp, out=out)
    return out, finite, None


def _join(low: np.ndarray, high: np.ndarray, bits: int, wdtype: np.dtype) -> np.ndarray:
    """`high << bits | low` as a new array of `wdtype` (twice the width of the inputs)."""
    out = np.multiply(high, 1 << bits, dtype=wdtype)
    out += low
    return out


def regroup_bytes(acts: torch.Tensor) -> torch.Tensor:
    """`shuffle_bytes` of a tensor's little-endian bytes, computed on the tensor's own device
    (a producer's GPU regroups before the copy to the host, which then only compresses):
    [n, d] -> uint8 [n·d·itemsize], byte j of element i at j·n·d + i."""
    flat = acts.detach().contiguous().view(-1)
    return flat.view(torch.uint8).view(flat.numel(), flat.element_size()).t().contiguous().view(-1)


# ---------------------------------------------------------------------------------------------
# encode


def _words(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """The activations as a C-contiguous numpy array of unsigned words (no copy if possible).

    A producer's chunk is already a contiguous CPU tensor of the wire dtype: then one tensor
    call, not five. Each call lets go of the GIL and takes it back, and on a sending thread
    each taking back can make the model's thread wait (`bench_producer.py`'s GIL waits)."""
    t = acts
    if not (t.dtype is DTYPES[dtype] and t.device.type == "cpu" and not t.requires_grad
            and t.is_contiguous()):
        t = acts.detach().to(DTYPES[dtype])  # narrow first: less to copy off an accelerator
        t = t.cpu().contiguous()
    if dtype == "float32":
        return t.view(torch.int32).numpy().view(WORD_DTYPES[dtype])
    return t.view(torch.int16).numpy().view(WORD_DTYPES[dtype])


def encode_chunk(
    acts: torch.Tensor,
    *,
    producer: str,
    run: str,
    seq: int,
    model: str,
    hook: str,
    source: dict[str, Any],
    codec: str = DEFAULT_CODEC,
    dtype: str | None = None,
    ts: float | None = None,
    checksum: int | None = None,
    regrouped: torch.Tensor | np.ndarray | None = None,
) -> list[bytes]:
    """Encode `acts` (shape [n, d], any device) as the two frames `[header, payload]`.

    :param dtype: wire dtype name (a key of `DTYPES`); None = the tensor's own dtype, which
        must then be one of them. Values are converted (rounded) when they differ.
    :param source: provenance (corpus id, token offsets, ...): a map with str keys,
        msgpack-serialisable.
    :param ts: seconds since the epoch; None = now.
    :param checksum: `zlib.crc32` of the raw bytes when the caller has computed it already
        (a replayer that verified a recording): saves a pass over the data; not re-checked.
    :param regrouped: for `lz4-shuffle`, `regroup_bytes(acts)` already computed (on the
        device the activations came from), as a CPU uint8 tensor or array; not re-checked.
    Raises ValueError (or TypeError) on arguments that would make an invalid message.
    """
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise ValueError("acts must be a 2-D torch tensor [n, d]")
    n, d = (int(s) for s in acts.shape)
    if n < 1 or d < 1:
        raise ValueError(f"acts must have n >= 1 and d >= 1, got {n}x{d}")
    if dtype is None:
        names = {v: k for k, v in DTYPES.items()}
        if acts.dtype not in names:
            raise ValueError(f"unsupported tensor dtype {acts.dtype}; pass dtype=")
        dtype = names[acts.dtype]
    if dtype not in DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; one of {sorted(DTYPES)}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; one of {CODECS}")
    for name, value in (("producer", producer), ("run", run), ("model", model), ("hook", hook)):
        if type(value) is not str or not value or len(value) > MAX_STR_LEN:
            raise ValueError(f"{name} must be a non-empty str of at most {MAX_STR_LEN} chars")
    if type(seq) is not int or seq < 0:
        raise ValueError("seq must be an int >= 0")
    if not isinstance(source, Mapping):
        raise ValueError("source must be a map with str keys")
    try:
        check_source(dict(source), n)
    except WireError as exc:
        raise ValueError(str(exc)) from None
    ts = time.time() if ts is None else float(ts)
    if not math.isfinite(ts):
        raise ValueError("ts must be finite")

    words = _words(acts, dtype)
    raw = words.reshape(-1).view(np.uint8)
    itemsize = ITEMSIZE[dtype]
    if codec == "raw":
        payload = raw.tobytes()
    elif codec == "lz4":
        payload = lz4.frame.compress(raw, store_size=True)
    else:
        if regrouped is None:  # the crc32 on the way, where the kernels fold it
            planes, folded = _shuffle(raw, itemsize, crc=checksum is None)
            checksum = folded if folded is not None else checksum
        else:
            planes = regrouped
        if isinstance(planes, torch.Tensor):
            planes = planes.numpy()
        if planes.size != raw.size:
            raise ValueError(f"regrouped holds {planes.size} bytes, not {raw.size}")
        payload = lz4.frame.compress(planes, store_size=True)
    header = {
        "v": WIRE_VERSION,
        "kind": KIND,
        "producer": producer,
        "run": run,
        "seq": seq,
        "model": model,
        "hook": hook,
        "d": d,
        "n": n,
        "dtype": dtype,
        "codec": codec,
        "raw_nbytes": raw.size,
        "checksum": crc32(raw) if checksum is None else checksum,
        "source": dict(source),
        "ts": ts,
    }
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > DecodeLimits.max_header_nbytes:
        raise ValueError(f"header of {len(packed)} bytes: receivers accept at most "
                         f"{DecodeLimits.max_header_nbytes} (make `source` smaller)")
    return [packed, payload]


# ---------------------------------------------------------------------------------------------
# decode


def _buffer(frame: Any) -> memoryview:
    """A memoryview over a frame's bytes without copying (zmq.Frame, bytes, memoryview...)."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        buf = frame
    try:
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
    except (TypeError, ValueError) as exc:
        raise WireError("frames", f"frame of type {type(frame).__name__} is not bytes") from exc
    return mv


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass: not accepted


def _check_str(header: dict, key: str, max_len: int = MAX_STR_LEN) -> None:
    value = header[key]
    if type(value) is not str or not value or len(value) > max_len:
        raise WireError("field", f"{key} must be a non-empty str of at most {max_len} chars")


def _is_scalar(value: object) -> bool:
    """JSON-safe leaf: str, int, finite float, bool or None (never bytes or containers)."""
    if type(value) is float:
        return math.isfinite(value)
    return value is None or type(value) in (str, int, bool)


def check_source(source: Any, n: Any) -> None:
    """`source` reaches JSON files and logs: a flat, bounded map of JSON-safe values."""
    if type(source) is not dict or len(source) > MAX_SOURCE_KEYS:
        raise WireError("field", f"source must be a map of at most {MAX_SOURCE_KEYS} entries")
    for key, value in source.items():
        if type(key) is not str or len(key) > MAX_SOURCE_KEY_LEN:
            raise WireError("field", f"source keys must be str of at most {MAX_SOURCE_KEY_LEN}")
        if type(value) is list:
            if len(value) > MAX_SOURCE_LIST or not all(_is_scalar(v) for v in value):
                raise WireError("field", f"source[{key!r:.50}]: a list of scalars, at most "
                                f"{MAX_SOURCE_LIST}")
        elif not _is_scalar(value):
            raise WireError("field", f"source[{key!r:.50}] is a {type(value).__name__}, not a "
                            "str, int, finite float, bool, None or list of those")
    present = [k for k in POSITION_KEYS if k in source]
    if present:
        if len(present) != len(POSITION_KEYS) or not all(
            _is_int(source[k]) and 0 <= source[k] < 1 << 62 for k in POSITION_KEYS
        ):
            raise WireError("field", "source epoch/start/end: all three, ints >= 0")
        if _is_int(n) and source["end"] - source["start"] != n:
            raise WireError("field", f"source end - start = {source['end'] - source['start']}, "
                            f"but the chunk has n = {n} rows")


def _validate_header(header: Any, limits: DecodeLimits) -> dict[str, Any]:
    if type(header) is not dict:
        raise WireError("header", f"header is a msgpack {type(header).__name__}, not a map")
    if "v" not in header:
        raise WireError("version", "header has no version field `v`")
    if not _is_int(header["v"]) or header["v"] != WIRE_VERSION:
        raise WireError("version", f"version {header['v']!r} is not {WIRE_VERSION}")
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        raise WireError("field", f"missing field(s) {missing}")
    if len(header) != len(HEADER_FIELDS):
        unknown = [k for k in header if k not in HEADER_FIELDS]
        raise WireError("field", f"unknown field(s) {unknown!r:.200}")
    if type(header["kind"]) is not str or header["kind"] != KIND:
        raise WireError("field", f"kind {header['kind']!r:.50} is not {KIND!r}")
    for key in ("producer", "run", "model", "hook"):
        _check_str(header, key)
    for key in ("seq", "n", "d", "raw_nbytes", "checksum"):
        if not _is_int(header[key]):
            raise WireError("field", f"{key} must be an int")
    if header["seq"] < 0:
        raise WireError("field", "seq must be >= 0")
    if not 0 <= header["checksum"] < 1 << 32:
        raise WireError("field", "checksum must be a crc32 (0 <= checksum < 2**32)")
    check_source(header["source"], header["n"])
    ts = header["ts"]
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise WireError("field", "ts must be a finite number")
    if type(header["codec"]) is not str or header["codec"] not in CODECS:
        raise WireError("codec", f"unknown codec {header['codec']!r:.50}")
    if type(header["dtype"]) is not str or header["dtype"] not in DTYPES:
        raise WireError("field", f"unknown dtype {header['dtype']!r:.50}")
    n, d = header["n"], header["d"]
    if n < 1 or d < 1:
        raise WireError("field", f"n and d must be >= 1, got n={n} d={d}")
    if n > limits.max_n or d > limits.max_d:
        raise WireError("size", f"{n}x{d} beyond the caps {limits.max_n}x{limits.max_d}")
    expected = n * d * ITEMSIZE[header["dtype"]]
    if header["raw_nbytes"] != expected:
        raise WireError("size", f"raw_nbytes {header['raw_nbytes']} != n*d*itemsize {expected}")
    if expected > limits.max_raw_nbytes:
        raise WireError("size", f"{expected} raw bytes beyond the cap {limits.max_raw_nbytes}")
    return header


def _check_expected(
    header: dict[str, Any],
    expect_hook: Collection[str] | None,
    expect_d: int | Mapping[str, int] | None,
) -> None:
    hook, d = header["hook"], header["d"]
    if expect_hook is not None and hook not in expect_hook:
        raise WireError("hook", f"hook {hook!r:.100} is not expected")
    if expect_d is None:
        return
    if isinstance(expect_d, Mapping):
        if hook not in expect_d:
            raise WireError("hook", f"hook {hook!r:.100} is not expected")
        want = expect_d[hook]
    else:
        want = expect_d
    if d != want:
        raise WireError("dim", f"d={d} for hook {hook!r:.100}, expected {want}")


def _lz4_decompress(payload: memoryview, raw_nbytes: int) -> bytearray:
    """Decompress exactly one LZ4 frame that must hold exactly `raw_nbytes` bytes.

    The output is capped at raw_nbytes whatever the frame header claims, so a forged frame
    (a "decompression bomb") costs at most raw_nbytes of memory. Calls the C function
    directly: `LZ4FrameDecompressor.decompress` would first copy a memoryview into bytes.
    """
    context = lz4.frame.create_decompression_context()
    try:
        out, consumed, end_of_frame = lz4.frame.decompress_chunk(
            context, payload, max_length=raw_nbytes, return_bytearray=True  # writable, for torch
        )
    except Exception as exc:  # lz4 raises RuntimeError for corrupt frames
        raise WireError("codec", f"invalid LZ4 frame: {exc}") from exc
    if not end_of_frame:
        if consumed < payload.nbytes:
            raise WireError("size", f"payload decompresses to more than {raw_nbytes} bytes")
        raise WireError("codec", "truncated LZ4 frame")
    if consumed != payload.nbytes:
        raise WireError("codec", f"{payload.nbytes - consumed} bytes after the LZ4 frame")
    if len(out) != raw_nbytes:
        raise WireError("size", f"payload decompresses to {len(out)} bytes, not {raw_nbytes}")
    return out


def all_finite(words: np.ndarray, dtype: str) -> bool:
    """No inf/NaN. A value is non-finite iff its bits without the sign are >= the
    exponent-all-ones pattern E: a positive one is then >= E as a signed integer, a negative
    one >= sign | E as an unsigned one. So two max reductions decide it exactly, without the
    temporary of a mask (about twice as fast as masking in cache-sized blocks).
    """
    flat = words.reshape(-1)
    if flat.size == 0:
        return True
    limit = _EXP_MASK[dtype]
    return (int(flat.view(_SINT[dtype]).max()) < limit
            and int(flat.view(WORD_DTYPES[dtype]).max()) < (_SIGN[dtype] | limit))


def _top_plane_finite(top: np.ndarray, dtype: str) -> bool:
    """True proves every value finite from the plane of most significant bytes alone (half or
    a quarter of the bytes, read before the words exist); False means "look closer": a byte
    with every exponent bit it holds set, which for bfloat16 and float32 also includes the
    finite values of the largest binade (e.g. the largest finite value). The same signed /
    unsigned max trick as `all_finite`, on bytes."""
    limit = _TOP_EXP[dtype]
    return int(top.view(np.int8).max()) < limit and int(top.max()) < (0x80 | limit)


def decode_chunk(
    frames: Sequence[Any],
    *,
    limits: DecodeLimits = DecodeLimits(),  # frozen, so a shared default is safe
    expect_hook: Collection[str] | None = None,
    expect_d: int | Mapping[str, int] | None = None,
) -> Chunk:
    """Validate and decode `[header, payload]` (bytes, memoryview or zmq.Frame each).

    :param expect_hook: hooks this receiver accepts (None = any).
    :param expect_d: the width every chunk must have, or a width per hook (None = any); with
        a mapping, a hook missing from it is rejected as `hook`.
    Raises WireError with a reason from REJECT_REASONS; never anything else.
    """
    try:
        n_frames = len(frames)
    except TypeError as exc:
        raise WireError("frames", "message is not a sequence of frames") from exc
    if n_frames != 2:
        raise WireError("frames", f"{n_frames} frames, expected 2 [header, payload]")
    try:
        head, body = frames[0], frames[1]
    except Exception as exc:  # a mapping or other odd container of the right length
        raise WireError("frames", "message frames cannot be indexed") from exc
    head_buf, payload = _buffer(head), _buffer(body)
    if head_buf.nbytes > limits.max_header_nbytes:
        raise WireError("header", f"header of {head_buf.nbytes} bytes is too large")
    try:
        header = msgpack.unpackb(head_buf, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise WireError("header", f"header is not msgpack: {type(exc).__name__}") from exc
    header = _validate_header(header, limits)
    _check_expected(header, expect_hook, expect_d)

    dtype, codec, raw_nbytes = header["dtype"], header["codec"], header["raw_nbytes"]
    itemsize = ITEMSIZE[dtype]
    wdtype = WORD_DTYPES[dtype]
    finite = False  # not yet known
    folded: int | None = None  # the words' crc32, where the regrouping pass computed it
    if codec == "raw":
        if payload.nbytes != raw_nbytes:
            raise WireError("size", f"raw payload of {payload.nbytes} bytes, not {raw_nbytes}")
        words = np.frombuffer(payload, wdtype)
        # Zero-copy over a received zmq.Frame (writable memory). torch cannot represent
        # read-only memory (bytes from recv(copy=True)), nor do all kernels like misaligned data.
        if payload.readonly or not words.flags.aligned:
            words = words.copy()
    elif codec == "lz4":
        words = np.frombuffer(_lz4_decompress(payload, raw_nbytes), wdtype)
    else:
        # Finiteness from the top plane (one byte per value, read as the planes are joined):
        # almost always that settles it, and the words need no pass of their own. The crc32
        # too, where the kernels fold it: inside the same C call, block by block while each
        # block of words is in L1 (a whole-array call from Python per block would only add
        # per-call overhead).
        words, finite, folded = _unshuffle(_lz4_decompress(payload, raw_nbytes), itemsize,
                                           dtype, crc=True)

    checksum = folded if folded is not None else crc32(words)
    if checksum != header["checksum"]:
        raise WireError("checksum", f"crc32 {checksum:#010x} != header {header['checksum']:#010x}")
    if not (finite or all_finite(words, dtype)):
        raise WireError("nonfinite", "activations contain inf or NaN")

    signed = torch.from_numpy(words.view(np.int32 if itemsize == 4 else np.int16))
    acts = signed.view(DTYPES[dtype]).view(header["n"], header["d"])
    return Chunk(header=header, acts=acts, wire_nbytes=head_buf.nbytes + payload.nbytes)
