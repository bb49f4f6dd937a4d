"""What a producer is configured with: one `ProducerConfig` field per `saestream producer`
flag, each with its default and its help text (the CLI is derived from these fields)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from saestream.common.devices import MAX_THREADS
from saestream.common.errors import UserError
from saestream.common.settings import MAX_COUNT, ranged
from saestream.common.transport import DEFAULT_HWM, MAX_HWM, CurveClientKeys
from saestream.common.wire import MAX_STR_LEN

EMBEDDED_MODEL = "smollm2-135m"
DEFAULT_CONNECT = "tcp://127.0.0.1:5557"
MAX_ENCODE_THREADS = 64
"""Most encode threads: each may hold two chunks in flight, so the count bounds memory."""
MAX_SEED = 2**64 - 1
"""Largest seed: torch.manual_seed takes a uint64 (numpy's generator any int >= 0)."""
MAX_LINGER = 86_400.0

MAX_QUEUE = 1024
"""Longest --linger, in seconds (a day): it becomes ZeroMQ's int32 LINGER in ms (at most
~24.8 days: common.transport.MAX_LINGER_MS), and a drain longer than a day is a hang."""


def check_producer_id(value: str) -> None:
    """UserError unless `value` can be a producer id: every header carries it (at most
    MAX_STR_LEN characters), and logs and metric labels show it (no control characters: a
    newline split a log line in two)."""
    if len(value) > MAX_STR_LEN:
        raise UserError(f"--producer-id: at most {MAX_STR_LEN} characters, not {len(value)}")
    if not value.isprintable():
        raise UserError(f"--producer-id {value!r}: holds a control character (a newline, a "
                        "tab, an escape)")


@dataclass
class ProducerConfig:
    """One field per `saestream producer` flag (see README, section producer)."""

    model: str = EMBEDDED_MODEL
    """smollm2-135m (embedded), tiny (random test Llama), random:CONFIG.json, a model
    directory, or a Hugging Face hub id already in the local cache."""
    hooks: Sequence[str] = ()
    """Module path to capture, e.g. model.layers.20 (repeatable). Default: block
    round(2/3 * n_layers)."""
    corpus: str = "wiki-sample"
    """text:PATH_OR_GLOB, tokens:PATH[.npy|.bin][:uint16|:uint32], wiki-sample,
    synthetic[:N_CONTEXTS]."""
    split: str = "train"
    """Part of the corpus to stream: train, eval (every 10th document held out for
    evaluation) or all."""
    connect: Sequence[str] = (DEFAULT_CONNECT,)
    """Consumer endpoint to PUSH to (repeatable; chunks are dealt round-robin among the
    connected ones)."""
    control_connect: Sequence[str] = ()
    """Consumer control endpoint to ask where to continue (repeatable); default: each
    --connect endpoint's port + 1; `off`: never ask (the state file alone says where)."""
    chunk_tokens: int = 2048
    """Token rows per message (the last chunk of a run or epoch, or one cut short by a
    skipped context, may have fewer)."""
    wire_dtype: str = "bfloat16"
    """Dtype on the wire: bfloat16, float16 or float32."""
    codec: str = "lz4-shuffle"
    """Payload codec: raw, lz4 or lz4-shuffle."""
    batch_size: int = ranged(8, 1, 1 << 20)
    """Contexts per forward pass."""
    seq_len: int = 128
    """Tokens per context (2-D .npy corpora bring their own); at most the model's maximum
    positions."""
    shard: str = "0/1"
    """I/N: read the contexts i with i mod N == I."""
    producer_id: str | None = None
    """Id sent in every header and known to the consumer's ledger; default: the one in
    --state-file, else HOST-PID (then saved there)."""
    epochs: int = ranged(0, 0, MAX_COUNT)
    """Passes over the shard; 0 = endless."""
    max_tokens: int = ranged(0, 0, MAX_COUNT)
    """Send exactly N tokens per hook, wait until the consumer holds them, exit 0;
    0 = no limit."""
    state_file: Path | None = None
    """Progress file: read on start (resume), written on exit and periodically."""
    state_every: float = 30.0
    """Seconds between state-file writes while running."""
    metrics_port: int = 0
    """Prometheus /metrics port; 0 = off."""
    metrics_addr: str = "127.0.0.1"
    """Address /metrics listens on (0.0.0.0 for a scraper on another host)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    model_dtype: str = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU."""
    keep_first_token: bool = False
    """Also send position 0 of each context (dropped by default: outlier norm)."""
    seed: int = ranged(0, 0, MAX_SEED)
    """Seed of random models and the synthetic corpus."""
    curve: CurveClientKeys | None = None
    """CURVE client keys; None = plaintext."""
    cache_dir: Path | None = None
    """Where the dequantised smollm2-135m copy is cached [default: $SAESTREAM_CACHE/models
    or ~/.cache/saestream/models]."""
    token_dtype: str = "uint16"
    """Element type of tokens:FILE.bin corpora."""
    threads: int = ranged(0, 0, MAX_THREADS)  # as $SAESTREAM_THREADS; 99999 crashed OpenMP
    """torch CPU threads; 0 = $SAESTREAM_THREADS or torch's default."""
    queue_size: int = ranged(8, 1, MAX_QUEUE)
    """Chunks queued for the sending thread before the model loop blocks (at most 1,024: the
    queue holds whole chunks, and backpressure is its point)."""
    encode_threads: int = 0
    """Threads encoding chunks (lz4 and crc32 release the GIL); messages still go out in
    sequence order. 0 = half the CPUs this process may use, 1 to 4; at most
    64."""
    hwm: int = ranged(DEFAULT_HWM, 1, MAX_HWM)
    """ZeroMQ send high-water mark (messages per consumer)."""
    linger: float = ranged(5.0, 0.0, MAX_LINGER)
    """Seconds allowed after SIGTERM/SIGINT to send what is queued, at most 86400."""
    extra_source: dict = field(default_factory=dict)
    """More provenance to put in every header's `source` (library use)."""
